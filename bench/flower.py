"""Federated rounds over Flower against the in-process simulation of the same rounds.

For each model size, three participants of synthetic blocks train R rounds of K local
steps: once in this process (`federated.fit`, clients vmapped, the simulation), once over
a SuperLink and three SuperNodes on localhost (collab/flower, insecure). Both sides run
the same config and data; the Flower side's round times come from the server's
WORKDIR/flower_rounds.jsonl (send, local training and replies; then aggregation), its
nodes' own training time from their replies, the bytes from the parameter arrays sent
each way. Round 1 (the nodes' workers start and compile) is reported apart; rounds 2..R
give the medians. Where the rest of a Flower round goes: the SuperNode polls the
SuperLink every 3 s (hard-coded in flwr 1.42), and each message starts a fresh ClientApp
process (~1 s of Python and flwr imports) that hands it to the node's worker.

  python -m bench.flower [--sizes=tiny,small] [--rounds=4] [--local_steps=4]
      [--batch=8] [--record=docs/BENCHMARKS.md]
"""

import json
import os
import statistics
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

from bench import record
from collab import io
from collab.data import blocks as blocks_lib
from collab.settings import federated
from collab.settings import run
from configs import common

_SIZES = flags.DEFINE_list('sizes', ['tiny', 'small'], 'Model sizes (configs/common.py).')
_ROUNDS = flags.DEFINE_integer('rounds', 4, 'Rounds per side.')
_LOCAL = flags.DEFINE_integer('local_steps', 4, 'Local steps per client per round.')
_BATCH = flags.DEFINE_integer('batch', 8, 'Blocks per batch.')
_RECORD = record.define_flag()
PARTICIPANTS = ('org0', 'org1', 'org2')
HEADING = '## Flower (`bench/flower.py`)'
LATEST_HEADING = '### Latest run of `python -m bench.flower`'
VOCAB, SEQ_LEN, BLOCKS = 2048, 256, 64


def synthetic_data(data_dir: str) -> str:
  """A built data folder: three participants of random blocks, no tokenizer."""
  rng = np.random.default_rng(0)
  os.makedirs(os.path.join(data_dir, 'blocks'), exist_ok=True)
  for p in PARTICIPANTS:
    for split, n in (('train', BLOCKS), ('valid', 8)):
      blocks_lib.save_blocks(blocks_lib.blocks_path(data_dir, p, split),
                             rng.integers(0, VOCAB, (n, SEQ_LEN), dtype=np.uint16))
  os.makedirs(os.path.join(data_dir, 'tokenizer'), exist_ok=True)
  io.atomic_write_json(os.path.join(data_dir, 'manifest.json'), {
      'participants': list(PARTICIPANTS), 'seq_len': SEQ_LEN, 'vocab_size': VOCAB,
      'eot_id': 0, 'block_dtype': 'uint16', 'inputs': 'synthetic'})
  return data_dir


def make_config(size: str, data_dir: str):
  c = common.base_config(size)
  c.setting = 'federated'
  c.data.participants = [common.participant(p, ('dir:synthetic',)) for p in PARTICIPANTS]
  c.data.seq_len, c.data.data_dir = SEQ_LEN, data_dir
  c.model.vocab_size, c.model.dropout = VOCAB, 0.0
  c.train.batch_size, c.train.warmup_steps = _BATCH.value, 2
  c.federated.rounds, c.federated.local_steps = _ROUNDS.value, _LOCAL.value
  return c


def simulate(config, workdir: str) -> list:
  """Seconds of each round in this process (federated.run_round timed)."""
  times, original = [], federated.run_round

  def timed(*args, **kwargs):
    start = time.perf_counter()
    out = original(*args, **kwargs)
    import jax  # pylint: disable=g-import-not-at-top
    jax.block_until_ready(out[0]['params'])
    times.append(time.perf_counter() - start)
    return out
  federated.run_round = timed
  try:
    data = run.load_data(config, workdir, PARTICIPANTS)
    model, _ = run.make_model(config, data.manifest)
    federated.fit(config, workdir, model, data.train, data.valid)
  finally:
    federated.run_round = original
  return times


def deploy(config, root: str) -> dict:
  """The same rounds over three local SuperNodes: round rows and start-up seconds."""
  from collab.flower import local  # pylint: disable=g-import-not-at-top
  data_dir = config.data.data_dir
  workdir = os.path.join(root, 'run')
  os.makedirs(workdir)
  run.write_config(workdir, config)
  with local.Federation(os.path.join(root, 'flower')) as fed:
    start = time.perf_counter()
    fed.start_superlink()
    for p in PARTICIPANTS:
      fed.start_node(p, local.node_data(data_dir, p, os.path.join(root, p, 'data')),
                     os.path.join(root, p, 'state'))
    up = time.perf_counter() - start
    start = time.perf_counter()
    fed.run(workdir)
    total = time.perf_counter() - start
  rows = io.read_jsonl(os.path.join(workdir, 'flower_rounds.jsonl'))
  return {'rows': rows, 'startup_s': up, 'run_s': total}


def measure(size: str) -> dict:
  with tempfile.TemporaryDirectory() as root:
    config = make_config(size, synthetic_data(os.path.join(root, 'data')))
    sim = simulate(config, os.path.join(root, 'sim'))
    flower = deploy(config, os.path.join(root, 'flower'))
  later = flower['rows'][1:]
  node_s = [statistics.median(v for v in r['node_seconds'].values()) for r in later]
  return {
      'size': size, 'sim_first_s': sim[0], 'sim_s': statistics.median(sim[1:]),
      'flower_first_s': flower['rows'][0]['seconds'],
      'flower_s': statistics.median(r['seconds'] for r in later),
      'node_s': statistics.median(node_s),
      'aggregate_s': statistics.median(r['aggregate_seconds'] for r in later),
      'bytes_down': flower['rows'][0]['bytes_to_nodes'],
      'bytes_up': flower['rows'][0]['bytes_from_nodes'],
      'startup_s': flower['startup_s'], 'run_s': flower['run_s']}


def table(results: list) -> str:
  lines = ['| model | params MB | sent / received per round MB | simulation s/round '
           '(rounds/s) | Flower s/round (rounds/s) | Flower vs simulation | node training '
           's | aggregation s | round 1 s: simulation, Flower | SuperLink + 3 SuperNodes up s |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for r in results:
    lines.append(
        f"| {r['size']} | {r['bytes_up'] / 3 / 1e6:.1f} | {r['bytes_down'] / 1e6:.1f} / "
        f"{r['bytes_up'] / 1e6:.1f} | {r['sim_s']:.2f} ({1 / r['sim_s']:.2f}) | "
        f"{r['flower_s']:.2f} ({1 / r['flower_s']:.3f}) | {r['flower_s'] / r['sim_s']:.1f}x | "
        f"{r['node_s']:.2f} | {r['aggregate_s']:.2f} | {r['sim_first_s']:.1f}, "
        f"{r['flower_first_s']:.1f} | {r['startup_s']:.1f} |")
  return '\n'.join(lines)


def main(argv):
  del argv
  results = [measure(size) for size in _SIZES.value]
  text = (f'{record.stamp()} 3 participants x {_LOCAL.value} local steps of {_BATCH.value} x '
          f'{SEQ_LEN} tokens per round, {_ROUNDS.value} rounds; medians of rounds 2-'
          f'{_ROUNDS.value}; Flower: one SuperLink and three SuperNodes on localhost, '
          f'insecure, the nodes\' workers kept across rounds.\n\n{table(results)}\n')
  print(text)
  print(json.dumps(results, indent=1))
  if _RECORD.value:
    record.replace_section(_RECORD.value, LATEST_HEADING, text, parent=HEADING)


if __name__ == '__main__':
  app.run(main)
