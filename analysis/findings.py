"""PROTOCOL's five findings, each answered by a comparison with a 95% interval and a verdict.

Reads results.json files only (through analysis.results). Every interval is a percentile
bootstrap with a fixed seed, so the same results give the same bytes:

- perplexity comparisons resample validation blocks (paired: both models scored the
  same blocks; `perplexity_blocks` in results.json), and report the ratio of perplexities
  exp(mean loss difference);
- memorization comparisons resample generated samples (each side's memorized / total
  counts), and the cross-organization share resamples memorized spans.

Runs repeated over seeds contribute all their blocks and samples. The verdict rules are
stated in `RULES` (the table's caption) and applied by `verdict_*` below.
"""

import math
from typing import Sequence

import numpy as np

from analysis import results

RESAMPLES = 2000
SEED = 1
# Finding 2: federated is "close to" centralized when the perplexity ratio lies within
# this factor either way (an equivalence margin, stated before looking at the numbers).
CLOSE = 1.25

SUPPORTED, CONTRADICTED, INCONCLUSIVE = 'supported', 'contradicted', 'inconclusive'
RULES = (
    'Verdicts: a 95% bootstrap interval (resampling validation blocks for perplexity, '
    'generated samples for memorization ratios, memorized spans for shares) that excludes '
    'the null in the paper\'s direction supports a finding; one that excludes it in the '
    'other direction contradicts it; otherwise inconclusive. F1: centralized / own-single '
    f'perplexity < 1. F2: FedAvg / centralized perplexity inside [1/{CLOSE}, {CLOSE}] supports, '
    'wholly outside contradicts. F3: FedAvg minus centralized memorization ratio < 0 and '
    'FedAvg ratio > 0 (a FedAvg ratio of exactly 0 contradicts "still emits"). F4: in the '
    'six orders, memorization of the participant seen last minus the others > 0 and '
    'perplexity of a participant seen last / seen first < 1 (both needed to support; '
    'either reversed contradicts). F5: share of memorized spans that are cross-organization '
    'clones > 0 in both the centralized and the FedAvg run (no memorized span: '
    'inconclusive; spans but none cross-org: contradicted). Samples are resampled as '
    'independent draws although each prompt gives several, so memorization intervals '
    'are narrower than a bootstrap over prompts would give.')


# ---- Bootstrap --------------------------------------------------------------------------

def _interval(stats_R) -> list:
  return [float(np.percentile(stats_R, 2.5)), float(np.percentile(stats_R, 97.5))]


def mean_interval(values_N) -> tuple:
  """(mean, 95% interval) of the mean of paired differences, resampling them."""
  values_N = np.asarray(values_N, np.float64)
  if values_N.size == 0:
    return None, None
  rng = np.random.default_rng(SEED)
  idx_RxN = rng.integers(0, values_N.size, (RESAMPLES, values_N.size))
  return float(values_N.mean()), _interval(values_N[idx_RxN].mean(axis=1))


def share_draws(k: int, n: int, rng) -> np.ndarray:
  """Bootstrap replicates of a share k/n: resampling n flags of which k are True."""
  return rng.binomial(n, k / n, RESAMPLES) / n


def share_interval(k: int, n: int) -> tuple:
  if not n:
    return None, None
  return k / n, _interval(share_draws(k, n, np.random.default_rng(SEED)))


def difference_interval(a: tuple, b: tuple) -> tuple:
  """(a share - b share, 95% interval) for independent samples a = (k, n), b = (k, n)."""
  (ka, na), (kb, nb) = a, b
  if not na or not nb:
    return None, None
  rng = np.random.default_rng(SEED)
  diff_R = share_draws(ka, na, rng) - share_draws(kb, nb, rng)
  return ka / na - kb / nb, _interval(diff_R)


def direction(ci, expected: int) -> int:
  """+1: the interval excludes 0 on the `expected` side (+1 above, -1 below); -1: on the
  other side; 0: it holds 0 (or there is none)."""
  if not ci:
    return 0
  side = 1 if ci[0] > 0 else -1 if ci[1] < 0 else 0
  return side * expected


# ---- What the runs hold -----------------------------------------------------------------

def _by_setting(runs, setting: str, optimizer: str | None = None) -> list:
  return [r for r in runs if r['setting'] == setting and (
      optimizer is None or r.get('server_optimizer') == optimizer)
          and r.get('privacy') is None]  # DP-FedAvg runs are not the paper's FedAvg.


def _blocks(run: dict, participant: str):
  return np.asarray((run.get('perplexity_blocks') or {}).get(participant) or (), np.float64)


def _paired(a_runs, b_runs, participants) -> np.ndarray:
  """Loss differences a - b on the same validation blocks, over participants and seeds."""
  diffs = []
  for a, b in zip(a_runs, b_runs):
    for p in participants:
      la, lb = _blocks(a, p), _blocks(b, p)
      if la.size and la.size == lb.size:
        diffs.append(la - lb)
  return np.concatenate(diffs) if diffs else np.zeros(0)


def _mem_counts(runs, participants) -> tuple:
  """(memorized samples, samples) of prompted memorization over runs and participants."""
  k = n = 0
  for r in runs:
    for p in participants:
      block = ((r.get('memorization') or {}).get('participants') or {}).get(p) or {}
      k += int(block.get('memorized_samples') or 0)
      n += int(block.get('samples') or 0)
  return k, n


def _cross_counts(runs) -> tuple:
  """(memorized spans that are cross-org clones, memorized spans) over runs."""
  k = n = 0
  for r in runs:
    mem = r.get('memorization') or {}
    spans = int(mem.get('spans') or 0)
    n += spans
    k += int(round(float(mem.get('cross_org_share') or 0.0) * spans))
  return k, n


def _names(runs) -> list:
  return results.participants(runs)


# ---- Formatting -------------------------------------------------------------------------

def _ratio_text(mean, ci) -> str:
  if mean is None:
    return '–'
  return f'{math.exp(mean):.3f} [{math.exp(ci[0]):.3f}, {math.exp(ci[1]):.3f}]'


def _pct_text(value, ci) -> str:
  if value is None:
    return '–'
  return f'{100 * value:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]'


def _share_text(k: int, n: int) -> str:
  value, ci = share_interval(k, n)
  if value is None:
    return 'no spans'
  return f'{100 * value:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}] ({k}/{n})'


# ---- The five findings ------------------------------------------------------------------

def finding1(runs) -> list:
  """Size and diversity: centralized vs each participant's own single model, on that
  participant's validation blocks."""
  central = _by_setting(runs, 'centralized')
  names = _names(runs)
  diffs = []
  for p in names:
    single = [r for r in _by_setting(runs, 'single') if r.get('participants') == [p]]
    diffs.append(_paired(central, single, [p]))
  mean, ci = mean_interval(np.concatenate(diffs) if diffs else [])
  d = direction(ci, -1)
  return ['1. Size and diversity drive effectiveness',
          'perplexity ratio centralized / single on its own participant (blocks pooled)',
          _ratio_text(mean, ci), verdict(d)]


def finding2(runs) -> list:
  """Federated (FedAvg) perplexity close to centralized: ratio within CLOSE either way."""
  fed, central = _by_setting(runs, 'federated', 'fedavg'), _by_setting(runs, 'centralized')
  mean, ci = mean_interval(_paired(fed, central, _names(runs)))
  if ci is None:
    v = INCONCLUSIVE
  elif -math.log(CLOSE) <= ci[0] and ci[1] <= math.log(CLOSE):
    v = SUPPORTED
  elif ci[0] > math.log(CLOSE) or ci[1] < -math.log(CLOSE):
    v = CONTRADICTED
  else:
    v = INCONCLUSIVE
  return ['2. Federated perplexity is close to centralized',
          'perplexity ratio FedAvg / centralized (all validation blocks)',
          _ratio_text(mean, ci), v]


def finding3(runs) -> list:
  """Federated memorizes less but still emits verbatim code."""
  names = _names(runs)
  fed = _mem_counts(_by_setting(runs, 'federated', 'fedavg'), names)
  central = _mem_counts(_by_setting(runs, 'centralized'), names)
  diff, ci = difference_interval(fed, central)
  fed_ratio, fed_ci = share_interval(*fed)
  if diff is None:
    v = INCONCLUSIVE
  elif direction(ci, -1) < 0 or fed[0] == 0:
    v = CONTRADICTED
  elif direction(ci, -1) > 0 and direction(fed_ci, 1) > 0:
    v = SUPPORTED
  else:
    v = INCONCLUSIVE
  numbers = (f'{_pct_text(diff, ci)} points (FedAvg {fed[0]}/{fed[1]}, centralized '
             f'{central[0]}/{central[1]} samples)' if diff is not None else '–')
  return ['3. Federated models memorize less but still emit verbatim code',
          'memorization ratio FedAvg minus centralized (prompted samples, all participants)',
          numbers, v]


def finding4(runs) -> list:
  """Order matters: the participant seen last is memorized most and fits best."""
  chains = [r for r in runs if r['setting'] == 'incremental' and r.get('order')]
  last = other = (0, 0)
  first_runs, last_runs, names = [], [], []
  for r in chains:
    order = r['order']
    k, n = _mem_counts([r], [order[-1]])
    last = (last[0] + k, last[1] + n)
    k, n = _mem_counts([r], order[:-1])
    other = (other[0] + k, other[1] + n)
  for p in _names(chains):
    firsts = [r for r in chains if r['order'][0] == p]
    lasts = [r for r in chains if r['order'][-1] == p]
    for a, b in zip(lasts, firsts):  # Pairs of orders: p seen last vs seen first.
      last_runs.append(a)
      first_runs.append(b)
      names.append(p)
  diffs = [(_blocks(a, p) - _blocks(b, p)) for a, b, p in zip(last_runs, first_runs, names)
           if _blocks(a, p).size and _blocks(a, p).size == _blocks(b, p).size]
  mean, ppl_ci = mean_interval(np.concatenate(diffs) if diffs else [])
  mem, mem_ci = difference_interval(last, other)
  signs = (direction(mem_ci, 1), direction(ppl_ci, -1))
  v = (CONTRADICTED if min(signs) < 0 else SUPPORTED if min(signs) > 0 else INCONCLUSIVE)
  numbers = (f'memorization last minus others {_pct_text(mem, mem_ci)} points '
             f'({last[0]}/{last[1]} vs {other[0]}/{other[1]}); perplexity last / first '
             f'{_ratio_text(mean, ppl_ci)}' if chains else '–')
  return ['4. Incremental order changes effectiveness and memorization',
          'six orders: the participant seen last vs the others (memorization) and vs '
          'itself seen first (perplexity)', numbers, v]


def finding5(runs) -> list:
  """Cross-organization clones are memorized in centralized and federated training."""
  parts, signs = [], []
  for label, group in (('centralized', _by_setting(runs, 'centralized')),
                       ('FedAvg', _by_setting(runs, 'federated', 'fedavg'))):
    k, n = _cross_counts(group)
    parts.append(f'{label} {_share_text(k, n)}')
    _, ci = share_interval(k, n)
    signs.append(None if not n else 1 if k and ci[0] > 0 else -1 if not k else 0)
  if min((x for x in signs if x is not None), default=0) < 0:
    v = CONTRADICTED
  elif None in signs:
    v = INCONCLUSIVE
  else:
    v = SUPPORTED if min(signs) > 0 else INCONCLUSIVE
  return ['5. Cross-organization clones are memorized (centralized and federated)',
          'share of memorized spans that are cross-organization clones', '; '.join(parts), v]


def verdict(sign: int) -> str:
  return SUPPORTED if sign > 0 else CONTRADICTED if sign < 0 else INCONCLUSIVE


def findings(runs: Sequence[dict]) -> tuple:
  """(title, header, rows): one row per PROTOCOL finding."""
  rows = [f(runs) for f in (finding1, finding2, finding3, finding4, finding5)]
  return (f'PROTOCOL findings, answered by this study. {RULES}',
          ['finding', 'comparison', 'estimate [95% CI]', 'verdict'], rows)
