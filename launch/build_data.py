"""Builds the participants' data folder and prints its card.

  python -m launch.build_data --config=configs/default.py --data_dir=DIR
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from collab.data import build
from launch import common

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/X.py[:arg]).',
                                          lock_config=True)
_DATA_DIR = flags.DEFINE_string('data_dir', None,
                                'Where to build the data; defaults to config.data.data_dir.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cfg = _CONFIG.value
  if cfg is None:
    common.fail('launch.build_data', '--config is required, e.g. --config=configs/default.py.')
  data_dir = _DATA_DIR.value or cfg.data.data_dir
  if not data_dir:
    common.fail('launch.build_data', 'give --data_dir=DIR (or set config.data.data_dir).')
  card = common.run_or_exit('launch.build_data', lambda: build.build_data(cfg.data, data_dir))
  print(build.format_card(card))
  print(f'\nData folder: {data_dir}')


if __name__ == '__main__':
  app.run(main, flags_parser=common.parse_flags('launch.build_data'))
