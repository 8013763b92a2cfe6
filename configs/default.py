"""The default study: three organizations that share code, sized to memorize on 2 CPU cores.

PSF (requests, the standard library), PyPA (pip's vendored requests, tomli and rich, and
packaging) and Textualize (rich) each contribute a few documented modules of their real
code. The 20 files ship with the repository (configs/corpus/default: copies of pinned
releases with their licences; configs/common.py DEFAULT_PARTICIPANTS), so this runs
offline and builds the same data whatever versions are installed. The copies they share
are real cross-organization clones. Every setting of PROTOCOL.md is run (single x3,
centralized, federated FedAvg, incremental in all 6 orders) with PROTOCOL's recipe
scaled down: a 0.7M-parameter GPT-2 (2048-token vocabulary), no dropout, and many passes
over little data. That is the memorization regime at this scale: models trained far past
their best validation perplexity (README says where it was best), not the paper's 10
epochs.

  python -m launch.study --config=configs/default.py --workdir=runs/default
"""

from configs import common

# Passes over each participant's data per setting (PROTOCOL: 10). A 0.7M-parameter model
# emits 6-line spans of its training code under PROTOCOL's prompts only once it has
# nearly memorized them.
EPOCHS = 32.0
ROUNDS = 8  # Federated communication rounds (PROTOCOL: 10).


def get_config(arg=None):
  """The embedded CPU study; `arg` is unused."""
  del arg
  c = common.base_config('tiny')  # 2 layers, 4 heads, d_model 128, 256-token context.
  c.data.participants = common.default_participants()  # Small by choice: no byte cap.
  c.data.max_file_bytes = 16_000  # The chosen modules are all smaller.
  c.data.tokenizer.vocab_size = 2048  # Small vocabulary: the output layer dominates at d=128.
  c.model.dropout = 0.0  # Memorization is the subject; dropout only slows it (and the step).
  c.train.batch_size = 4  # 4 blocks of 256 tokens: many updates per pass over little data.
  c.train.epochs = EPOCHS  # Centralized: epochs over the pooled data; single: over one.
  c.train.learning_rate = 3e-3  # Best of 3e-3, 6e-3, 1.2e-2 for memorizing at this size.
  c.train.warmup_steps = 20  # PROTOCOL's 2000 would exceed these runs; capped anyway.
  c.train.log_every = 10  # Steps between metrics.jsonl lines.
  c.train.eval_every = 25  # Validation perplexity during training: where it was best.
  # 6-10 validation blocks per organization: a batch of 32 would be three-quarters
  # padding, and the study validates ~130 times.
  c.train.eval_batch_size = 8
  c.train.checkpoint_every = 200  # Steps between checkpoints (and one at the end).
  c.federated.rounds = ROUNDS
  c.federated.local_epochs = EPOCHS / ROUNDS  # Rounds x local epochs = EPOCHS per client.
  c.federated.eval_every = 1  # Rounds between validation passes.
  c.eval.batch_size = 160  # Rows per compiled sampling batch.
  c.eval.passk.num_problems = 8  # The first 8 HumanEval problems: 0 at this scale anyway.
  c.eval.passk.n = 5  # Samples per problem: pass@1 and pass@5 (PROTOCOL: n = 200).
  c.eval.passk.ks = (1, 5)
  c.eval.passk.max_new_tokens = 48  # Enough for short HumanEval bodies.
  # Documented functions per participant (a seeded sample; each has 17-24) and PROTOCOL's
  # 5 samples per prompt: 60 samples per participant, a CI of +-14 points at most. The
  # clone audit runs on every final and best model and on the centralized and FedAvg
  # snapshots; k-extractability (below) is the primary measure.
  c.eval.memorization.max_prompts = 12
  c.eval.memorization.samples_per_prompt = 5
  # New tokens per sample (PROTOCOL: 512); a 6-line clone needs ~60-100 tokens of code.
  c.eval.memorization.max_new_tokens = 128
  c.eval.memorization.unprompted_samples = 50  # The extraction protocol runs too.
  # FedAvg only; --config.study.server_optimizers="('fedavg','fedyogi')" adds FedYogi.
  c.study.server_optimizers = ('fedavg',)
  # k-extractability of every training block (about 20 per participant) at three prefix
  # lengths, the validation blocks as the null; (n, p)-extraction with 4 samples per prefix.
  c.eval.extractability.ks = (32, 64, 128)
  c.eval.extractability.m = 32
  c.eval.extractability.samples = 4
  # Memorization against fit: every run exports snapshots (the chains' stages are theirs),
  # each audited for fit and k-extractability; the centralized snapshots are also
  # clone-audited (PROTOCOL's measure over training; about 10 s per run so audited).
  c.study.snapshot_runs = ('all',)
  c.study.snapshot_fractions = (0.25, 0.5, 0.75)
  c.study.snapshot_clone_audit = ('centralized',)
  # A FedAvg run with 4x the rounds (4 local epochs each, as the 8-round run): it reaches
  # the centralized run's fit, so memorization is compared at matched fit.
  c.study.fit_matching_rounds = (4 * ROUNDS,)
  # Membership inference: non-member windows also from held-out modules of the same
  # releases (configs/corpus/heldout, ~11k tokens per organization, never trained on):
  # 200+ non-member windows of 32 tokens per participant (the validation file's 48-80
  # and 176 or a few more of the held-out ones) where the validation file alone has 48-80.
  c.study.heldout_sources = 'corpus:heldout/{participant}'
  c.eval.membership.heldout_windows = 176  # With the validation windows: 200+ in all.
  return c
