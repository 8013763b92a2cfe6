r"""The study's figures (matplotlib PNG), from results.json and metrics.jsonl files only.

  python -m analysis.plots --workdir=runs/default

Writes WORKDIR/figures/: memorization.png (ratio by setting and participant),
incremental_orders.png (heat maps over orders), loss_curves.png (training loss per run)
and forgetting.png (perplexity of every participant over incremental stages).
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


def write_figures(workdir: str) -> list:
  """Writes every figure the results allow; returns their paths."""
  runs = tables.load_results(workdir)
  out = os.path.join(workdir, 'figures')
  os.makedirs(out, exist_ok=True)
  made = [memorization_bars(runs, os.path.join(out, 'memorization.png')),
          incremental_heatmap(runs, os.path.join(out, 'incremental_orders.png')),
          loss_curves(workdir, runs, os.path.join(out, 'loss_curves.png')),
          forgetting(runs, os.path.join(out, 'forgetting.png'))]
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
