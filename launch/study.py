r"""Runs a whole study and prints its tables.

  python -m launch.study --config=configs/default.py --workdir=runs/default

Builds the participants' data once, trains every run of config.study that is not done
(resuming interrupted ones), evaluates them, runs the cross-organization analysis, then
writes tables/ and figures/ with the analysis scripts and prints the tables. Running it
again on a finished study only re-prints the tables.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from launch import common

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Study config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Study folder (resumed if it exists).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  from analysis import tables
  from collab import study
  config, workdir = _CONFIG.value, _WORKDIR.value
  common.run_or_exit('launch.study', lambda: study.run_study(config, workdir))
  print(tables.write_tables(workdir))
  if config.study.figures:
    from analysis import plots
    for path in plots.write_figures(workdir):
      print(f'figure: {path}')


if __name__ == '__main__':
  app.run(main, flags_parser=common.parse_flags('launch.study'))
