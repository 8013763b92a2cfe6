"""Runs every benchmark one after another (what `make bench` runs) and summarises them.

Each bench runs as its own process (`python -m bench.NAME`): their absl flags would clash
in one process, and one bench's threads or compiled programs must not slow the next.
Benches that define `--record` (bench/record.py) get `--record=FILE` and rewrite only
their own section of it. Exits non-zero if any bench fails.

  python -m bench.run_all [--only=train_step,sampling] [--record=docs/BENCHMARKS.md]
"""

import ast
import importlib.util
import os
import subprocess
import sys
import time

from absl import app
from absl import flags
from absl import logging

from bench import record

BENCHES = ('train_step', 'sampling', 'federated', 'many_clients', 'sandbox', 'clones', 'flower')
NEEDS_TORCH = ('train_step', 'sampling')  # Their peers are transformers on PyTorch.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_ONLY = flags.DEFINE_list('only', [], f'Run only these benches (of {", ".join(BENCHES)}).')
_RECORD = flags.DEFINE_string('record', record.DEFAULT_PATH,
                              'Markdown file the benches record their sections in, '
                              'relative to the repository root; empty: record nothing.')


def defines_record_flag(name: str) -> bool:
  """Whether bench/NAME.py defines --record (record.define_flag() or DEFINE_*('record'))."""
  with open(os.path.join(ROOT, 'bench', f'{name}.py'), encoding='utf-8') as f:
    tree = ast.parse(f.read())
  for node in ast.walk(tree):
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
      continue
    owner = node.func.value
    if node.func.attr == 'define_flag' and isinstance(owner, ast.Name) and owner.id == 'record':
      return True
    first = node.args[0] if node.args else None
    if (node.func.attr.startswith('DEFINE_') and isinstance(first, ast.Constant)
        and first.value == 'record'):
      return True
  return False


def command(name: str, record_path: str) -> list:
  cmd = [sys.executable, '-m', f'bench.{name}']
  if record_path and defines_record_flag(name):
    cmd.append(f'--record={record_path}')
  return cmd


def run_one(name: str, record_path: str) -> dict:
  """Runs one bench with its output streamed through; returns its summary row."""
  cmd = command(name, record_path)
  logging.info('bench %s: %s', name, ' '.join(cmd))
  start = time.perf_counter()
  rc = subprocess.run(cmd, cwd=ROOT, check=False).returncode
  return {'bench': name, 'rc': rc, 'seconds': time.perf_counter() - start,
          'recorded': any(a.startswith('--record=') for a in cmd)}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments {argv[1:]}; use --only=NAME,...')
  names = list(_ONLY.value) or list(BENCHES)
  unknown = sorted(set(names) - set(BENCHES))
  if unknown:
    raise app.UsageError(f'Unknown benches {unknown}; choose from {", ".join(BENCHES)}.')
  if (importlib.util.find_spec('torch') is None
      and any(n in NEEDS_TORCH for n in names)):
    logging.warning('torch is not installed, so %s will fail: `pip install torch==2.13.0` '
                    '(make bench does).', [n for n in names if n in NEEDS_TORCH])
  if importlib.util.find_spec('flwr') is None and 'flower' in names:
    logging.warning('flwr is not installed, so bench.flower will fail: make flower '
                    '(make bench does).')
  rows = []
  for i, name in enumerate(names):
    print(f'\n===== [{i + 1}/{len(names)}] bench.{name} =====', flush=True)
    rows.append(run_one(name, _RECORD.value))
  print('\n| bench | result | seconds | section recorded |\n|---|---|---|---|')
  for r in rows:
    result = 'ok' if r['rc'] == 0 else f'FAILED (exit {r["rc"]})'
    print(f"| {r['bench']} | {result} | {r['seconds']:.0f} | "
          f"{'yes' if r['recorded'] else 'no (no --record flag)'} |")
  failed = [r['bench'] for r in rows if r['rc']]
  if failed:
    sys.exit(f'{len(failed)} of {len(rows)} benches failed: {", ".join(failed)}.')


if __name__ == '__main__':
  app.run(main)
