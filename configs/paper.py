"""Paper scale: GPT-2 124M, context 1024, PROTOCOL.md hyperparameters, for GPUs and TPU pods.

  python -m launch.study --config=configs/paper.py:/data/artifact --workdir=runs/paper

The argument is a checkout of the paper's artifact (its Git LFS files pulled), laid out as
released: `dataset/{org}/{org}_train.json.gz` and `{org}_valid.json.gz` for org in google,
microsoft, facebook (gzipped JSON lines without `path`: repo_name, copies, size, content,
license, hash, the cleaning's statistics and flags), and `prompts/{org}_prompts.csv`
(function id, signature with docstring, function body). collab reads them as released:
  - the paper's split: each org's train file is its training data, its valid file its
    validation data (data.split = 'given'), never pooled and re-split;
  - the release is already cleaned, so its random filters' flags are trusted (no second
    0.7 draw on config/test and keyword-less files), and so is its `ratio` for filter 5
    (characters per token by the paper's tokenizer, not recounted with our BPE, under which
    a kept file can fall below 1.5); the other deterministic filters run and the data card
    counts what they drop (nothing, on the release);
  - memorization prompts are the released ones, at their original indentation; the
    results also report how often a sample reproduces the released function body.
Files are named by the release's `hash` (they have no path), so federated clients by
'directories' are refused; 'repositories' work. Without the argument the three default
participants are used at full size, split and prompted as in the default study. Add
`--multihost` on pods (one process per host); `parallel.mesh` shards data over every
device by default.
"""

import os

from configs import common

PAPER_ORGS = ('google', 'microsoft', 'facebook')


def release_participant(root: str, org: str):
  """One organization of the artifact at `root`, read as released (see the docstring)."""
  train, valid = (f'jsonl:{os.path.join(root, "dataset", org, f"{org}_{side}.json.gz")}'
                  for side in ('train', 'valid'))
  p = common.participant(org, (train, valid))
  p.valid_sources = (valid,)  # With data.split='given': these files are the validation side.
  # The release's flags stand for the random filters' draw (already made), and its ratio
  # (characters per token of the paper's GPT-2 tokenizer) for filter 5; see clean.py.
  p.trusted_flags = ('config_or_test', 'has_no_keywords', 'ratio')
  return p


def get_config(arg=None):
  """`arg`: a checkout of the paper's artifact (see the docstring), or empty for the defaults."""
  c = common.base_config('gpt2')  # 12 layers, 12 heads, d_model 768, 1024 positions.
  # Released prompts CSV per participant ('{participant}' is filled in); '': collab's own
  # prompts, every documented function of the training files.
  c.eval.memorization.prompts_csv = ''
  # True: prompts keep their original indentation (the paper's); False: dedented.
  c.eval.memorization.keep_indent = False
  if arg:
    c.data.participants = [release_participant(arg, o) for o in PAPER_ORGS]
    c.data.split = 'given'  # The release's own train/valid files (PROTOCOL: the paper's split).
    c.eval.memorization.prompts_csv = os.path.join(arg, 'prompts', '{participant}_prompts.csv')
    c.eval.memorization.keep_indent = True
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
  # k-extractability on Carlini et al.'s context axis, k in {50, 100, 200, 500} and m = 50
  # (configs/common.py), over a seeded 2,000 blocks per participant and split: a 95% CI
  # of at most +-2.2 points, one batched greedy call per k.
  c.eval.extractability.max_blocks = 2000
  c.eval.fit.max_blocks = 2000  # Fit of every model (snapshots too) on as many blocks.
  # Snapshots of every run for memorization against fit, and (n, p)-extraction.
  c.study.snapshot_runs = ('all',)
  c.eval.extractability.samples = 8
  return c


def sweep(add):
  """Server optimizers and local work per round, for the federated setting."""
  for opt in ('fedavg', 'fedyogi', 'fedadam'):
    for local in (1.0, 2.0):
      add(**{'setting': 'federated', 'federated.server_optimizer': opt,
             'federated.local_epochs': local})
