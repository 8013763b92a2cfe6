"""Evaluates a finished run into WORKDIR/results.json: perplexity, pass@k, memorization,
and the privacy audits: canary exposure, membership inference and the DP budget.

Every setting ends by exporting its final model to WORKDIR/final (a Hugging Face GPT-2
folder, see collab.settings.run.finish), so evaluation is the same for all of them.
Each part is written to its own file as it finishes (passk/result.json, memorization/...,
canaries/result.json, membership/result.json)
and skipped when present, so an interrupted evaluation resumes where it stopped.
"""

import hashlib
import json
import os
import shutil
import time

import jax
import numpy as np

from collab import hf
from collab import io
from collab import provenance
from collab.data import blocks as blocks_lib
from collab.data import canaries as canaries_lib
from collab.data import tokenizer as tokenizer_lib
from collab.evals.memorization import clients as client_memorization
from collab.evals.privacy import exposure
from collab.evals.memorization import audit as memorization
from collab.evals.privacy import membership
from collab.evals.execution import passk
from collab.evals.generation import sampling
from collab.evals.generation import scoring
from collab.evals import stats
from collab.settings import incremental
from collab.settings import run

RESULTS_JSON = 'results.json'


class NotTrainedError(FileNotFoundError):
  """The run has no finished training to evaluate."""


def load_final(workdir: str, vocab_multiple: int = 1) -> tuple:
  """(params, ModelConfig, train summary) of a finished run, its embedding padded to
  `vocab_multiple` rows (what config.model trained with: aligned matrix products)."""
  summary_path = os.path.join(workdir, run.TRAIN_JSON)
  final = os.path.join(workdir, run.FINAL_DIR)
  if not (os.path.isfile(summary_path) and os.path.isdir(final)):
    raise NotTrainedError(f'{workdir!r} has no finished training ({run.TRAIN_JSON} and '
                          f'{run.FINAL_DIR}/); train it first with python -m launch.train.')
  params, model_config = hf.import_hf(final, vocab_multiple)
  return jax.tree_util.tree_map(np.asarray, params), model_config, io.read_json(summary_path)


def generate_fn(config, params, model_config, tokenizer, key, sampling_cfg):
  """passk.GenerateFn over our compiled sampler (temperature/top-p from `sampling_cfg`)."""
  def fn(prompts, num_samples):
    return sampling.generate_text(
        params, model_config, tokenizer, prompts, num_samples, key=key,
        max_new_tokens=int(sampling_cfg.max_new_tokens),
        stop_strings=tuple(config.eval.stop_strings),
        temperature=float(sampling_cfg.temperature), top_p=float(sampling_cfg.top_p),
        batch_size=int(config.eval.batch_size))
  return fn


def fingerprint(config, workdir: str, settings) -> str:
  """What a cached evaluation depends on: its settings, the seed, the data folder's
  inputs and the trained model (train.json is written once, when training ends)."""
  h = hashlib.sha256(json.dumps({'settings': settings, 'seed': int(config.seed)},
                                sort_keys=True, default=str).encode())
  h.update(str(blocks_lib.load_manifest(run.data_dir_of(config, workdir)).get('inputs'))
           .encode())
  with open(os.path.join(workdir, run.TRAIN_JSON), 'rb') as f:
    h.update(f.read())
  return h.hexdigest()


def _client_fields(config) -> list:
  """Who a client is (config.federated): it decides the per-client memorization."""
  fed = config.federated
  return [fed.clients, fed.directory_depth, fed.synthetic_clients, fed.synthetic_partition,
          fed.dirichlet_alpha]


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


def evaluate_passk(config, workdir: str, params, model_config, tokenizer) -> dict | None:
  """pass@k on HumanEval with n samples per problem; cached in WORKDIR/passk/."""
  if not config.eval.passk.enabled:
    return None
  bad = [k for k in config.eval.passk.ks if int(k) < 1]
  if bad or int(config.eval.passk.n) < 1:
    raise ValueError(f'config.eval.passk.ks={tuple(config.eval.passk.ks)} and n='
                     f'{config.eval.passk.n}: every k and n must be >= 1 (ks above n are '
                     'skipped); fix them before sampling starts.')
  out_dir = os.path.join(workdir, 'passk')
  key = fingerprint(config, workdir, [config.eval.passk.to_dict(), config.eval.stop_strings])
  return _cached(os.path.join(out_dir, 'result.json'), lambda: _passk(
      config, out_dir, params, model_config, tokenizer), key)


def _passk(config, out_dir: str, params, model_config, tokenizer) -> dict:
  cfg = config.eval.passk
  problems = passk.load_problems(int(cfg.num_problems))
  key = jax.random.fold_in(jax.random.key(config.seed), 1)
  ks = [k for k in cfg.ks if k <= cfg.n]
  evaluation = passk.run(
      generate_fn(config, params, model_config, tokenizer, key, cfg), problems, int(cfg.n),
      ks=ks, stop_strings=tuple(config.eval.stop_strings), timeout=float(cfg.timeout),
      workers=int(cfg.workers) or None, allow_weak=bool(cfg.allow_weak_sandbox),
      limits=passk.sandbox_limits(cfg), out_dir=out_dir)
  counts = {}
  for row in evaluation.rows:
    n, c = counts.get(row['task_id'], (0, 0))
    counts[row['task_id']] = (n + 1, c + int(row['passed']))
  return {'pass_at_k': {k: v for k, v in evaluation.scores.items() if k.startswith('pass@')},
          'ci95': stats.passk_bootstrap(counts, ks, seed=config.seed),
          'n': int(cfg.n), 'num_problems': len(problems)}


def evaluate_memorization(config, workdir: str, params, model_config,
                          tokenizer) -> dict | None:
  """Memorization audit of every participant; cached in WORKDIR/memorization/.

  Writes WORKDIR/samples/memorization.jsonl (every sample with its prompt's provenance),
  WORKDIR/memorization/memorized.jsonl (every memorized span with its provenance) and
  WORKDIR/memorization/result.json (the block results.json holds).
  """
  if not config.eval.memorization.enabled:
    return None
  out_dir = os.path.join(workdir, 'memorization')
  key = fingerprint(config, workdir, [config.eval.memorization.to_dict(),
                                      config.eval.stop_strings, _client_fields(config)])
  return _cached(os.path.join(out_dir, 'result.json'), lambda: _memorization(
      config, workdir, out_dir, params, model_config, tokenizer), key,
                 stale=(os.path.join(workdir, memorization.SAMPLES_JSONL),))


def _memorization(config, workdir: str, out_dir: str, params, model_config,
                  tokenizer) -> dict:
  cfg = config.eval.memorization
  data_dir = run.data_dir_of(config, workdir)
  names = run.participant_names(config)
  indexes = memorization.build_indexes(data_dir, names, int(cfg.min_lines),
                                       int(cfg.clone_type))
  complete = memorization.make_complete(params, model_config, tokenizer,
                                        int(config.eval.batch_size))
  samples, prompt_counts = memorization.load_or_generate(
      cfg, workdir, data_dir, names, complete, tokenizer, seed=int(config.seed),
      stop_strings=tuple(config.eval.stop_strings), max_len=model_config.max_len)
  result, rows = memorization.audit(samples, indexes['train'], indexes['valid'],
                                    seed=int(config.seed))
  result['prompts'] = prompt_counts
  result['settings'] = cfg.to_dict()
  if config.federated.clients != 'participants':  # Which repositories/folders leak.
    result['clients'] = client_memorization.client_memorization(
        config.federated, data_dir, rows, indexes['train'], int(config.seed))
  io.write_jsonl(os.path.join(out_dir, 'memorized.jsonl'), rows)
  return result


def _lazy(make):
  """make() on first call, then the same object: compile the scorer only if needed."""
  made = []

  def get(*args):
    if not made:
      made.append(make())
    return made[0](*args)
  return get


def evaluate_canaries(config, workdir: str, tokenizer, score) -> dict | None:
  """Exposure of every participant's canaries; cached in WORKDIR/canaries/result.json.

  None when switched off or when the data folder has no canaries.
  """
  meta = canaries_lib.load(run.data_dir_of(config, workdir))
  if not config.eval.canaries.enabled or meta is None:
    return None
  return _cached(os.path.join(workdir, 'canaries', 'result.json'), lambda: exposure.evaluate(
      score, tokenizer_lib.make_encoder(tokenizer), tokenizer_lib.eot_id(tokenizer), meta,
      candidates=int(config.eval.canaries.candidates), seed=int(config.seed)),
                 fingerprint(config, workdir, config.eval.canaries.to_dict()))


def evaluate_membership(config, workdir: str, tokenizer, score, seq_len: int) -> dict | None:
  """Loss and Min-K% membership inference per participant; cached in WORKDIR/membership/."""
  cfg = config.eval.membership
  if not cfg.enabled:
    return None
  return _cached(os.path.join(workdir, 'membership', 'result.json'), lambda: membership.evaluate(
      score, tokenizer_lib.make_encoder(tokenizer), tokenizer_lib.eot_id(tokenizer),
      run.data_dir_of(config, workdir), run.participant_names(config),
      max_files=int(cfg.max_files), seq_len=seq_len, k=float(cfg.min_k), fpr=float(cfg.fpr),
      seed=int(config.seed)), fingerprint(config, workdir, [cfg.to_dict(), seq_len]))


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


def evaluate_run(config, workdir: str) -> dict:
  """Writes and returns WORKDIR/results.json for a finished run."""
  start, seconds = time.time(), {}

  def timed(part: str, compute):
    begin = time.time()
    out = compute()
    seconds[part] = time.time() - begin
    return out

  params, model_config, summary = load_final(
      workdir, int(config.model.get('vocab_multiple', 1)))
  data_dir = run.data_dir_of(config, workdir)
  manifest = blocks_lib.load_manifest(data_dir)  # A clear error when the data is gone.
  check_trained_as(config, workdir, manifest.get('inputs'))
  tokenizer = tokenizer_lib.load_tokenizer(os.path.join(data_dir, 'tokenizer'))
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
      'passk': timed('passk', lambda: evaluate_passk(config, workdir, params, model_config,
                                                     tokenizer)),
      'memorization': timed('memorization', lambda: evaluate_memorization(
          config, workdir, params, model_config, tokenizer)),
      'train_seconds': summary.get('train_seconds'),
      # DP-FedAvg's budget as training reported it (epsilon None: no finite guarantee).
      'privacy': summary.get('privacy'),
  }
  results['snapshots'] = timed('snapshots', lambda: evaluate_snapshots(config, workdir,
                                                                       tokenizer))
  # Whole blocks with their B x L x V logits, like validation: the evaluation batch size
  # (config.eval.batch_size is for one-token decoding steps).
  score = _lazy(lambda: scoring.make_scorer(params, model_config,
                                            int(config.train.eval_batch_size)))
  results['canaries'] = timed('canaries', lambda: evaluate_canaries(config, workdir,
                                                                    tokenizer, score))
  results['membership'] = timed('membership', lambda: evaluate_membership(
      config, workdir, tokenizer, score, min(int(manifest['seq_len']), model_config.max_len)))
  results['evaluate_seconds_by_part'] = seconds  # Cached parts take ~0 s.
  results['evaluate_seconds'] = time.time() - start
  # The machine that evaluated (and trained, unless the run folder moved between them).
  results['machine'] = provenance.machine()
  io.atomic_write_json(os.path.join(workdir, RESULTS_JSON), results)
  io.atomic_write_text(os.path.join(workdir, RESULTS_JSON + '.key'), results_key(config, workdir))
  return results


def _memorization_point(mem: dict | None) -> dict | None:
  """The part of a memorization result a dose-response point keeps."""
  if mem is None:
    return None
  keep = ('samples', 'memorized_samples', 'ratio', 'ratio_ci95', 'spans')
  return {'participants': {p: {k: r.get(k) for k in keep}
                           for p, r in mem['participants'].items()},
          'cross_org_share': mem.get('cross_org_share'), 'spans': mem.get('spans')}


def evaluate_snapshots(config, workdir: str, tokenizer) -> list | None:
  """Memorization of every intermediate model in WORKDIR/snapshots (dose-response).

  Each snapshot folder is read as a finished run (its final/ and train.json) and audited
  by `evaluate_memorization`, the code path of the final model, with its parts cached in
  the snapshot's folder. Points are in training order; the final model is the run's own.
  """
  root = os.path.join(workdir, run.SNAPSHOTS_DIR)
  if not os.path.isdir(root):
    return None
  cfg = config.copy_and_resolve_references()  # The run's data folder, not the snapshot's.
  cfg.unlock()
  cfg.data.data_dir = run.data_dir_of(config, workdir)
  cfg.lock()
  wanted = {float(f) for f in config.train.get('snapshot_fractions', ())}
  points = []
  # Snapshot folders are named by their step (or round); hidden ones are unfinished writes.
  for name in sorted((n for n in os.listdir(root) if n.isdigit()), key=int):
    folder = os.path.join(root, name)
    info = io.read_json(os.path.join(folder, run.TRAIN_JSON))
    if float(info.get('requested_fraction', info['fraction'])) not in wanted:
      continue  # Exported under other snapshot_fractions.
    params, model_config, _ = load_final(folder, int(config.model.get('vocab_multiple', 1)))
    points.append({
        **{k: info.get(k) for k in ('fraction', 'step', 'round', 'epochs', 'train_loss')},
        'perplexity': {n: r['perplexity'] for n, r in info['valid'].items()},
        'memorization': _memorization_point(
            evaluate_memorization(cfg, folder, params, model_config, tokenizer))})
  return points


def results_key(config, workdir: str) -> str:
  """The fingerprint of a run's results.json: every evaluation setting, model and data."""
  return fingerprint(config, workdir, [config.eval.to_dict(), _client_fields(config),
                                       config.train.eval_batch_size,
                                       list(config.train.get('snapshot_fractions', ()))])


def load_current_results(config, workdir: str) -> dict | None:
  """WORKDIR/results.json if it was evaluated under this config, else None."""
  path = os.path.join(workdir, RESULTS_JSON)
  if not (os.path.isfile(path) and os.path.isfile(path + '.key')):
    return None
  with open(path + '.key', encoding='utf-8') as f:
    return io.read_json(path) if f.read() == results_key(config, workdir) else None
