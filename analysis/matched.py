"""Memorization against fit: extractable shares compared at equal training loss.

Settings learn at different speeds (FedAvg fits more slowly than pooled training), so
memorization at the end of training mixes "how it trains" with "how far it got". Each
run is a path over its snapshots, best and final models through (own training loss,
results.json 'fit'; extractable share of training windows at the primary k, its
'extractability'), and two settings are compared at the same fits.

- `trajectory(run, participant)`: the path's points in training order.
- `at_loss(trajectory, loss)`: the share interpolated linearly between the two adjacent
  points that bracket `loss` (None outside the path), with a seeded parametric-bootstrap
  interval (`CAPTION` states the method).
- `matched_difference(a, b)`: b - a averaged over `grid(overlap)`, training losses spaced
  evenly in log(loss) across the two paths' overlap, and at its lowest level; or why
  there is none ("fits never overlap: ...").

Also the bootstrap primitives analysis.findings builds on, so both give the same bytes.
"""

import math
from typing import Sequence

import numpy as np

from collab.evals.memorization import extractability

RESAMPLES = 2000
SEED = 1
LEVELS = 9  # Training losses a matched comparison averages over.
_NEAR = 1e-9  # Two snapshots at the same fraction of training are the same model.

CAPTION = (
    'Matched fit: each run\'s path of (own training loss, extractable share of training '
    'windows at the primary k) over its snapshots, best and final models; the share at a '
    'loss is interpolated linearly between the two adjacent points in training order that '
    'bracket it (the first such pair; none outside the path: no extrapolation). Two '
    f'settings are compared at {LEVELS} training losses spaced evenly in log(loss) from the '
    'low end to the high end of the range both paths reach (inclusive); the estimate is '
    'the mean gap over these levels (the average distance between the curves over the '
    'common fit), shown beside the gap at the lowest level (the closest fit both reach, '
    'where memorization is highest). Interval: parametric bootstrap, drawing Binomial(n, '
    f'r)/n once at every point of a path ({RESAMPLES} draws, seed {SEED}), interpolating '
    'each draw at every level with the same weights as the estimate and averaging it over '
    'the levels; 2.5/97.5 percentiles. A point with no extracted window draws only zeros.')


# ---- Bootstrap primitives ---------------------------------------------------------------

def interval(stats_R) -> list:
  """The 95% percentile interval of bootstrap replicates."""
  return [float(np.percentile(stats_R, 2.5)), float(np.percentile(stats_R, 97.5))]


def share_draws(k: int, n: int, rng) -> np.ndarray:
  """Bootstrap replicates of a share k/n: resampling n flags of which k are True."""
  return rng.binomial(n, k / n, RESAMPLES) / n


def mean_interval(values_N) -> tuple:
  """(mean, 95% interval) of the mean of paired differences, resampling them."""
  values_N = np.asarray(values_N, np.float64)
  if values_N.size == 0:
    return None, None
  rng = np.random.default_rng(SEED)
  idx_RxN = rng.integers(0, values_N.size, (RESAMPLES, values_N.size))
  return float(values_N.mean()), interval(values_N[idx_RxN].mean(axis=1))


def share_interval(k: int, n: int) -> tuple:
  if not n:
    return None, None
  return k / n, interval(share_draws(k, n, np.random.default_rng(SEED)))


def difference_interval(a: tuple, b: tuple) -> tuple:
  """(a share - b share, 95% interval) for independent samples a = (k, n), b = (k, n)."""
  (ka, na), (kb, nb) = a, b
  if not na or not nb:
    return None, None
  rng = np.random.default_rng(SEED)
  diff_R = share_draws(ka, na, rng) - share_draws(kb, nb, rng)
  return ka / na - kb / nb, interval(diff_R)


# ---- Reading extractability and fit -----------------------------------------------------

primary_k = extractability.primary_k  # The smallest k the audit measured.


def counts(section: dict | None, participant: str, split: str = 'train') -> tuple:
  """(extracted windows, windows) of one participant at the primary k; (0, 0) if absent."""
  k = primary_k(section)
  block = ((((section or {}).get('participants') or {}).get(participant) or {})
           .get(split) or {}).get(k) or {}
  return int(block.get('extracted') or 0), int(block.get('windows') or 0)


def cross_counts(section: dict | None, participant: str) -> tuple:
  """(extracted windows that are cross-organization clones, extracted windows); (0, 0)
  where the audit did not look for cross-organization clones (not: none found)."""
  block = (((section or {}).get('participants') or {}).get(participant) or {})
  if block.get('cross_org') is None:
    return 0, 0
  return int(block['cross_org'].get('extracted') or 0), counts(section, participant)[0]


def has_cross(section: dict | None) -> bool:
  """Whether the audit counted cross-organization clones among extracted windows."""
  parts = ((section or {}).get('participants') or {}).values()
  return any(b.get('cross_org') is not None for b in parts)


def total(pairs) -> tuple:
  """(sum of k, sum of n) of (k, n) count pairs."""
  return tuple(map(sum, zip(*pairs))) or (0, 0)


def summed_counts(runs, participants, split: str = 'train') -> tuple:
  """(extracted windows, windows) at the primary k over runs and participants."""
  return total(counts(r.get('extractability'), p, split) for r in runs for p in participants)


def summed_cross(runs) -> tuple:
  """(extracted windows that are cross-org clones, extracted windows) over runs."""
  return total(cross_counts(r.get('extractability'), p)
               for r in runs for p in measured(r.get('extractability')))


def measured(section: dict | None) -> list:
  """The participants an extractability section audited."""
  return list(((section or {}).get('participants') or {}))


def fit_loss(fit: dict | None, participant: str | None, own=None) -> float | None:
  """A participant's own training loss; None: the pooled one (token-weighted mean), over
  the participants in `own` (those the run trained on) when given."""
  fit = fit or {}
  if participant is not None:
    return ((fit.get('participants') or {}).get(participant) or {}).get('train_loss')
  pooled = (fit.get('pooled') or {}).get('train_loss')
  if pooled is not None and own is None:
    return pooled
  parts = [v for p, v in (fit.get('participants') or {}).items() if v.get('train_loss')
           is not None and v.get('tokens') and (own is None or p in own)]
  tokens = sum(v['tokens'] for v in parts)
  return sum(v['train_loss'] * v['tokens'] for v in parts) / tokens if tokens else None


# ---- Trajectories -----------------------------------------------------------------------

def place(point: dict, stages: int) -> tuple:
  """(stage, share of it done) of one of a run's models: it orders them and says when
  two are one model. Snapshot fractions are of the whole run; a chain's stage points end
  their stage, and its best point gives its stage and the share of that stage done."""
  if point.get('model') == 'final':
    return stages, 1.0
  if stages and point.get('model') != 'best':
    return point.get('stage', 0), 1.0 if 'stage' in point else point.get('fraction', 1.0)
  return point.get('stage', 0) if stages else 0, float(point.get('fraction', 1.0))


def _same_place(a: tuple, b: tuple) -> bool:
  return a[0] == b[0] and math.isclose(a[1], b[1], abs_tol=_NEAR)


def stages_of(run: dict) -> int:
  """A chain's number of stages; 0 for a run that is not a chain."""
  return len(run.get('order') or ()) if run.get('setting') == 'incremental' else 0


def path_points(run: dict) -> list:
  """A run's models in training order: snapshots (an incremental chain's stage points),
  the best model where it falls (once: the best is often a snapshot or the final model
  itself), then the final model. Each point is tagged with 'model' (its name on the
  path) and the best one with 'is_best': True."""
  stages = stages_of(run)
  points = [{**p, 'model': _label(p)} for p in run.get('snapshots') or []]
  points.append({**run, 'model': 'final'})
  best = (run.get('models') or {}).get('best')
  if best is not None:
    where = place({**best, 'model': 'best'}, stages)
    same = [i for i, p in enumerate(points) if _same_place(where, place(p, stages))]
    if same:
      points[same[0]]['is_best'] = True
    else:
      at = next(i for i, p in enumerate(points) if place(p, stages) > where
                or p['model'] == 'final')
      points.insert(at, {**best, 'model': 'best', 'is_best': True})
  return points


def _point_counts(ext: dict, participant: str | None, measure: str, own=None) -> tuple:
  get = cross_counts if measure == 'cross_org' else counts
  names = ([p for p in measured(ext) if own is None or p in own] if participant is None
           else [participant])
  return total(get(ext, p) for p in names)


def trajectory(run: dict, participant: str | None = None, measure: str = 'train') -> list:
  """[{'loss', 'extracted', 'windows', 'rate', 'model'}] in training order: a participant's
  own training loss and its extractable share (None: over the participants the run
  trained on, pooled loss and summed windows). measure='cross_org': the share of
  extracted windows that are cross-organization clones. Points without fit, or with
  nothing to share, are left out."""
  out = []
  own = run.get('participants')
  for p in path_points(run):
    loss = fit_loss(p.get('fit'), participant, own)
    c, n = _point_counts(p.get('extractability'), participant, measure, own)
    if loss is not None and n:
      out.append({'loss': float(loss), 'extracted': c, 'windows': n, 'rate': c / n,
                  'model': p['model']})
  return out


def has_path(runs) -> bool:
  """Whether any run has a model with both fit and extractability recorded."""
  return any(trajectory(r) for r in runs)


def _label(point: dict) -> str:
  """'stage 2', 'round 8', 'step 400': where a snapshot stands in training."""
  for key in ('stage', 'round', 'step'):
    if point.get(key) is not None:
      return f'{key} {point[key]}'
  return f"fraction {point.get('fraction')}"


def loss_range(traj: Sequence[dict]) -> tuple | None:
  losses = [p['loss'] for p in traj]
  return (min(losses), max(losses)) if losses else None


def _bracket(traj: Sequence[dict], loss: float) -> tuple | None:
  """(index a, index b, weight of b) of the first adjacent pair that brackets `loss`.
  Paths need not fall monotonically (an incremental participant's loss rises again
  while later stages train on others): the first crossing is when the run first
  reaches that fit."""
  pairs = [(i, i + 1) for i in range(len(traj) - 1)] or ([(0, 0)] if traj else [])
  for i, j in pairs:
    la, lb = traj[i]['loss'], traj[j]['loss']
    if min(la, lb) <= loss <= max(la, lb):
      return i, j, 0.0 if la == lb else (loss - la) / (lb - la)
  return None


def curve(traj: Sequence[dict], levels: Sequence[float], rng) -> dict | None:
  """{'rate_L', 'draws_RxL'}: the share interpolated at each level and its bootstrap
  replicates; None where the path misses a level. Every point's share is drawn once,
  so a point read at several levels carries the same draw to each."""
  found = [_bracket(traj, loss) for loss in levels]
  if not found or None in found:
    return None
  draws_RxP = np.stack([share_draws(p['extracted'], p['windows'], rng) for p in traj], 1)
  rate_P = np.array([p['rate'] for p in traj])
  i_L, j_L, w_L = (np.array(v) for v in zip(*found))
  return {'rate_L': (1 - w_L) * rate_P[i_L] + w_L * rate_P[j_L],
          'draws_RxL': (1 - w_L) * draws_RxP[:, i_L] + w_L * draws_RxP[:, j_L]}


def at_loss(traj: Sequence[dict], loss: float, rng=None) -> dict | None:
  """{'loss', 'rate', 'ci95', 'between', 'weight', 'draws'} of the share interpolated at
  `loss`; None where the path does not reach it. 'draws' are the bootstrap replicates."""
  found = _bracket(traj, loss)
  if found is None:
    return None
  i, j, w = found
  return {**group_at_loss([traj], loss, rng or np.random.default_rng(SEED)), 'weight': w,
          'between': (traj[i]['model'], traj[j]['model'])}


def group_curve(trajs: Sequence[Sequence[dict]], levels: Sequence[float], rng) -> dict | None:
  """The mean over paths (seeds, chains) of their curves; None unless every path reaches
  every level."""
  each = [curve(t, levels, rng) for t in trajs]
  if not each or any(e is None for e in each):
    return None
  return {k: np.mean([e[k] for e in each], axis=0) for k in ('rate_L', 'draws_RxL')}


def group_at_loss(trajs: Sequence[Sequence[dict]], loss: float, rng) -> dict | None:
  """group_curve at one loss: {'loss', 'rate', 'ci95', 'draws'}."""
  got = group_curve(trajs, [loss], rng)
  if got is None:
    return None
  draws = got['draws_RxL'][:, 0]
  return {'loss': loss, 'rate': float(got['rate_L'][0]), 'ci95': interval(draws),
          'draws': draws}


# ---- Comparing two settings at equal fit ------------------------------------------------

def _group(side) -> list:
  """A trajectory, or a list of trajectories (seeds), as a list of trajectories."""
  return [side] if side and isinstance(side[0], dict) else list(side or [])


def _intersect(ranges) -> tuple | None:
  if not ranges or None in ranges:
    return None
  lo, hi = max(r[0] for r in ranges), min(r[1] for r in ranges)
  return (lo, hi) if lo <= hi else None


def common_range(trajs: Sequence[Sequence[dict]]) -> tuple | None:
  """The loss range every path reaches (a path is connected, so it reaches every loss
  between its lowest and highest); None if they share none or one is empty."""
  return _intersect([loss_range(t) for t in trajs])


def grid(overlap: tuple, count: int = LEVELS) -> list:
  """`count` training losses from the overlap's low end to its high end (both exact),
  evenly spaced in log(loss); one level where the overlap is a single loss."""
  lo, hi = overlap
  if hi <= lo:
    return [lo]
  inner = np.geomspace(lo, hi, count) if lo > 0 else np.linspace(lo, hi, count)
  return [lo, *(float(x) for x in inner[1:-1]), hi]


def span(r) -> str:
  return f'[{r[0]:.3f}, {r[1]:.3f}]' if r else 'no fit with extractability'


def _no_overlap(a, b, ra, rb, names) -> str:
  empty = [n for n, side in zip(names, (a, b)) if not side or not all(side)]
  if empty or None in (ra, rb):
    return (f"{' and '.join(empty)}: no model with fit and extractability" if empty else
            f'the {names[0] if ra is None else names[1]} runs (seeds) share no fit')
  return f'fits never overlap: {names[0]} reaches {span(ra)}, {names[1]} {span(rb)}'


def _gap(ca: dict, cb: dict, at=slice(None)) -> dict:
  """b - a over the levels `at` (their mean gap), replicate by replicate."""
  draws = (cb['draws_RxL'][:, at] - ca['draws_RxL'][:, at]).mean(axis=1)
  rate_a, rate_b = (float(np.mean(c['rate_L'][at])) for c in (ca, cb))
  return {'matched': True, 'a': rate_a, 'b': rate_b, 'diff': rate_b - rate_a,
          'ci95': interval(draws), 'draws': draws}


def matched_difference(a, b, names: tuple = ('A', 'B'), levels=None, rng=None) -> dict:
  """b - a in extractable share at equal training loss: the mean gap over `levels`
  (default: `grid` of the overlap of the two loss ranges), with its 95% interval.

  a and b are trajectories, or lists of trajectories (seeds: each side is their mean).
  Returns {'matched': True, 'overlap', 'levels', 'gaps' (b - a at each level), 'a', 'b'
  (mean shares), 'diff', 'ci95', 'draws', 'lowest' (the same at the lowest level alone,
  with its 'loss')}; or {'matched': False, 'reason'} ('fits never overlap: ...')."""
  a, b = _group(a), _group(b)
  ra, rb = common_range(a), common_range(b)
  both = _intersect([ra, rb])
  if both is None:
    return {'matched': False, 'ranges': (ra, rb), 'reason': _no_overlap(a, b, ra, rb, names)}
  levels = grid(both) if levels is None else list(levels)
  rng = rng or np.random.default_rng(SEED)
  ca, cb = group_curve(a, levels, rng), group_curve(b, levels, rng)
  if ca is None or cb is None:
    return {'matched': False, 'ranges': (ra, rb),
            'reason': f'train losses {span((min(levels), max(levels)))} leave {span(both)}'}
  low = int(np.argmin(levels))
  return {**_gap(ca, cb), 'overlap': both, 'levels': levels,
          'gaps': (cb['rate_L'] - ca['rate_L']).tolist(),
          'lowest': {**_gap(ca, cb, slice(low, low + 1)), 'loss': levels[low]}}


def mean_difference(results: Sequence[dict], key: str | None = None) -> dict | None:
  """The mean of several matched differences (one per participant, say; key='lowest': of
  their lowest levels), replicate by replicate; None if none matched. Their replicates
  must come from one rng passed through matched_difference, so they are independent."""
  done = [r[key] if key else r for r in results if r.get('matched')]
  if not done:
    return None
  draws = np.mean([r['draws'] for r in done], axis=0)
  return {'diff': float(np.mean([r['diff'] for r in done])), 'ci95': interval(draws),
          'count': len(done)}


def last_vs_earlier(chains: Sequence[dict], names: Sequence[str]) -> dict:
  """participant -> matched_difference(its path in chains that saw it earlier, that saw
  it last), for those seen both ways; one rng: mean_difference's draws are independent."""
  rng, each = np.random.default_rng(SEED), {}
  for p in names:
    last = [trajectory(r, p) for r in chains if r['order'][-1] == p]
    earlier = [trajectory(r, p) for r in chains if p in r['order'][:-1]]
    if last and earlier:
      each[p] = matched_difference(earlier, last, (f'{p} earlier', f'{p} last'), rng=rng)
  return each


def widest_overlap(reference: tuple, candidates: dict) -> tuple:
  """((name, result), every result) for the candidate (name -> trajectories) whose fit
  overlaps the reference's (name, trajectories) over the widest loss range: of several
  runs of a setting (FedAvg over 8 or 32 rounds) the one that reaches the reference's
  fit best. (None, None) when none overlaps; ties go to the first name."""
  ref_name, ref = reference
  tried = {name: matched_difference(ref, trajs, (ref_name, name))
           for name, trajs in sorted(candidates.items())}
  done = [(name, r) for name, r in tried.items() if r['matched']]
  best = max(done, key=lambda t: t[1]['overlap'][1] - t[1]['overlap'][0],
             default=(None, None))
  return best, tried
