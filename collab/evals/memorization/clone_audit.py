"""The paper's memorization evaluator: sampled code matched as >= 6-line clones.

Section 'memorization' of results.json (collab/evals/memorization/audit.py computes it):
per participant the memorization ratio with its interval, memorized lines and
fingerprints, and the null baseline; cross-organization spans, duplication buckets and,
with finer clients, the clients that leak most. Files beside it in the evaluation folder:
samples/memorization.jsonl (every sample with its prompt's provenance) and
memorization/memorized.jsonl (every memorized span).
"""

import os
from typing import Sequence

from collab import io
from collab.evals import interface
from collab.evals.interface import fmt, fmt_ci, group_views

NAME = 'memorization'


def client_fields(config) -> list:
  """Who a client is (config.federated): it decides the per-client memorization."""
  fed = config.federated
  return [fed.clients, fed.directory_depth, fed.synthetic_clients, fed.synthetic_partition,
          fed.dirichlet_alpha]


def compute(ctx: interface.Context) -> dict:
  from collab.evals.memorization import audit  # Clone indexes and sampling: heavy.
  from collab.evals.memorization import clients as client_memorization
  cfg, config = ctx.config.eval.memorization, ctx.config
  indexes = audit.build_indexes(ctx.data_dir, ctx.names, int(cfg.min_lines),
                                int(cfg.clone_type))
  complete = audit.make_complete(ctx.params, ctx.model_config, ctx.tokenizer,
                                 int(config.eval.batch_size))
  samples, prompt_counts = audit.load_or_generate(
      cfg, ctx.eval_dir, ctx.data_dir, ctx.names, complete, ctx.tokenizer,
      seed=int(config.seed), stop_strings=tuple(config.eval.stop_strings),
      max_len=ctx.model_config.max_len)
  result, rows = audit.audit(samples, indexes['train'], indexes['valid'],
                             seed=int(config.seed))
  result['prompts'] = prompt_counts
  result['settings'] = cfg.to_dict()
  if config.federated.clients != 'participants':  # Which repositories/folders leak.
    result['clients'] = client_memorization.client_memorization(
        config.federated, ctx.data_dir, rows, indexes['train'], int(config.seed))
  io.write_jsonl(os.path.join(ctx.out_dir, 'memorized.jsonl'), rows)
  return result


# ---- Tables -----------------------------------------------------------------------------

def participant_field(view: dict, participant: str, key: str):
  """results['memorization']['participants'][participant][key] of a run view, or None."""
  return ((view.get(NAME) or {}).get('participants', {}).get(participant) or {}).get(key)


def participants_of(views: Sequence[dict]) -> list:
  seen = []
  for v in views:
    for p in (v.get(NAME) or {}).get('participants', {}):
      if p not in seen:
        seen.append(p)
  return seen


def ratio_of(view: dict):
  """The memorization ratio averaged over the participants the run trained on."""
  values = [participant_field(view, p, 'ratio') for p in interface.trained_on(view)]
  values = [v for v in values if v is not None]
  return sum(values) / len(values) if values else None


def memorization_table(views: Sequence[dict]) -> interface.Table:
  """Memorization ratio (95% CI), memorized lines and fingerprints, beside the null."""
  header = ['run', 'model', 'participant', 'samples', 'ratio % [95% CI]', 'memorized lines',
            'fingerprints', 'exclusive', 'shared', 'null ratio %']
  rows = []
  for (name, model), group in group_views(views).items():
    for p in participants_of(group):
      if participant_field(group[0], p, 'samples') is None:
        continue
      ratio = (fmt_ci(participant_field(group[0], p, 'ratio'), participant_field(group[0], p, 'ratio_ci95'))
               if len(group) == 1 else fmt([participant_field(g, p, 'ratio') for g in group], 1, True))
      rows.append([name, model, p, fmt([participant_field(g, p, 'samples') for g in group], 0), ratio] + [
          fmt([participant_field(g, p, k) for g in group], 0)
          for k in ('memorized_lines', 'fingerprints', 'exclusive_spans', 'shared_spans')] + [
          fmt([participant_field(g, p, 'null_ratio') for g in group], 1, percent=True)])
  return interface.Table('memorization', 'Memorization per participant (clones of >= 6 '
                         'lines in generated code)', header, rows)


_COPY_LABELS = {'1': '1', '2-4': '2–4', '>=5': '5+'}  # '>' and '≥' do not survive LaTeX.


def _dup(view: dict, who: str, bucket: str, key: str):
  dup = (view.get(NAME) or {}).get('duplication') or {}
  block = dup.get('all') if who == 'all' else dup.get('participants', {}).get(who)
  return ((block or {}).get('buckets', {}).get(bucket) or {}).get(key)


def duplication_table(views: Sequence[dict]) -> interface.Table | None:
  """Memorized spans by the copy count of the training file they match (1, 2-4, 5+)."""
  header = ['run', 'model', 'participant', 'copies', 'files', 'training windows %',
            'memorized spans', 'spans %', 'relative rate']
  rows = []
  for (name, model), group in group_views(views).items():
    dup = (group[0].get(NAME) or {}).get('duplication')
    if not dup:
      continue
    who = list(dup['participants']) + (['all'] if len(dup['participants']) > 1 else [])
    for p in who:
      for b in dup['bucket_names']:
        rows.append([name, model, p, _COPY_LABELS.get(b, b)] + [
            fmt([_dup(g, p, b, k) for g in group], *spec) for k, spec in (
                ('files', (0,)), ('window_share', (1, True)), ('spans', (0,)),
                ('span_share', (1, True)), ('relative_rate', (2,)))])
  if not rows:
    return None
  return interface.Table('duplication', 'Memorization by duplication: spans per copy count '
                         'of the matched training file (relative rate = spans % / training '
                         'windows %)', header, rows)


def clients_table(views: Sequence[dict], top: int = 10) -> interface.Table | None:
  """The clients (repositories, folders or shards) whose code each run gives back most."""
  header = ['run', 'model', 'client', 'participant', 'blocks', 'files', 'memorized spans',
            'memorized lines', 'samples', 'exclusive spans', 'duplication %']
  rows, granularity = [], ''
  for view in views:
    block = (view.get(NAME) or {}).get('clients')
    if not block:
      continue
    granularity = block['granularity']
    rows += [[view['run'], view.get('model', 'final'), c['client'], c['participant']] + [
        fmt([c[k]], 0) for k in ('blocks', 'files', 'memorized_spans', 'memorized_lines',
                                 'memorized_samples', 'exclusive_spans')] + [
        fmt([c['duplication']], 1, percent=True)] for c in block['clients'][:top]]
    if not block['clients']:
      rows.append([view['run'], view.get('model', 'final'),
                   f"(none of {block['num_clients']} clients)"] + ['–'] * 8)
  if not rows:
    return None
  return interface.Table('clients', f'Clients that leak most ({granularity}; top {top} per '
                         'run)', header, rows)


def tables(views: Sequence[dict]) -> list:
  return [t for t in (memorization_table(views), duplication_table(views),
                      clients_table(views)) if t is not None]


EVALUATOR = interface.Evaluator(
    name=NAME, needs=frozenset({'model', 'data', 'samples'}),
    enabled=interface.enabled_flag(NAME),
    settings=interface.settings_of(NAME, lambda c: list(c.eval.stop_strings), client_fields),
    compute=compute, tables=tables,
    stale=(os.path.join('samples', 'memorization.jsonl'),))
