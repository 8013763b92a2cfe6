"""Many clients: a federation of >= 1,000 simulated clients drawn from Google, Hugging Face and Python's code.

Each default organization's training blocks are cut into 400 synthetic clients (1,200 in
all, about 4 blocks of 64 tokens each); every round samples 48 of them and trains them in
vmapped blocks of 16 clients, so a round's memory follows the block, not the federation
(issue 9). The argument picks who a client is instead:

  synthetic (default) | dirichlet (unequal shards, alpha 0.5) | repositories | directories

  python -m launch.build_data --config=configs/many_clients.py --data_dir=runs/many_clients/data
  python -m launch.train --config=configs/many_clients.py --workdir=runs/many_clients
  python -m launch.study --config=configs/many_clients.py:repositories --workdir=runs/repos
  python -m bench.many_clients --record=docs/BENCHMARKS.md   # clients/s, tokens/s, memory
"""

from configs import common

# Cleaned bytes per organization: enough for 400 clients of ~4 blocks after the 80/20 split.
MAX_BYTES_PER_PARTICIPANT = 400_000
CLIENTS_PER_PARTICIPANT = 400
KINDS = ('synthetic', 'dirichlet', 'repositories', 'directories')


def get_config(arg=None):
  """`arg`: the client granularity, one of KINDS ('' or None: synthetic)."""
  kind = arg or 'synthetic'
  if kind not in KINDS:
    raise ValueError(f'Unknown many_clients argument {kind!r}; use one of {KINDS}.')
  c = common.base_config('tiny')  # 2 layers, 4 heads, d_model 128: many rounds on 2 cores.
  c.setting = 'federated'  # The point of this family (launch.train runs it as is).
  c.data.participants = common.package_participants(MAX_BYTES_PER_PARTICIPANT)
  c.data.max_file_bytes = 8_000  # Small files: more of them, and more repositories, per cap.
  c.data.seq_len = 64  # Short blocks: ~4,900 of them in all, so 1,200 clients hold >= 3.
  c.data.tokenizer.vocab_size = 2048  # Small vocabulary, as configs/default.py.
  c.train.batch_size = 4  # A client's batch: about one pass over its ~4 blocks per step.
  c.train.learning_rate = 2e-3  # As configs/default.py (a 1.5M model trains stably at it).
  c.train.warmup_steps = 10  # Local steps of warmup on the shared schedule.
  c.train.log_every = 1  # Rounds are few and cheap: one metrics line each.
  c.train.epochs = 2.0  # The study's centralized baseline: ~2,300 steps of 4 blocks.
  c.federated.rounds = 40  # 40 x 48 = 1,920 client updates: each client ~1.6 times.
  c.federated.clients_per_round = 48  # m of N clients sampled per round (seeded).
  c.federated.client_block = 16  # Clients per vmapped call: memory is O(16), not O(48).
  c.federated.local_steps = 2  # Two local batches per round (the artifact's 2 local passes).
  c.federated.keep_client_state = False  # 1,200 AdamW states would dwarf the model.
  c.federated.checkpoint_every = 10  # Rounds between checkpoints.
  c.federated.clients = 'synthetic' if kind == 'dirichlet' else kind  # Who a client is.
  c.federated.synthetic_clients = CLIENTS_PER_PARTICIPANT  # Shards per organization.
  if kind == 'dirichlet':
    c.federated.synthetic_partition = 'dirichlet'  # Unequal shards: a few big, many small.
    c.federated.dirichlet_alpha = 0.5  # Small alpha: very unequal clients.
  c.federated.directory_depth = 2  # 'directories': sub-packages of pkg: sources.
  if kind in ('repositories', 'directories'):
    # Tens of clients here (32 repositories, 75 directories at depth 2), not 1,200.
    c.federated.clients_per_round = 16
    c.federated.rounds = 20
  c.eval.passk.enabled = False  # This family studies memorization per client, not pass@k.
  c.eval.memorization.max_prompts = 20  # Docstring prompts per organization.
  c.eval.memorization.max_new_tokens = 128  # A 6-line clone needs ~60-100 tokens of code.
  c.study.settings = ('centralized', 'federated')  # The pooled baseline beside the federation.
  c.study.server_optimizers = ('fedavg',)  # One federated run.
  c.study.all_orders = False  # No incremental runs; kept explicit.
  return c
