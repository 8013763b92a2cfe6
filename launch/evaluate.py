r"""Evaluates a trained run into WORKDIR/results.json.

  python -m launch.evaluate --config=configs/default.py --workdir=DIR

Every evaluator of collab/evals/evaluators.py (fit, pass@k in the sandbox,
k-extractability, the clone audit, extraction ranking, canaries, membership), as
config.eval says, on the final model, the best one (config.eval.models) and each
snapshot (config.eval.snapshot_evals). Parts already computed are kept, so an
interrupted evaluation resumes.
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
