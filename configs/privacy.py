"""The privacy micro study: canaries, DP-FedAvg at a few noise multipliers, and the audits.

Google, Hugging Face and Python (configs/common.py PACKAGE_PARTICIPANTS, 100 kB each) and
the default study's tiny GPT-2, trained as below, with secret canaries inserted 1, 10 and
100 times into each organization's training files; runs: centralized, federated FedAvg,
and DP-FedAvg (clients = the three organizations, uniform weights, every client every
round) at each noise multiplier of DP_NOISE_MULTIPLIERS, the first of which (0.0) clips
the client updates without noise (ε = ∞). Every run is evaluated for perplexity,
memorization, canary exposure and membership inference
(pass@k is off: it measures nothing about privacy and dominates the time).

  python -m launch.study --config=configs/privacy.py --workdir=runs/privacy
"""

from configs import common
from configs import default

MAX_BYTES_PER_PARTICIPANT = 100_000  # Cleaned bytes per organization.
# Noise multipliers z of the DP-FedAvg runs: noise std z * CLIP_NORM on the sum of the
# clipped client deltas. With only 3 clients per round, noise that buys a meaningful ε
# (z near 1) swamps a 0.7M-parameter model, so the grid also spans the small z where the
# model still learns (and ε is astronomically large): see README, Privacy extensions.
DP_NOISE_MULTIPLIERS = (0.0, 0.003, 0.01, 0.03, 1.0)
# L2 bound on each client's round delta: about the median unclipped delta norm of this
# study's FedAvg rounds (4 to 9 in rounds 1-3, 1 in the last), so clipping costs little.
CLIP_NORM = 5.0


def get_config(arg=None):
  """The privacy micro study; `arg` is unused."""
  del arg
  c = default.get_config()
  # The training recipe this study's README numbers were measured with (the default
  # study's before it moved to a memorization regime).
  c.model.dropout = 0.1  # GPT-2's dropout.
  c.train.batch_size = 16  # 16 blocks of 256 tokens per step.
  c.train.epochs = 8.0  # Passes over the data per setting.
  c.train.learning_rate = 2e-3  # Peak AdamW learning rate.
  c.train.log_every = 5  # Steps between metrics.jsonl lines.
  c.train.eval_every = 0  # Validation only at the end.
  c.train.checkpoint_every = 50  # Steps between checkpoints.
  c.federated.rounds = 4  # Communication rounds.
  c.federated.local_epochs = 2.0  # Rounds x local epochs = 8 per client.
  c.federated.eval_every = 0  # Validation only at the end.
  c.eval.memorization.max_prompts = 6  # Docstring prompts per organization.
  c.eval.memorization.samples_per_prompt = 5  # PROTOCOL's 5.
  c.eval.memorization.unprompted_samples = 0  # No extraction protocol.
  c.study.snapshot_runs = c.study.snapshot_clone_audit = ()  # No trajectories.
  c.study.fit_matching_rounds = ()  # No fit-matched FedAvg run.
  # Small files under a 100 kB cap: many files per organization, so the membership
  # inference has more than a handful of validation files.
  c.data.participants = common.package_participants(MAX_BYTES_PER_PARTICIPANT)
  c.study.heldout_sources = ''  # The held-out corpus holds the default organizations only.
  c.data.max_file_bytes = 4_000
  c.data.canaries.repeats = (1, 10, 100)  # Copies of each canary in the training files.
  c.data.canaries.per_repeat = 2  # Canaries per organization and repeat count.
  c.data.canaries.length = 4  # 4 hex characters: |R| = 65536 secrets, exposure <= 16 bits.
  c.federated.dp.clip_norm = CLIP_NORM
  c.federated.dp.delta = 1e-5  # The δ of the reported (ε, δ).
  c.eval.passk.enabled = False
  c.eval.canaries.candidates = 1024  # Sampled candidates per canary (rank estimated).
  c.eval.membership.max_files = 100  # Files per organization and side.
  c.study.settings = ('centralized', 'federated')
  c.study.server_optimizers = ('fedavg',)
  c.study.dp_noise_multipliers = DP_NOISE_MULTIPLIERS
  c.study.crossorg = False  # Not about privacy; the default study has it.
  return c
