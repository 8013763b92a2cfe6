r"""Evaluates a trained run into WORKDIR/results.json.

  python -m launch.evaluate --config=configs/default.py --workdir=DIR

Perplexity (from training's final evaluation), pass@k on HumanEval in the sandbox, and
the memorization audit per participant, as config.eval says. Parts already computed
are kept, so an interrupted evaluation resumes.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from launch import common

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'A finished run folder.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  from collab import evaluate
  results = common.run_or_exit(
      'launch.evaluate', lambda: evaluate.evaluate_run(_CONFIG.value, _WORKDIR.value))
  print(f"results: {_WORKDIR.value}/results.json (pooled perplexity "
        f"{results['perplexity']['pooled']:.2f})")


if __name__ == '__main__':
  app.run(main, flags_parser=common.parse_flags('launch.evaluate'))
