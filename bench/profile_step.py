"""Where the CPU train step spends its time: XLA's thunks by kind, and every matrix product
with its shape and FLOP/s.

Builds the same jitted `steps.train_step` as bench/train_step.py (same model sizes,
vocabulary, batch, dropout 0.1, AdamW), traces `--steps` steps with `jax.profiler`, sums
the trace's events per XLA instruction, and joins them with the compiled HLO: each
product's (`dot`, or a fusion around one, e.g. YNNPACK's `ynn_fusion`) output and operand
shapes, contracting size, FLOPs and achieved GFLOP/s, and the jax operation it came from
(`op_name`, e.g. `h_0/mlp/nd,df->nf`). Times are per step; products inside loops (a
chunked loss) are summed over their iterations. Use it to see which shapes run far below
a plain square product (bench/train_step.py's matmul reference) on the machine at hand.

  python -m bench.profile_step [--size=small] [--vocab=8192] [--batch=16]
      [--loss_chunk=0] [--profile_steps=3] [--top=20]
"""

import glob
import tempfile

from absl import app
from absl import flags
import jax
import numpy as np

from bench import hlo_profile
from bench import record
from bench import train_step as train_bench
from collab import host
from configs import common

FLAGS = flags.FLAGS  # --vocab, --batch, --loss_chunk: bench/train_step.py's.
_SIZE = flags.DEFINE_string('size', 'small', 'Model size (configs/common.py).')
_PROFILE_STEPS = flags.DEFINE_integer('profile_steps', 3, 'Traced steps (after a warm-up).')
_TOP = flags.DEFINE_integer('top', 20, 'Rows of the products table.')


def main(argv):
  del argv
  config = train_bench.model_config(_SIZE.value, FLAGS.vocab)  # With --loss_chunk.
  tokens_BxL = np.random.default_rng(0).integers(0, config.vocab_size,
                                                 (FLAGS.batch, config.max_len))
  side = train_bench.collab_side(config, common.train_config(), tokens_BxL)
  side.run(2)  # Compilation and allocation, untraced.
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      side.run(_PROFILE_STEPS.value)
    trace, = glob.glob(f'{tmp}/**/*.xplane.pb', recursive=True)
    profile = jax.profiler.ProfileData.from_file(trace)
    times, runs = hlo_profile.thunk_ms(profile, _PROFILE_STEPS.value)
  print(f'{_SIZE.value}, vocabulary {config.vocab_size}, batch {FLAGS.batch} x '
        f'{config.max_len}, loss_chunk {config.loss_chunk}, dropout {config.dropout}. '
        f'{record.machine("")}\n')
  print(hlo_profile.tables(times, runs, hlo_profile.products(side.hlo()), _TOP.value))


if __name__ == '__main__':
  host.use_hugepages()  # As the launchers do (collab/host.py; COLLAB_HUGEPAGES=0: not).
  app.run(main)
