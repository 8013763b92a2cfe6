r"""Runs a config's federated training over Flower SuperNodes (the `flower` extra).

  python -m launch.flower_server --config=configs/default.py --workdir=runs/flower \
      --superlink=SUPERLINK_HOST:8000 [--root_certificates=ca.crt]

Run it on the SuperLink's machine: the SuperLink starts collab's ServerApp there, which
reads and writes WORKDIR (the resolved config, checkpoints, metrics.jsonl, final/,
train.json: the usual run folder, so launch.evaluate and analysis.tables read it).
Waits for the run's end; a node that is refused or lost ends it with an error naming
the node, and running the same command again resumes from the last completed round.
Without --root_certificates the connection is insecure (localhost only).
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from launch import common

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder (resumed if it exists).')
_SUPERLINK = flags.DEFINE_string('superlink', '127.0.0.1:8000',
                                 'The SuperLink\'s address (its --host and --port).')
_ROOT_CERTIFICATES = flags.DEFINE_string(
    'root_certificates', '', 'CA certificate (PEM) of the SuperLink\'s TLS certificate; '
    'empty: insecure.')
flags.mark_flags_as_required(['config', 'workdir'])


def serve(config, workdir: str) -> None:
  import os  # pylint: disable=g-import-not-at-top
  from collab.flower import local  # pylint: disable=g-import-not-at-top
  from collab.flower import server  # pylint: disable=g-import-not-at-top
  from collab.settings import run  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config.setting = 'federated'
  server.check_config(config)
  os.makedirs(workdir, exist_ok=True)
  run.claim_workdir(workdir, config)  # The ServerApp reads it from here.
  env = local.cli_env(os.path.join(workdir, 'flwr-home'), _SUPERLINK.value,
                      _ROOT_CERTIFICATES.value)
  try:
    local.run_app(env, workdir)
  except local.RunFailed as e:
    raise ValueError(str(e)) from None


def main(argv):
  del argv
  common.run_or_exit('launch.flower_server', lambda: serve(_CONFIG.value, _WORKDIR.value))
  print(f'done: federated (Flower) in {_WORKDIR.value}; evaluate it with python -m '
        f'launch.evaluate --config=... --workdir={_WORKDIR.value}')


if __name__ == '__main__':
  app.run(main, flags_parser=common.parse_flags('launch.flower_server'))
