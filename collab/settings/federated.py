"""Federated training: client updates vmapped over a client axis, in blocks, then a server step.

A round (DESIGN.md convention 3):
  1. sample the round's clients (all, or m of N seeded by the round);
  2. group them into blocks of B = config.federated.client_block clients (the last one
     padded with clients of weight 0); every client of a block starts from the server
     parameters (and its kept optimizer state) and runs K local train_steps as a lax.scan
     (collab/settings/clients.py); the vmapped path maps that over a leading client axis,
     shardable over the `clients` mesh axis (with data parallelism inside a client on
     `data`); the reference path calls the same jitted single-client programs client by
     client (collab/settings/rounds.py);
  3. after each block its weighted (with DP: clipped) delta sum is added to a running
     accumulator and the block's client states are dropped, so memory is O(B), not
     O(clients per round); after the last block the server turns the accumulator into a
     pseudo-gradient (the weighted mean delta; with DP the noisy sum of clipped deltas over
     m, collab/settings/dp.py) for its optax optimizer (collab/settings/server.py).

Clients are the participants (config.federated.clients = 'participants', the paper), or
finer units of them from `collab.data.clients.partition` (repositories, directories or a
synthetic partition), each attributed to its participant. Clients hold different numbers
of blocks: every client runs `steps_per_round` (K_max) scan steps and the steps past its
own data have zero weights, which leave its state unchanged; a client smaller than one
batch (only below 'participants') trains on batches padded with rows of weight 0.

Checkpoints hold `{"step": round, "params", "opt_state": server optimizer, "clients":
every client's optimizer state stacked, "clip_norm": the DP bound}` ('clients' only when
kept, 'clip_norm' only with DP) plus every client's data position, so a killed run
resumes bit-identical. `step` counts rounds, so other code reading `params` from a
federated run's checkpoint (evaluation, init_from) needs nothing special. Round metrics
are described in collab/settings/round_metrics.py.
"""

import os
import time
from typing import Callable, NamedTuple

from absl import logging
import jax
import numpy as np
from tqdm import auto as tqdm

from collab import checkpoint
from collab import io
from collab import parallel
from collab import steps
from collab.data import blocks as blocks_lib
from collab.settings import centralized
from collab.settings import dp as dp_lib
from collab.settings import round_metrics
from collab.settings import rounds
from collab.settings import best as best_lib
from collab.settings import run
from collab.settings import server as server_lib

CLIENTS_JSON = 'clients.json'  # Per-client sizes and tokens, when clients are not participants.


class Plan(NamedTuple):
  """What a run does, derived from the config and the clients' data sizes."""
  names: tuple  # Clients, in order; a client's id is its index here.
  steps_N: np.ndarray  # Local steps per round of each client (K_c).
  steps_per_round: int  # K_max: scan length of a round, and the schedule's unit.
  rounds: int
  per_round: int  # Clients sampled per round (m).
  weights_N: np.ndarray  # Aggregation weight of each client (before normalising).
  steps_per_call: int  # Local steps per compiled call.
  rows_N: np.ndarray  # Real rows (blocks) in each of a client's batches: min(blocks, batch).
  keep_state: bool  # Client optimizer states kept across rounds (participants only).
  pad: bool  # Clients smaller than a batch train on padded batches.


def local_steps(config, num_blocks_N, num_rounds: int, per_round: int, seq_len: int,
                pad: bool = False, names=None) -> np.ndarray:
  """K_c per client: a matched budget, else fixed local steps, else local epochs.

  With `pad`, a client smaller than one batch has one (padded) batch per epoch.
  """
  fed, batch = config.federated, config.train.batch_size
  num_blocks_N = np.asarray(num_blocks_N)
  smallest = int(np.argmin(num_blocks_N))
  who = repr(names[smallest]) if names is not None else f'#{smallest}'
  per_epoch_N = num_blocks_N // batch
  if pad:
    if num_blocks_N[smallest] == 0:
      raise ValueError(f'Client {who} holds no training blocks; its partition must drop it.')
    per_epoch_N = np.maximum(per_epoch_N, 1)
  if np.any(per_epoch_N == 0):
    raise ValueError(f'Client {who} has fewer training blocks ({num_blocks_N[smallest]}) than '
                     f'one batch of {batch}; lower config.train.batch_size or add data.')
  budget = int(config.train.get('budget_tokens', 0))
  if budget > 0:  # Every round: per_round clients, K steps of batch * (L - 1) tokens.
    k = run.budget_steps(budget, num_rounds * per_round * batch * (seq_len - 1))
    return np.full(len(per_epoch_N), k)
  if fed.local_steps > 0:
    return np.full(len(per_epoch_N), int(fed.local_steps))
  if fed.local_epochs <= 0:
    raise ValueError('Set config.federated.local_steps or a positive local_epochs.')
  return np.maximum(1, np.ceil(fed.local_epochs * per_epoch_N)).astype(np.int64)


def _size(blocks) -> int:
  return int(blocks) if isinstance(blocks, (int, np.integer)) else len(blocks)


def make_plan(config, train: dict, seq_len: int) -> Plan:
  """Checks the federated config against the clients' data; fails with what to change.

  `train` maps client names to their blocks, or to their numbers of blocks (a server
  that holds no data plans from the sizes its clients report).
  """
  fed, names = config.federated, tuple(train)
  if fed.rounds < 1:
    raise ValueError(f'config.federated.rounds must be >= 1, got {fed.rounds}.')
  per_round = int(fed.clients_per_round) or len(names)
  if not 1 <= per_round <= len(names):
    raise ValueError(f'config.federated.clients_per_round={fed.clients_per_round} must be in '
                     f'[0, {len(names)}] (0: all {len(names)} clients).')
  pad = fed.clients != 'participants'
  sizes_N = np.asarray([_size(train[n]) for n in names])
  steps_N = local_steps(config, sizes_N, fed.rounds, per_round, seq_len, pad=pad,
                        names=names)
  if fed.weighting not in ('blocks', 'uniform'):
    raise ValueError(f"Unknown config.federated.weighting {fed.weighting!r}; use 'blocks' "
                     "or 'uniform'.")
  dp_lib.check_config(fed)
  weights_N = sizes_N.astype(np.float32) if fed.weighting == 'blocks' else np.ones(len(names),
                                                                                   np.float32)
  k_max = int(steps_N.max())
  per_call = min(int(fed.steps_per_call) or k_max, k_max)
  # Per-client optimizer states would take N copies of the optimizer state on device:
  # kept only when the clients are the (few) participants.
  keep = bool(fed.keep_client_state) and not pad
  return Plan(names, steps_N, k_max, int(fed.rounds), per_round, weights_N, per_call,
              np.minimum(sizes_N, config.train.batch_size), keep, pad)


def sample_clients(sample_key: jax.Array, round_: int, num_clients: int, per_round: int):
  """Sorted ids of the round's clients: all, or `per_round` drawn from (seed, round)."""
  if per_round >= num_clients:
    return np.arange(num_clients)
  chosen = jax.random.choice(jax.random.fold_in(sample_key, round_), num_clients,
                             (per_round,), replace=False)
  return np.sort(np.asarray(chosen))


def _block_batches(data: blocks_lib.MultiIterator, ids_C, steps_N, first: int, count: int,
                   shape_BxL: tuple) -> tuple:
  """tokens_CxKxBxL and weights_CxKxB of local steps [first, first + count) of each client.

  Steps past a client's own K_c, every step of a padding client (id past the end), and
  the padding rows of a client smaller than a batch are zeros with zero weights.
  """
  tokens = np.zeros((len(ids_C), count) + shape_BxL, np.int32)
  weights = np.zeros((len(ids_C), count, shape_BxL[0]), np.float32)
  for c, i in enumerate(ids_C):
    real = 0 if i >= len(steps_N) else int(np.clip(steps_N[i] - first, 0, count))
    if real:
      tokens[c, :real], weights[c, :real] = data.iterators[i].take_weighted(real)
  return tokens, weights


def train_block(programs: rounds.Programs, plan: Plan, params, stored, data, keys_N,
                block_C: np.ndarray, round_: int, shape_BxL: tuple, stored_ids=None) -> tuple:
  """Local training of a block of clients from the server `params`: (states_C, metrics).

  `data.iterators[i]` is client i's BatchIterator; `stored` holds the kept optimizer
  states, read at `stored_ids` (default: the client ids; a node keeps only its own state
  and reads it at 0). `metrics` lists each chunk's per-client sums.
  """
  n = len(plan.names)
  stored_ids = block_C if stored_ids is None else stored_ids
  state_C = programs.start(params, stored, np.asarray(stored_ids, np.int32), np.int32(round_))
  keys_C = keys_N[np.minimum(block_C, n - 1)]
  block_steps = max(int(plan.steps_N[i]) for i in block_C if i < n)
  sums = []
  for first in range(0, block_steps, plan.steps_per_call):
    tokens, weights = _block_batches(data, block_C, plan.steps_N, first, plan.steps_per_call,
                                     shape_BxL)
    state_C, metrics_C = programs.run(state_C, tokens, weights, keys_C)
    sums.append(metrics_C)
  return state_C, sums


def accumulate_block(programs: rounds.Programs, plan: Plan, state: dict, acc: dict,
                     state_C: dict, block_C: np.ndarray) -> tuple:
  """Adds a block's trained clients to the round's accumulator: (state, acc, delta_norm_C).

  Only `params` (and, kept on the server, `opt_state`) of `state_C` are read.
  """
  n = len(plan.names)
  weights_C = np.where(block_C < n, plan.weights_N[np.minimum(block_C, n - 1)], 0.0)
  clients_C = state_C if plan.keep_state else {'params': state_C['params']}
  return programs.accumulate(state, acc, clients_C, weights_C.astype(np.float32),
                             np.asarray(block_C, np.int32))


def round_result(state: dict, server_metrics, sums, norms, count: int) -> tuple:
  """(state, the round's metrics) from the per-block (first client, metrics_C) sums and
  delta norms of `count` real clients, in client order (run_round's metrics)."""
  padded = sum(len(n) for n in jax.device_get(norms))
  loss_C, tokens_C = np.zeros(padded), np.zeros(padded)
  for b, m in jax.device_get(sums):
    size = len(m['loss_sum'])
    loss_C[b:b + size] += m['loss_sum']
    tokens_C[b:b + size] += m['tokens']
  real = slice(0, count)
  server_metrics = {k: float(v) for k, v in jax.device_get(server_metrics).items()}
  return state, {'loss_sum': loss_C[real], 'tokens': tokens_C[real],
                 'delta_norm': np.concatenate(jax.device_get(norms))[real], **server_metrics}


def run_round(programs: rounds.Programs, plan: Plan, state: dict,
              data: blocks_lib.MultiIterator, keys_N: jax.Array, ids: np.ndarray, round_: int,
              shape_BxL: tuple) -> tuple:
  """One round over the sampled client ids, block by block: (new server state, metrics).

  The metrics hold, per real client in `ids` order, `loss_sum`, `tokens`, `delta_norm`,
  and the server's `update_norm` (with DP also `clip_norm`, `unclipped_fraction` and,
  adaptive, `unclipped_fraction_noisy` and `next_clip_norm`). `state` is donated.
  """
  n, block = len(plan.names), programs.block
  padded = -(-len(ids) // block) * block
  ids_C = np.concatenate([ids, np.full(padded - len(ids), n)]).astype(np.int32)
  acc = programs.zeros(state['params'])
  sums, norms = [], []
  for b in range(0, padded, block):
    block_C = ids_C[b:b + block]
    state_C, chunks = train_block(programs, plan, state['params'], state.get('clients', {}),
                                  data, keys_N, block_C, round_, shape_BxL)
    sums += [(b, m) for m in chunks]
    state, acc, norms_C = accumulate_block(programs, plan, state, acc, state_C, block_C)
    norms.append(norms_C)
    del state_C  # The block's client states go before the next block's start.
  state, server_metrics = programs.apply(state, acc)
  return round_result(state, server_metrics, sums, norms, len(ids))


def _ppl_metrics(result: dict) -> dict:
  return {f'valid/{name}/perplexity': r['perplexity'] for name, r in result.items()
          if r['perplexity'] is not None}


def check_config(config) -> None:
  """What the federated path does not support, with what to change."""
  if config.parallel.mode != 'pjit':
    raise ValueError('Federated training runs on the pjit path (clients vmapped and sharded '
                     'over the mesh); set --config.parallel.mode=pjit.')
  if jax.process_count() > 1:
    raise ValueError('Federated training feeds every client from one process; run it with '
                     'one process (its mesh may still span all of that host\'s devices).')


def train(config, workdir: str) -> dict:
  """Trains config.federated over the configured participants' clients; returns the summary."""
  run.check_config(config)
  check_config(config)
  names = run.participant_names(config)
  data = run.load_data(config, workdir, names)
  model, _ = run.make_model(config, data.manifest)
  run.claim_workdir(workdir, config, data_inputs=data.manifest.get('inputs'))
  train_blocks, owner = data.train, None
  if config.federated.clients != 'participants':
    from collab.data import clients as clients_data  # Only finer clients need it.
    partition = clients_data.partition(config.federated, data.data_dir, data.train,
                                       config.seed)
    train_blocks, owner = partition.blocks, dict(partition.owner)
  return fit(config, workdir, model, train_blocks, data.valid,
             eot_id=data.manifest['eot_id'], owner=owner,
             tokenizer_dir=run.tokenizer_dir_of(data.data_dir))


class Federation(NamedTuple):
  """Where a run's clients train and validate: in this process (`in_process`) or on
  remote nodes (collab/flower). `fit` drives either through the same rounds."""
  sizes: dict  # Client name -> training blocks (what the plan is made from).
  seq_len: int  # Tokens per block.
  # (plan, JSON data positions or None) -> (run_round, evaluate, position):
  # run_round(programs, plan, state, keys_N, ids, round) -> (state, metrics) as run_round;
  # evaluate(params) -> centralized.evaluate_valid's result; position() -> JSON.
  start: Callable
  keeps_client_state: bool = True  # False: the clients keep their optimizer states.


def in_process(config, model, train: dict, valid: dict) -> Federation:
  """Every client's data in this process: the simulation."""
  shape_BxL = (config.train.batch_size, next(iter(train.values())).shape[1])

  def start(plan, positions):
    data = blocks_lib.MultiIterator([train[n] for n in plan.names], shape_BxL[0],
                                    run.seeds(config.seed)[1], positions, pad=plan.pad)
    return (lambda programs, plan, state, keys_N, ids, r:
            run_round(programs, plan, state, data, keys_N, ids, r, shape_BxL),
            lambda params: centralized.evaluate_valid(config, model, params, valid),
            lambda: data.position)
  return Federation({n: len(b) for n, b in train.items()}, shape_BxL[1], start)


def fit(config, workdir: str, model, train: dict, valid: dict, eot_id: int = 0,
        owner: dict | None = None, tokenizer_dir: str = '') -> dict:
  """Trains the in-process federation of `train` (client name -> blocks); see fit_with."""
  return fit_with(config, workdir, model, in_process(config, model, train, valid), eot_id,
                  owner, tokenizer_dir)


def fit_with(config, workdir: str, model, federation: Federation, eot_id: int = 0,
             owner: dict | None = None, tokenizer_dir: str = '') -> dict:
  """Runs (or resumes) the rounds; evaluates every participant (keeping the best model in
  WORKDIR/best, best_lib.keep_best); writes train.json last.

  `owner` maps each client to its participant (None: the clients are the participants).
  """
  start_time = time.time()
  fed = config.federated
  shape_BxL = (config.train.batch_size, federation.seq_len)
  plan = make_plan(config, federation.sizes, shape_BxL[1])
  if not federation.keeps_client_state:
    plan = plan._replace(keep_state=False)  # The server holds none.
  total_local = plan.rounds * plan.steps_per_round
  optimizer = steps.make_optimizer(config.train, total_local)
  init_key, _, train_key = run.seeds(config.seed)
  programs = rounds.make_programs(config, plan, model, optimizer,
                                  server_lib.make_server_optimizer(fed), init_key,
                                  parallel.make_mesh(config.parallel),
                                  noise_key=dp_lib.noise_key(train_key))
  manager = checkpoint.make_manager(workdir, config.train.keep_checkpoints,
                                    fed.checkpoint_every)
  state, extra, source = checkpoint.restore_or_init(
      manager, programs.abstract_state, programs.init, config.train.init_from or None,
      import_params=run.params_importer(model.config))
  start = int(jax.device_get(state['step']))
  per_client = round_metrics.keeps_per_client(len(plan.names), fed.clients)
  logging.info('%s: %s at round %d of %d; %d clients (%s), %d per round, local steps %s.',
               workdir, source, start, plan.rounds, len(plan.names), fed.clients,
               plan.per_round, dict(zip(plan.names, plan.steps_N.tolist())) if per_client
               else f'{plan.steps_N.min()}..{plan.steps_N.max()}')
  train_round, evaluate, position = federation.start(plan, extra.get('data'))
  seen_N = np.asarray(extra.get('blocks_seen', [0] * len(plan.names)), np.int64)
  keys = jax.random.split(train_key, len(plan.names) + 1)  # One per client, one to sample.
  schedule = steps.make_schedule(config.train, total_local)
  writer = io.MetricsWriter(workdir)
  writer.truncate_after(start, key='round')
  snapshots = run.snapshot_points(config.train.get('snapshot_fractions', ()), plan.rounds)
  with tqdm.tqdm(total=plan.rounds, initial=start, desc='federated', unit='round',
                 dynamic_ncols=True) as bar:
    for r in range(start, plan.rounds):
      ids = sample_clients(keys[-1], r, len(plan.names), plan.per_round)
      state, metrics = train_round(programs, plan, state, keys[:-1], ids, r)
      seen_N[ids] += plan.steps_N[ids] * plan.rows_N[ids]
      # The clients' learning rate at the round's first local step.
      row = round_metrics.round_row(plan.names, ids, metrics,
                                    float(schedule(r * plan.steps_per_round)), r, per_client)
      if fed.dp.enabled:
        row['privacy/epsilon'] = dp_lib.round_epsilon(fed.dp, r + 1, plan.per_round,
                                                      len(plan.names))
      writer.write(r + 1, row, key='round')
      every = fed.eval_every
      if r + 1 in snapshots or (every and (r + 1) % every == 0 and r + 1 < plan.rounds):
        result = evaluate(state['params'])
        writer.write(r + 1, _ppl_metrics(result), key='round')
        point = _point(fed, r + 1, plan.rounds, result)
        best_lib.keep_best(workdir, state['params'], model.config, eot_id, point, tokenizer_dir)
        if r + 1 in snapshots:
          run.save_snapshot(workdir, r + 1, state['params'], model.config, eot_id, {
              **point, 'requested_fraction': snapshots[r + 1],
              'train_loss': row['train/loss']}, tokenizer_dir)
      checkpoint.save(manager, r + 1, state,
                      {'data': position(), 'blocks_seen': seen_N.tolist()},
                      force=r + 1 == plan.rounds)
      bar.set_postfix(loss=f"{row['train/loss']:.3f}")
      bar.update(1)
  manager.wait_until_finished()
  manager.close()
  final = evaluate(state['params'])
  writer.write(plan.rounds, _ppl_metrics(final), key='round')
  writer.close()
  # best/ before train.json, which marks the run finished.
  best = best_lib.keep_best(workdir, state['params'], model.config, eot_id,
                       _point(fed, plan.rounds, plan.rounds, final), tokenizer_dir)
  return _finish(config, workdir, model, eot_id, plan, state, seen_N, owner, shape_BxL[1],
                 {'source': source, 'valid': final, 'best': best_lib.best_summary(best),
                  'train_seconds': time.time() - start_time},
                 [federation.sizes[n] for n in plan.names], tokenizer_dir)


def _point(fed, done: int, num_rounds: int, valid: dict) -> dict:
  """Where round `done` lies in the run, with its validation (snapshots, best_lib.keep_best).
  Epochs are known only when clients run local epochs."""
  return {'round': done, 'rounds': num_rounds, 'fraction': done / num_rounds,
          'epochs': done * float(fed.local_epochs) if not fed.local_steps else None,
          'valid': valid}


def _finish(config, workdir, model, eot_id, plan, state, seen_N, owner, seq_len,
            summary: dict, sizes_N, tokenizer_dir: str = '') -> dict:
  """The run's summary (and clients.json for finer clients), then run.finish."""
  fed = config.federated
  per_client = round_metrics.keeps_per_client(len(plan.names), fed.clients)
  tokens = round_metrics.tokens_seen(plan.names, seen_N, seq_len, owner)
  summary = {'setting': 'federated', 'participants': list(tokens['tokens_seen_per_participant']),
             'rounds': plan.rounds, 'steps_per_round': plan.steps_per_round,
             'server_optimizer': fed.server_optimizer, 'client_granularity': fed.clients,
             'num_clients': len(plan.names), 'clients_per_round': plan.per_round,
             **tokens, **summary}
  if per_client:
    summary['local_steps'] = dict(zip(plan.names, plan.steps_N.tolist()))
  if owner is not None:  # Per-client numbers beside train.json, not in it.
    io.atomic_write_json(os.path.join(workdir, CLIENTS_JSON), round_metrics.clients_table(
        plan, seen_N, seq_len, owner, sizes_N))
  if fed.dp.enabled:
    summary['privacy'] = dp_lib.privacy_summary(
        fed.dp, plan.rounds, plan.per_round, len(plan.names),
        float(jax.device_get(state['clip_norm'])), unit=fed.clients)
  return run.finish(workdir, state['params'], model.config, eot_id, summary, tokenizer_dir)
