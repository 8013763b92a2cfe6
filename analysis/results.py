"""Reading a study's results: its runs' results.json files and its summary.json.

tables and findings read through here, so findings need not import tables (which imports
findings) to reach the results; tables re-exports these names for plots, launch.study and
the tests.
"""

import json
import os
from typing import Sequence

SETTING_ORDER = ('single', 'centralized', 'federated', 'incremental')


def load_results(workdir: str) -> list:
  """The study's runs' results.json (summary.json's `runs`; without one, every
  `*/results.json` under `workdir`), sorted by setting then name. Folders of runs the
  study no longer asks for stay on disk but out of its tables."""
  runs = []
  for name in load_summary(workdir).get('runs') or sorted(os.listdir(workdir)):
    path = os.path.join(workdir, name, 'results.json')
    if os.path.isfile(path):
      with open(path, encoding='utf-8') as f:
        runs.append(json.load(f))
  if not runs:
    raise FileNotFoundError(f'No */results.json under {workdir!r}; run the study first '
                            '(python -m launch.study --config=... --workdir=...).')
  rank = {s: i for i, s in enumerate(SETTING_ORDER)}
  return sorted(runs, key=lambda r: (rank.get(r['setting'], 99), r['run']))


def load_summary(workdir: str) -> dict:
  path = os.path.join(workdir, 'summary.json')
  if not os.path.isfile(path):
    return {}
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def group_seeds(runs: Sequence[dict]) -> dict:
  """Run name without its '@seedN' suffix -> the runs of that name (in seed order)."""
  groups = {}
  for r in runs:
    groups.setdefault(r['run'].split('@')[0], []).append(r)
  return groups


def participants(runs: Sequence[dict]) -> list:
  """Every participant any run evaluated, in first-seen order."""
  seen = []
  for r in runs:
    for p in r.get('perplexity', {}):
      if p != 'pooled' and p not in seen:
        seen.append(p)
  return seen
