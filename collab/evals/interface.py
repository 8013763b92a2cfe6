"""One face for every evaluator (DESIGN.md, "Evaluators: one face, one list").

An `Evaluator` says what it needs, what its cache depends on, what it computes for one
model, the section of results.json it fills and the table rows analysis prints from
that section. collab/evals/evaluators.py lists them in one explicit tuple; collab/evaluate.py
walks the tuple for every model of a run (final, best, snapshots), and analysis/tables.py
asks the same objects for their rows. Neither learns any evaluator's name: a new one is
a module, its config fields and one entry in the tuple.

A model is evaluated in an *evaluation folder*: the run folder for its final model,
WORKDIR/eval-best for the best one, each snapshot's own folder. An evaluator caches its
section in `Context.out_dir` (EVAL_FOLDER/NAME/result.json) under its key: the model, the
data, the seed and what `settings(config)` returns.
"""

import math
import statistics
from typing import Any, Callable, NamedTuple, Sequence

NEEDS = frozenset({'model', 'scorer', 'data', 'samples'})
MODELS = ('final', 'best')  # The models config.eval.models may name.


class Context(NamedTuple):
  """What an evaluator may read for one model of one run."""
  config: Any  # The run's resolved config (ml_collections.ConfigDict).
  run_dir: str  # The run folder (config.json, data, the other models).
  # 'final' (a run's or an incremental stage's last model), 'best', or 'snapshot'.
  model: str
  eval_dir: str  # The model's evaluation folder (see the module docstring).
  out_dir: str  # This evaluator's cache folder: eval_dir/NAME.
  params: Any  # The model's parameters (numpy pytree).
  model_config: Any  # collab.model.ModelConfig.
  tokenizer: Any  # The data folder's tokenizer (transformers).
  data_dir: str  # The built data folder.
  names: Sequence[str]  # The study's participants.
  score: Callable  # score(token sequences) -> log-probs per sequence (compiled on first use).
  seq_len: int  # Training block length the model saw (<= its context).


class Table(NamedTuple):
  """One table: its file stem in WORKDIR/tables, title, header and rows (strings)."""
  stem: str
  title: str
  header: Sequence[str]
  rows: Sequence[Sequence[str]]


class Evaluator(NamedTuple):
  """One evaluator. `compute` returns its results.json section, or None (nothing to say)."""
  name: str  # Its results.json section, cache folder and config.eval field.
  needs: frozenset  # Subset of NEEDS: what compute reads beyond the config (documents it).
  enabled: Callable[[Any], bool]  # enabled(config): run it at all?
  settings: Callable[[Any], Any]  # settings(config): JSON-able; part of the cache key.
  compute: Callable[[Context], dict | None]
  # tables(runs): rows from results (each run view has 'run', 'model' and the sections).
  tables: Callable[[Sequence[dict]], Sequence[Table]] = lambda runs: ()
  stale: Sequence[str] = ()  # Files (relative to eval_dir) its recomputation invalidates.
  # inputs(ctx): what else its section depends on (e.g. other runs' models); in the key.
  inputs: Callable[[Context], Any] = lambda ctx: None


def section_of(config, name: str):
  """config.eval.<name>, or None where the config has no such section."""
  return config.eval.get(name)


def enabled_flag(name: str) -> Callable[[Any], bool]:
  """enabled(config) = config.eval.<name>.enabled (absent: off)."""
  def enabled(config) -> bool:
    section = section_of(config, name)
    return bool(section is not None and section.get('enabled', False))
  return enabled


def settings_of(name: str, *extra: Callable[[Any], Any]) -> Callable[[Any], Any]:
  """settings(config) = config.eval.<name> as a dict, plus each extra(config)."""
  def settings(config):
    section = section_of(config, name)
    return [section.to_dict() if section is not None else None] + [f(config) for f in extra]
  return settings


# ---- Table cells (analysis/tables.py prints these; the same results give the same bytes).

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


def group_views(views: Sequence[dict]) -> dict:
  """(run name without '@seedN', model) -> its views in seed order: one table row group."""
  groups = {}
  for v in views:
    groups.setdefault((v['run'].split('@')[0], v.get('model', 'final')), []).append(v)
  return groups


def trained_on(view: dict) -> list:
  """The participants a model was trained on: a chain's best model from stage k has
  seen the first k of its order only."""
  if view.get('stage') and view.get('order'):
    return list(view['order'][:int(view['stage'])])
  return list(view.get('participants') or [])


def noise_multiplier(view: dict):
  """A DP run's noise multiplier (None without DP)."""
  return (view.get('privacy') or {}).get('noise_multiplier')


def privacy_ordered(groups: dict) -> list:
  """Group keys: runs without DP first (in their order), then DP runs by noise multiplier."""
  plain = [k for k, g in groups.items() if noise_multiplier(g[0]) is None]
  dp = sorted((k for k, g in groups.items() if noise_multiplier(g[0]) is not None),
              key=lambda k: (noise_multiplier(groups[k][0]), k))
  return plain + dp


def mean(values):
  values = [v for v in values if v is not None]
  return statistics.fmean(values) if values else None
