r"""The study's tables, as Markdown and LaTeX, from results.json files only.

  python -m analysis.tables --workdir=runs/default

Reads the results.json of the runs WORKDIR/summary.json lists (without one, every
WORKDIR/*/results.json) and summary.json's study-wide cross-organization analysis, writes
WORKDIR/tables/{name}.md and {name}.tex, and prints the Markdown. The privacy tables
(privacy, canaries, membership) appear only when some run has a DP budget, canary
exposure or membership inference in its results, and the clients table only when a run
audited finer clients than the participants, and the duplication table only when a run's
memorization has a duplication breakdown. `findings` answers PROTOCOL's five findings
with intervals and verdicts (analysis/findings.py). Runs repeated
over seeds (`name@seedN`) are shown as mean ± standard deviation. Every table ends with
the machine its results were measured on, as results.json and summary.json recorded it
(analysis/captions.py). The same results give the same bytes, on any machine.
"""

import json
import math
import os
import statistics
import sys
from typing import Sequence

from absl import app
from absl import flags

from analysis import captions
from analysis import findings as findings_lib
# plots, launch.study and tests read results through this module's names.
from analysis.results import group_seeds, load_results, load_summary  # noqa: F401
from analysis.results import participants as _participants


# ---- Formatting -------------------------------------------------------------------------

def fmt(values: Sequence, digits: int = 2, percent: bool = False) -> str:
  """One value, or mean ± sd over seeds; '–' where missing."""
  values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
  if not values:
    return '–'
  scale = 100.0 if percent else 1.0
  mean = statistics.fmean(values) * scale
  # A diverged model's perplexity (1e298) in scientific notation rather than 300 digits.
  style = 'e' if math.isfinite(mean) and abs(mean) >= 1e6 else 'f'
  text = f'{mean:.{digits}{style}}'
  if len(values) > 1:
    text += f' ± {statistics.stdev(values) * scale:.{digits}{style}}'
  return text


def fmt_ci(value, ci, digits: int = 1) -> str:
  """A percentage with its 95% interval: '12.5 [8.0, 17.0]'."""
  if value is None:
    return '–'
  text = f'{100 * value:.{digits}f}'
  if ci:
    text += f' [{100 * ci[0]:.{digits}f}, {100 * ci[1]:.{digits}f}]'
  return text


def markdown(title: str, header: Sequence[str], rows: Sequence[Sequence[str]],
             caption: str = '') -> str:
  """A titled Markdown table; `caption` (e.g. where it was measured) goes under it."""
  lines = [f'### {title}', '', '| ' + ' | '.join(header) + ' |',
           '|' + '|'.join('---' for _ in header) + '|']
  lines += ['| ' + ' | '.join(r) + ' |' for r in rows]
  lines += ['', caption] if caption else []
  return '\n'.join(lines) + '\n'


def _tex_escape(s: str) -> str:
  for a, b in (('\\', r'\textbackslash{}'), ('&', r'\&'), ('%', r'\%'), ('_', r'\_'),
               ('#', r'\#'), ('±', r'$\pm$'), ('–', '--'), ('→', r'$\rightarrow$')):
    s = s.replace(a, b)
  return s


def latex(title: str, header: Sequence[str], rows: Sequence[Sequence[str]],
          caption: str = '') -> str:
  """A booktabs table; its \\caption is the title, then `caption` as a second sentence."""
  cols = 'l' + 'r' * (len(header) - 1)
  text = f"{title.rstrip('.')}. {caption}" if caption else title
  lines = [r'\begin{table}[t]', r'\centering', rf'\caption{{{_tex_escape(text)}}}',
           rf'\begin{{tabular}}{{{cols}}}', r'\toprule',
           ' & '.join(_tex_escape(h) for h in header) + r' \\', r'\midrule']
  lines += [' & '.join(_tex_escape(c) for c in r) + r' \\' for r in rows]
  lines += [r'\bottomrule', r'\end{tabular}', r'\end{table}']
  return '\n'.join(lines) + '\n'


# ---- Tables -----------------------------------------------------------------------------

def _ks(runs: Sequence[dict]) -> list:
  ks = set()
  for r in runs:
    ks.update(int(k.split('@')[1]) for k in (r.get('passk') or {}).get('pass_at_k', {}))
  return sorted(ks)


def effectiveness(runs: Sequence[dict]) -> tuple:
  """Perplexity per participant and pooled, and pass@k, for every run."""
  parts, ks = _participants(runs), _ks(runs)
  header = ['run', 'setting'] + [f'ppl {p}' for p in parts] + ['ppl pooled'] + [
      f'pass@{k} (%)' for k in ks]
  rows = []
  for name, group in group_seeds(runs).items():
    row = [name, group[0]['setting']]
    row += [fmt([g['perplexity'].get(p) for g in group]) for p in parts + ['pooled']]
    row += [fmt([((g.get('passk') or {}).get('pass_at_k') or {}).get(f'pass@{k}')
                 for g in group], 1, percent=True) for k in ks]
    rows.append(row)
  return 'Effectiveness: validation perplexity and HumanEval pass@k', header, rows


def _mem(run: dict, participant: str, key: str):
  return ((run.get('memorization') or {}).get('participants', {}).get(participant) or {}).get(key)


def memorization(runs: Sequence[dict]) -> tuple:
  """Memorization ratio (95% CI), memorized lines and fingerprints, beside the null baseline."""
  header = ['run', 'participant', 'samples', 'ratio % [95% CI]', 'memorized lines',
            'fingerprints', 'exclusive', 'shared', 'null ratio %']
  rows = []
  for name, group in group_seeds(runs).items():
    for p in _participants(group):
      if _mem(group[0], p, 'samples') is None:
        continue
      ratio = (fmt_ci(_mem(group[0], p, 'ratio'), _mem(group[0], p, 'ratio_ci95'))
               if len(group) == 1 else fmt([_mem(g, p, 'ratio') for g in group], 1, True))
      rows.append([name, p, fmt([_mem(g, p, 'samples') for g in group], 0), ratio] + [
          fmt([_mem(g, p, k) for g in group], 0)
          for k in ('memorized_lines', 'fingerprints', 'exclusive_spans', 'shared_spans')] + [
          fmt([_mem(g, p, 'null_ratio') for g in group], 1, percent=True)])
  return 'Memorization per participant (clones of >= 6 lines in generated code)', header, rows


_COPY_LABELS = {'1': '1', '2-4': '2–4', '>=5': '5+'}  # '>' and '≥' do not survive LaTeX.


def _dup(run: dict, who: str, bucket: str, key: str):
  dup = (run.get('memorization') or {}).get('duplication') or {}
  block = dup.get('all') if who == 'all' else dup.get('participants', {}).get(who)
  return ((block or {}).get('buckets', {}).get(bucket) or {}).get(key)


def duplication(runs: Sequence[dict]) -> tuple:
  """Memorized spans by the copy count of the training file they match (1, 2-4, 5+):
  each bucket's share of spans beside its share of training windows, and their ratio."""
  header = ['run', 'participant', 'copies', 'files', 'training windows %',
            'memorized spans', 'spans %', 'relative rate']
  rows = []
  for name, group in group_seeds(runs).items():
    dup = (group[0].get('memorization') or {}).get('duplication')
    if not dup:
      continue
    who = list(dup['participants']) + (['all'] if len(dup['participants']) > 1 else [])
    for p in who:
      for b in dup['bucket_names']:
        rows.append([name, p, _COPY_LABELS.get(b, b)] + [
            fmt([_dup(g, p, b, k) for g in group], *spec) for k, spec in (
                ('files', (0,)), ('window_share', (1, True)), ('spans', (0,)),
                ('span_share', (1, True)), ('relative_rate', (2,)))])
  return ('Memorization by duplication: spans per copy count of the matched training file '
          '(relative rate = spans % / training windows %)', header, rows)


def incremental(runs: Sequence[dict]) -> tuple:
  """For each order: final perplexity and memorization ratio per participant."""
  inc = [r for r in runs if r['setting'] == 'incremental']
  parts = _participants(inc)
  header = ['order'] + [f'ppl {p}' for p in parts] + [f'mem % {p}' for p in parts]
  rows = []
  for name, group in group_seeds(inc).items():
    order = ' → '.join(group[0].get('order') or [])
    rows.append([order or name] + [fmt([g['perplexity'].get(p) for g in group])
                                   for p in parts] + [
        fmt([_mem(g, p, 'ratio') for g in group], 1, True) for p in parts])
  return 'Incremental training: final model of each order', header, rows


def crossorg(runs: Sequence[dict], summary: dict) -> tuple:
  """The containment matrix, then each run's share of memorized spans that cross orgs."""
  co = summary.get('crossorg') or {}
  parts = co.get('participants', [])
  header = ['A \\ B (% of A\'s windows in B)'] + parts
  rows = [[a] + [f'{100 * co["matrix"][i][j]:.1f}' for j in range(len(parts))]
          for i, a in enumerate(parts)]
  for name, group in group_seeds(runs).items():
    shares = [(g.get('memorization') or {}).get('cross_org_share') for g in group]
    if any(s is not None for s in shares):
      rows.append([f'{name}: memorized spans that are cross-org clones (%)',
                   fmt(shares, 1, percent=True)] + [''] * max(len(parts) - 1, 0))
  return 'Cross-organization clones', header, rows


def repository_pairs(summary: dict) -> tuple:
  """Which repositories of different participants share 6-line windows, most first."""
  header = ['participant A', 'repository A', 'participant B', 'repository B',
            'windows shared', 'example files']
  rows = [[p['a']['participant'], p['a']['repo'], p['b']['participant'], p['b']['repo'],
           str(p['windows']), f"{p['a']['path']} ~ {p['b']['path']}"]
          for p in (summary.get('crossorg') or {}).get('repository_pairs') or ()]
  return 'Cross-organization clones: repositories that share code (top pairs)', header, rows


# ---- Privacy (DP budget, canary exposure, membership inference) --------------------------

def _mean(values):
  values = [v for v in values if v is not None]
  return statistics.fmean(values) if values else None


def _trained(run: dict) -> list:
  """The participants a run trained on (exposure and MIA are averaged over these)."""
  return list(run.get('participants') or _participants([run]))


def noise_multiplier(run: dict):
  return (run.get('privacy') or {}).get('noise_multiplier')


def exposure_of(run: dict, repeats: int, participant: str | None = None):
  """Mean canary exposure at a repeat count: of one participant, or of those trained on."""
  parts = ((run.get('canaries') or {}).get('participants') or {})
  names = [participant] if participant else _trained(run)
  return _mean([((parts.get(p) or {}).get('by_repeats') or {}).get(str(repeats))
                for p in names])


def mia_of(run: dict, score: str, key: str = 'auroc', participant: str | None = None):
  """A membership-inference number: of one participant, or the mean over those trained on."""
  parts = ((run.get('membership') or {}).get('participants') or {})
  names = [participant] if participant else _trained(run)
  return _mean([((parts.get(p) or {}).get(score) or {}).get(key) for p in names])


def memorization_ratio(run: dict):
  """The memorization ratio averaged over the participants the run trained on."""
  return _mean([_mem(run, p, 'ratio') for p in _trained(run)])


def _repeat_counts(runs: Sequence[dict]) -> list:
  counts = set()
  for r in runs:
    counts.update(int(n) for n in ((r.get('canaries') or {}).get('by_repeats') or {}))
  return sorted(counts)


def fmt_epsilon(group: Sequence[dict]) -> str:
  """ε of a DP run ('∞' when its accountant gives no finite bound); '–' without DP."""
  blocks = [g.get('privacy') for g in group if g.get('privacy')]
  if not blocks:
    return '–'
  eps = [b.get('epsilon') for b in blocks]
  if any(e is None or math.isinf(e) for e in eps):
    return '∞'
  mean = statistics.fmean(eps)  # The same for every seed: it depends on the config only.
  return f'{mean:.2e}' if mean >= 1000 else f'{mean:.2f}'


def fmt_noise(group: Sequence[dict]) -> str:
  """The noise multiplier as configured (0.001 stays 0.001); '–' without DP."""
  z = noise_multiplier(group[0])
  return '–' if z is None else f'{z:g}'


def _privacy_order(groups: dict) -> list:
  """Runs without DP first (in their order), then DP runs by noise multiplier."""
  plain = [n for n, g in groups.items() if noise_multiplier(g[0]) is None]
  dp = sorted((n for n, g in groups.items() if noise_multiplier(g[0]) is not None),
              key=lambda n: (noise_multiplier(groups[n][0]), n))
  return plain + dp


def privacy(runs: Sequence[dict]) -> tuple:
  """Per run: noise multiplier, ε, perplexity, memorization, exposure and MIA AUROC."""
  counts, groups = _repeat_counts(runs), group_seeds(runs)
  header = (['run', 'noise multiplier', 'ε', 'ppl pooled', 'mem ratio %'] +
            [f'exposure {n}x' for n in counts] + ['MIA AUROC loss', 'MIA AUROC min-k'])
  rows = []
  for name in _privacy_order(groups):
    group = groups[name]
    rows.append([name, fmt_noise(group), fmt_epsilon(group),
                 fmt([g['perplexity'].get('pooled') for g in group]),
                 fmt([memorization_ratio(g) for g in group], 1, percent=True)] +
                [fmt([exposure_of(g, n) for g in group]) for n in counts] +
                [fmt([mia_of(g, s) for g in group], 3) for s in ('loss', 'min_k')])
  return ('Privacy and utility (exposure in bits and MIA AUROC: means over the '
          'participants each run trained on)', header, rows)


def canaries(runs: Sequence[dict]) -> tuple:
  """Mean exposure per run, participant and repeat count."""
  counts = _repeat_counts(runs)
  space = next((r['canaries'].get('log2_space') for r in runs if r.get('canaries')), None)
  header = ['run', 'participant', 'trained on'] + [f'exposure {n}x' for n in counts]
  rows, groups = [], group_seeds(runs)
  for name in _privacy_order(groups):
    group = groups[name]
    if not group[0].get('canaries'):
      continue
    for p in group[0]['canaries']['participants']:
      rows.append([name, p, 'yes' if p in _trained(group[0]) else 'no'] +
                  [fmt([exposure_of(g, n, p) for g in group]) for n in counts])
  return (f'Canary exposure in bits (max log2|R| = {space:.1f})', header, rows)


def membership(runs: Sequence[dict]) -> tuple:
  """AUROC and TPR at the configured FPR per run, participant and score."""
  fpr = next(r['membership']['settings']['fpr'] for r in runs if r.get('membership'))
  tpr = f'TPR@{100 * fpr:g}%FPR %'
  header = ['run', 'participant', 'trained on', 'members / non-members', 'AUROC loss',
            f'{tpr} loss', 'AUROC min-k', f'{tpr} min-k']
  rows, groups = [], group_seeds(runs)
  for name in _privacy_order(groups):
    group = groups[name]
    parts = (group[0].get('membership') or {}).get('participants') or {}
    for p, m in parts.items():
      if not m:
        continue
      rows.append([name, p, 'yes' if p in _trained(group[0]) else 'no',
                   f"{m['members']} / {m['nonmembers']}"] + [
          fmt([mia_of(g, s, k, p) for g in group], *spec) for s in ('loss', 'min_k')
          for k, spec in (('auroc', (3,)), ('tpr_at_fpr', (1, True)))])
  return ('Membership inference: training vs validation files', header, rows)


def leaking_clients(runs: Sequence[dict], top: int = 10) -> tuple:
  """The clients (repositories, folders or shards) whose code each run gives back most."""
  header = ['run', 'client', 'participant', 'blocks', 'files', 'memorized spans',
            'memorized lines', 'samples', 'exclusive spans', 'duplication %']
  rows, granularity = [], ''
  for run in runs:
    block = (run.get('memorization') or {}).get('clients')
    if not block:
      continue
    granularity = block['granularity']
    rows += [[run['run'], c['client'], c['participant']] + [
        fmt([c[k]], 0) for k in ('blocks', 'files', 'memorized_spans', 'memorized_lines',
                                 'memorized_samples', 'exclusive_spans')] + [
        fmt([c['duplication']], 1, percent=True)] for c in block['clients'][:top]]
    if not block['clients']:
      rows.append([run['run'], f"(none of {block['num_clients']} clients)"] + ['–'] * 8)
  return (f'Clients that leak most ({granularity}; top {top} per run)', header, rows)


def _metrics(run_dir: str) -> list:
  path = os.path.join(run_dir, 'metrics.jsonl')
  if not os.path.isfile(path):
    return []
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


def trajectories(workdir: str, runs: Sequence[dict]) -> tuple:
  """Per run (its metrics.jsonl): where validation perplexity was best, and how far the
  final model is past it: is memorization bought by overfitting?"""
  header = ['run', 'best valid ppl (pooled)', 'at % of training', 'final valid ppl',
            'final / best', 'final train loss']
  rows = []
  for r in runs:
    rows_m = _metrics(os.path.join(workdir, r['run']))
    key = 'round' if any('round' in m for m in rows_m) else 'step'
    valid = [(m[key], m['valid/pooled/perplexity']) for m in rows_m
             if 'valid/pooled/perplexity' in m]
    losses = [m['train/loss'] for m in rows_m if 'train/loss' in m]
    if not valid or not losses:
      continue
    at, best = min(valid, key=lambda v: (v[1], v[0]))
    end, final = valid[-1]
    rows.append([r['run'], f'{best:.2f}', f'{100 * at / max(end, 1):.0f}', f'{final:.2f}',
                 f'{final / best:.2f}', f'{losses[-1]:.3f}'])
  return ('Generalization over training: validation perplexity at its best and at the end',
          header, rows)


def all_tables(runs: Sequence[dict], summary: dict) -> dict:
  """name -> (title, header, rows), in the order they are printed."""
  tables = {'effectiveness': effectiveness(runs), 'memorization': memorization(runs)}
  if any(r['setting'] == 'incremental' for r in runs):
    tables['incremental'] = incremental(runs)
  if summary.get('crossorg'):
    tables['crossorg'] = crossorg(runs, summary)
    if summary['crossorg'].get('repository_pairs') is not None:
      tables['crossorg_pairs'] = repository_pairs(summary)
  tables['findings'] = findings_lib.findings(runs)
  # Privacy tables only where a run has something to show: older results stay as they were.
  if any(r.get(k) for r in runs for k in ('privacy', 'canaries', 'membership')):
    tables['privacy'] = privacy(runs)
  if any(r.get('canaries') for r in runs):
    tables['canaries'] = canaries(runs)
  if any(r.get('membership') for r in runs):
    tables['membership'] = membership(runs)
  if any((r.get('memorization') or {}).get('clients') for r in runs):
    tables['clients'] = leaking_clients(runs)
  if any((r.get('memorization') or {}).get('duplication') for r in runs):
    tables['duplication'] = duplication(runs)
  return tables


def write_tables(workdir: str, out_dir: str | None = None) -> str:
  """Writes tables/{name}.md and .tex atomically; returns the Markdown of all of them."""
  from collab import io  # Atomic file writes only; analysis imports no training code.
  out_dir = out_dir or os.path.join(workdir, 'tables')
  runs = load_results(workdir)
  summary = load_summary(workdir)
  tables = all_tables(runs, summary)
  trajectory = trajectories(workdir, runs)
  if trajectory[2]:
    tables['trajectories'] = trajectory
  caption = captions.machine_caption(runs, summary)
  text = []
  for name, (title, header, rows) in tables.items():
    md = markdown(title, header, rows, caption)
    io.atomic_write_text(os.path.join(out_dir, f'{name}.md'), md)
    io.atomic_write_text(os.path.join(out_dir, f'{name}.tex'),
                         latex(title, header, rows, caption))
    text.append(md)
  return '\n'.join(text)


def main(argv):
  del argv
  workdir = flags.FLAGS.workdir
  if not workdir:
    sys.exit('tables: error: give --workdir=STUDY_FOLDER')
  try:
    print(write_tables(workdir))
  except FileNotFoundError as e:
    sys.exit(f'tables: error: {e}')


if __name__ == '__main__':
  # Defined only when run as a script, so launch.study can import this module.
  flags.DEFINE_string('workdir', None, 'Study folder holding one folder per run.')
  app.run(main)
