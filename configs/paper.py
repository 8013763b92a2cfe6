"""Paper scale: GPT-2 124M, context 1024, PROTOCOL.md hyperparameters, for GPUs and TPU pods.

  python -m launch.study --config=configs/paper.py:/data/paper --workdir=runs/paper

The argument is a folder holding the paper's released data, `{org}_train.json.gz` and
`{org}_valid.json.gz` for org in google, microsoft, facebook (gzipped JSON lines:
repo_name, path, content, license); collab pools each org's two files and re-splits them
80/20 with seed 1 after cleaning. Without it the three default participants are used
at full size. Add
`--multihost` on pods (one process per host); `parallel.mesh` shards data over every
device by default.
"""

import os

from configs import common

PAPER_ORGS = ('google', 'microsoft', 'facebook')


def get_config(arg=None):
  """`arg`: a folder with the paper's {org}_train.json.gz files, or empty for the defaults."""
  c = common.base_config('gpt2')  # 12 layers, 12 heads, d_model 768, 1024 positions.
  if arg:
    c.data.participants = [common.participant(o, tuple(
        f'jsonl:{os.path.join(arg, f"{o}_{split}.json.gz")}' for split in ('train', 'valid')))
        for o in PAPER_ORGS]
  c.data.tokenizer.vocab_size = 50257  # A GPT-2-sized BPE trained on the training splits.
  c.data.tokenizer.max_bytes = 200_000_000  # BPE training text cap.
  c.model.dtype = 'bfloat16'  # Compute in bfloat16 on accelerators; parameters stay float32.
  c.train.batch_size = 32  # Global batch of 1024-token blocks (the artifact: 8 per device x 4).
  c.train.epochs = 10.0  # PROTOCOL: 10 epochs (centralized); the rest follow from it.
  c.train.checkpoint_every = 1000  # Steps between checkpoints.
  c.train.log_every = 50  # Steps between metrics lines.
  c.train.eval_every = 5000  # Steps between validation passes.
  c.train.eval_batch_size = 64  # Blocks per evaluation batch.
  c.federated.rounds = 10  # PROTOCOL: 10 rounds.
  c.federated.local_epochs = 1.0  # Ours: 1 pass per round (the artifact's 2 came from an off-by-one).
  c.eval.batch_size = 256  # Rows per compiled sampling batch.
  c.eval.passk.num_problems = 0  # All 164 HumanEval problems.
  c.eval.passk.n = 200  # PROTOCOL: 200 samples per problem, k in {1, 10, 100}.
  c.eval.memorization.max_prompts = 0  # Every documented function of the training data.
  return c


def sweep(add):
  """Server optimizers and local work per round, for the federated setting."""
  for opt in ('fedavg', 'fedyogi', 'fedadam'):
    for local in (1.0, 2.0):
      add(**{'setting': 'federated', 'federated.server_optimizer': opt,
             'federated.local_epochs': local})
