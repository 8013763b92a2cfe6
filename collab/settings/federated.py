"""Federated training: client updates vmapped over a client axis, then a server step.

A round (DESIGN.md convention 3):
  1. sample the round's clients (all, or m seeded by the round);
  2. every client starts from the server parameters (and its kept optimizer state) and
     runs K local train_steps as a lax.scan (collab/settings/clients.py); the vmapped
     path maps that over a leading client axis C, shardable over the `clients` mesh axis
     (with data parallelism inside a client on `data`); the reference path calls the same
     jitted single-client programs client by client (collab/settings/rounds.py);
  3. the server turns the weighted mean delta into a pseudo-gradient for its optax
     optimizer (collab/settings/server.py) and stores the clients' optimizer states.

Clients hold different numbers of blocks: every client runs `steps_per_round` (K_max)
scan steps and the steps past its own data have zero weights, which leave its state
unchanged; padding clients (to fill a block divisible by the mesh) weigh 0.

Checkpoints hold `{"step": round, "params", "opt_state": server optimizer, "clients":
every participant's client optimizer state stacked}` plus every client's data position,
so a killed run resumes bit-identical. `step` counts rounds, so other code reading
`params` from a federated run's checkpoint (evaluation, init_from) needs nothing special.
"""

import math
import time
from typing import NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import auto as tqdm

from collab import checkpoint
from collab import io
from collab import parallel
from collab import steps
from collab.data import blocks as blocks_lib
from collab.settings import centralized
from collab.settings import rounds
from collab.settings import run
from collab.settings import server as server_lib



class Plan(NamedTuple):
  """What a run does, derived from the config and the clients' data sizes."""
  names: tuple  # Participants, in config order; a client's id is its index here.
  steps_N: np.ndarray  # Local steps per round of each participant (K_c).
  steps_per_round: int  # K_max: scan length of a round, and the schedule's unit.
  rounds: int
  per_round: int  # Clients sampled per round (m).
  weights_N: np.ndarray  # Aggregation weight of each participant (before normalising).
  steps_per_call: int  # Local steps per compiled call.


def local_steps(config, num_blocks_N, num_rounds: int, per_round: int,
                seq_len: int) -> np.ndarray:
  """K_c per participant: a matched budget, else fixed local steps, else local epochs."""
  fed, batch = config.federated, config.train.batch_size
  per_epoch_N = np.asarray(num_blocks_N) // batch
  if np.any(per_epoch_N == 0):
    raise ValueError(f'A client has fewer training blocks ({min(num_blocks_N)}) than one batch '
                     f'of {batch}; lower config.train.batch_size or add data.')
  budget = int(config.train.get('budget_tokens', 0))
  if budget > 0:  # Every round: per_round clients, K steps of batch * (L - 1) tokens.
    k = run.budget_steps(budget, num_rounds * per_round * batch * (seq_len - 1))
    return np.full(len(per_epoch_N), k)
  if fed.local_steps > 0:
    return np.full(len(per_epoch_N), int(fed.local_steps))
  if fed.local_epochs <= 0:
    raise ValueError('Set config.federated.local_steps or a positive local_epochs.')
  return np.maximum(1, np.ceil(fed.local_epochs * per_epoch_N)).astype(np.int64)


def make_plan(config, train: dict, seq_len: int) -> Plan:
  """Checks the federated config against the data; fails with what to change."""
  fed, names = config.federated, tuple(train)
  if fed.rounds < 1:
    raise ValueError(f'config.federated.rounds must be >= 1, got {fed.rounds}.')
  per_round = int(fed.clients_per_round) or len(names)
  if not 1 <= per_round <= len(names):
    raise ValueError(f'config.federated.clients_per_round={fed.clients_per_round} must be in '
                     f'[0, {len(names)}] (0: all {len(names)} participants).')
  sizes_N = np.asarray([len(train[n]) for n in names])
  steps_N = local_steps(config, sizes_N, fed.rounds, per_round, seq_len)
  if fed.weighting not in ('blocks', 'uniform'):
    raise ValueError(f"Unknown config.federated.weighting {fed.weighting!r}; use 'blocks' "
                     "or 'uniform'.")
  weights_N = sizes_N.astype(np.float32) if fed.weighting == 'blocks' else np.ones(len(names),
                                                                                   np.float32)
  k_max = int(steps_N.max())
  per_call = min(int(fed.steps_per_call) or k_max, k_max)
  return Plan(names, steps_N, k_max, int(fed.rounds), per_round, weights_N, per_call)


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

  Steps past a client's own K_c, and every step of a padding client (id past the end),
  are zeros with zero weights.
  """
  tokens = np.zeros((len(ids_C), count) + shape_BxL, np.int32)
  weights = np.zeros((len(ids_C), count, shape_BxL[0]), np.float32)
  for c, i in enumerate(ids_C):
    real = 0 if i >= len(steps_N) else int(np.clip(steps_N[i] - first, 0, count))
    if real:
      tokens[c, :real] = data.iterators[i].take(real)
      weights[c, :real] = 1.0
  return tokens, weights


def run_round(programs: rounds.Programs, plan: Plan, state: dict,
              data: blocks_lib.MultiIterator, keys_N: jax.Array, ids: np.ndarray, round_: int,
              shape_BxL: tuple) -> tuple:
  """One round over the sampled client ids: (new server state, per-client metrics).

  The metrics hold, per real client in `ids` order, `loss_sum`, `tokens`, `delta_norm`,
  and the server's `update_norm`.
  """
  n = len(plan.names)
  padded = -(-len(ids) // programs.block) * programs.block
  ids_C = np.concatenate([ids, np.full(padded - len(ids), n)]).astype(np.int32)
  weights_C = np.where(ids_C < n, plan.weights_N[np.minimum(ids_C, n - 1)], 0.0)
  states, sums = [], []
  for b in range(0, padded, programs.block):
    block_C = ids_C[b:b + programs.block]
    state_C = programs.start(state['params'], state.get('clients', {}), block_C,
                             np.int32(round_))
    keys_C = keys_N[np.minimum(block_C, n - 1)]
    block_steps = max(int(plan.steps_N[i]) for i in block_C if i < n)
    for first in range(0, block_steps, plan.steps_per_call):
      tokens, weights = _block_batches(data, block_C, plan.steps_N, first,
                                       plan.steps_per_call, shape_BxL)
      state_C, metrics_C = programs.run(state_C, tokens, weights, keys_C)
      sums.append((b, metrics_C))
    states.append(state_C)
  state_C = states[0] if len(states) == 1 else jax.tree_util.tree_map(
      lambda *x: jnp.concatenate(x), *states)
  state, server_metrics = programs.finish(state, state_C, weights_C.astype(np.float32), ids_C)
  loss_C, tokens_C = np.zeros(padded), np.zeros(padded)
  for b, m in jax.device_get(sums):
    loss_C[b:b + programs.block] += m['loss_sum']
    tokens_C[b:b + programs.block] += m['tokens']
  server_metrics = jax.device_get(server_metrics)
  real = slice(0, len(ids))
  return state, {'loss_sum': loss_C[real], 'tokens': tokens_C[real],
                 'delta_norm': np.asarray(server_metrics['delta_norm'])[real],
                 'update_norm': float(server_metrics['update_norm'])}


def _round_row(plan: Plan, ids, metrics: dict, lr: float, round_: int) -> dict:
  """The metrics.jsonl line of a round; raises naming the client whose loss is not finite."""
  row = {'train/lr': lr, 'server/update_norm': metrics['update_norm'],
         'clients': [plan.names[i] for i in ids]}
  for c, i in enumerate(ids):
    name, loss_sum, tokens = plan.names[i], metrics['loss_sum'][c], metrics['tokens'][c]
    if not math.isfinite(loss_sum):
      raise steps.NonFiniteLossError(
          f'Client {name!r} has a training loss of {loss_sum} in round {round_}; lower '
          'config.train.learning_rate, keep config.train.grad_clip > 0, or check its data.')
    row[f'client/{name}/loss'] = loss_sum / max(tokens, 1.0)
    row[f'client/{name}/tokens'] = int(tokens)
    row[f'client/{name}/delta_norm'] = float(metrics['delta_norm'][c])
  row['train/loss'] = float(np.sum(metrics['loss_sum']) / max(np.sum(metrics['tokens']), 1.0))
  return row


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
  """Trains config.federated over every configured participant; returns the summary."""
  run.check_config(config)
  check_config(config)
  names = run.participant_names(config)
  data = run.load_data(config, workdir, names)
  model, _ = run.make_model(config, data.manifest)
  run.write_config(workdir, config)
  return fit(config, workdir, model, data.train, data.valid, eot_id=data.manifest['eot_id'])


def fit(config, workdir: str, model, train: dict, valid: dict, eot_id: int = 0) -> dict:
  """Runs (or resumes) the rounds; evaluates every participant; writes train.json last."""
  start_time = time.time()
  shape_BxL = (config.train.batch_size, next(iter(train.values())).shape[1])
  plan = make_plan(config, train, shape_BxL[1])
  total_local = plan.rounds * plan.steps_per_round
  optimizer = steps.make_optimizer(config.train, total_local)
  init_key, data_seed, train_key = run.seeds(config.seed)
  programs = rounds.make_programs(config, plan, model, optimizer,
                                  server_lib.make_server_optimizer(config.federated),
                                  init_key, parallel.make_mesh(config.parallel))
  manager = checkpoint.make_manager(workdir, config.train.keep_checkpoints,
                                    config.federated.checkpoint_every)
  state, extra, source = checkpoint.restore_or_init(
      manager, programs.abstract_state, programs.init, config.train.init_from or None,
      import_params=run.import_params)
  start = int(jax.device_get(state['step']))
  logging.info('%s: %s at round %d of %d (%s local steps per round).', workdir, source,
               start, plan.rounds, dict(zip(plan.names, plan.steps_N.tolist())))
  data = blocks_lib.MultiIterator([train[n] for n in plan.names], shape_BxL[0], data_seed,
                                  extra.get('data'))
  seen_N = np.asarray(extra.get('blocks_seen', [0] * len(plan.names)), np.int64)
  keys = jax.random.split(train_key, len(plan.names) + 1)  # One per client, one to sample.
  schedule = steps.make_schedule(config.train, total_local)
  writer = io.MetricsWriter(workdir)
  writer.truncate_after(start, key='round')
  with tqdm.tqdm(total=plan.rounds, initial=start, desc='federated', unit='round',
                 dynamic_ncols=True) as bar:
    for r in range(start, plan.rounds):
      ids = sample_clients(keys[-1], r, len(plan.names), plan.per_round)
      state, metrics = run_round(programs, plan, state, data, keys[:-1], ids, r, shape_BxL)
      seen_N[ids] += plan.steps_N[ids] * shape_BxL[0]
      # The clients' learning rate at the round's first local step.
      row = _round_row(plan, ids, metrics, float(schedule(r * plan.steps_per_round)), r)
      writer.write(r + 1, row, key='round')
      every = config.federated.eval_every
      if every and (r + 1) % every == 0 and r + 1 < plan.rounds:
        writer.write(r + 1, _ppl_metrics(centralized.evaluate_valid(
            config, model, state['params'], valid)), key='round')
      checkpoint.save(manager, r + 1, state,
                      {'data': data.position, 'blocks_seen': seen_N.tolist()},
                      force=r + 1 == plan.rounds)
      bar.set_postfix(loss=f"{row['train/loss']:.3f}")
      bar.update(1)
  manager.wait_until_finished()
  manager.close()
  final = centralized.evaluate_valid(config, model, state['params'], valid)
  writer.write(plan.rounds, _ppl_metrics(final), key='round')
  writer.close()
  summary = {'setting': 'federated', 'participants': list(plan.names),
             'rounds': plan.rounds, 'source': source,
             'steps_per_round': plan.steps_per_round,
             'local_steps': dict(zip(plan.names, plan.steps_N.tolist())),
             'server_optimizer': config.federated.server_optimizer,
             **_tokens_seen(plan, seen_N, shape_BxL[1]),
             'valid': final, 'train_seconds': time.time() - start_time}
  return run.finish(workdir, state['params'], model.config, eot_id, summary)


def _tokens_seen(plan: Plan, blocks_seen_N: np.ndarray, seq_len: int) -> dict:
  """Predicted tokens trained on, in all and per participant (as centralized.fit counts)."""
  per_block = seq_len - 1
  return {'tokens_seen': int(blocks_seen_N.sum()) * per_block,
          'tokens_seen_per_participant': {
              n: int(blocks_seen_N[i]) * per_block for i, n in enumerate(plan.names)}}
