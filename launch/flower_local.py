r"""A whole Flower federation on this machine: the config's federated run over one SuperNode
per participant (the `flower` extra), insecure on localhost.

  python -m launch.flower_local --config=configs/default.py --workdir=runs/flower

Builds the data (WORKDIR/data, or config.data.data_dir) if needed, gives each node a data
folder of its own participant only (WORKDIR/nodes/ORG/data), starts a SuperLink and the
SuperNodes (logs in WORKDIR/flower/logs), runs the server on WORKDIR/run (its log in
WORKDIR/run/server.log; a run folder as
launch.train leaves) and stops every process it started. Run again to resume.
"""

import os

from absl import app
from absl import flags
from ml_collections import config_flags

from launch import common

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Federation folder (resumed if it exists).')
flags.mark_flags_as_required(['config', 'workdir'])


def federate(config, workdir: str) -> tuple:
  """Runs config's federated training over local SuperNodes: (run folder, data folder)."""
  from collab.data import build  # pylint: disable=g-import-not-at-top
  from collab.flower import local  # pylint: disable=g-import-not-at-top
  from collab.flower import server  # pylint: disable=g-import-not-at-top
  from collab.settings import run  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config.setting = 'federated'
  server.check_config(config)
  data_dir = run.data_dir_of(config, workdir)
  build.build_data(config.data, data_dir)
  rundir = os.path.join(workdir, 'run')
  os.makedirs(rundir, exist_ok=True)
  run.claim_workdir(rundir, config)
  with local.Federation(os.path.join(workdir, 'flower')) as fed:
    fed.start_superlink()
    for org in run.participant_names(config):
      node_dir = os.path.join(workdir, 'nodes', org)
      fed.start_node(org, local.node_data(data_dir, org, os.path.join(node_dir, 'data')),
                     os.path.join(node_dir, 'state'))
    try:
      fed.run(rundir)
    except local.RunFailed as e:
      raise ValueError(str(e)) from None
  return rundir, data_dir


def main(argv):
  del argv
  rundir, data_dir = common.run_or_exit('launch.flower_local',
                                        lambda: federate(_CONFIG.value, _WORKDIR.value))
  print(f'done: federated over Flower in {rundir}; evaluate it with python -m '
        f'launch.evaluate --config=... --config.setting=federated --workdir={rundir} '
        f'--config.data.data_dir={data_dir}')


if __name__ == '__main__':
  app.run(main, flags_parser=common.parse_flags('launch.flower_local'))
