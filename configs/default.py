"""The default study: three real organizations' code, sized for 2 CPU cores (`make study`).

Google (jax, flax, optax, ...), Hugging Face (transformers, tokenizers, ...) and Python
(the standard library): their code ships with collab's own dependencies, so this runs
offline right after install. Every setting of PROTOCOL.md is run (single x3, centralized,
federated with FedAvg and FedYogi, incremental in all 6 orders) with PROTOCOL's recipe
scaled down: a 1.5M-parameter GPT-2, a small vocabulary, and a few epochs over a capped
sample of each organization's code. Derived numbers (steps, rounds, warmup caps) are
computed from the data at run time.

  python -m launch.study --config=configs/default.py --workdir=runs/default
"""

from configs import common

# Cleaned bytes kept per participant (a seeded subsample of its files, 80/20 split after).
MAX_BYTES_PER_PARTICIPANT = 80_000
# Passes over each participant's data per setting (PROTOCOL: 10): a small sample seen
# often, so that a 1.5M-parameter model has something to memorize within minutes.
EPOCHS = 8.0


def get_config(arg=None):
  """The embedded CPU study; `arg` is unused."""
  del arg
  c = common.base_config('tiny')  # 2 layers, 4 heads, d_model 128, 256-token context.
  c.data.participants = common.default_participants(MAX_BYTES_PER_PARTICIPANT)
  c.data.max_file_bytes = 8_000  # Small files: more of them, and more repositories, per cap.
  c.data.tokenizer.vocab_size = 2048  # Small vocabulary: the output layer dominates at d=128.
  c.train.batch_size = 16  # 16 blocks of 256 tokens: 4096 tokens per step.
  c.train.epochs = EPOCHS  # Centralized: epochs over the pooled data; single: over one.
  c.train.learning_rate = 2e-3  # A 1.5M model trains stably at a higher peak than 124M.
  c.train.warmup_steps = 20  # PROTOCOL's 2000 would exceed these runs; capped anyway.
  c.train.log_every = 5  # Steps between metrics.jsonl lines.
  c.train.checkpoint_every = 50  # Steps between checkpoints (and one at the end).
  c.federated.rounds = 4  # Communication rounds (PROTOCOL: 10).
  c.federated.local_epochs = EPOCHS / 4  # Rounds x local epochs = EPOCHS per client.
  c.eval.batch_size = 160  # Rows per compiled sampling batch.
  c.eval.passk.num_problems = 16  # The first 16 HumanEval problems.
  c.eval.passk.n = 10  # Samples per problem: pass@1 and pass@10 (PROTOCOL: n = 200).
  c.eval.passk.ks = (1, 10)
  c.eval.passk.max_new_tokens = 48  # Enough for short HumanEval bodies.
  c.eval.memorization.max_prompts = 6  # Docstring prompts per participant (seeded sample).
  # New tokens per sample (PROTOCOL: 512); a 6-line clone needs ~60-100 tokens of code.
  c.eval.memorization.max_new_tokens = 128
  return c
