"""Incremental training: a chain of centralized runs, one participant after another.

An order (p1, ..., pn) is a chain of stages (DESIGN.md convention 4). Stage k is
`centralized.fit` on p_k's blocks alone, starting from stage k-1's final parameters
restored through Orbax (`init_from` = stage k-1's workdir) with a fresh optimizer and
warmup. Stage k lives in `WORKDIR/stages/p1-...-pk`, named by the order's prefix, so the
chains of `all_orders` share the stages they have in common and every stage keeps its
checkpoints for later evaluation; with `incremental.first_stages` (a study sets it) a
finished single run of the first participant is the first stage. After each stage, fit
evaluates every participant's validation blocks: the stages' results are the chain's
forgetting curves. Each stage keeps its own best/ (best_lib.keep_best); the chain's best/ is
the stage best with the lowest pooled validation loss.

A stage with train.json is done and is not run again; a stage without one resumes from
its own checkpoint (or starts from its predecessor), so a killed chain resumes at the
stage where it stopped.

Matched budgets: with config.train.budget_tokens > 0 every stage gets an equal share
(budget // stages), so a chain trains on the budget, as the other settings do.
"""

import itertools
import os
import shutil
import time

from collab import io
from collab.settings import centralized
from collab.settings import best as best_lib
from collab.settings import run

STAGES_DIR = 'stages'
# Config sections that name a chain, not how any one stage trains (one workdir holds many
# chains: an order, then all orders).
CHAIN_FIELDS = ('incremental',)


def orders(config) -> list:
  """The chains to train: config.incremental.order (or the participants), or all orders."""
  names = run.participant_names(config)
  spec = config.incremental.order
  order = tuple(s.strip() for s in spec.split(',') if s.strip()) if spec else tuple(names)
  unknown = [p for p in order if p not in names]
  if unknown or len(set(order)) != len(order) or not order:
    raise ValueError(f'config.incremental.order {spec!r} must name distinct participants among '
                     f'{names}, separated by commas (unknown: {unknown}).')
  bad = [p for p in order if '-' in p or os.sep in p]
  if bad:
    raise ValueError(f'Participants {bad} have "-" or "{os.sep}" in their names, which stage '
                     'folders use as separators; rename them in config.data.participants.')
  if config.incremental.all_orders:
    return list(itertools.permutations(order))
  return [order]


def stage_dir(config, workdir: str, prefix) -> str:
  """STAGES/p1-...-pk: the stage that ends the order's prefix `prefix`.

  STAGES is config.incremental.stages_dir, or WORKDIR/stages; a study points all its
  chains at one folder so orders that begin alike share their first stages. A first
  stage is a single run: with config.incremental.first_stages (a folder name with
  '{participant}') a finished single run there serves as the chain's first stage.
  """
  first = _finished_single(config, prefix)
  if first:
    return first
  root = config.incremental.get('stages_dir') or os.path.join(workdir, STAGES_DIR)
  return os.path.join(root, '-'.join(prefix))


# What a single run's config says that a first stage's does not: neither changes how
# centralized.fit trains one participant from scratch.
SINGLE_FIELDS = ('setting', 'single')


def _finished_single(config, prefix) -> str:
  """The finished single run of `prefix`'s participant that is its first stage, or ''
  (train the stage in STAGES). Matched budgets give a stage a share of the budget, so
  a single run is never its stage then."""
  template = config.incremental.get('first_stages') or ''
  if len(prefix) != 1 or '{participant}' not in template or config.train.get(
      'budget_tokens', 0):
    return ''
  folder = template.replace('{participant}', prefix[0])
  path = os.path.join(folder, run.CONFIG_JSON)
  if not (run.is_done(folder) and os.path.isfile(path)):
    return ''
  trained = io.read_json(path)
  return folder if (trained.get('setting'), trained.get('single')) == ('single', prefix[0]) \
      else ''


def stage_config(config, num_stages: int):
  """The config of one stage: the run's, with the token budget split equally."""
  budget = int(config.train.get('budget_tokens', 0))
  if budget <= 0:
    return config
  stage = config.copy_and_resolve_references()  # Configs are never changed at run time.
  stage.train.budget_tokens = budget // num_stages
  return stage


def run_stage(config, workdir: str, order, k: int, model, data: run.RunData) -> dict:
  """Stage k of `order` (done already, resumed, or started from stage k-1): its summary."""
  folder = stage_dir(config, workdir, order[:k + 1])
  cfg = stage_config(config, len(order))
  # Stages are shared by every chain with the same prefix, whatever the rest of its order.
  inputs = data.manifest.get('inputs')
  ignore = CHAIN_FIELDS + (SINGLE_FIELDS if _finished_single(config, order[:k + 1]) else ())
  run.check_same_training(cfg, folder, ignore=ignore, data_inputs=inputs)
  path = os.path.join(folder, run.TRAIN_JSON)
  if os.path.isfile(path):
    return io.read_json(path)
  init_from = stage_dir(config, workdir, order[:k]) if k else config.train.init_from
  run.write_config(folder, cfg, inputs)
  return centralized.fit(cfg, folder, model, {order[k]: data.train[order[k]]}, data.valid,
                         init_from=init_from, eot_id=data.manifest['eot_id'],
                         desc=f'stage {k + 1}/{len(order)} {order[k]}',
                         tokenizer_dir=run.tokenizer_dir_of(data.data_dir))


def stage_best(config, folder: str, num_blocks: int) -> tuple:
  """(best point, folder holding its model) of a finished stage: its best/ (best_lib.keep_best).

  Stages trained before runs kept best/ have none: their final model, with the
  validation in their train.json, is then the only point known.
  """
  point = best_lib.best_point(folder)
  if point is not None:
    return point, os.path.join(folder, best_lib.BEST_DIR)
  summary = io.read_json(os.path.join(folder, run.TRAIN_JSON))
  steps, valid = summary['steps'], summary['valid']
  return ({'step': steps, 'steps': steps, 'fraction': 1.0,
           'epochs': centralized.epochs(config, num_blocks, steps), 'valid': valid,
           'pooled_loss': best_lib.pooled_loss(valid)}, os.path.join(folder, run.FINAL_DIR))


def chain_best(config, workdir: str, order, data: run.RunData) -> tuple:
  """(point, model folder) of the stage best with the lowest pooled validation loss over
  the chain (the earlier stage on ties); the point names its 'stage' (from 1) and
  'participant'. Every stage validates on every participant, so the losses compare."""
  best = None
  for k, name in enumerate(order):
    folder = stage_dir(config, workdir, order[:k + 1])
    point, model_dir = stage_best(stage_config(config, len(order)), folder,
                                  len(data.train[name]))
    if best is None or point['pooled_loss'] < best[0]['pooled_loss']:
      best = ({**point, 'stage': k + 1, 'participant': name}, model_dir)
  return best


def export_best(workdir: str, point: dict, model_dir: str) -> None:
  """WORKDIR/best: a copy of the chain's best stage model, with its point.json."""
  def write(folder):
    shutil.copytree(model_dir, folder, dirs_exist_ok=True)
    io.atomic_write_json(os.path.join(folder, best_lib.POINT_JSON), point)
  best_lib.replace_best(workdir, write)


def run_chain(config, workdir: str, order, model, data: run.RunData) -> dict:
  """Every stage of one order, in turn; the chain's summary with its forgetting curves.

  `stages` lists, per stage, the participant, its folder (relative to WORKDIR), steps,
  tokens seen and the validation results of every participant after it; `forgetting`
  maps each participant to its validation perplexity after each stage; `best` is the
  chain's best point (chain_best).
  """
  stages = []
  for k, name in enumerate(order):
    summary = run_stage(config, workdir, order, k, model, data)
    stages.append({'participant': name,
                   'workdir': os.path.relpath(stage_dir(config, workdir, order[:k + 1]),
                                              workdir),
                   **{key: summary[key] for key in ('steps', 'source', 'tokens_seen',
                                                    'valid', 'train_seconds')}})
  per_participant = {name: 0 for name in order}
  for stage in stages:
    per_participant[stage['participant']] += stage['tokens_seen']
  final = stages[-1]['valid']
  return {
      'order': list(order), 'stages': stages, 'valid': final,
      'steps': sum(s['steps'] for s in stages),
      'tokens_seen': sum(per_participant.values()),
      'tokens_seen_per_participant': per_participant,
      'forgetting': {name: [s['valid'][name]['perplexity'] for s in stages] for name in final},
      'best': best_lib.best_summary(chain_best(config, workdir, order, data)[0]),
      'train_seconds': sum(s['train_seconds'] for s in stages)}


def train(config, workdir: str) -> dict:
  """Trains every chain of config.incremental; returns (and writes) the summary.

  The top-level fields describe the first chain (the configured order); `chains` holds
  every chain (one unless all_orders).
  """
  run.check_config(config)
  chains = orders(config)
  data = run.load_data(config, workdir, list(chains[0]))
  model, _ = run.make_model(config, data.manifest)
  run.claim_workdir(workdir, config, ignore=CHAIN_FIELDS,
                    data_inputs=data.manifest.get('inputs'))
  start = time.time()
  results = [run_chain(config, workdir, order, model, data) for order in chains]
  summary = {'setting': 'incremental', 'participants': results[0]['order'], **results[0],
             'chains': results, 'wall_seconds': time.time() - start}
  # The chain's model is its last stage's: evaluation reads WORKDIR/final like any run's.
  last = os.path.join(stage_dir(config, workdir, chains[0]), run.FINAL_DIR)
  with io.atomic_dir(os.path.join(workdir, run.FINAL_DIR)) as tmp:
    shutil.copytree(last, tmp, dirs_exist_ok=True)
  export_best(workdir, *chain_best(config, workdir, chains[0], data))  # Before train.json.
  io.atomic_write_json(os.path.join(workdir, run.TRAIN_JSON), summary)
  return summary
