"""Shared config pieces: model sizes, default participants, and the base config.

Every experiment-family file (default.py, paper.py, ...) starts from `base_config()`
and changes only what differs. Derived values (vocabulary size from the tokenizer,
total steps from data size and epochs) are computed in code, never stored here.
"""

import ml_collections

# name -> (num_layers, num_heads, d_model, max_len). d_ff is always 4 * d_model.
# Parameter counts assume the default 8192-token vocabulary (tied embeddings).
MODEL_SIZES = {
    'tiny': (2, 4, 128, 256),  # ~1.5M parameters: tests and the CPU default.
    'small': (6, 4, 256, 256),  # ~7M parameters.
    'gpt2': (12, 12, 768, 1024),  # 124M at the GPT-2 vocabulary (50257).
    'gpt2-medium': (24, 16, 1024, 1024),  # 355M at the GPT-2 vocabulary.
}

# Default participants: three real organizations, each a few documented modules of its
# code (small enough to be memorized on 2 CPU cores). They share code as GitHub
# organizations do, through vendoring: pip (PyPA) vendors requests (PSF) and rich
# (Textualize) and tomli, which the standard library took in as tomllib. The files ship
# with the repository (configs/corpus/default: copies of pinned releases with their
# licences, checked against MANIFEST.json on every read), so the study's data is the same
# on any machine whatever is installed; configs/corpus/vendor.py lists the `pkg:`/`stdlib:`
# specs they were copied from and refreshes them on purpose.
DEFAULT_PARTICIPANTS = {
    'psf': ('corpus:default/psf',),
    'pypa': ('corpus:default/pypa',),
    'textualize': ('corpus:default/textualize',),
}

# Larger organizations (whole installed packages), for studies that need many files or
# repositories: many_clients.py and privacy.py subsample them with a byte cap.
PACKAGE_PARTICIPANTS = {
    'google': ('pkg:jax', 'pkg:flax', 'pkg:optax', 'pkg:orbax-checkpoint',
               'pkg:absl-py', 'pkg:ml-collections', 'pkg:tensorflow-datasets',
               'pkg:array-record', 'pkg:etils'),
    'huggingface': ('pkg:transformers', 'pkg:tokenizers', 'pkg:huggingface-hub',
                    'pkg:safetensors'),
    'python': ('stdlib',),
}


def model_config(size: str = 'tiny') -> ml_collections.ConfigDict:
  """GPT-2 hyperparameters for one of MODEL_SIZES."""
  if size not in MODEL_SIZES:
    raise ValueError(f'Unknown model size {size!r}; choose one of {sorted(MODEL_SIZES)}.')
  num_layers, num_heads, d_model, max_len = MODEL_SIZES[size]
  c = ml_collections.ConfigDict()
  c.size = size  # Name of the size preset, for the record.
  c.num_layers = num_layers  # Transformer blocks.
  c.num_heads = num_heads  # Attention heads per block.
  c.d_model = d_model  # Residual stream width.
  c.d_ff = 4 * d_model  # MLP hidden width.
  c.max_len = max_len  # Learned positions; blocks may not be longer.
  c.vocab_size = 0  # 0: taken from the tokenizer at run time.
  c.dropout = 0.1  # Embedding, attention and residual dropout (GPT-2: 0.1).
  # Dropout on attention probabilities alone; None: `dropout`. 0 lets 'cudnn' train.
  c.attention_dropout = ml_collections.config_dict.placeholder(float)
  c.dtype = 'float32'  # Compute dtype: float32 or bfloat16; parameters stay float32.
  # 'xla' (einsum attention, any device) or 'cudnn' (fused attention: GPU, bfloat16; used
  # where attention dropout is off: evaluation, sampling, or attention_dropout 0).
  c.attention = 'xla'
  # Embedding rows padded to a multiple of this (same function: padding rows never reach
  # a logit). GPT-2's 50257 -> 50304 tiles on tensor cores and shards over 'model'.
  c.vocab_multiple = 128 if size.startswith('gpt2') else 1
  # Training loss in chunks of this many positions of every row (the LM head recomputed
  # in the backward pass, never all [batch, length, vocab] logits at once); 0: whole.
  # Same loss up to float32 rounding. On a CPU with a large vocabulary per d_model it is
  # also faster (the chunk's logits stay in cache; bench.train_step --loss_chunk=32:
  # -10-13% per tiny step at vocabulary 8,192); at the default study's 2,048 it is not.
  c.loss_chunk = 0
  return c


def participant(name: str, sources, max_bytes: int = 0) -> ml_collections.ConfigDict:
  """One organization: a name and the sources its code comes from."""
  c = ml_collections.ConfigDict()
  c.name = name  # Unique name; used in split names and tables.
  # 'corpus:NAME/ORG', 'pkg:NAME', 'stdlib', 'dir:PATH' or 'jsonl:PATH' (sources.py).
  c.sources = tuple(sources)
  c.max_bytes = max_bytes  # Cap on cleaned bytes (deterministic subsample); 0: none.
  # With data.split='given': the sources (also in `sources`) that are its validation side.
  c.valid_sources = ()
  # Release fields trusted instead of the random filters' second draw or filter 5's recount
  # (collab.data.clean.TRUSTABLE_FLAGS: 'config_or_test', 'has_no_keywords', 'ratio').
  c.trusted_flags = ()
  return c


def default_participants(max_bytes: int = 0):
  return [participant(n, s, max_bytes) for n, s in DEFAULT_PARTICIPANTS.items()]


def package_participants(max_bytes: int = 0):
  return [participant(n, s, max_bytes) for n, s in PACKAGE_PARTICIPANTS.items()]


def data_config(participants, seq_len: int) -> ml_collections.ConfigDict:
  """Sources, cleaning, split, tokenizer and blocks."""
  c = ml_collections.ConfigDict()
  c.participants = participants  # List of participant(...) ConfigDicts.
  c.data_dir = ''  # Built data folder; '' means WORKDIR/data (study) or --data_dir.
  c.seed = 1  # Seed of the seeded filters and the subsampling (PROTOCOL: 1).
  # 'file' (paper: random 80/20 over files), 'repo' (no repo on both sides) or 'given'
  # (each participant's valid_sources are its validation files: the release's split).
  c.split = 'file'
  c.split_seed = 1  # Seed of the train/valid split (PROTOCOL: 1).
  c.valid_fraction = 0.2  # Share of files (or repositories) held out for validation.
  c.dedup_across = False  # Exact dedup across participants (paper: off, clones stay).
  c.max_file_bytes = 1_000_000  # Larger source files are skipped and counted.
  c.seq_len = seq_len  # Tokens per block (PROTOCOL: 1024); <= model.max_len.
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.path = ''  # A local Hugging Face tokenizer folder; '' trains a BPE.
  c.tokenizer.vocab_size = 8192  # BPE vocabulary size when training one.
  c.tokenizer.train_on = ''  # '' all training splits, one participant's name, or a source spec.
  c.tokenizer.max_bytes = 20_000_000  # Training text cap for the BPE trainer.
  # Secret canaries (Carlini et al. 2019) in each participant's training files, for the
  # exposure evaluation (collab/data/canaries.py). Off by default.
  c.canaries = ml_collections.ConfigDict()
  c.canaries.repeats = ()  # Copies per canary, one group each, e.g. (1, 10, 100); (): none.
  c.canaries.per_repeat = 1  # Canaries per participant and repeat count.
  c.canaries.alphabet = '0123456789abcdef'  # Secret characters (ASCII letters/digits).
  c.canaries.length = 6  # Secret length: |R| = len(alphabet) ** length possible secrets.
  c.canaries.seed = 1  # Seed of the secrets and of where the copies are inserted.
  return c


def train_config() -> ml_collections.ConfigDict:
  """Optimizer, schedule, batching, logging and checkpoints (PROTOCOL defaults)."""
  c = ml_collections.ConfigDict()
  c.batch_size = 16  # Global batch in blocks.
  c.epochs = 10.0  # Passes over the training blocks (PROTOCOL: 10); used when steps == 0.
  c.steps = 0  # Explicit number of steps; 0 derives it from epochs.
  c.optimizer = 'adamw'  # 'adamw' or 'sgd'.
  c.learning_rate = 5e-4  # Peak learning rate (PROTOCOL: 5e-4).
  c.warmup_steps = 2000  # Linear warmup (PROTOCOL: 2000), capped at the total steps.
  c.min_lr_ratio = 0.0  # Cosine decays to learning_rate * min_lr_ratio.
  c.weight_decay = 0.1  # AdamW decay, masked off biases and LayerNorm.
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-8
  c.grad_clip = 1.0  # Global-norm clipping (PROTOCOL: 1.0); 0 disables.
  c.log_every = 10  # Steps between metrics.jsonl lines.
  c.eval_every = 0  # Steps between validation passes; 0: only at the end.
  c.eval_batch_size = 32  # Blocks per evaluation batch.
  c.checkpoint_every = 200  # Steps between checkpoints (and one at the end).
  c.keep_checkpoints = 2  # Checkpoints kept per run.
  # Fractions of the run (steps; rounds when federated) at which the model is also
  # exported to WORKDIR/snapshots/ and evaluated (config.eval.snapshot_evals: memorization
  # against fit); (): none.
  c.snapshot_fractions = ()
  c.init_from = ''  # Another run's workdir or a Hugging Face GPT-2 folder.
  # Matched budgets (study option): > 0 gives every setting this many training tokens
  # (predicted tokens, batch_size * (seq_len - 1) per step), overriding steps/epochs here
  # and federated local_steps/local_epochs (rounds kept); incremental stages split it
  # equally. 0: off.
  c.budget_tokens = 0
  return c


def parallel_config() -> ml_collections.ConfigDict:
  """Mesh, logical-axis rules and the parallel mode."""
  c = ml_collections.ConfigDict()
  c.mode = 'pjit'  # 'pjit' (jit + NamedSharding, default) or 'pmap'.
  # Mesh axis sizes; -1 takes every remaining device. Their product is the device count.
  c.mesh = ml_collections.ConfigDict({'clients': 1, 'data': -1, 'model': 1})
  # Logical axis name -> mesh axis (or None: replicated).
  c.rules = (('batch', 'data'), ('clients', 'clients'), ('embed', None),
             ('mlp', 'model'), ('heads', 'model'), ('vocab', 'model'),
             ('length', None), ('kv', None), ('layers', None))
  c.multihost = False  # Start jax.distributed (coordinator from the environment).
  return c


def federated_config() -> ml_collections.ConfigDict:
  """FedAvg and relatives (PROTOCOL: all clients every round, 10 rounds)."""
  c = ml_collections.ConfigDict()
  c.rounds = 10  # Communication rounds.
  c.clients_per_round = 0  # m clients sampled per round (seeded); 0: all.
  c.local_epochs = 1.0  # Passes over each client's own blocks per round; used when local_steps == 0.
  c.local_steps = 0  # Fixed local steps per round; 0 derives them from local_epochs.
  c.weighting = 'blocks'  # 'blocks' (paper: by training blocks) or 'uniform'.
  c.server_optimizer = 'fedavg'  # fedavg | fedavgm | fedadam | fedyogi | fedadagrad.
  c.server_learning_rate = 1.0  # FedAvg: 1.0 (the mean delta applied as is).
  c.server_momentum = 0.9  # FedAvgM.
  c.server_b1 = 0.9  # FedAdam / FedYogi.
  c.server_b2 = 0.99
  c.server_eps = 1e-3  # Adaptivity (Reddi et al. 2021).
  c.prox_mu = 0.0  # FedProx proximal term; 0: plain FedAvg.
  # Keep each client's optimizer state across rounds (paper's artifact), on device: in
  # force only when clients == 'participants' (thousands of finer clients would need
  # thousands of optimizer states); finer clients start every round with a fresh one.
  c.keep_client_state = True
  # Clients per vmapped call (a round's memory grows with it, not with clients per round);
  # 0: all sampled clients at once.
  c.client_block = 0
  c.vmap = True  # Clients vmapped over a leading axis; False: the reference loop, one by one.
  c.steps_per_call = 0  # Local steps per compiled call (bounds batch memory); 0: a whole round.
  c.checkpoint_every = 1  # Rounds between checkpoints (and one at the end).
  c.eval_every = 0  # Rounds between validation passes; 0: only at the end.
  # Who a client is: 'participants' (one per organization, the paper), 'repositories'
  # (every repository of every participant), 'directories' (folders `directory_depth`
  # deep inside each repository) or 'synthetic' (each participant's training blocks cut
  # into `synthetic_clients` shards, 'equal' or 'dirichlet' sizes) for scale studies.
  c.clients = 'participants'
  c.directory_depth = 1  # 'directories': path components naming a client's folder.
  c.synthetic_clients = 0  # 'synthetic': clients per participant.
  c.synthetic_partition = 'equal'  # 'synthetic': 'equal' or 'dirichlet' shard sizes.
  c.dirichlet_alpha = 1.0  # 'dirichlet': concentration (small: very unequal clients).
  c.dp = dp_config()
  return c


def dp_config() -> ml_collections.ConfigDict:
  """DP-FedAvg (McMahan et al. 2018): client-level clipping and Gaussian noise."""
  c = ml_collections.ConfigDict()
  c.enabled = False  # Clip each client's delta and noise the aggregate; needs uniform weights.
  c.clip_norm = 1.0  # L2 bound on each client's delta (the initial bound when adaptive).
  c.noise_multiplier = 0.0  # Noise std on the sum of clipped deltas = noise_multiplier * clip.
  c.adaptive_clip = False  # Andrew et al. 2021: move the bound toward a quantile of norms.
  c.target_quantile = 0.5  # Adaptive clipping: share of clients whose delta fits the bound.
  c.clip_learning_rate = 0.2  # Adaptive clipping: geometric step of the bound per round.
  c.clip_count_noise = 0.0  # Adaptive clipping: noise std on the clipped-client count.
  c.delta = 1e-5  # The delta of the reported (epsilon, delta).
  return c


def incremental_config() -> ml_collections.ConfigDict:
  """Chains of stages, one participant after another."""
  c = ml_collections.ConfigDict()
  c.order = ''  # Comma-separated participant names; '' means the configured order.
  c.all_orders = False  # Every permutation of the participants (the study does this).
  c.stages_dir = ''  # Where stages live; '' means WORKDIR/stages. Studies share one.
  # A finished single run per participant ('{participant}' in the folder name) that
  # serves as the first stage of the chains starting with it (a study sets it); '': none.
  c.first_stages = ''
  return c


def eval_config() -> ml_collections.ConfigDict:
  """Perplexity, pass@k, memorization (PROTOCOL), canary exposure and membership inference."""
  c = ml_collections.ConfigDict()
  c.batch_size = 32  # Rows per compiled sampling / evaluation batch.
  c.stop_strings = ('\nclass', '\ndef', '\n#', '\n@', '\nprint', '\nif')
  c.passk = ml_collections.ConfigDict()
  c.passk.enabled = True
  c.passk.num_problems = 0  # First N HumanEval problems; 0: all 164.
  c.passk.n = 200  # Samples per problem (PROTOCOL: 200).
  c.passk.ks = (1, 10, 100)
  c.passk.temperature = 0.8
  c.passk.top_p = 0.95
  c.passk.max_new_tokens = 256
  c.passk.timeout = 3.0  # Seconds per program.
  c.passk.allow_weak_sandbox = False  # Run without bwrap (resource limits only) if True.
  c.passk.workers = 0  # Programs run at once, one sandbox each; 0: one per CPU core.
  c.passk.memory_mb = 1024  # Address-space limit per program (RLIMIT_AS).
  c.memorization = ml_collections.ConfigDict()
  c.memorization.enabled = True
  c.memorization.max_prompts = 0  # Prompts per participant (seeded subsample); 0: all.
  c.memorization.samples_per_prompt = 5  # PROTOCOL: 5.
  c.memorization.temperature = 0.6
  c.memorization.top_p = 0.6
  c.memorization.repetition_penalty = 1.1
  c.memorization.max_prompt_tokens = 512
  c.memorization.max_new_tokens = 512
  c.memorization.min_lines = 6  # Clone threshold in normalized lines (Simian: 6).
  c.memorization.clone_type = 1  # 1: whitespace ignored; 2: identifiers/literals abstracted.
  # The paper's released prompts: a CSV path with '{participant}' (function id, signature
  # with docstring, function body); '': prompts from the training files' docstrings.
  c.memorization.prompts_csv = ''
  c.memorization.keep_indent = False  # Prompts at their original indentation (the paper's).
  c.memorization.unprompted_samples = 0  # Extraction protocol samples (top-k 40, T 1.0); 0: off.
  c.memorization.unprompted_top_k = 40  # Extraction protocol: top-k sampling (no stop strings).
  c.memorization.unprompted_temperature = 1.0  # Extraction protocol temperature.
  # Canary exposure (Carlini et al. 2019), when the data has canaries (config.data.canaries).
  c.canaries = ml_collections.ConfigDict()
  c.canaries.enabled = True
  # Secrets scored per canary: the exact rank when |R| - 1 <= this, else a seeded sample.
  c.canaries.candidates = 1024
  # Membership inference: training (member) vs validation files, loss and Min-K% scores.
  c.membership = ml_collections.ConfigDict()
  c.membership.enabled = True
  # Units: 'window' (non-overlapping windows of the blocks, scored in context) or 'file'.
  c.membership.unit = 'window'
  c.membership.window = 32  # Tokens per window.
  c.membership.max_windows = 0  # Windows per participant and split (seeded sample); 0: all.
  c.membership.max_files = 200  # unit='file': files per participant and side; 0: all.
  c.membership.min_k = 0.2  # Min-K% and Min-K%++: share of least likely tokens (20%).
  c.membership.fprs = (0.001, 0.01)  # False-positive rates the TPR is reported at.
  # Reference models of LiRA and RMIA: 'auto' (the study's single runs of the other
  # participants) or comma-separated Hugging Face GPT-2 folders that saw nobody.
  c.membership.references = 'auto'
  c.membership.rmia_a = 0.3  # RMIA's offline correction of p(x) (Zarifzadeh et al.).
  c.membership.rmia_gamma = 1.0  # RMIA's likelihood-ratio threshold.
  # Non-members also from WORKDIR/data-heldout where the study built it (held-out files
  # of the same organizations, config.study.heldout_sources).
  c.membership.heldout = True
  # Held-out windows per participant: a seeded choice of whole blocks holding at least
  # this many (0: all); each scored block costs a forward pass per model evaluated.
  c.membership.heldout_windows = 0
  # Fit: each model's mean token loss on every participant's own training blocks (the x
  # axis of memorization against fit).
  c.fit = ml_collections.ConfigDict()
  c.fit.enabled = True
  c.fit.max_blocks = 0  # Training blocks per participant (seeded choice); 0: all.
  # k-extractability (Carlini et al. 2022): greedy decoding of a training block's first k
  # tokens, fed at their training positions, reproduces its next m tokens exactly.
  # Validation blocks are the null.
  c.extractability = ml_collections.ConfigDict()
  c.extractability.enabled = True
  c.extractability.ks = (50, 100, 200, 500)  # Prefix lengths (the smallest is the primary).
  c.extractability.m = 50  # Suffix tokens that must come out exactly.
  c.extractability.max_blocks = 0  # Blocks per participant and split (seeded); 0: all.
  # (n, p)-extraction (Hayes et al. 2024): n samples per prefix at this temperature, at the
  # smallest k, on the models in `sampled_models` (0: off).
  c.extractability.samples = 0
  c.extractability.temperature = 1.0
  c.extractability.sampled_models = ('final', 'best')
  # Extraction ranking (Carlini et al. 2021): unprompted samples ranked by perplexity,
  # zlib ratio and the ratio to reference models that never saw the participant; the
  # precision of each ranking's top n. Needs memorization.unprompted_samples > 0.
  c.ranking = ml_collections.ConfigDict()
  c.ranking.enabled = True
  c.ranking.top = (10, 25)  # n of the top-n precision.
  # Reference models: 'auto' (the study's single runs of the other participants) or a
  # comma-separated list of Hugging Face GPT-2 folders (e.g. a pretrained model).
  c.ranking.references = 'auto'
  # The models every evaluator runs on besides 'final' (the end of training, always
  # evaluated): 'best' (the validation point with the lowest pooled loss, WORKDIR/best).
  c.models = ('final', 'best')
  # Evaluators also run on every snapshot (WORKDIR/snapshots/*, incremental stages): the
  # trajectories of memorization against fit.
  c.snapshot_evals = ('fit', 'extractability')
  return c


def study_config() -> ml_collections.ConfigDict:
  """Which runs a study holds (launch.study); each run is one setting of this config."""
  c = ml_collections.ConfigDict()
  c.settings = ('single', 'centralized', 'federated', 'incremental')  # Settings to run.
  c.server_optimizers = ('fedavg', 'fedyogi')  # One federated run per server optimizer.
  # Server learning rate of the adaptive optimizers (fedadam, fedyogi, fedadagrad) in a
  # study; FedAvg's 1.0 makes them diverge (Reddi et al. 2021 tune it near 1e-2).
  c.adaptive_server_learning_rate = 0.05
  c.all_orders = True  # Incremental: every order of the participants (else the given one).
  # (): every run at config.seed. One seed: at that seed. Several: every run per seed
  # (`name@seedN`), tables show mean ± sd over seeds.
  c.seeds = ()
  # DP-FedAvg runs: one FedAvg run per noise multiplier z (federated.dp on, uniform
  # weighting, the rest of config.federated), named federated-dp-z{z}; 0.0 clips only.
  c.dp_noise_multipliers = ()
  # Runs (by name) that export intermediate models at `snapshot_fractions` of their
  # training, each evaluated by config.eval.snapshot_evals (memorization against fit).
  # ('all',): every run but the incremental chains, whose stages are their trajectory.
  c.snapshot_runs = ()
  c.snapshot_fractions = (0.25, 0.5, 0.75)
  # Runs whose snapshots the clone audit (eval.memorization) also samples, beside
  # eval.snapshot_evals: it costs a sampling pass per snapshot.
  c.snapshot_clone_audit = ()
  # FedAvg runs with N rounds instead of federated.rounds (the same local epochs per
  # round, so N / rounds times the training), named federated-fedavg-rN: a federated
  # run that reaches the centralized run's fit, so that memorization can be compared at
  # matched fit. (): none.
  c.fit_matching_rounds = ()
  # Held-out files of each participant, never trained on: one source spec with
  # '{participant}' (e.g. 'corpus:heldout/{participant}'), built into WORKDIR/data-heldout
  # with the study's tokenizer; membership inference takes non-member windows from them.
  # '': none (non-members are the validation windows alone).
  c.heldout_sources = ''
  c.heldout_max_file_bytes = 64_000  # Their size cap (the held-out modules are larger).
  c.crossorg = True  # Cross-organization clone analysis of the participants' data.
  c.figures = True  # Write figures/ (matplotlib) beside tables/.
  return c


def flower_config() -> ml_collections.ConfigDict:
  """Waiting on the nodes of a Flower federation (collab/flower; not part of training)."""
  c = ml_collections.ConfigDict()
  c.join_timeout_s = 300.0  # Longest wait for a node per participant before the first round.
  # Longest wait for a node that went away (killed, machine gone) to come back within a
  # round; then the server stops with an error naming it, and resumes when run again.
  c.rejoin_timeout_s = 120.0
  c.round_timeout_s = 86400.0  # Longest wait for a round's replies (local training included).
  c.poll_s = 0.2  # Seconds between polls for replies.
  return c


def base_config(size: str = 'tiny') -> ml_collections.ConfigDict:
  """Everything a run needs; families override what differs."""
  c = ml_collections.ConfigDict()
  c.seed = 1  # One seed: split into init, data and train keys (PROTOCOL: 1).
  c.setting = 'centralized'  # 'single', 'centralized', 'federated' or 'incremental'.
  c.single = ''  # Participant trained alone when setting == 'single'.
  c.model = model_config(size)
  c.data = data_config(default_participants(), seq_len=c.model.max_len)
  c.train = train_config()
  c.parallel = parallel_config()
  c.federated = federated_config()
  c.flower = flower_config()
  c.incremental = incremental_config()
  c.eval = eval_config()
  c.study = study_config()
  return c
