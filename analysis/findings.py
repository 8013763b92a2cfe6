"""PROTOCOL's five findings, each answered by a comparison with a 95% interval and a verdict,
on the best model (lowest pooled validation loss), on the final model and, for the
memorization findings 3-5, at matched fit (analysis/matched.py).

Reads results.json files only (through analysis.results). Every interval is a percentile
bootstrap with a fixed seed, so the same results give the same bytes: perplexity
comparisons resample validation blocks (paired: both models scored the same blocks) and
report exp(mean loss difference); memorization is measured first by k-extractability
(the extractable share of training windows at the smallest k; validation windows are its
null), resampling windows, with the paper's 6-line clone ratio beside it (it decides for
results that predate extractability), resampling samples. Best and final apply the same
rules to `results.model_views` of each model; runs repeated over seeds contribute all
their blocks, windows and samples. `RULES` (the table's caption) states the rules.
"""

import math
import re
from typing import Sequence

import numpy as np

from analysis import matched
from analysis import results
# The bootstrap primitives live with matched fit's; tables and tests read them here too.
from analysis.matched import (RESAMPLES, SEED, difference_interval,  # noqa: F401
                              mean_interval, share_draws, share_interval)

# Finding 2: federated is "close to" centralized when the perplexity ratio lies within
# this factor either way (an equivalence margin, stated before looking at the numbers).
CLOSE = 1.25
_LONGER = re.compile(r'-r\d+$')  # federated-fedavg-r32: FedAvg given more rounds.

SUPPORTED, CONTRADICTED, INCONCLUSIVE = 'supported', 'contradicted', 'inconclusive'
NONE = '–'  # Nothing to judge: the results lack the model or the measure.
RULES = (
    'Verdicts: a 95% bootstrap interval (resampling validation blocks for perplexity, '
    'windows for extractable shares, generated samples for clone ratios, extracted windows '
    'or memorized spans for shares) that excludes the null in the paper\'s direction '
    'supports a finding; one that excludes it in the other direction contradicts it; '
    'otherwise inconclusive; – where the results lack the model or the measure. Best is the '
    'model with the lowest pooled validation loss, final the last; F2, F3 and F5 use the '
    'FedAvg runs on the paper\'s schedule (those given more rounds, -rN, serve matched '
    'fit). F1: centralized / own-single perplexity < 1. F2: FedAvg / centralized '
    f'perplexity inside [1/{CLOSE}, {CLOSE}] supports, wholly outside contradicts. F3 '
    '(extractable share at the primary k; clone ratio where none was audited): FedAvg '
    'minus centralized < 0 and FedAvg still emits training code (train minus validation '
    'share > 0; without validation windows, share > 0; none extracted contradicts). F4: in '
    'the six orders, memorization of the participant seen last minus the others > 0 and '
    'perplexity of a participant seen last / seen first < 1 (both needed to support; '
    'either reversed contradicts). F5: share of extracted windows (memorized spans) that '
    'are cross-organization clones > 0 in both the centralized and the FedAvg run (none '
    'extracted: inconclusive; some but none cross-org: contradicted). At matched fit only '
    'memorization is judged, on the mean gap over training losses spaced evenly in '
    'log(loss) across the range both sides reach (parametric-bootstrap interval; the gap at '
    'the lowest such loss beside it): F3 FedAvg (the run whose fit overlaps centralized\'s '
    'most) minus centralized < 0, pooled over participants; F4 a participant seen last '
    'minus itself seen earlier > 0 (same data, so its difficulty cancels), the mean over '
    'participants; F5 both cross-organization shares > 0 at F3\'s lowest loss, where '
    'windows are extracted. Samples are resampled as independent draws although each '
    'prompt gives several, so clone-ratio intervals are narrower than resampling prompts.')


# ---- Bootstrap --------------------------------------------------------------------------

def direction(ci, expected: int) -> int:
  """+1: the interval excludes 0 on the `expected` side (+1 above, -1 below); -1: on the
  other side; 0: it holds 0 (or there is none)."""
  if not ci:
    return 0
  side = 1 if ci[0] > 0 else -1 if ci[1] < 0 else 0
  return side * expected


def verdict(sign: int) -> str:
  return SUPPORTED if sign > 0 else CONTRADICTED if sign < 0 else INCONCLUSIVE


# ---- What the runs hold -----------------------------------------------------------------

def _by_setting(runs, setting: str, optimizer: str | None = None) -> list:
  return [r for r in runs if r['setting'] == setting and (
      optimizer is None or r.get('server_optimizer') == optimizer)
          and r.get('privacy') is None]  # DP-FedAvg runs are not the paper's FedAvg.


def _fedavg(runs) -> list:
  """The paper's FedAvg: its schedule, not the runs given more rounds to match the fit."""
  fed = _by_setting(runs, 'federated', 'fedavg')
  return [r for r in fed if not _LONGER.search(r['run'].split('@')[0])] or fed


def _chains(runs) -> list:
  return [r for r in runs if r['setting'] == 'incremental' and r.get('order')]


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
  blocks = [((r.get('memorization') or {}).get('participants') or {}).get(p) or {}
            for r in runs for p in participants]
  return matched.total((int(b.get('memorized_samples') or 0), int(b.get('samples') or 0))
                       for b in blocks)


def _cross_counts(runs) -> tuple:
  """(memorized spans that are cross-org clones, memorized spans) over runs."""
  spans = [(float((r.get('memorization') or {}).get('cross_org_share') or 0.0),
            int((r.get('memorization') or {}).get('spans') or 0)) for r in runs]
  return matched.total((int(round(share * n)), n) for share, n in spans)


def _has_ext(runs) -> bool:
  return any(matched.primary_k(r.get('extractability')) for r in runs)


def _names(runs) -> list:  # A best model may have extractability alone.
  return list(dict.fromkeys(results.participants(runs) + [
      p for r in runs for p in matched.measured(r.get('extractability'))]))


# ---- Formatting -------------------------------------------------------------------------

def _ratio_text(mean, ci) -> str:
  if mean is None:
    return '–'
  return f'{math.exp(mean):.3f} [{math.exp(ci[0]):.3f}, {math.exp(ci[1]):.3f}]'


def _pct_text(value, ci, digits: int = 1) -> str:
  if value is None:
    return '–'
  return f'{100 * value:.{digits}f} [{100 * ci[0]:.{digits}f}, {100 * ci[1]:.{digits}f}]'


def _share_text(k: int, n: int, empty: str = 'no spans') -> str:
  value, ci = share_interval(k, n)
  if value is None:
    return empty
  return f'{100 * value:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}] ({k}/{n})'


def _diff_text(label: str, a: tuple, b: tuple, names: tuple, unit: str) -> str:
  """'label +1.2 [0.3, 2.1] points (A ka/na, B kb/nb unit)': the share a minus b."""
  diff, ci = difference_interval(a, b)
  digits = 2 if unit == 'windows' else 1  # Extractable shares are often below 1%.
  return (f'{label} {_pct_text(diff, ci, digits)} points ({names[0]} {a[0]}/{a[1]}, '
          f'{names[1]} {b[0]}/{b[1]} {unit})' if diff is not None else f'{label} –')


# ---- The five findings on one model: (estimate text, verdict) ---------------------------

def finding1(runs) -> tuple:
  """Size and diversity: centralized vs each participant's own single model, on that
  participant's validation blocks."""
  central = _by_setting(runs, 'centralized')
  diffs = [_paired(central, [r for r in _by_setting(runs, 'single')
                             if r.get('participants') == [p]], [p]) for p in _names(runs)]
  mean, ci = mean_interval(np.concatenate(diffs) if diffs else [])
  return _ratio_text(mean, ci), verdict(direction(ci, -1))


def finding2(runs) -> tuple:
  """Federated (FedAvg) perplexity close to centralized: ratio within CLOSE either way."""
  mean, ci = mean_interval(_paired(_fedavg(runs), _by_setting(runs, 'centralized'),
                                   _names(runs)))
  bound = math.log(CLOSE)
  v = (INCONCLUSIVE if ci is None else SUPPORTED if -bound <= ci[0] and ci[1] <= bound
       else CONTRADICTED if ci[0] > bound or ci[1] < -bound else INCONCLUSIVE)
  return _ratio_text(mean, ci), v


def _less_but_emits(fed: tuple, central: tuple, null: tuple | None) -> str:
  """F3's rule on (k, n) counts; `null`: FedAvg's validation counts, if audited."""
  diff, ci = difference_interval(fed, central)
  if diff is None:
    return INCONCLUSIVE
  emits = direction(difference_interval(fed, null)[1] if null and null[1]
                    else share_interval(*fed)[1], 1)
  less = direction(ci, -1)
  if less < 0 or emits < 0 or fed[0] == 0:
    return CONTRADICTED
  return SUPPORTED if less > 0 and emits > 0 else INCONCLUSIVE


def finding3(runs) -> tuple:
  """Federated memorizes less but still emits verbatim code."""
  names, fed, central = _names(runs), _fedavg(runs), _by_setting(runs, 'centralized')
  clone = _mem_counts(fed, names), _mem_counts(central, names)
  parts = []
  if _has_ext(fed + central):
    ext = matched.summed_counts(fed, names), matched.summed_counts(central, names)
    null = matched.summed_counts(fed, names, 'valid')
    v = _less_but_emits(*ext, null)
    parts.append(_diff_text('extractable', *ext, ('FedAvg', 'centralized'), 'windows'))
    if null[1]:
      parts.append(_diff_text('FedAvg train minus valid', ext[0], null, ('train', 'valid'),
                              'windows'))
  else:
    v = _less_but_emits(*clone, None)
  parts.append(_diff_text('clone ratio', *clone, ('FedAvg', 'centralized'), 'samples'))
  return '; '.join(parts), v


def _last_vs_others(chains, counts) -> tuple:
  """(counts of the participant seen last, of the others) summed over chains."""
  return (matched.total(counts([r], [r['order'][-1]]) for r in chains),
          matched.total(counts([r], r['order'][:-1]) for r in chains))


def _last_first_perplexity(chains) -> tuple:
  """(mean, CI) of loss differences: a participant seen last minus itself seen first,
  over pairs of orders."""
  diffs = [_paired([r for r in chains if r['order'][-1] == p],
                   [r for r in chains if r['order'][0] == p], [p]) for p in _names(chains)]
  return mean_interval(np.concatenate(diffs) if diffs else [])


def _seen(chain: dict) -> dict:
  """The chain with 'order' cut to the participants its model has seen: a chain's best
  model may end an earlier stage (results.model_view gives it that 'stage')."""
  return {**chain, 'order': chain['order'][:chain.get('stage') or len(chain['order'])]}


def finding4(runs) -> tuple:
  """Order matters: the participant seen last is memorized most and fits best."""
  # A model that has seen one participant says nothing about order.
  chains = [c for c in map(_seen, _chains(runs)) if len(c['order']) > 1]
  if not chains:
    return ('– (every model has seen one participant: e.g. each chain\'s best model ends '
            'its first stage)' if _chains(runs) else '–'), INCONCLUSIVE
  measures = [('extractable', matched.summed_counts, 'windows')] if _has_ext(chains) else []
  measures.append(('clone ratio', _mem_counts, 'samples'))
  parts, cis = [], []
  for label, counts, unit in measures:  # The first measure decides.
    last, other = _last_vs_others(chains, counts)
    cis.append(difference_interval(last, other)[1])
    parts.append(_diff_text(f'{label} last minus others', last, other, ('last', 'others'),
                            unit))
  mean, ppl_ci = _last_first_perplexity(chains)
  parts.append(f'perplexity last / first {_ratio_text(mean, ppl_ci)}')
  signs = (direction(cis[0], 1), direction(ppl_ci, -1))
  v = CONTRADICTED if min(signs) < 0 else SUPPORTED if min(signs) > 0 else INCONCLUSIVE
  return '; '.join(parts), v


def _cross_sign(k: int, n: int, ci) -> int | None:
  """F5 on one run group: None nothing extracted, -1 none cross-org, +1 interval > 0."""
  return None if not n else -1 if not k else 1 if ci and ci[0] > 0 else 0


def _cross_verdict(signs) -> str:
  if min((x for x in signs if x is not None), default=0) < 0:
    return CONTRADICTED
  if None in signs:
    return INCONCLUSIVE
  return SUPPORTED if min(signs) > 0 else INCONCLUSIVE


def finding5(runs) -> tuple:
  """Cross-organization clones are memorized in centralized and federated training."""
  groups = (('centralized', _by_setting(runs, 'centralized')), ('FedAvg', _fedavg(runs)))
  audited = any(matched.has_cross(r.get('extractability')) for _, g in groups for r in g)
  measures = [('extracted windows', matched.summed_cross, 'none extracted')] if audited else []
  measures.append(('clone spans', _cross_counts, 'no spans'))
  parts, signs = [], []
  for label, counts, empty in measures:  # The first measure decides.
    each = [(name, counts(group)) for name, group in groups]
    signs.append([_cross_sign(k, n, share_interval(k, n)[1]) for _, (k, n) in each])
    parts.append(f'{label}: ' + ', '.join(f'{name} {_share_text(k, n, empty)}'
                                          for name, (k, n) in each))
  return '; '.join(parts), _cross_verdict(signs[0])


# ---- At matched fit: (estimate text, verdict) ------------------------------------------

def _fedavg_at_fit(runs) -> tuple:
  """(FedAvg run name, its runs, result vs centralized or None, every result): the FedAvg
  runs (any schedule) whose pooled training loss overlaps centralized's most."""
  central = [matched.trajectory(r) for r in _by_setting(runs, 'centralized')]
  groups = results.group_seeds(_by_setting(runs, 'federated', 'fedavg'))
  (name, res), tried = matched.widest_overlap(('centralized', central), {
      n: [matched.trajectory(r) for r in g] for n, g in groups.items()})
  return name, groups.get(name), res, tried


def _gap_text(res: dict, names: tuple) -> str:
  """'X [lo, hi] points (B b%, A a%)': a matched difference b - a and its two shares."""
  return (f"{_pct_text(res['diff'], res['ci95'], 2)} points ({names[1]} "
          f"{100 * res['b']:.2f}%, {names[0]} {100 * res['a']:.2f}%)")


def matched3(runs) -> tuple:
  """FedAvg minus centralized extractable share at equal pooled training loss: the mean
  gap over the fit both reach, and the gap at the lowest loss both reach."""
  if not matched.has_path(runs):
    return '– (no fit with extractability recorded)', NONE
  name, _, res, tried = _fedavg_at_fit(runs)
  if res is None:
    return ('; '.join(r['reason'] for r in tried.values()) or '– (no FedAvg run)',
            INCONCLUSIVE)
  names = ('centralized', name)
  return (f"{name} minus centralized, mean over {len(res['levels'])} train losses log-spaced"
          f" across {matched.span(res['overlap'])} (both reach): {_gap_text(res, names)}; at "
          f"the lowest, {res['lowest']['loss']:.3f}: {_gap_text(res['lowest'], names)}"
          ), verdict(direction(res['ci95'], -1))


def matched4(runs) -> tuple:
  """A participant seen last minus itself seen earlier (other orders) at equal own
  training loss, the mean over participants. The same data on both sides, so a
  participant whose code is easier to extract at any fit does not decide it."""
  chains = _chains(runs)
  if not matched.has_path(chains):
    return '– (no chain with fit and extractability recorded)', NONE
  each = matched.last_vs_earlier(chains, _names(chains))
  mean, low = (matched.mean_difference(list(each.values()), k) for k in (None, 'lowest'))
  misses = [r['reason'] for r in each.values() if not r['matched']]
  if mean is None:
    return '; '.join(misses) or 'no participant seen both last and earlier', INCONCLUSIVE
  spans = ', '.join(f"{p} {matched.span(r['overlap'])}" for p, r in each.items() if r['matched'])
  text = (f"last minus earlier, same participant, mean over {matched.LEVELS} train losses "
          f"log-spaced across the fit both reach: {_pct_text(mean['diff'], mean['ci95'], 2)}"
          f" points (mean over {mean['count']} participants: {spans}); at each one's lowest:"
          f" {_pct_text(low['diff'], low['ci95'], 2)} points")
  return '; '.join([text] + misses), verdict(direction(mean['ci95'], 1))


def matched5(runs) -> tuple:
  """Cross-organization share of extracted windows, centralized and FedAvg, at the lowest
  training loss both reach in F3 (where windows are extracted)."""
  if not matched.has_path(runs):
    return '– (no fit with extractability recorded)', NONE
  name, fed, res, _ = _fedavg_at_fit(runs)
  if not any(matched.has_cross(p.get('extractability')) for r in runs
             for p in matched.path_points(r)):
    return '– (extractability counted no cross-organization clones)', NONE
  if res is None:
    return '– (F3 found no matched fit)', INCONCLUSIVE
  rng, loss = np.random.default_rng(SEED), res['lowest']['loss']
  parts, signs = [], []
  for label, group in (('centralized', _by_setting(runs, 'centralized')), (name, fed)):
    at = matched.group_at_loss([matched.trajectory(r, measure='cross_org') for r in group],
                               loss, rng)
    signs.append(at and _cross_sign(at['rate'] > 0, 1, at['ci95']))
    parts.append(f'{label} – (no extracted windows there)' if at is None else
                 f"{label} {_pct_text(at['rate'], at['ci95'])}%")
  return (f'at train loss {loss:.3f}, the lowest both reach (where windows are extracted): '
          + ', '.join(parts)), _cross_verdict(signs)


# ---- The table --------------------------------------------------------------------------

_ROWS = (  # (finding, comparison, on one model, at matched fit)
    ('1. Size and diversity drive effectiveness',
     'perplexity ratio centralized / single on its own participant (blocks pooled)',
     finding1, None),
    ('2. Federated perplexity is close to centralized',
     'perplexity ratio FedAvg / centralized (all validation blocks)', finding2, None),
    ('3. Federated models memorize less but still emit verbatim code',
     'FedAvg minus centralized: extractable share of training windows at the primary k '
     '(beside it the clone ratio of prompted samples), all participants', finding3,
     matched3),
    ('4. Incremental order changes effectiveness and memorization',
     'six orders: the participant seen last vs the others (memorization; at matched fit '
     'vs itself seen earlier) and vs itself seen first (perplexity)', finding4, matched4),
    ('5. Cross-organization clones are memorized (centralized and federated)',
     'share of extracted windows (memorized spans) that are cross-organization clones',
     finding5, matched5),
)
HEADER = ['finding', 'comparison', 'at best', 'verdict', 'at final', 'verdict',
          'at matched fit', 'verdict']


def _on_model(runs, model: str, judge) -> list:
  views = results.model_views(runs, [model])
  return list(judge(views)) if views else [NONE, NONE]


def findings(runs: Sequence[dict]) -> tuple:
  """(title, header, rows): one row per PROTOCOL finding, judged on the best model, the
  final model and at matched fit."""
  rows = [[title, comparison, *_on_model(runs, 'best', judge),
           *_on_model(runs, 'final', judge), *(at_fit(runs) if at_fit else (NONE, NONE))]
          for title, comparison, judge, at_fit in _ROWS]
  return (f'PROTOCOL findings, answered by this study. {RULES} {matched.CAPTION}', HEADER,
          rows)
