r"""The study's tables, as Markdown and LaTeX, from results.json files only.

  python -m analysis.tables --workdir=runs/default

Reads the results.json of the runs WORKDIR/summary.json lists (without one, every
WORKDIR/*/results.json) and summary.json's study-wide cross-organization analysis, writes
WORKDIR/tables/{name}.md and {name}.tex, and prints the Markdown. Its own tables
(effectiveness, incremental, cross-organization, privacy, trajectories) come first, then
each evaluator's (collab/evals/evaluators.py: memorization, duplication, clients,
extractability, ranking, canaries, membership), each from every model's view of the runs
(final and best: a `model` column), and only where some run has that section.
`findings` answers PROTOCOL's five findings
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
from collab.evals import evaluators
from collab.evals import interface
from collab.evals.interface import fmt, fmt_ci  # noqa: F401 (tests and plots use them)
from collab.evals.memorization import clone_audit
from collab.evals.privacy import exposure
from collab.evals.privacy import membership as membership_eval
from analysis import findings as findings_lib
# plots, launch.study and tests read results through this module's names.
from analysis.results import group_seeds, load_results, load_summary  # noqa: F401
from analysis.results import model_views
from analysis.results import participants as _participants


# ---- Formatting -------------------------------------------------------------------------

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


def _trained_share(view: dict) -> float:
  """Where a model stands in its run's training (1: the end); a chain's best model at
  stage k counts the k - 1 stages before it as whole."""
  if view['model'] == 'final':
    return 1.0
  fraction = view.get('fraction') or 0.0
  if view.get('stage') and view.get('order'):
    return (int(view['stage']) - 1 + fraction) / len(view['order'])
  return fraction


def effectiveness(runs: Sequence[dict]) -> tuple:
  """Perplexity per participant and pooled, and pass@k, for every run and model."""
  parts, ks = _participants(runs), _ks(model_views(runs))
  header = ['run', 'model', 'setting', 'at % of training'] + [f'ppl {p}' for p in parts] + [
      'ppl pooled'] + [f'pass@{k} (%)' for k in ks]
  rows = []
  for (name, model), group in interface.group_views(model_views(runs)).items():
    row = [name, model, group[0]['setting'],
           fmt([100.0 * _trained_share(group[0])], 0)]  # The same for every seed.
    row += [fmt([g['perplexity'].get(p) for g in group]) for p in parts + ['pooled']]
    row += [fmt([((g.get('passk') or {}).get('pass_at_k') or {}).get(f'pass@{k}')
                 for g in group], 1, percent=True) for k in ks]
    rows.append(row)
  return ('Effectiveness: validation perplexity and HumanEval pass@k of the final model '
          'and of the best one (lowest pooled validation loss)', header, rows)


_mem = clone_audit.participant_field  # plots read it too.


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

exposure_of = exposure.exposure_of
mia_of = membership_eval.mia_of
memorization_ratio = clone_audit.ratio_of
noise_multiplier = interface.noise_multiplier
_mean = interface.mean  # plots' privacy figure reads these two.
_repeat_counts = exposure.repeat_counts


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


def privacy(runs: Sequence[dict]) -> tuple:
  """Per run: noise multiplier, ε, perplexity, memorization, exposure and MIA AUROC."""
  counts, groups = exposure.repeat_counts(runs), group_seeds(runs)
  audited = any(exposure.empirical_epsilon(r) is not None for r in runs)
  header = (['run', 'noise multiplier', 'ε'] + (['ε empirical (95%)'] if audited else []) +
            ['ppl pooled', 'mem ratio %'] +
            [f'exposure {n}x' for n in counts] + ['MIA AUROC loss', 'MIA AUROC min-k'])
  rows = []
  for name in interface.privacy_ordered(groups):
    group = groups[name]
    rows.append([name, fmt_noise(group), fmt_epsilon(group)] +
                ([fmt([exposure.empirical_epsilon(g) for g in group])] if audited else []) +
                [fmt([g['perplexity'].get('pooled') for g in group]),
                 fmt([memorization_ratio(g) for g in group], 1, percent=True)] +
                [fmt([exposure_of(g, n) for g in group]) for n in counts] +
                [fmt([mia_of(g, s) for g in group], 3) for s in ('loss', 'min_k')])
  return ('Privacy and utility (exposure in bits and MIA AUROC: means over the '
          'participants each run trained on; ε empirical: a lower bound from the canaries '
          'at 95% confidence, which must stay below the accountant\'s ε)', header, rows)


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
  """name -> (title, header, rows), in the order they are printed: the study's own
  tables, then each evaluator's (collab/evals/evaluators.py) from every model's view."""
  tables = {'effectiveness': effectiveness(runs)}
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
  views = model_views(runs)
  for ev in evaluators.ALL:
    for table in ev.tables(views):
      tables[table.stem] = (table.title, table.header, table.rows)
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
