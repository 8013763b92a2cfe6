r"""The study's figures (matplotlib PNG), from results.json and metrics.jsonl files only.

  python -m analysis.plots --workdir=runs/default

Writes WORKDIR/figures/: memorization.png (ratio by setting and participant),
incremental_orders.png (heat maps over orders), loss_curves.png (training loss per run),
forgetting.png (perplexity of every participant over incremental stages), when runs
recorded extractability with fit memorization_vs_fit.png (extractable share against own
training loss, validation perplexity and epochs, along each run's snapshots, best and
final models), when runs recorded membership inference roc.png (ROC per score on log-log
axes) and, when the study has DP-FedAvg runs, privacy_utility.png (noise multiplier
against perplexity and canary exposure, ε beside each point).
"""

import json
import os
import sys

from absl import app
from absl import flags
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
import numpy as np  # noqa: E402

from analysis import matched  # noqa: E402
from analysis import tables  # noqa: E402

_PNG = {'metadata': {'Software': None}, 'dpi': 120}  # No version stamp: same bytes each time.


def _save(fig, path: str) -> str:
  from collab import io  # Atomic writes only.
  io.atomic_write(path, lambda f: fig.savefig(f, format='png', **_PNG), binary=True)
  plt.close(fig)
  return path


def memorization_bars(runs, path: str) -> str | None:
  """Grouped bars: memorization ratio per run, one bar per participant, with 95% CIs."""
  named = [(r['run'], r) for r in runs if (r.get('memorization') or {}).get('participants')]
  if not named:
    return None
  parts = tables._participants([r for _, r in named])
  fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(named) + 2), 4))
  width = 0.8 / max(len(parts), 1)
  for j, p in enumerate(parts):
    vals = [100 * (tables._mem(r, p, 'ratio') or 0) for _, r in named]
    cis = [tables._mem(r, p, 'ratio_ci95') or [v / 100, v / 100] for (_, r), v in
           zip(named, vals)]
    err = np.array([[v - 100 * lo for v, (lo, _) in zip(vals, cis)],
                    [100 * hi - v for v, (_, hi) in zip(vals, cis)]]).clip(min=0)
    ax.bar(np.arange(len(named)) + j * width, vals, width, yerr=err, capsize=2, label=p)
  ax.set_xticks(np.arange(len(named)) + width * (len(parts) - 1) / 2)
  ax.set_xticklabels([n for n, _ in named], rotation=35, ha='right', fontsize=8)
  ax.set_ylabel('memorization ratio (% of samples with a clone)')
  ax.set_title('Memorization by setting and participant (95% bootstrap CI)')
  ax.legend(title='participant', fontsize=8)
  fig.tight_layout()
  return _save(fig, path)


def incremental_heatmap(runs, path: str) -> str | None:
  """Orders x participants: final perplexity and memorization ratio of each order."""
  inc = [r for r in runs if r['setting'] == 'incremental']
  if not inc:
    return None
  parts = tables._participants(inc)
  rows = [' → '.join(r.get('order') or [r['run']]) for r in inc]
  fig, axes = plt.subplots(1, 2, figsize=(11, 1.2 + 0.5 * len(inc)))
  for ax, (title, get, fmt) in zip(axes, (
      ('final perplexity', lambda r, p: r['perplexity'].get(p), '{:.1f}'),
      ('memorization ratio (%)', lambda r, p: 100 * (tables._mem(r, p, 'ratio') or 0),
       '{:.1f}'))):
    grid = np.array([[get(r, p) if get(r, p) is not None else np.nan for p in parts]
                     for r in inc], float)
    im = ax.imshow(grid, cmap='viridis', aspect='auto')
    for (i, j), v in np.ndenumerate(grid):
      ax.text(j, i, fmt.format(v), ha='center', va='center', color='w', fontsize=8)
    ax.set_xticks(range(len(parts)), parts)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel('participant')
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
  fig.suptitle('Incremental training: the order of participants')
  fig.tight_layout()
  return _save(fig, path)


def _loss_curve(run_dir: str) -> tuple:
  """(progress in [0, 1], training loss) from a run's metrics.jsonl."""
  path = os.path.join(run_dir, 'metrics.jsonl')
  if not os.path.isfile(path):
    return [], []
  with open(path, encoding='utf-8') as f:
    rows = [json.loads(line) for line in f if 'train/loss' in line]
  key = 'round' if rows and 'round' in rows[0] else 'step'
  xs = [r[key] for r in rows]
  return [x / max(xs[-1], 1) for x in xs], [r['train/loss'] for r in rows]


def loss_curves(workdir: str, runs, path: str) -> str | None:
  """Training loss against the share of training done, one line per (non-chain) run."""
  fig, ax = plt.subplots(figsize=(7, 4))
  drawn = 0
  for r in runs:
    xs, ys = _loss_curve(os.path.join(workdir, r['run']))
    if xs:
      ax.plot(xs, ys, label=r['run'], linewidth=1.2)
      drawn += 1
  if not drawn:
    plt.close(fig)
    return None
  ax.set_xlabel('share of training done (steps, or rounds for federated)')
  ax.set_ylabel('training loss (nats per token)')
  ax.set_title('Loss curves per setting')
  ax.legend(fontsize=7)
  fig.tight_layout()
  return _save(fig, path)


def forgetting(runs, path: str) -> str | None:
  """Perplexity of every participant after each stage, one panel per order."""
  inc = [r for r in runs if r['setting'] == 'incremental' and r.get('forgetting')]
  if not inc:
    return None
  cols = min(3, len(inc))
  rows = -(-len(inc) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
  for ax, r in zip(axes.flat, inc):
    order = r.get('order') or []
    for p, curve in sorted(r['forgetting'].items()):
      if p != 'pooled':
        ax.plot(range(1, len(curve) + 1), curve, marker='o', label=p)
    ax.set_xticks(range(1, len(order) + 1), [f'{k + 1}:{n}' for k, n in enumerate(order)],
                  fontsize=7)
    ax.set_xlabel('after stage')
    ax.set_ylabel('validation perplexity')
    ax.set_title(' → '.join(order), fontsize=9)
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(inc):]:
    ax.axis('off')
  fig.suptitle('Forgetting over incremental stages')
  fig.tight_layout()
  return _save(fig, path)


def _dp_points(runs) -> list:
  """(noise multiplier, ε text, [runs over seeds]) of every DP run, by noise multiplier."""
  groups = tables.group_seeds(runs)
  dp = [(tables.noise_multiplier(g[0]), tables.fmt_epsilon(g), g) for g in groups.values()
        if tables.noise_multiplier(g[0]) is not None]
  return sorted(dp, key=lambda t: t[0])


PPL_CAP = 1e5  # Perplexities above this (a model the noise destroyed) sit on the top edge.
CHANCE_EXPOSURE = 1 / np.log(2)  # E[log2|R| - log2 rank] for a uniformly random rank.


def _utility_panel(ax, dp, plain, mean) -> None:
  """Pooled perplexity against z (log scale, capped), ε beside each point."""
  xs = [z for z, _, _ in dp]
  ppl = [mean(g, lambda r: r['perplexity'].get('pooled')) for _, _, g in dp]
  shown = [np.nan if y is None else min(y, PPL_CAP) for y in ppl]
  ax.plot(xs, shown, marker='o', color='k', label='DP-FedAvg')
  for (z, eps, _), y, y_shown in zip(dp, ppl, shown):
    if y is not None:
      label = f'ε={eps}' + (f'\nppl {y:.1e}' if y > PPL_CAP else '')
      ax.annotate(label, (z, y_shown), textcoords='offset points', xytext=(-4, 6),
                  ha='right', fontsize=7)
  for (name, g), color in zip(plain, plt.cm.tab10.colors):
    y = mean(g, lambda r: r['perplexity'].get('pooled'))
    if y is not None:
      ax.axhline(min(y, PPL_CAP), linestyle='--', color=color, linewidth=1, label=name)
  ax.set_yscale('log')
  ax.set_ylabel(f'validation perplexity (pooled; capped at {PPL_CAP:.0e})')
  ax.set_title('Utility')


def _exposure_panel(ax, dp, plain, mean, counts) -> None:
  """Mean exposure per repeat count against z; dashed: federated runs without DP."""
  xs = [z for z, _, _ in dp]
  for n, color in zip(counts, plt.cm.viridis(np.linspace(0, 0.9, max(len(counts), 1)))):
    ys = [mean(g, lambda r, n=n: tables.exposure_of(r, n)) for _, _, g in dp]
    ax.plot(xs, [np.nan if y is None else y for y in ys], marker='o', color=color,
            label=f'{n}x')
    for name, g in plain:
      y = mean(g, lambda r, n=n: tables.exposure_of(r, n))
      if y is not None and name.startswith('federated'):
        ax.axhline(y, linestyle='--', color=color, linewidth=1)
  ax.axhline(CHANCE_EXPOSURE, linestyle=':', color='gray', linewidth=1, label='chance')
  ax.set_ylabel('canary exposure (bits)')
  ax.set_title('Exposure by repeat count (dashed: FedAvg, no DP)')


def privacy_utility(runs, path: str) -> str | None:
  """Noise multiplier against pooled perplexity and canary exposure (per repeat count).

  Runs without DP are dashed horizontal references; each DP point is labelled with ε.
  The z axis is linear near 0 and logarithmic above the smallest positive z (symlog), so
  a grid such as 0, 0.003, ..., 1 is readable.
  """
  dp = _dp_points(runs)
  if not dp:
    return None
  plain = [(n, g) for n, g in tables.group_seeds(runs).items()
           if tables.noise_multiplier(g[0]) is None]
  mean = lambda group, get: tables._mean([get(r) for r in group])  # noqa: E731
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  _utility_panel(axes[0], dp, plain, mean)
  _exposure_panel(axes[1], dp, plain, mean, tables._repeat_counts(runs))
  positive = [z for z, _, _ in dp if z > 0]
  for ax in axes:
    if positive:
      ax.set_xscale('symlog', linthresh=min(positive))
      ax.set_xlim(-0.2 * min(positive), 1.5 * max(positive))
    ax.set_xlabel('noise multiplier z')
    ax.legend(fontsize=7)
  fig.suptitle('Privacy–utility trade-off of DP-FedAvg')
  fig.tight_layout()
  return _save(fig, path)


def _epochs_scale(run: dict, points: list) -> float | None:
  """Epochs per unit of a point's place: a run's epochs over the whole run (a snapshot's
  epochs / fraction); a chain's epochs of one stage (stages counted as equal)."""
  if matched.stages_of(run):
    stage = [p.get('epochs') for p in points if 'stage' in p and p['model'] != 'best']
    stage = [e for e in stage if e]
    return float(np.mean(stage)) if stage else None
  return next((p['epochs'] / p['fraction'] for p in points
               if p.get('epochs') and p.get('fraction')), run.get('epochs'))


def fit_points(run: dict) -> list:
  """One row per model on the run's path (snapshots, best, final) with extractability and
  fit: {'model', 'best', 'k', 'loss', 'share', 'ppl', 'epochs', 'parts'}: loss is the
  pooled training loss and share the extractable share of training windows (summed) at
  the primary k, both over the participants the run trained on, ppl the pooled validation perplexity, and parts the
  (own training loss, share, own validation perplexity) of each participant."""
  points = matched.path_points(run)
  scale, stages = _epochs_scale(run, points), matched.stages_of(run)
  own = run.get('participants') or None  # A single run: its own participant only.
  rows = []
  for p in points:
    ext, fit, ppl = p.get('extractability'), p.get('fit'), p.get('perplexity') or {}
    c, n = matched.summed_counts([p], [q for q in matched.measured(ext)
                                       if own is None or q in own])
    loss = matched.fit_loss(fit, None, own)
    if not n or loss is None:
      continue
    stage, done = matched.place(p, stages)
    each = {q: matched.counts(ext, q) for q in matched.measured(ext)}
    parts = [(matched.fit_loss(fit, q), c_q / n_q, ppl.get(q))
             for q, (c_q, n_q) in each.items() if n_q]
    rows.append({'model': p['model'], 'best': bool(p.get('is_best')),
                 'k': matched.primary_k(ext), 'loss': loss, 'share': c / n,
                 'ppl': ppl.get('pooled'), 'parts': parts,
                 'epochs': None if scale is None else scale * (max(stage - 1, 0) + done)})
  return rows


_STYLE = {'single': ':', 'centralized': '-', 'federated': '--', 'incremental': '-.'}
_AXES = (('loss', 0, 'own training loss (nats/token; training runs right)'),
         ('ppl', 2, 'validation perplexity (pooled; own for faint points)'),
         ('epochs', None, 'epochs (chains: stages counted as equal)'))


def _draw_run(axes, name: str, setting: str, rows: list, color) -> None:
  """The run's pooled path on every panel; its participants' points faint beside it."""
  for ax, (key, part, _) in zip(axes, _AXES):
    xy = [(r[key], 100 * r['share']) for r in rows if r[key] is not None]
    if not xy:
      continue
    ax.plot(*zip(*xy), marker='o', markersize=3, linestyle=_STYLE.get(setting, '-'),
            color=color, linewidth=1.2, label=name if ax is axes[0] else None)
    best = [(r[key], 100 * r['share']) for r in rows if r['best'] and r[key] is not None]
    if best:
      ax.plot(*zip(*best), marker='*', markersize=9, color=color, linestyle='none')
    faint = [(q[part] if part is not None else r[key], 100 * q[1]) for r in rows
             for q in r['parts'] if (q[part] if part is not None else r[key]) is not None]
    if faint:
      ax.scatter(*zip(*faint), s=8, color=color, alpha=0.25, linewidths=0)


def memorization_vs_fit(runs, path: str) -> str | None:
  """Extractable share at the primary k against a participant's own training loss, against
  validation perplexity and against epochs: one path per run (snapshots, best as a star,
  final), pooled over its participants, with each participant's points faint. Settings
  that fit at different speeds are compared along the first axis (PROTOCOL: matched
  fit). None when no run has extractability with fit."""
  curves = [(r, fit_points(r)) for r in runs]
  curves = [(r, rows) for r, rows in curves if rows]
  if not curves:
    return None
  k = curves[0][1][0]['k']  # Every run of a study audits the same ks.
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), sharey=True)
  colors = plt.cm.tab20(np.linspace(0, 1, 20))
  for i, (r, rows) in enumerate(curves):
    _draw_run(axes, r['run'], r['setting'], rows, colors[i % 20])
  for ax, (_, _, label) in zip(axes, _AXES):
    ax.set_xlabel(label)
  axes[0].invert_xaxis()  # Lower loss is further into training.
  axes[1].set_xscale('log')
  axes[1].invert_xaxis()
  axes[0].set_ylabel(f'extractable share of training windows, k={k} (%)')
  fig.suptitle('Memorization against fit (pooled over participants; faint: each '
               'participant; star: best model)')
  fig.legend(loc='lower center', ncol=min(6, len(curves)), fontsize=7)
  fig.tight_layout(rect=(0, 0.06 + 0.035 * (-(-len(curves) // 6)), 1, 1))
  return _save(fig, path)


def _mean_roc(membership: dict, score: str, names) -> tuple | None:
  """The ROC curve of `score` averaged (TPR at each FPR) over the participants `names`."""
  grid = np.geomspace(1e-3, 1.0, 60)
  curves = []
  for p in names:
    roc = ((((membership.get('participants') or {}).get(p) or {}).get('scores') or {})
           .get(score) or {}).get('roc')
    if roc:
      curves.append(np.interp(grid, roc['fpr'], roc['tpr']))
  return (grid, np.mean(curves, axis=0)) if curves else None


def roc(runs, path: str) -> str | None:
  """ROC curves on log-log axes: one panel per membership score, one curve per run (its
  final model; TPR averaged over the participants it trained on), chance dashed."""
  with_mia = [r for r in runs if (r.get('membership') or {}).get('participants')
              and any(_mean_roc(r['membership'], s, r.get('participants') or [])
                      is not None for s in r['membership'].get('scores') or ())]
  if not with_mia:
    return None  # No ROC curves (results of an older collab, or no scores).
  scores = with_mia[0]['membership']['scores']
  cols = 3
  fig, axes = plt.subplots(-(-len(scores) // cols), cols, figsize=(4.2 * cols, 3.6 * (
      -(-len(scores) // cols))), squeeze=False)
  colors = plt.get_cmap('tab20').colors
  for ax, score in zip(axes.flat, scores):
    for i, r in enumerate(with_mia):
      curve = _mean_roc(r['membership'], score, r.get('participants') or [])
      if curve is not None:
        ax.plot(*curve, color=colors[i % 20], lw=1.2, label=r['run'])
    ax.plot([1e-3, 1], [1e-3, 1], 'k--', lw=0.8)
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlim(1e-3, 1)
    ax.set_ylim(1e-3, 1.05)
    ax.set_title(score)
    ax.set_xlabel('false-positive rate')
    ax.set_ylabel('true-positive rate')
  for ax in list(axes.flat)[len(scores):]:
    ax.axis('off')
  handles, labels = axes.flat[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc='lower center', ncol=min(6, len(labels)), fontsize=7)
  fig.suptitle('Membership inference ROC per score (final models; mean over the '
               'participants each run trained on; FPR below 1/non-members is not resolved)')
  fig.tight_layout(rect=(0, 0.06 + 0.035 * (-(-len(labels) // 6)), 1, 1))
  return _save(fig, path)


def write_figures(workdir: str) -> list:
  """Writes every figure the results allow; returns their paths."""
  runs = tables.load_results(workdir)
  out = os.path.join(workdir, 'figures')
  os.makedirs(out, exist_ok=True)
  made = [memorization_bars(runs, os.path.join(out, 'memorization.png')),
          incremental_heatmap(runs, os.path.join(out, 'incremental_orders.png')),
          loss_curves(workdir, runs, os.path.join(out, 'loss_curves.png')),
          forgetting(runs, os.path.join(out, 'forgetting.png')),
          privacy_utility(runs, os.path.join(out, 'privacy_utility.png')),
          memorization_vs_fit(runs, os.path.join(out, 'memorization_vs_fit.png')),
          roc(runs, os.path.join(out, 'roc.png'))]
  return [p for p in made if p]


def main(argv):
  del argv
  workdir = flags.FLAGS.workdir
  if not workdir:
    sys.exit('plots: error: give --workdir=STUDY_FOLDER')
  try:
    for path in write_figures(workdir):
      print(path)
  except FileNotFoundError as e:
    sys.exit(f'plots: error: {e}')


if __name__ == '__main__':
  # Defined only when run as a script, so launch.study can import this module.
  flags.DEFINE_string('workdir', None, 'Study folder holding one folder per run.')
  app.run(main)
