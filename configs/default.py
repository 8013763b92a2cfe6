"""The default study: three real organizations' code, small enough for 2 CPU cores.

Google (jax, flax, optax, ...), Hugging Face (transformers, tokenizers, ...) and Python
(the standard library): their code ships with collab's own dependencies, so this runs
offline right after install. Everything else follows PROTOCOL.md via common.base_config.

  python -m launch.build_data --config=configs/default.py --data_dir=/tmp/collab_data
"""

from configs import common

# Cleaned bytes kept per participant (a seeded subsample): ~0.4M tokens each, so building
# all three takes seconds and ten epochs of the tiny model fit a CPU.
MAX_BYTES_PER_PARTICIPANT = 1_500_000


def get_config(arg=None):
  """The embedded CPU study; `arg` is unused for now."""
  del arg
  c = common.base_config('tiny')  # 2 layers, 4 heads, d_model 128, 256-token context.
  # The three default organizations, each capped to MAX_BYTES_PER_PARTICIPANT.
  c.data.participants = common.default_participants(MAX_BYTES_PER_PARTICIPANT)
  c.train.batch_size = 16  # 16 blocks of 256 tokens: 4096 tokens per step.
  # Runs here last ~0.7-2.3k steps (10 epochs), so PROTOCOL's 2000 warmup steps would be
  # most of the run; 100 keeps the cosine schedule meaningful.
  c.train.warmup_steps = 100
  c.train.log_every = 20  # Steps between metrics.jsonl lines.
  c.train.checkpoint_every = 500  # Steps between checkpoints (and one at the end).
  return c
