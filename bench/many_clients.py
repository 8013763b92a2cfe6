"""Many clients: federated rounds as the federation grows tenfold, and against the client block.

Every measurement is a fresh process (`--child`) that trains `federated.fit` for a few
rounds over N synthetic clients (`collab.data.clients.partition`, 'synthetic': contiguous
shards of one memory-mapped array of random tokens, `--blocks_per_client` blocks each;
the model's speed ignores the tokens, and random blocks let N reach 10,000 without
building 40,000 blocks of real code). Each round samples `--per_round` clients and trains
them in vmapped blocks of B (`config.federated.client_block`); client optimizer states are
not kept. Rounds are timed around `federated.run_round` (the first one, which compiles,
is reported apart; the rest give medians of wall and of this process's CPU time, which
other jobs on the machine disturb less); the rest of `fit` (final checkpoint, validation,
export) runs too.
Memory is the process's RSS high-water mark (getrusage) after the last round, and at
the end of `fit`; a fresh process per point keeps points apart.

  python -m bench.many_clients [--clients=100,1000,10000] [--blocks=4,16,32]
      [--sweep_at=1000] [--fixed_block=16] [--per_round=32] [--rounds=5]
      [--record=docs/BENCHMARKS.md] [--out=FILE]
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

from bench import record
from collab import io

HEADING = '## Many clients (`bench/many_clients.py`)'
LATEST_HEADING = '### Latest run of `python -m bench.many_clients`'

_CLIENTS = flags.DEFINE_list('clients', ['100', '1000', '10000'],
                             'Federation sizes N (memory should stay flat across them).')
_BLOCKS = flags.DEFINE_list('blocks', ['4', '16', '32'],
                            'Client blocks B swept at N = --sweep_at.')
_SWEEP_AT = flags.DEFINE_integer('sweep_at', 1000, 'N of the client-block sweep.')
_FIXED_BLOCK = flags.DEFINE_integer('fixed_block', 16, 'B of the N sweep.')
_PER_ROUND = flags.DEFINE_integer('per_round', 32, 'Clients sampled per round (m).')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Rounds per point (the first compiles).')
_LOCAL = flags.DEFINE_integer('local_steps', 2, 'Local steps per client per round.')
_BATCH = flags.DEFINE_integer('batch', 4, 'Blocks per local batch.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 64, 'Tokens per block.')
_PER_CLIENT = flags.DEFINE_integer('blocks_per_client', 4, 'Training blocks per client.')
_VOCAB = flags.DEFINE_integer('vocab', 2048, 'Vocabulary (configs/many_clients.py: 2048).')
_CHILD = flags.DEFINE_string('child', '', 'Internal: JSON {clients, block, tokens} to run.')
_OUT = flags.DEFINE_string('out', '', 'Also write the results here as JSON.')
_RECORD = record.define_flag()


def make_config(num_clients: int, block: int):
  """configs/many_clients.py with one participant cut into N clients of the given size."""
  from configs import common
  from configs import many_clients
  c = many_clients.get_config('synthetic')
  c.data.participants = [common.participant('bench', ('dir:synthetic',))]
  c.data.seq_len = _SEQ_LEN.value
  c.train.batch_size, c.train.eval_batch_size = _BATCH.value, 8
  c.federated.synthetic_clients = num_clients
  c.federated.clients_per_round = min(_PER_ROUND.value, num_clients)
  c.federated.client_block = block
  c.federated.local_steps = _LOCAL.value
  c.federated.rounds = _ROUNDS.value
  c.federated.checkpoint_every = _ROUNDS.value  # One checkpoint, at the end.
  return c


def child(spec: dict) -> dict:
  """One point in this (fresh) process: times rounds of federated.fit; peak RSS."""
  from collab.data import clients
  from collab.settings import federated
  from collab.settings import run
  n, block = int(spec['clients']), int(spec['block'])
  config = make_config(n, block)
  tokens_NxL = np.load(spec['tokens'], mmap_mode='r')
  train = {'bench': tokens_NxL[:n * _PER_CLIENT.value]}
  valid = {'bench': tokens_NxL[-8:]}
  fed = clients.partition(config.federated, '', train, config.seed)
  model, _ = run.make_model(config, {'vocab_size': _VOCAB.value})
  times, cpu, tokens, rss = [], [], [], []
  original = federated.run_round

  def timed_round(*args, **kwargs):  # fit looks run_round up in its module at every round.
    start, start_cpu = time.perf_counter(), time.process_time()
    state, metrics = original(*args, **kwargs)  # Returns host metrics: the round is done.
    times.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
    tokens.append(float(np.sum(metrics['tokens'])))
    rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return state, metrics

  federated.run_round = timed_round
  with tempfile.TemporaryDirectory() as workdir:
    federated.fit(config, workdir, model, fed.blocks, valid, eot_id=0, owner=fed.owner)
  peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  wall_s, cpu_s = float(np.median(times[1:] or times)), float(np.median(cpu[1:] or cpu))
  per_round = config.federated.clients_per_round
  round_tokens = float(np.median(tokens))
  return {'clients': n, 'block': block, 'per_round': per_round, 'rounds': len(times),
          'first_round_s': times[0], 'round_s': wall_s, 'round_cpu_s': cpu_s,
          'clients_per_s': per_round / wall_s, 'tokens_per_s': round_tokens / wall_s,
          'tokens_per_cpu_s': round_tokens / cpu_s,
          'rounds_rss_mb': rss[-1], 'peak_rss_mb': peak_mb}


def run_point(tokens_path: str, n: int, block: int) -> dict:
  """Runs one point in a fresh process with this process's flags; returns its result."""
  spec = json.dumps({'clients': n, 'block': block, 'tokens': tokens_path})
  flags_ = [a for a in sys.argv[1:] if not a.startswith(('--record', '--out', '--child'))]
  out = subprocess.run([sys.executable, '-m', 'bench.many_clients', f'--child={spec}',
                        *flags_], capture_output=True, text=True, check=False)
  lines = [l for l in out.stdout.splitlines() if l.startswith('RESULT ')]
  if out.returncode or not lines:
    raise RuntimeError(f'Point N={n}, B={block} failed:\n{out.stderr[-3000:]}')
  return json.loads(lines[-1][len('RESULT '):])


def markdown(rows: list) -> str:
  lines = ['| clients N | block B | sampled m | s/round (CPU s) | clients/s | tokens/s | '
           'tokens/CPU-s | 1st round s (compile) | peak RSS MB: rounds (whole fit) |',
           '|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f"| {r['clients']:,} | {r['block']} | {r['per_round']} | {r['round_s']:.2f} "
                 f"({r['round_cpu_s']:.2f}) | {r['clients_per_s']:.1f} | "
                 f"{r['tokens_per_s']:,.0f} | {r['tokens_per_cpu_s']:,.0f} | "
                 f"{r['first_round_s']:.1f} | {r['rounds_rss_mb']:,.0f} "
                 f"({r['peak_rss_mb']:,.0f}) |")
  return '\n'.join(lines)


def main(argv):
  del argv
  if _CHILD.value:
    print('RESULT ' + json.dumps(child(json.loads(_CHILD.value))), flush=True)
    return
  sizes = sorted({int(n) for n in _CLIENTS.value})
  points = [(n, _FIXED_BLOCK.value) for n in sizes]
  points += [(_SWEEP_AT.value, int(b)) for b in _BLOCKS.value
             if (_SWEEP_AT.value, int(b)) not in points]
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'tokens.npy')
    rows_needed = max(n for n, _ in points) * _PER_CLIENT.value + 8  # + 8 validation blocks.
    rng = np.random.default_rng(0)
    np.save(path, rng.integers(0, _VOCAB.value, (rows_needed, _SEQ_LEN.value), np.uint16))
    for n, block in points:
      start = time.perf_counter()
      rows.append(run_point(path, n, block))
      print(f'N={n} B={block}: {rows[-1]} ({time.perf_counter() - start:.0f} s)', flush=True)
  conditions = (f'tiny model (configs/many_clients.py), m = {_PER_ROUND.value} clients per '
                f'round x {_LOCAL.value} local steps of {_BATCH.value} x {_SEQ_LEN.value} '
                f'tokens, {_PER_CLIENT.value} blocks per client, client states not kept; '
                f'median of rounds 2-{_ROUNDS.value}; one fresh process per row.')
  table = markdown(rows)
  print(conditions + '\n\n' + table)
  if _OUT.value:
    io.atomic_write_json(_OUT.value, {'conditions': conditions, 'rows': rows})
  if _RECORD.value:
    record.replace_section(_RECORD.value, LATEST_HEADING,
                           f'{record.stamp()} {conditions}\n\n{table}', parent=HEADING)


if __name__ == '__main__':
  app.run(main)
