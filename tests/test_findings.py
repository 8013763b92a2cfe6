"""PROTOCOL findings: each rule on hand-made results, every verdict reachable."""

import numpy as np
import pytest

from analysis import findings
from analysis import matched
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


FINAL, BEST, MATCHED = 5, 3, 7  # Verdict columns of the findings table.


def _verdicts(runs, column=FINAL):
  return [row[column] for row in findings.findings(runs)[2]]


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
  title, header, rows = findings.findings(runs)
  assert header == ['finding', 'comparison', 'at best', 'verdict', 'at final', 'verdict',
                    'at matched fit', 'verdict']
  assert all(len(r) == len(header) for r in rows)
  a = tables.markdown(*findings.findings(runs))
  b = tables.markdown(*findings.findings(runs))
  assert a == b and a.count('| supported |') == 5
  assert 'findings' in tables.all_tables(runs, {})
  assert 'parametric bootstrap' in title


def test_results_without_best_fit_or_extractability_show_dashes():
  rows = findings.findings(_study())[2]
  assert [r[BEST - 1:BEST + 1] for r in rows] == [['–', '–']] * 5
  assert [r[MATCHED] for r in rows] == ['–'] * 5
  assert all(r[MATCHED - 1].startswith('–') for r in rows)


# ---- Extractability, best models and matched fit ---------------------------------------

def _ext(rates, n=1000, valid=0.002, cross=0.25):
  """An extractability section: participant -> extractable share at k=32 of n windows."""
  def block(rate):
    return {'32': {'windows': n, 'extracted': round(rate * n), 'rate': rate}}
  return {'ks': [32, 64], 'm': 32, 'skipped_ks': [], 'participants': {
      p: {'train': block(r), 'valid': block(valid),
          'cross_org': {'extracted': round(cross * round(r * n)), 'windows': n // 10}}
      for p, r in rates.items()}}


def _fit(losses):
  return {'participants': {p: {'train_loss': v, 'tokens': 100} for p, v in losses.items()},
          'pooled': {'train_loss': sum(losses.values()) / len(losses)}}


def _path(run, points, **ext):
  """The run with snapshots: points are (loss, share) of every participant, in training
  order, the last one the final model's."""
  snaps = [{'fraction': (i + 1) / len(points), 'step': i + 1,
            'fit': _fit({p: loss for p in NAMES}),
            'extractability': _ext({p: rate for p in NAMES}, **ext)}
           for i, (loss, rate) in enumerate(points[:-1])]
  loss, rate = points[-1]
  return dict(run, snapshots=snaps, fit=_fit({p: loss for p in NAMES}),
              extractability=_ext({p: rate for p in NAMES}, **ext))


def _chain(run, recency):
  """Stage points of a chain: a participant's loss falls to 2.0 in its stage and rises by
  0.5 per later stage; its share follows its loss, or (recency) is 0.2 only right after
  its own stage."""
  order, stages = run['order'], []
  for s in range(len(order)):
    losses, rates = {}, {}
    for p in order:
      i = order.index(p)
      losses[p] = 4.0 if s < i else 2.0 + 0.5 * (s - i)
      rates[p] = (0.2 if s == i else 0.0) if recency else 0.1 * (4.0 - losses[p])
    stages.append({'stage': s + 1, 'participant': order[s], 'fit': _fit(losses),
                   'extractability': _ext(rates)})
  return dict(run, snapshots=stages[:-1], **{k: stages[-1][k] for k in ('fit',
                                                                        'extractability')})


CENTRAL_PATH = ((4.0, 0.01), (3.0, 0.05), (2.0, 0.2))
FED_PATH = ((4.0, 0.01), (3.5, 0.03), (3.0, 0.05))  # Ten rounds: it fits less.


def _extracting_study(r32=((4.0, 0.01), (3.0, 0.05), (2.2, 0.17)), recency=True,
                      cross=0.25):
  """_study with extractability: FedAvg extracts like centralized at equal loss by
  default (its longer run, r32, follows centralized's curve), but fits less in 10 rounds."""
  runs = []
  for r in _study():
    if r['setting'] == 'centralized':
      runs.append(_path(r, CENTRAL_PATH, cross=cross))
    elif r['setting'] == 'federated':
      runs.append(_path(r, FED_PATH, cross=cross))
      if r32:
        runs.append(_path(dict(r, run='federated-fedavg-r32'), r32, cross=cross))
    elif r['setting'] == 'incremental':
      runs.append(_chain(r, recency))
    else:
      runs.append(r)
  return runs


def test_extractability_decides_final_and_equal_fit_is_not_less_memorization():
  runs = _extracting_study()
  rows = findings.findings(runs)[2]
  assert _verdicts(runs) == [findings.SUPPORTED] * 5
  assert 'extractable -15.00 [' in rows[2][FINAL - 1]  # 5% vs 20% of windows.
  assert 'clone ratio -15.0 [' in rows[2][FINAL - 1]  # The paper's measure beside it.
  assert rows[2][MATCHED] == findings.INCONCLUSIVE  # Same share at the same loss.
  assert rows[2][MATCHED - 1].startswith(
      'federated-fedavg-r32 minus centralized, mean over 9 train losses log-spaced across '
      '[2.200, 4.000] (both reach): 0.00 [')
  assert '; at the lowest, 2.200: 0.00 [' in rows[2][MATCHED - 1]
  assert rows[3][MATCHED] == findings.SUPPORTED  # Recency beyond fit.
  assert rows[4][MATCHED] == findings.SUPPORTED and rows[4][MATCHED - 1].startswith(
      'at train loss 2.200, the lowest both reach')
  assert rows[0][MATCHED] == rows[1][MATCHED] == '–'


def test_federated_that_extracts_less_at_equal_fit_supports_finding3():
  runs = _extracting_study(r32=((4.0, 0.005), (3.0, 0.025), (2.2, 0.085)))
  assert _verdicts(runs, MATCHED)[2] == findings.SUPPORTED
  more = _extracting_study(r32=((4.0, 0.02), (3.0, 0.1), (2.2, 0.3)))
  assert _verdicts(more, MATCHED)[2] == findings.CONTRADICTED


def test_a_coarse_snapshot_at_the_midpoint_does_not_decide_finding3():
  # One curve, share = (1.8 - loss) / 1.75 below loss 1.8, sampled at different losses
  # (the default study's snapshots); centralized's chord across the kink puts a share at
  # the overlap's midpoint (1.688) where FedAvg, sampled at the kink, has almost none.
  def on_curve(*losses):
    return tuple((x, max(0.0, min(1.0, (1.8 - x) / 1.75))) for x in losses)
  central = on_curve(3.295, 2.17, 0.52, 0.106, 0.073)
  r32 = on_curve(3.511, 1.8, 1.506, 0.227, 0.046, 0.036)
  runs = [_path(r, central, n=20) if r['setting'] == 'centralized' else
          _path(r, r32, n=20) if r['run'] == 'federated-fedavg-r32' else r
          for r in _extracting_study(r32=((4.0, 0.01), (3.0, 0.05), (2.2, 0.17)))]
  paths = [matched.trajectory(r) for r in runs if r['run'] in ('centralized',
                                                                'federated-fedavg-r32')]
  midpoint = matched.matched_difference(*paths, levels=[(0.073 + 3.295) / 2])
  assert midpoint['ci95'][1] < -0.1  # The midpoint alone: FedAvg 16 points below.
  assert abs(matched.matched_difference(*paths)['diff']) < 0.05
  row = findings.findings(runs)[2][2]
  assert row[MATCHED] == findings.INCONCLUSIVE
  assert 'across [0.073, 3.295] (both reach): -2.67 [' in row[MATCHED - 1]
  assert '; at the lowest, 0.073: ' in row[MATCHED - 1]


def test_fits_that_never_overlap_say_so():
  runs = [_path(r, ((5.0, 0.0), (4.5, 0.01))) if r['setting'] == 'federated' else r
          for r in _extracting_study(r32=None)]
  row3, _, row5 = findings.findings(runs)[2][2:]
  assert row3[MATCHED - 1] == ('fits never overlap: centralized reaches [2.000, 4.000], '
                               'federated-fedavg [4.500, 5.000]')
  assert row3[MATCHED] == findings.INCONCLUSIVE
  assert row5[MATCHED - 1].startswith('– (F3 found no matched fit')


def test_order_effect_that_fit_explains_is_not_supported_at_matched_fit():
  runs = _extracting_study(recency=False)  # Shares follow the loss alone.
  row = findings.findings(runs)[2][3]
  assert row[FINAL] == findings.SUPPORTED and row[MATCHED] == findings.INCONCLUSIVE
  assert 'mean over 3 participants: a [2.000, 3.000], ' in row[MATCHED - 1]
  assert "; at each one's lowest: " in row[MATCHED - 1]


def test_no_cross_organization_extraction_contradicts_finding5_at_every_point():
  runs = _extracting_study(cross=0.0)
  assert _verdicts(runs)[4] == _verdicts(runs, MATCHED)[4] == findings.CONTRADICTED


def test_best_model_is_judged_on_its_own_sections():
  runs = []
  for r in _extracting_study():
    best = None
    if r['setting'] == 'centralized':
      best = {'step': 2, 'fraction': 2 / 3, 'extractability': _ext({p: 0.05 for p in NAMES})}
    elif r['run'] == 'federated-fedavg':  # At its best FedAvg extracts more.
      best = {'round': 2, 'fraction': 2 / 3, 'extractability': _ext({p: 0.1 for p in NAMES})}
    runs.append(dict(r, models={'best': best}) if best else r)
  rows = findings.findings(runs)[2]
  assert rows[2][BEST] == findings.CONTRADICTED and rows[2][FINAL] == findings.SUPPORTED
  assert rows[2][BEST - 1].startswith('extractable 5.00 [')


def test_a_chain_best_at_an_earlier_stage_is_judged_on_what_it_has_seen():
  runs = []
  for r in _extracting_study():
    if r['setting'] == 'incremental':
      first, second = r['order'][:2]  # The best model ends stage 2: `second` seen last.
      losses = {p: _losses(2.8 if p == second else 3.2, seed=30)[p] for p in NAMES}
      r = dict(r, models={'best': {
          'stage': 2, 'participant': second, 'step': 100, 'fraction': 1.0,
          'perplexity_blocks': losses,
          'memorization': _mem({first: (10, 100), second: (30, 100), r['order'][2]: (0, 100)}),
          'extractability': _ext({first: 0.0, second: 0.2, r['order'][2]: 0.0})}})
    runs.append(r)
  row = findings.findings(runs)[2][3]
  assert row[BEST] == findings.SUPPORTED
  assert '(last 1200/6000, others 0/6000 windows)' in row[BEST - 1]


def test_extractability_without_cross_organization_counts_is_not_zero_clones():
  runs = _extracting_study()
  for r in runs:
    for point in [r] + (r.get('snapshots') or []):
      for block in ((point.get('extractability') or {}).get('participants') or {}).values():
        block.pop('cross_org', None)
  row = findings.findings(runs)[2][4]
  assert row[FINAL] == findings.SUPPORTED and row[FINAL - 1].startswith('clone spans:')
  assert row[MATCHED - 1].startswith('– (extractability counted no cross') and row[
      MATCHED] == '–'
