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


MODEL_ORDER = ('final', 'best')  # results.json: the final model's sections at top level,
# every other model's under results['models'][name] (collab.evaluate).


# What describes a run rather than one of its models (model_view keeps these).
RUN_FIELDS = ('run', 'setting', 'participants', 'order', 'server_optimizer', 'seed',
              'tokens_seen', 'tokens_seen_per_participant', 'forgetting', 'train_seconds',
              'privacy', 'snapshots', 'machine')


def models_of(run: dict) -> list:
  """The models a run was evaluated on: 'final', then those under results['models']."""
  return ['final'] + [m for m in sorted(run.get('models') or {},
                                         key=lambda m: (MODEL_ORDER + (m,)).index(m))]


def model_view(run: dict, model: str) -> dict | None:
  """The run as if `model` were its only model: its sections (perplexity, memorization,
  extractability, ...) replace the final model's, with 'model' set; None when the run has
  no such model. Runs from before models existed have only 'final'."""
  if model == 'final':
    return {**run, 'model': 'final'}
  other = (run.get('models') or {}).get(model)
  if other is None:
    return None
  # Only what describes the run carries over: a section this model lacks is absent, not
  # the final model's (its perplexity blocks, its memorization, ...).
  return {**{k: v for k, v in run.items() if k in RUN_FIELDS}, **other, 'model': model}


def model_views(runs: Sequence[dict], models: Sequence[str] = MODEL_ORDER) -> list:
  """Every run's view for each of `models` it has, run by run (final first)."""
  return [v for r in runs for m in models if (v := model_view(r, m)) is not None]
