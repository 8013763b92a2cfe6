"""Memorization against fit: paths, interpolation at a loss, intervals, matched differences."""

import numpy as np
import pytest

from analysis import matched


def _traj(*points, windows=1000):
  """A hand-made path: (loss, rate) pairs in training order."""
  return [{'loss': loss, 'extracted': round(rate * windows), 'windows': windows,
           'rate': round(rate * windows) / windows, 'model': f'point {i}'}
          for i, (loss, rate) in enumerate(points)]


def _section(rate, n=1000, cross=0):
  block = {'windows': n, 'extracted': round(rate * n), 'rate': rate}
  return {'ks': [32, 64, 128], 'm': 32, 'skipped_ks': [], 'participants': {
      'a': {'train': {'32': block, '64': {'windows': n, 'extracted': 0}},
            'cross_org': {'extracted': cross, 'windows': 50}}}}


def _point(loss, rate, **where):
  return {'fit': {'participants': {'a': {'train_loss': loss, 'tokens': 10}},
                  'pooled': {'train_loss': loss}},
          'extractability': _section(rate), **where}


def test_a_run_path_is_snapshots_best_once_then_final():
  run = {'run': 'centralized', **_point(2.0, 0.3),
         'snapshots': [_point(4.0, 0.0, step=10, fraction=0.25),
                       {'step': 20, 'fraction': 0.5},  # Not audited: left out.
                       _point(3.0, 0.1, step=30, fraction=0.75)],
         'models': {'best': _point(3.5, 0.05, step=25, fraction=0.6)}}
  assert [p['loss'] for p in matched.trajectory(run)] == [4.0, 3.5, 3.0, 2.0]
  assert matched.trajectory(run)[1]['model'] == 'best'
  run['models']['best'] = _point(3.0, 0.1, step=30, fraction=0.75)  # A snapshot itself.
  assert [p['loss'] for p in matched.trajectory(run)] == [4.0, 3.0, 2.0]
  run['models']['best'] = _point(2.0, 0.3, fraction=1.0)  # The final model itself.
  assert [p['loss'] for p in matched.trajectory(run)] == [4.0, 3.0, 2.0]
  assert matched.trajectory({'run': 'old', 'perplexity': {}}) == []


def test_a_chain_best_sits_inside_its_stage():
  chain = {'run': 'incremental-a-b-c', 'setting': 'incremental', 'order': ['a', 'b', 'c'],
           **_point(2.0, 0.3),
           'snapshots': [_point(4.0, 0.0, stage=1, step=100, fraction=1 / 3),
                         _point(3.0, 0.1, stage=2, step=100, fraction=2 / 3)]}
  # A best point's fraction is of its own stage.
  for best, losses in (((3.5, 0.05, 2, 0.5), [4.0, 3.5, 3.0, 2.0]),
                       ((3.0, 0.1, 2, 1.0), [4.0, 3.0, 2.0]),  # Stage 2's end.
                       ((2.5, 0.2, 3, 0.5), [4.0, 3.0, 2.5, 2.0]),
                       ((2.0, 0.3, 3, 1.0), [4.0, 3.0, 2.0])):  # The final model.
    loss, rate, stage, fraction = best
    chain['models'] = {'best': _point(loss, rate, stage=stage, step=50, fraction=fraction)}
    assert [p['loss'] for p in matched.trajectory(chain)] == losses


def test_primary_k_is_the_smallest_audited():
  assert matched.primary_k({'ks': [128, 32, 64], 'skipped_ks': []}) == '32'
  assert matched.primary_k({'ks': [32, 64], 'skipped_ks': [32]}) == '64'
  assert matched.primary_k(None) is None
  assert matched.counts(_section(0.25), 'a') == (250, 1000)
  assert matched.cross_counts(_section(0.25, cross=40), 'a') == (40, 250)


def test_at_loss_is_exact_at_points_and_linear_between():
  traj = _traj((4.0, 0.0), (3.0, 0.1), (2.0, 0.3))
  assert matched.at_loss(traj, 3.0)['rate'] == pytest.approx(0.1)
  assert matched.at_loss(traj, 2.0)['rate'] == pytest.approx(0.3)
  assert matched.at_loss(traj, 2.5)['rate'] == pytest.approx(0.2)
  assert matched.at_loss(traj, 3.75)['rate'] == pytest.approx(0.025)
  assert matched.at_loss(traj, 1.99) is None and matched.at_loss(traj, 4.01) is None
  assert matched.at_loss([], 3.0) is None
  single = _traj((3.0, 0.1))
  assert matched.at_loss(single, 3.0)['rate'] == pytest.approx(0.1)
  assert matched.at_loss(single, 2.9) is None


def test_a_path_that_turns_back_is_read_where_it_first_reaches_the_loss():
  # Trained (loss falls, share rises), then forgotten while later stages train on others.
  traj = _traj((4.0, 0.0), (2.0, 0.2), (3.0, 0.0))
  at = matched.at_loss(traj, 2.5)
  assert at['rate'] == pytest.approx(0.15) and at['between'] == ('point 0', 'point 1')


def test_interval_holds_the_estimate_and_narrows_with_more_windows():
  few = matched.at_loss(_traj((4.0, 0.1), (2.0, 0.3), windows=100), 3.0)
  many = matched.at_loss(_traj((4.0, 0.1), (2.0, 0.3), windows=10000), 3.0)
  for at in (few, many):
    assert at['rate'] == pytest.approx(0.2) and at['ci95'][0] < at['rate'] < at['ci95'][1]
  assert many['ci95'][1] - many['ci95'][0] < (few['ci95'][1] - few['ci95'][0]) / 5
  assert matched.at_loss(_traj((4.0, 0.1), (2.0, 0.3)), 3.0)['ci95'] == \
      matched.at_loss(_traj((4.0, 0.1), (2.0, 0.3)), 3.0)['ci95']  # Seeded.
  nothing = matched.at_loss(_traj((4.0, 0.0), (2.0, 0.0)), 3.0)
  assert nothing['rate'] == 0 and nothing['ci95'] == [0.0, 0.0]


def test_grid_spans_the_overlap_evenly_in_log_loss():
  levels = matched.grid((0.082, 3.295))
  assert len(levels) == matched.LEVELS and levels[0] == 0.082 and levels[-1] == 3.295
  steps = np.diff(np.log(levels))
  assert steps == pytest.approx(np.full(len(steps), np.log(3.295 / 0.082) / 8))
  assert matched.grid((2.0, 2.0)) == [2.0]


def test_matched_difference_is_the_mean_gap_over_the_grid_and_at_its_lowest_level():
  a = _traj((4.0, 0.0), (3.0, 0.1), (2.0, 0.3))
  b = _traj((5.0, 0.0), (3.0, 0.05), (2.6, 0.09))
  res = matched.matched_difference(a, b)
  assert res['matched'] and res['overlap'] == (2.6, 4.0)
  assert res['levels'] == matched.grid((2.6, 4.0))
  assert res['levels'][0] == 2.6 and res['levels'][-1] == 4.0
  assert res['gaps'][0] == pytest.approx(0.09 - 0.18) and res['gaps'][-1] == pytest.approx(
      0.025 - 0.0)
  assert res['diff'] == pytest.approx(np.mean(res['gaps']))
  assert res['ci95'][0] < res['diff'] < res['ci95'][1] < 0
  low = res['lowest']
  assert low['loss'] == 2.6 and low['a'] == pytest.approx(0.18) and low['b'] == 0.09
  assert low['diff'] == pytest.approx(-0.09) and low['ci95'][1] < 0
  same = matched.matched_difference(a, [dict(p) for p in a])
  assert same['diff'] == 0 and same['ci95'][0] < 0 < same['ci95'][1]


def test_a_curve_uniformly_lower_by_20_points_is_20_points_lower():
  a = _traj((4.0, 0.3), (3.0, 0.5), (2.0, 0.8))
  b = _traj((4.0, 0.1), (3.5, 0.2), (3.0, 0.3), (2.5, 0.45), (2.0, 0.6))  # Same shape.
  res = matched.matched_difference(a, b)
  assert res['diff'] == pytest.approx(-0.2) and res['lowest']['diff'] == pytest.approx(-0.2)
  assert res['ci95'][1] < 0 and res['ci95'][0] < -0.2 < res['ci95'][1]


def test_one_curve_sampled_coarsely_differs_at_the_midpoint_not_over_the_grid():
  # The default study's snapshots on one curve: share (1.8 - loss) / 1.75 below 1.8.
  # Centralized's chord across the kink puts a share at the midpoint (1.684) where
  # FedAvg, sampled at the kink, has almost none: a coarse-snapshot artifact.
  def on_curve(*losses):
    return _traj(*((x, max(0.0, min(1.0, (1.8 - x) / 1.75))) for x in losses), windows=61)
  central = on_curve(3.295, 2.17, 0.52, 0.106, 0.073)
  fedavg = on_curve(3.511, 1.8, 1.506, 0.227, 0.046, 0.036)
  midpoint = matched.matched_difference(central, fedavg, levels=[(0.073 + 3.295) / 2])
  assert midpoint['diff'] < -0.1 and midpoint['ci95'][1] < 0  # It would say: less.
  res = matched.matched_difference(central, fedavg)
  assert abs(res['diff']) < 0.05 and res['ci95'][0] < 0 < res['ci95'][1]


def test_a_point_read_at_several_levels_carries_one_draw():
  # Both levels between the same two points: their draws move together, so averaging
  # them does not narrow the interval as independent draws would.
  traj = _traj((4.0, 0.1), (2.0, 0.3), windows=100)
  rng = np.random.default_rng(0)
  two = matched.curve(traj, [3.0, 3.0], rng)
  assert (two['draws_RxL'][:, 0] == two['draws_RxL'][:, 1]).all()
  assert matched.curve(traj, [3.0, 1.0], rng) is None


def test_fits_that_never_overlap_are_reported_as_such():
  res = matched.matched_difference(_traj((4.0, 0.0), (3.0, 0.1)),
                                   _traj((5.5, 0.0), (4.5, 0.01)), ('centralized', 'FedAvg'))
  assert not res['matched']
  assert res['reason'] == ('fits never overlap: centralized reaches [3.000, 4.000], '
                           'FedAvg [4.500, 5.500]')
  missing = matched.matched_difference(_traj((4.0, 0.0)), [], ('A', 'B'))
  assert not missing['matched'] and 'B: no model with fit' in missing['reason']


def test_seeds_must_all_reach_the_level_and_are_averaged():
  seeds_a = [_traj((4.0, 0.0), (2.0, 0.2)), _traj((3.8, 0.02), (2.2, 0.18))]
  res = matched.matched_difference(seeds_a, _traj((4.0, 0.0), (2.0, 0.2)))
  assert res['overlap'] == (2.2, 3.8) and res['lowest']['loss'] == 2.2
  assert res['lowest']['a'] == pytest.approx(0.18) and res['lowest']['b'] == pytest.approx(
      0.18)
  assert res['diff'] == pytest.approx(0.0, abs=1e-12)


def test_widest_overlap_and_mean_difference():
  central = _traj((4.0, 0.0), (2.0, 0.2))
  (name, res), tried = matched.widest_overlap(('centralized', [central]), {
      'federated-fedavg': [_traj((4.0, 0.0), (3.6, 0.01))],
      'federated-fedavg-r32': [_traj((4.0, 0.0), (2.4, 0.1))],
      'federated-fedavg-far': [_traj((6.0, 0.0), (5.0, 0.0))]})
  assert name == 'federated-fedavg-r32' and res['overlap'] == (2.4, 4.0)
  assert not tried['federated-fedavg-far']['matched']
  assert matched.widest_overlap(('centralized', [central]), {}) == ((None, None), {})
  mean = matched.mean_difference([res, tried['federated-fedavg'],
                                  tried['federated-fedavg-far']])
  assert mean['count'] == 2 and mean['diff'] == pytest.approx(
      (res['diff'] + tried['federated-fedavg']['diff']) / 2)
  low = matched.mean_difference([res, tried['federated-fedavg']], 'lowest')
  assert low['diff'] == pytest.approx(
      (res['lowest']['diff'] + tried['federated-fedavg']['lowest']['diff']) / 2)
  assert matched.mean_difference([tried['federated-fedavg-far']]) is None


def test_memorization_vs_fit_figure_draws_every_path_and_nothing_without_extractability(
    tmp_path):
  from analysis import plots  # Matplotlib (and the tables it reads through): this test only.
  run = {'run': 'centralized', 'setting': 'centralized', **_point(2.0, 0.3),
         'perplexity': {'a': 9.0, 'pooled': 9.0},
         'snapshots': [_point(4.0, 0.0, step=10, fraction=0.25, epochs=1.0,
                              perplexity={'a': 30.0, 'pooled': 30.0}),
                       _point(3.0, 0.1, step=30, fraction=0.75, epochs=3.0,
                              perplexity={'a': 12.0, 'pooled': 12.0})],
         'models': {'best': _point(3.0, 0.1, step=30, fraction=0.75)}}
  rows = plots.fit_points(run)
  assert [(r['loss'], r['share'], r['epochs'], r['best']) for r in rows] == [
      (4.0, 0.0, 1.0, False), (3.0, 0.1, 3.0, True), (2.0, 0.3, 4.0, False)]
  assert rows[-1]['parts'] == [(2.0, 0.3, 9.0)] and rows[0]['k'] == '32'
  path = str(tmp_path / 'memorization_vs_fit.png')
  assert plots.memorization_vs_fit([run], path) == path
  first = open(path, 'rb').read()
  plots.memorization_vs_fit([run], path)
  assert open(path, 'rb').read() == first
  old = {'run': 'old', 'setting': 'centralized', 'perplexity': {'pooled': 9.0},
         'memorization': {'participants': {}}}
  assert plots.memorization_vs_fit([old], str(tmp_path / 'x.png')) is None
  assert not (tmp_path / 'x.png').exists()
