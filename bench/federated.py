"""Federated training throughput: rounds against centralized training at equal tokens, and
the vmapped client path against the reference loop, in one process on one machine.

All three sides train the same model on the same number of tokens in batches of the same
shape: centralized (`run.make_engine`, one jitted train_step per batch, as
`centralized.fit` runs it), federated with the clients vmapped (one compiled call per
round runs every client's local steps) and federated with the reference loop (the same
jitted single-client programs, client after client). Checkpoints and evaluation are left
out of every side. Each side runs once untimed (compilation), then `repeats` timed runs
that alternate sides, so machine load hits all alike; the best run counts. Tokens are
predicted tokens, batch * (L - 1) per step.

  python -m bench.federated [--clients=3] [--local_steps=4] [--rounds=2] [--batch=16]
      [--size=tiny] [--vocab=8192] [--dtype=float32] [--repeats=3] [--out=FILE]
"""

import json
import os
import platform
import time

from absl import app
from absl import flags
import jax
import numpy as np

from collab import io
from collab import parallel
from collab import steps
from collab.data import blocks as blocks_lib
from collab.settings import federated
from collab.settings import rounds
from collab.settings import run
from collab.settings import server as server_lib
from configs import common

_CLIENTS = flags.DEFINE_integer('clients', 3, 'Federated clients (all train every round).')
_LOCAL = flags.DEFINE_integer('local_steps', 4, 'Local steps per client per round.')
_ROUNDS = flags.DEFINE_integer('rounds', 2, 'Rounds per timed run.')
_BATCH = flags.DEFINE_integer('batch', 16, 'Blocks per batch (every side).')
_SIZE = flags.DEFINE_string('size', 'tiny', 'Model size (configs/common.py).')
_VOCAB = flags.DEFINE_integer('vocab', 8192, 'Vocabulary size (the default BPE size).')
_DTYPE = flags.DEFINE_string('dtype', 'float32', 'Compute dtype (config.model.dtype).')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs per side; the best counts.')
_LOSS_CHUNK = flags.DEFINE_integer('loss_chunk', 0, 'config.model.loss_chunk (0: whole).')
_OUT = flags.DEFINE_string('out', '', 'Also write the results here as JSON.')


def make_config():
  """The size's config with C synthetic participants, fixed local steps, no dropout noise."""
  c = common.base_config(_SIZE.value)
  c.model.dtype, c.model.loss_chunk = _DTYPE.value, _LOSS_CHUNK.value
  c.data.participants = [common.participant(f'client{i}', ('dir:synthetic',))
                         for i in range(_CLIENTS.value)]
  c.train.batch_size, c.train.warmup_steps = _BATCH.value, 10
  # Timed runs continue the same run: room on the schedule for all of them.
  c.federated.rounds = _ROUNDS.value * (_REPEATS.value + 1)
  c.federated.local_steps = _LOCAL.value
  c.train.steps = c.federated.rounds * _CLIENTS.value * _LOCAL.value
  return c


def synthetic_blocks(config) -> dict:
  """Two rounds' worth of random blocks per client (the model's speed ignores the tokens)."""
  rng = np.random.default_rng(0)
  rows = 2 * _LOCAL.value * _BATCH.value
  return {p.name: rng.integers(0, _VOCAB.value, (rows, config.data.seq_len)).astype(np.uint16)
          for p in config.data.participants}


def centralized_side(config, model, train: dict):
  """run(rounds): the same tokens as `rounds` federated rounds, one train_step per batch."""
  optimizer = steps.make_optimizer(config.train, config.train.steps)
  init_key, data_seed, train_key = run.seeds(config.seed)
  engine = run.make_engine(config, model, optimizer, init_key)
  pooled = np.concatenate(list(train.values()))
  batches = blocks_lib.BatchIterator(pooled, _BATCH.value, data_seed)
  box = {'state': engine.init()}

  def run_(rounds):
    state = box['state']
    for _ in range(rounds * _CLIENTS.value * _LOCAL.value):
      state, metrics = engine.step(state, next(batches), train_key)
    box['state'] = jax.block_until_ready(state)
    float(metrics['loss_sum'])
  return run_


def federated_side(config, model, train: dict, vmap: bool):
  """run(rounds): `rounds` federated rounds (vmapped clients, or the loop)."""
  config = config.copy_and_resolve_references()
  config.federated.vmap = vmap
  seq_len = config.data.seq_len
  plan = federated.make_plan(config, train, seq_len)
  optimizer = steps.make_optimizer(config.train, plan.rounds * plan.steps_per_round)
  init_key, data_seed, train_key = run.seeds(config.seed)
  programs = rounds.make_programs(
      config, plan, model, optimizer, server_lib.make_server_optimizer(config.federated),
      init_key, parallel.make_mesh(config.parallel))
  data = blocks_lib.MultiIterator([train[n] for n in plan.names], _BATCH.value, data_seed)
  keys = jax.random.split(train_key, len(plan.names) + 1)
  box = {'state': programs.init(), 'round': 0}

  def run_(rounds):
    state = box['state']
    for _ in range(rounds):
      ids = federated.sample_clients(keys[-1], box['round'], len(plan.names), plan.per_round)
      state, _ = federated.run_round(programs, plan, state, data, keys[:-1], ids,
                                     box['round'], (_BATCH.value, seq_len))
      box['round'] += 1
    box['state'] = jax.block_until_ready(state)
  return run_


def _timed(fn) -> tuple:
  """(wall s, CPU s of this process: every XLA thread) of fn(rounds)."""
  wall, cpu = time.perf_counter(), time.process_time()
  fn(_ROUNDS.value)
  return time.perf_counter() - wall, time.process_time() - cpu


def race(sides: dict) -> dict:
  """{name: (first run wall s, best wall s, best CPU s)}; timed runs alternate sides.

  CPU seconds are reported beside wall seconds because other jobs may share the machine:
  they slow the wall clock of whichever side runs while they do, not this process's CPU.
  """
  first = {name: _timed(fn)[0] for name, fn in sides.items()}
  best = {name: (float('inf'), float('inf')) for name in sides}
  for _ in range(_REPEATS.value):
    for name, fn in sides.items():
      wall, cpu = _timed(fn)
      best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
  return {name: (first[name],) + best[name] for name in sides}


def main(argv):
  del argv
  config = make_config()
  model, _ = run.make_model(config, {'vocab_size': _VOCAB.value})
  train = synthetic_blocks(config)
  sides = {'centralized': centralized_side(config, model, train),
           'federated (vmap)': federated_side(config, model, train, vmap=True),
           'federated (loop)': federated_side(config, model, train, vmap=False)}
  times = race(sides)
  tokens = _ROUNDS.value * _CLIENTS.value * _LOCAL.value * _BATCH.value * (
      config.data.seq_len - 1)
  central_wall, central_cpu = times['centralized'][1:]
  rows = [{'side': name, 'tokens': tokens, 'first_run_s': first, 'best_s': wall,
           'best_cpu_s': cpu, 'tok_s': tokens / wall, 'tok_per_cpu_s': tokens / cpu,
           'vs_centralized': central_wall / wall, 'vs_centralized_cpu': central_cpu / cpu}
          for name, (first, wall, cpu) in times.items()]
  device = jax.devices()[0]
  header = (f'# {platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} on '
            f'{jax.device_count()} {device.platform} device(s) ({device.device_kind}); '
            f'{_SIZE.value} model ({_DTYPE.value}'
            f'{f", loss chunks of {_LOSS_CHUNK.value}" if _LOSS_CHUNK.value else ""}), '
            f'{_CLIENTS.value} clients x '
            f'{_LOCAL.value} local steps x {_ROUNDS.value} rounds of batch {_BATCH.value} x '
            f'{config.data.seq_len}; load average {os.getloadavg()[0]:.1f}')
  print(header)
  print('| side | tokens | 1st run s | best s (CPU s) | tok/s | tok/CPU-s | vs centralized '
        '(CPU) |')
  print('|---|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['side']} | {r['tokens']:,} | {r['first_run_s']:.2f} | {r['best_s']:.2f} "
          f"({r['best_cpu_s']:.2f}) | {r['tok_s']:,.0f} | {r['tok_per_cpu_s']:,.0f} | "
          f"{r['vs_centralized']:.2f}x ({r['vs_centralized_cpu']:.2f}x) |")
  loop, vmapped = times['federated (loop)'], times['federated (vmap)']
  vmap_vs_loop = {'wall': loop[1] / vmapped[1], 'cpu': loop[2] / vmapped[2]}
  print(f"vmap vs loop: {vmap_vs_loop['wall']:.2f}x wall, {vmap_vs_loop['cpu']:.2f}x CPU")
  result = {'header': header, 'rows': rows, 'vmap_vs_loop': vmap_vs_loop}
  print(json.dumps(result))
  if _OUT.value:
    io.atomic_write_json(_OUT.value, result)


if __name__ == '__main__':
  app.run(main)
