r"""Where a study's wall time went: data build, training and each evaluator, per run.

  python -m bench.study_time --cold=COLD_STUDY_DIR [--warm=WARM_STUDY_DIR]

Reads summary.json and every run's results.json (evaluate_seconds and their parts)
of a study folder and prints a Markdown table; with a second folder of the same study run
again with a filled compilation cache (bench/cold_study.sh), the difference of the two
wall times is the time spent compiling.
"""

import json
import os
import sys

from absl import app
from absl import flags

PARTS = ('passk', 'memorization', 'snapshots', 'membership', 'canaries')


def breakdown(study_dir: str) -> dict:
  """{'wall', 'data', 'train', 'evaluate', part...: seconds} of one study folder."""
  with open(os.path.join(study_dir, 'summary.json'), encoding='utf-8') as f:
    summary = json.load(f)
  out = {'wall': summary['wall_seconds'], 'data': summary.get('data_seconds') or 0.0,
         'train': 0.0, 'evaluate': 0.0, **{p: 0.0 for p in PARTS}}
  for name in summary['runs']:
    with open(os.path.join(study_dir, name, 'results.json'), encoding='utf-8') as f:
      results = json.load(f)
    out['evaluate'] += results.get('evaluate_seconds') or 0.0
    for part, seconds in (results.get('evaluate_seconds_by_part') or {}).items():
      out[part] = out.get(part, 0.0) + seconds
  # The training loop's wall time (evaluation runs beside it, collab.study); older
  # studies evaluated after training, so training was what the rest of the wall left.
  out['train'] = summary.get('train_seconds') or out['wall'] - out['data'] - out['evaluate']
  return out


def table(cold: dict, warm: dict | None) -> str:
  rows = [('wall (make study, after installation)', 'wall'), ('data build', 'data'),
          ('training loop (evaluation overlaps it)', 'train'),
          ('evaluation (all runs; summed, in a thread beside training)', 'evaluate')]
  rows += [(f'  {p}', p) for p in PARTS if cold.get(p)]
  header = '| part | cold (s) |' + (' warm (s) |' if warm else '')
  lines = [header, '|---|---|' + ('---|' if warm else '')]
  for label, key in rows:
    lines.append(f'| {label} | {cold[key]:.0f} |' + (f' {warm[key]:.0f} |' if warm else ''))
  if warm:
    lines.append(f"| compilation (cold − warm wall) | {cold['wall'] - warm['wall']:.0f} | – |")
  return '\n'.join(lines)


def main(argv):
  del argv
  if not flags.FLAGS.cold:
    sys.exit('study_time: error: give --cold=STUDY_FOLDER (and --warm=STUDY_FOLDER)')
  warm = breakdown(flags.FLAGS.warm) if flags.FLAGS.warm else None
  print(table(breakdown(flags.FLAGS.cold), warm))


if __name__ == '__main__':
  flags.DEFINE_string('cold', None, 'Study folder of a run with an empty compilation cache.')
  flags.DEFINE_string('warm', None, 'The same study run again with the cache filled.')
  app.run(main)
