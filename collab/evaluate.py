"""Evaluates a finished run into WORKDIR/results.json, model by model, evaluator by evaluator.

Every setting ends by exporting its final model to WORKDIR/final and the model with the
lowest pooled validation loss to WORKDIR/best (Hugging Face GPT-2 folders, see
collab.settings.run), so evaluation is the same for all of them. Each model is evaluated
by the evaluators of collab/evals/evaluators.py (one face: collab/evals/interface.py):

- the final model's sections sit at the top of results.json, as they always have;
- every other model of config.eval.models ('best') under results['models'][name];
- the run's trajectory under results['snapshots']: its snapshots (WORKDIR/snapshots/*)
  and, for an incremental chain, every stage before the last, each evaluated by the
  evaluators config.eval.snapshot_evals names (plus the clone audit where the study
  asks for it).

Each evaluator's section is written to its own file as it finishes (EVAL_DIR/NAME/
result.json, see interface.py for the evaluation folders) and reused while its key
holds, so an interrupted evaluation resumes where it stopped.
"""

import hashlib
import json
import os
import shutil
import time
from typing import NamedTuple

import jax
import numpy as np

from collab import hf
from collab import io
from collab import provenance
from collab.data import blocks as blocks_lib
from collab.data import tokenizer as tokenizer_lib
from collab.evals import evaluators
from collab.evals import interface
from collab.evals.generation import scoring
from collab.settings import incremental
from collab.settings import best as best_lib
from collab.settings import run

RESULTS_JSON = 'results.json'


class NotTrainedError(FileNotFoundError):
  """The run has no finished training to evaluate."""


class Model(NamedTuple):
  """One model of a run: its weights, the JSON that describes its point of training,
  and the folder its evaluations are cached in."""
  name: str  # 'final', 'best' or 'snapshot'.
  weights: str
  info: str
  eval_dir: str


def final_model(folder: str) -> Model:
  """A finished run's (or snapshot's, or stage's) final model, evaluated in its folder."""
  return Model('final', os.path.join(folder, run.FINAL_DIR),
               os.path.join(folder, run.TRAIN_JSON), folder)


def best_model(workdir: str) -> Model:
  return Model('best', os.path.join(workdir, best_lib.BEST_DIR),
               os.path.join(workdir, best_lib.BEST_DIR, best_lib.POINT_JSON),
               os.path.join(workdir, 'eval-best'))


def load_model(model: Model, vocab_multiple: int = 1) -> tuple:
  """(params, ModelConfig, info) of a model, its embedding padded to `vocab_multiple` rows
  (what config.model trained with: aligned matrix products)."""
  if not (os.path.isfile(model.info) and os.path.isdir(model.weights)):
    raise NotTrainedError(f'{model.eval_dir!r} has no finished {model.name} model '
                          f'({model.info} and {model.weights}/); train it first with '
                          'python -m launch.train.')
  params, model_config = hf.import_hf(model.weights, vocab_multiple)
  return jax.tree_util.tree_map(np.asarray, params), model_config, io.read_json(model.info)


def load_final(workdir: str, vocab_multiple: int = 1) -> tuple:
  """(params, ModelConfig, train summary) of a finished run."""
  return load_model(final_model(workdir), vocab_multiple)


def fingerprint(config, workdir: str, settings, info: str | None = None) -> str:
  """What a cached evaluation depends on: its settings, the seed, the data folder's
  inputs and the model (its `info` JSON, train.json by default, is written once with it)."""
  h = hashlib.sha256(json.dumps({'settings': settings, 'seed': int(config.seed)},
                                sort_keys=True, default=str).encode())
  h.update(str(blocks_lib.load_manifest(run.data_dir_of(config, workdir)).get('inputs'))
           .encode())
  with open(info or os.path.join(workdir, run.TRAIN_JSON), 'rb') as f:
    h.update(f.read())
  return h.hexdigest()


def _cached(path: str, compute, key: str, stale=()):
  """The JSON at `path` if it was computed under `key`, else compute() written there.

  `path + '.key'` is written before computing: under the same key, an interrupted part
  resumes from its intermediate files; under another key (other settings, model or
  data) its folder and `stale` files are removed first, so no old sample is reused.
  """
  key_path = path + '.key'
  current = None
  if os.path.isfile(key_path):
    with open(key_path, encoding='utf-8') as f:
      current = f.read()
  if current == key and os.path.isfile(path):
    return io.read_json(path)
  if current != key:
    for old in (os.path.dirname(path),) + tuple(stale):
      if os.path.isdir(old):
        shutil.rmtree(old)
      elif os.path.isfile(old):
        os.remove(old)
    io.atomic_write_text(key_path, key)
  result = compute()
  io.atomic_write_json(path, result)
  return result


def _lazy(make):
  """make() on first call, then the same object: compile the scorer only if needed."""
  made = []

  def get(*args):
    if not made:
      made.append(make())
    return made[0](*args)
  return get


def context(config, workdir: str, model: Model, params, model_config, tokenizer,
            seq_len: int, name: str = '') -> interface.Context:
  """The Context of one model (and evaluator `name`: its out_dir)."""
  # Whole blocks with their B x L x V logits, like validation: the evaluation batch size
  # (config.eval.batch_size is for one-token decoding steps).
  score = _lazy(lambda: scoring.make_scorer(params, model_config,
                                            int(config.train.eval_batch_size)))
  return interface.Context(
      config=config, run_dir=workdir, model=model.name, eval_dir=model.eval_dir,
      out_dir=os.path.join(model.eval_dir, name), params=params, model_config=model_config,
      tokenizer=tokenizer, data_dir=run.data_dir_of(config, workdir),
      names=run.participant_names(config), score=score, seq_len=seq_len)


def run_evaluator(ev: interface.Evaluator, ctx: interface.Context, model: Model):
  """One evaluator's section for one model: cached under its key, computed otherwise."""
  ctx = ctx._replace(out_dir=os.path.join(model.eval_dir, ev.name))
  key = fingerprint(ctx.config, ctx.run_dir, [ev.settings(ctx.config), ctx.seq_len,
                                              ctx.model, ev.inputs(ctx)], model.info)
  return _cached(os.path.join(ctx.out_dir, 'result.json'), lambda: ev.compute(ctx), key,
                 stale=tuple(os.path.join(model.eval_dir, s) for s in ev.stale))


def evaluate_model(config, workdir: str, model: Model, tokenizer, seq_len: int,
                   evals=None, seconds: dict | None = None,
                   loaded: tuple | None = None) -> dict:
  """{evaluator name: section} of one model (None: switched off, or nothing to say)."""
  params, model_config, _ = loaded or load_model(
      model, int(config.model.get('vocab_multiple', 1)))
  ctx = context(config, workdir, model, params, model_config, tokenizer, seq_len)
  out = {}
  for ev in evaluators.ALL if evals is None else evals:
    out[ev.name] = None
    if not ev.enabled(config):
      continue
    begin = time.time()
    section = run_evaluator(ev, ctx, model)
    if seconds is not None:
      part = ev.name if model.name == 'final' else f'{model.name}/{ev.name}'
      seconds[part] = seconds.get(part, 0.0) + time.time() - begin
    out[ev.name] = section
  return out


def evaluate_part(config, workdir: str, name: str, model: Model | None = None):
  """One evaluator's section for one model of a run (default: its final model)."""
  model = model or final_model(workdir)
  data_dir = run.data_dir_of(config, workdir)
  tokenizer = tokenizer_lib.load_tokenizer(os.path.join(data_dir, 'tokenizer'))
  loaded = load_model(model, int(config.model.get('vocab_multiple', 1)))
  seq_len = min(int(blocks_lib.load_manifest(data_dir)['seq_len']), loaded[1].max_len)
  ctx = context(config, workdir, model, *loaded[:2], tokenizer, seq_len)
  return run_evaluator(evaluators.by_name([name])[0], ctx, model)


def check_trained_as(config, workdir: str, data_inputs: str | None) -> None:
  """Raises unless `config` (and the data) are what `workdir` trained with: results.json
  records the setting, seed and clients of the config it is evaluated under."""
  ignore = incremental.CHAIN_FIELDS if config.setting == 'incremental' else ()
  changed = run.training_differences(config, workdir, ignore, data_inputs)
  if changed:
    flags = ' '.join(f'--config.{path}={old}' if old is not None
                     else f'(no --config.{path})' for path, old, _ in changed
                     if path != 'data' and not isinstance(old, (dict, list)))
    raise ValueError(
        f'{workdir!r} was trained under another config or data ({run.describe(changed)}); '
        'evaluate it with the config it trained with (its config.json)'
        + (f', e.g. {flags}.' if flags else '.'))



_POINT_FIELDS = ('fraction', 'step', 'round', 'stage', 'participant', 'epochs', 'train_loss')


def _point(info: dict) -> dict:
  """Where in training a model stands, and its validation perplexity."""
  valid = info.get('valid') or {}
  return {**{k: info[k] for k in _POINT_FIELDS if k in info},
          'perplexity': {n: r['perplexity'] for n, r in valid.items()},
          'perplexity_blocks': {n: r['block_losses'] for n, r in valid.items()
                                if 'block_losses' in r}}


def evaluate_run(config, workdir: str) -> dict:
  """Writes and returns WORKDIR/results.json for a finished run."""
  start, seconds = time.time(), {}
  final = final_model(workdir)
  loaded = load_model(final, int(config.model.get('vocab_multiple', 1)))
  summary = loaded[2]
  data_dir = run.data_dir_of(config, workdir)
  manifest = blocks_lib.load_manifest(data_dir)  # A clear error when the data is gone.
  check_trained_as(config, workdir, manifest.get('inputs'))
  tokenizer = tokenizer_lib.load_tokenizer(os.path.join(data_dir, 'tokenizer'))
  seq_len = min(int(manifest['seq_len']), loaded[1].max_len)
  results = {
      'run': os.path.basename(os.path.abspath(workdir)),
      'setting': config.setting,
      'participants': summary['participants'],
      'order': summary.get('order'),
      'server_optimizer': (config.federated.server_optimizer
                           if config.setting == 'federated' else None),
      'seed': config.seed,
      'tokens_seen': summary['tokens_seen'],
      'tokens_seen_per_participant': summary['tokens_seen_per_participant'],
      'perplexity': {name: r['perplexity'] for name, r in summary['valid'].items()},
      # Mean loss of every validation block (runs trained before it was kept: absent).
      'perplexity_blocks': {name: r['block_losses'] for name, r in summary['valid'].items()
                            if 'block_losses' in r},
      'forgetting': summary.get('forgetting'),  # Incremental: perplexity after each stage.
      'train_seconds': summary.get('train_seconds'),
      # DP-FedAvg's budget as training reported it (epsilon None: no finite guarantee).
      'privacy': summary.get('privacy'),
  }
  results.update(evaluate_model(config, workdir, final, tokenizer, seq_len,
                                seconds=seconds, loaded=loaded))
  del loaded
  results['models'] = evaluate_other_models(config, workdir, tokenizer, seq_len, seconds,
                                            summary)
  begin = time.time()
  results['snapshots'] = evaluate_snapshots(config, workdir, tokenizer, seq_len, summary)
  seconds['snapshots'] = time.time() - begin
  results['evaluate_seconds_by_part'] = seconds  # Cached parts take ~0 s.
  results['evaluate_seconds'] = time.time() - start
  # The machine that evaluated (and trained, unless the run folder moved between them).
  results['machine'] = provenance.machine()
  io.atomic_write_json(os.path.join(workdir, RESULTS_JSON), results)
  io.atomic_write_text(os.path.join(workdir, RESULTS_JSON + '.key'), results_key(config, workdir))
  return results


def evaluate_other_models(config, workdir: str, tokenizer, seq_len: int,
                          seconds: dict | None = None, summary: dict | None = None) -> dict:
  """{model: its point and sections} for config.eval.models other than 'final'."""
  unknown = sorted(set(config.eval.models) - set(interface.MODELS))
  if unknown:
    raise ValueError(f'config.eval.models has {unknown}; use names among {interface.MODELS}.')
  out = {}
  best = best_model(workdir)
  if 'best' in config.eval.models and os.path.isfile(best.info):  # Older runs: no best/.
    point = io.read_json(best.info)
    shared = stage_model(workdir, point, summary or {})
    loaded = load_model(shared or best, int(config.model.get('vocab_multiple', 1)))
    out['best'] = {**_point(point), **evaluate_model(
        config, workdir, shared or best, tokenizer, seq_len, seconds=seconds, loaded=loaded)}
  return out


def stage_model(workdir: str, point: dict, summary: dict) -> Model | None:
  """The stage model an incremental chain's best/ copies, evaluated where the stage
  keeps it: chains that share the stage share its evaluation. None for other runs."""
  stages = summary.get('stages') or []
  if not point.get('stage') or len(stages) < int(point['stage']):
    return None
  folder = os.path.normpath(os.path.join(workdir, stages[int(point['stage']) - 1]['workdir']))
  best = best_model(folder)
  # A stage trained before best/ existed: the chain copied its final model.
  return best if os.path.isfile(best.info) else final_model(folder)


def _memorization_point(mem: dict | None) -> dict | None:
  """The part of a memorization result a trajectory point keeps."""
  if mem is None:
    return None
  keep = ('samples', 'memorized_samples', 'ratio', 'ratio_ci95', 'spans')
  return {'participants': {p: {k: r.get(k) for k in keep}
                           for p, r in mem['participants'].items()},
          'cross_org_share': mem.get('cross_org_share'), 'spans': mem.get('spans')}


def snapshot_folders(config, workdir: str, summary: dict) -> list:
  """(folder, extra point fields) of the run's trajectory, in training order: its
  snapshots at config.train.snapshot_fractions, and an incremental chain's stages before
  the last (each a finished run; the last stage is the chain's final model)."""
  root = os.path.join(workdir, run.SNAPSHOTS_DIR)
  wanted = {float(f) for f in config.train.get('snapshot_fractions', ())}
  points = []
  # Snapshot folders are named by their step (or round); hidden ones are unfinished writes.
  for name in sorted((n for n in os.listdir(root) if n.isdigit()) if os.path.isdir(root)
                     else (), key=int):
    info = io.read_json(os.path.join(root, name, run.TRAIN_JSON))
    if float(info.get('requested_fraction', info['fraction'])) in wanted:
      points.append((os.path.join(root, name), {}))  # Else exported under other fractions.
  stages = summary.get('stages') or []
  for k, stage in enumerate(stages[:-1]):
    blocks = len(blocks_lib.load_blocks(run.data_dir_of(config, workdir),
                                        stage['participant'], 'train'))
    points.append((os.path.normpath(os.path.join(workdir, stage['workdir'])), {
        'stage': k + 1, 'participant': stage['participant'],
        'fraction': (k + 1) / len(stages),
        # Passes over its participant's blocks in this stage (as centralized.epochs).
        'epochs': stage['steps'] * config.train.batch_size / max(blocks, 1)}))
  return points


def evaluate_snapshots(config, workdir: str, tokenizer, seq_len: int,
                       summary: dict) -> list | None:
  """The run's trajectory: every snapshot (and stage) evaluated by the evaluators of
  config.eval.snapshot_evals, each cached in the snapshot's own folder."""
  folders = snapshot_folders(config, workdir, summary)
  if not folders:
    return None
  cfg = config.copy_and_resolve_references()  # The run's data folder, not the snapshot's.
  cfg.unlock()
  cfg.data.data_dir = run.data_dir_of(config, workdir)
  cfg.lock()
  evals = evaluators.by_name(config.eval.snapshot_evals)
  points = []
  for folder, extra in folders:
    # A stage is a finished run's final model (a chain's first may be a single run,
    # evaluated there as 'final' too: one cache); a snapshot is a point inside a run.
    model = final_model(folder)._replace(name='final' if 'stage' in extra else 'snapshot')
    loaded = load_model(model, int(config.model.get('vocab_multiple', 1)))
    sections = evaluate_model(cfg, folder, model, tokenizer, seq_len, evals, loaded=loaded)
    if 'memorization' in sections:
      sections['memorization'] = _memorization_point(sections['memorization'])
    points.append({**_point(loaded[2]), **extra, **sections})
  return points


def results_key(config, workdir: str) -> str:
  """The fingerprint of a run's results.json: every evaluation setting, model and data."""
  from collab.evals.memorization import clone_audit
  return fingerprint(config, workdir, [config.eval.to_dict(), clone_audit.client_fields(config),
                                       config.train.eval_batch_size,
                                       list(config.train.get('snapshot_fractions', ()))])


def load_current_results(config, workdir: str) -> dict | None:
  """WORKDIR/results.json if it was evaluated under this config, else None."""
  path = os.path.join(workdir, RESULTS_JSON)
  if not (os.path.isfile(path) and os.path.isfile(path + '.key')):
    return None
  with open(path + '.key', encoding='utf-8') as f:
    return io.read_json(path) if f.read() == results_key(config, workdir) else None
