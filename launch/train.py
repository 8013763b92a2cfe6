r"""Trains one run: python -m launch.train --config=configs/default.py --workdir=DIR.

  --config.setting=single|centralized|federated|incremental (single: --config.single=NAME)
  --config.data.data_dir=DIR  (default WORKDIR/data, built by launch.build_data)
  --multihost                 start jax.distributed first (pods, SLURM, several processes)
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from launch import common

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder (resumed if it exists).')
_MULTIHOST = flags.DEFINE_bool('multihost', False, 'Initialise jax.distributed first '
                               '(coordinator and process ids from the environment).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  config = _CONFIG.value
  if _MULTIHOST.value or config.parallel.multihost:
    from collab import parallel
    parallel.start_multihost()
  from collab import train  # After jax.distributed: nothing may touch devices before.
  summary = common.run_or_exit('launch.train', lambda: train.train(config, _WORKDIR.value))
  print(f"done: {summary['setting']} in {_WORKDIR.value}, pooled validation perplexity "
        f"{summary['valid']['pooled']['perplexity']:.2f}")


if __name__ == '__main__':
  app.run(main, flags_parser=common.parse_flags('launch.train'))
