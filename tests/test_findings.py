"""PROTOCOL findings: each rule on hand-made results, every verdict reachable."""

import numpy as np
import pytest

from analysis import findings
from analysis import tables

NAMES = ('a', 'b', 'c')


def _mem(counts):
  """A memorization block: participant -> (memorized samples, samples); spans, cross."""
  return {'participants': {p: {'memorized_samples': k, 'samples': n, 'ratio': k / n}
                           for p, (k, n) in counts.items()}}


def _run(name, setting, losses, mem=None, **extra):
  """A results.json with per-block validation losses (participant -> list)."""
  return {'run': name, 'setting': setting,
          'perplexity': {p: float(np.exp(np.mean(v))) for p, v in losses.items()},
          'perplexity_blocks': losses, 'memorization': mem, **extra}


def _losses(level, spread=0.05, n=8, seed=0):
  rng = np.random.default_rng(seed)
  return {p: (level + spread * rng.standard_normal(n)).tolist() for p in NAMES}


def _study(central=3.0, single=3.5, fed=3.1, central_mem=(20, 100), fed_mem=(5, 100),
           last=(30, 100), other=(10, 100), last_loss=2.8, first_loss=3.2,
           cross=((0.25, 40), (0.5, 8))):
  runs = [_run(f'single-{p}', 'single', _losses(single, seed=i), participants=[p])
          for i, p in enumerate(NAMES)]
  runs.append(_run('centralized', 'centralized', _losses(central, seed=5),
                   {**_mem({p: central_mem for p in NAMES}), 'cross_org_share': cross[0][0],
                    'spans': cross[0][1]}))
  runs.append(_run('federated-fedavg', 'federated', _losses(fed, seed=6),
                   {**_mem({p: fed_mem for p in NAMES}), 'cross_org_share': cross[1][0],
                    'spans': cross[1][1]}, server_optimizer='fedavg'))
  for i, order in enumerate([('a', 'b', 'c'), ('c', 'b', 'a'), ('b', 'a', 'c'),
                             ('c', 'a', 'b'), ('a', 'c', 'b'), ('b', 'c', 'a')]):
    losses = {p: (_losses(last_loss, seed=10 + i)[p] if p == order[-1] else
                  _losses(first_loss, seed=20 + i)[p]) for p in NAMES}
    mem = _mem({p: last if p == order[-1] else other for p in NAMES})
    runs.append(_run('incremental-' + '-'.join(order), 'incremental', losses, mem,
                     order=list(order)))
  return runs


def _verdicts(runs):
  return [row[-1] for row in findings.findings(runs)[2]]


def test_every_finding_supported_by_a_study_that_shows_it():
  assert _verdicts(_study()) == [findings.SUPPORTED] * 5


def test_every_finding_contradicted_by_a_study_that_shows_the_opposite():
  runs = _study(central=3.5, single=3.0, fed=4.5, central_mem=(5, 100), fed_mem=(30, 100),
                last=(5, 100), other=(30, 100), last_loss=3.2, first_loss=2.8,
                cross=((0.0, 40), (0.0, 20)))
  assert _verdicts(runs) == [findings.CONTRADICTED] * 5


def test_every_finding_inconclusive_when_the_study_cannot_tell():
  runs = _study(central=3.0, single=3.0, fed=3.2, central_mem=(10, 100), fed_mem=(9, 100),
                last=(10, 100), other=(10, 100), last_loss=3.0, first_loss=3.0,
                cross=((0.5, 4), (0.0, 0)))
  # F2: ratio exp(0.2) = 1.22, inside the margin but with an interval that crosses it.
  runs = [dict(r, perplexity_blocks={p: (np.asarray(v) + (np.arange(len(v)) % 2 - 0.5) * 0.3
                                         ).tolist() for p, v in r['perplexity_blocks'].items()})
          if r['setting'] == 'federated' else r for r in runs]
  assert _verdicts(runs) == [findings.INCONCLUSIVE] * 5


def test_federated_that_emits_nothing_contradicts_still_emits():
  runs = _study(fed_mem=(0, 100))
  assert _verdicts(runs)[2] == findings.CONTRADICTED


def test_intervals_are_bootstraps_of_the_right_quantities():
  diffs = np.array([-0.2, -0.1, -0.3, -0.25, -0.15])
  mean, ci = findings.mean_interval(diffs)
  assert mean == pytest.approx(diffs.mean())
  assert diffs.min() <= ci[0] < mean < ci[1] <= diffs.max()
  share, ci = findings.share_interval(3, 100)
  assert share == 0.03 and 0.0 <= ci[0] < 0.03 < ci[1] < 0.1
  assert findings.share_interval(0, 0) == (None, None)
  diff, ci = findings.difference_interval((30, 100), (10, 100))
  assert diff == pytest.approx(0.2) and ci[0] > 0.05 and ci[1] < 0.35


def test_findings_table_is_written_and_identical_on_rerun():
  runs = _study()
  a = tables.markdown(*findings.findings(runs))
  b = tables.markdown(*findings.findings(runs))
  assert a == b and a.count('| supported |') == 5
  assert 'findings' in tables.all_tables(runs, {})
