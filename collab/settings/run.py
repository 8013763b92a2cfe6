"""What every setting's run shares: config checks, data, model, engine and outputs.

A setting (centralized, federated, incremental) is a loop over these pieces; none of
them knows which setting it serves. The engine hides the parallel mode: the pjit path
(default) keeps a sharded state; the pmap path keeps a replicated one.
"""

import functools
import json
import math
import os
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from collab import checkpoint
from collab import hf
from collab import io
from collab import parallel
from collab import steps
from collab.data import blocks as blocks_lib
from collab.model import GPT2, ModelConfig

PyTree = Any
SETTINGS = ('single', 'centralized', 'federated', 'incremental')


class RunData(NamedTuple):
  """Blocks of a run: training (the participants it trains on) and validation (all)."""
  data_dir: str
  manifest: dict
  train: dict  # participant -> blocks_NxL (memory-mapped)
  valid: dict  # participant -> blocks_NxL, every participant of the data folder


class Engine(NamedTuple):
  """The parallel mode behind four calls; states in and out are in the mode's layout."""
  abstract_state: PyTree  # Host layout, ShapeDtypeStructs with shardings (for restore).
  init: Callable[[], PyTree]  # Fresh state, host layout.
  to_device: Callable[[PyTree], PyTree]  # Host layout -> the mode's layout.
  to_host: Callable[[PyTree], PyTree]  # The mode's layout -> host layout (save, eval).
  step: Callable  # (state, tokens_BxL numpy, rng) -> (state, metrics)


def data_dir_of(config, workdir: str) -> str:
  """config.data.data_dir, or WORKDIR/data when it is empty."""
  return config.data.data_dir or os.path.join(workdir, 'data')


def participant_names(config) -> list:
  return [p.name for p in config.data.participants]


def check_config(config) -> None:
  """Errors a run would otherwise hit late, with what to change."""
  if config.setting not in SETTINGS:
    raise ValueError(f'Unknown setting {config.setting!r}; use one of {SETTINGS} '
                     '(--config.setting=...).')
  names = participant_names(config)
  if config.setting == 'single' and config.single not in names:
    raise ValueError(f'setting=single needs --config.single=NAME with NAME one of {names}; '
                     f'got {config.single!r}.')
  if config.data.seq_len > config.model.max_len:
    raise ValueError(f'config.data.seq_len={config.data.seq_len} is longer than the model\'s '
                     f'{config.model.max_len} positions (config.model.max_len); lower seq_len '
                     'or raise max_len.')
  if config.parallel.mode not in ('pjit', 'pmap'):
    raise ValueError(f"Unknown config.parallel.mode {config.parallel.mode!r}; use 'pjit' or "
                     "'pmap'.")


def load_data(config, workdir: str, train_on: Sequence[str]) -> RunData:
  """Memory-maps the blocks; fails clearly when the data folder was never built."""
  data_dir = data_dir_of(config, workdir)
  manifest = blocks_lib.load_manifest(data_dir)
  if manifest['seq_len'] != config.data.seq_len:
    raise ValueError(f'{data_dir!r} was built with seq_len {manifest["seq_len"]} but the '
                     f'config asks for {config.data.seq_len}; rebuild the data or fix '
                     'config.data.seq_len.')
  if manifest['seq_len'] > config.model.max_len:
    raise ValueError(f'Blocks of {manifest["seq_len"]} tokens in {data_dir!r} are longer than '
                     f'the model\'s {config.model.max_len} positions.')
  unknown = [p for p in train_on if p not in manifest['participants']]
  if unknown:
    raise ValueError(f'Participants {unknown} are not in {data_dir!r} (it has '
                     f'{manifest["participants"]}); rebuild the data with them.')
  train = {p: blocks_lib.load_blocks(data_dir, p, 'train') for p in train_on}
  valid = {p: blocks_lib.load_blocks(data_dir, p, 'valid') for p in manifest['participants']}
  return RunData(data_dir, manifest, train, valid)


def make_model(config, manifest: dict) -> tuple:
  """(GPT2 module, ModelConfig) with the vocabulary of the data's tokenizer."""
  model_config = ModelConfig.from_config(config.model, manifest['vocab_size'])
  if model_config.vocab_size < manifest['vocab_size']:
    raise ValueError(f'config.model.vocab_size={model_config.vocab_size} is smaller than the '
                     f'tokenizer\'s {manifest["vocab_size"]}; set it to 0 (from tokenizer).')
  return GPT2(model_config), model_config


def seeds(seed: int) -> tuple:
  """One seed split once: (init key, data seed for numpy iterators, train key)."""
  init_key, data_key, train_key = jax.random.split(jax.random.key(seed), 3)
  data_seed = int(jax.random.randint(data_key, (), 0, np.iinfo(np.int32).max))
  return init_key, data_seed, train_key


def budget_steps(budget_tokens: int, tokens_per_step: int) -> int:
  """Whole steps of `tokens_per_step` that fit a token budget (at least one)."""
  if tokens_per_step <= 0:
    raise ValueError(f'tokens_per_step must be positive, got {tokens_per_step}.')
  return max(1, int(budget_tokens) // int(tokens_per_step))


def total_steps(train_cfg, num_blocks: int, seq_len: int = 0) -> int:
  """Steps of the run: a token budget, else config.train.steps, else ceil(epochs * batches).

  config.train.budget_tokens > 0 (matched budgets) needs `seq_len`: a step trains on
  batch_size * (seq_len - 1) predicted tokens.
  """
  budget = int(train_cfg.get('budget_tokens', 0))
  if budget > 0:
    if seq_len < 2:
      raise ValueError('config.train.budget_tokens needs the block length: pass seq_len to '
                       'run.total_steps.')
    return budget_steps(budget, train_cfg.batch_size * (seq_len - 1))
  if train_cfg.steps > 0:
    return int(train_cfg.steps)
  per_epoch = num_blocks // train_cfg.batch_size
  if per_epoch == 0:
    raise ValueError(f'{num_blocks} training blocks do not fill one batch of '
                     f'{train_cfg.batch_size}; lower config.train.batch_size or add data.')
  return max(1, math.ceil(train_cfg.epochs * per_epoch))


def make_engine(config, model, optimizer, init_key) -> Engine:
  """The pjit (sharded) or pmap (replicated) engine for one model and optimizer."""
  init_fn = functools.partial(steps.init_state, model=model, optimizer=optimizer,
                              seq_len=config.data.seq_len, boxed=True)
  step_fn = functools.partial(steps.train_step, model=model, optimizer=optimizer)
  if config.parallel.mode == 'pmap':
    return _pmap_engine(init_fn, step_fn, init_key)
  mesh = parallel.make_mesh(config.parallel)
  rules = tuple(config.parallel.rules)
  abstract = parallel.abstract_state(init_fn, mesh, rules, init_key)
  jitted = parallel.jit_train_step(step_fn, parallel.shardings_of(abstract), mesh, rules)
  parallel.check_batch_divisible(config.train.batch_size,
                                 parallel.data_parallel_size(parallel.batch_sharding(mesh, rules)))
  share = _process_share(config.train.batch_size)

  def step(state, tokens_BxL, rng):
    return jitted(state, parallel.shard_batch(mesh, {'tokens': tokens_BxL[share]}, rules), rng)
  return Engine(abstract, lambda: parallel.sharded_init(init_fn, mesh, rules, init_key),
                lambda s: s, lambda s: s, step)


def _process_share(global_batch: int) -> slice:
  """This process's rows of every global batch (all rows with one process)."""
  n, i = jax.process_count(), jax.process_index()
  parallel.check_batch_divisible(global_batch, n, what='global batch over processes')
  rows = global_batch // n
  return slice(i * rows, (i + 1) * rows)


def _pmap_engine(init_fn, step_fn, init_key) -> Engine:
  device = jax.local_devices()[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  init = jax.jit(lambda k: nn.meta.unbox(init_fn(k)), out_shardings=sharding)
  abstract = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
      jax.eval_shape(lambda k: nn.meta.unbox(init_fn(k)), init_key))
  pstep = parallel.pmap_train_step(step_fn)

  def step(state, tokens_BxL, rng):
    state, metrics = pstep(state, parallel.split_batch({'tokens': tokens_BxL}), rng)
    return state, parallel.unreplicate(metrics)
  return Engine(abstract, lambda: init(init_key), parallel.replicate,
                lambda s: jax.device_get(parallel.unreplicate(s)), step)


def params_importer(model_config: ModelConfig):
  """Reads a Hugging Face GPT-2 folder (an `init_from` source) for this model's layout.

  Shapes alone cannot tell two vocabularies apart once both are padded to the same
  rows, so the folder's architecture must equal the model's.
  """
  fields = ('vocab_size', 'num_layers', 'num_heads', 'd_model', 'd_ff', 'max_len')

  def read(folder: str) -> PyTree:
    params, config = hf.import_hf(folder, model_config.vocab_multiple)
    differ = [f'{f} {getattr(config, f)} (model: {getattr(model_config, f)})'
              for f in fields if getattr(config, f) != getattr(model_config, f)]
    if differ:
      raise checkpoint.ParamsMismatchError(
          f'init_from {folder!r} holds another model: {", ".join(differ)}; set '
          'config.model to its size and build the data with its tokenizer '
          '(data.tokenizer.path).')
    return params
  return read


def restore_or_init(engine: Engine, manager, init_from: str,
                    model_config: ModelConfig) -> tuple:
  """(state in the engine's layout, extra, source) as checkpoint.restore_or_init says."""
  state, extra, source = checkpoint.restore_or_init(
      manager, engine.abstract_state, engine.init, init_from or None,
      import_params=params_importer(model_config))
  return engine.to_device(state), extra, source


# Config fields added since runs may have been trained, with the value that reproduces
# how those runs trained: a run whose config.json lacks one was trained with that value.
ADDED_FIELDS = {('model', 'attention_dropout'): None, ('model', 'vocab_multiple'): 1}
# Fields of the kept sections that change how a run is computed, logged or saved, not
# what it learns (same function, same data order): changing them resumes and re-evaluates
# a run, e.g. a smaller eval batch or loss chunk after running out of memory.
NOT_TRAINING = {
    'data': ('data_dir',),
    'model': ('attention', 'loss_chunk'),
    'train': ('eval_batch_size', 'log_every', 'eval_every', 'checkpoint_every',
              'keep_checkpoints', 'snapshot_fractions'),
    'federated': ('vmap', 'steps_per_call', 'client_block', 'checkpoint_every', 'eval_every'),
    'incremental': ('stages_dir', 'first_stages'),
}


def _trained_as(cfg, ignore=()) -> dict:
  """The parts of a run's config that decide its training (not paths, mesh or evals),
  with the fields newer than a folder's record at their neutral values."""
  c = json.loads(cfg.to_json_best_effort())
  keep = ['seed', 'setting', 'single', 'model', 'data', 'train']
  if cfg.setting == 'federated':
    keep.append('federated')
  if cfg.setting == 'incremental':
    keep.append('incremental')
  for (section, field), value in ADDED_FIELDS.items():
    c.get(section, {}).setdefault(field, value)
  for section, fields in NOT_TRAINING.items():
    for field in fields:
      c.get(section, {}).pop(field, None)
  return {k: c[k] for k in keep if k not in ignore}


def _differences(old, new, prefix: str = '') -> list:
  """(dotted path, old value, new value) wherever two JSON trees differ."""
  if isinstance(old, dict) and isinstance(new, dict):
    return [d for k in sorted(set(old) | set(new))
            for d in _differences(old.get(k), new.get(k), f'{prefix}{k}.')]
  return [] if old == new else [(prefix[:-1], old, new)]


CONFIG_JSON = 'config.json'
DATA_INPUTS_JSON = 'data_inputs.json'  # The data folder's input fingerprint at training.


def training_differences(cfg, folder: str, ignore=(), data_inputs: str | None = None) -> list:
  """How `cfg` (and the data's `inputs` fingerprint) differ from what `folder` trained on.

  Each item is (dotted config path or 'data', old, new). `ignore` names top-level
  sections that do not decide this folder's training (a shared incremental stage does
  not depend on the rest of its chain's order). Folders from before a record existed
  are not held to it.
  """
  changed = []
  path = os.path.join(folder, CONFIG_JSON)
  if os.path.isfile(path):
    old = _trained_as(ml_collections.ConfigDict(io.read_json(path)), ignore)
    changed = _differences(old, _trained_as(cfg, ignore))
  path = os.path.join(folder, DATA_INPUTS_JSON)
  if data_inputs and os.path.isfile(path):
    old_inputs = io.read_json(path).get('inputs')
    if old_inputs != data_inputs:
      changed.append(('data', old_inputs, data_inputs))
  return changed


def describe(changed) -> str:
  """The differences, readable: data changes explained, at most five fields."""
  short = lambda v: '{...}' if isinstance(v, dict) else repr(v)  # A section (dis)appears.
  text = ['the data folder was rebuilt from other sources or by another collab version'
          if path == 'data' else f'{path}: {short(old)} -> {short(new)}'
          for path, old, new in changed]
  return '; '.join(text[:5]) + ('; ...' if len(text) > 5 else '')


def check_same_training(cfg, folder: str, ignore=(), data_inputs: str | None = None) -> None:
  """Raises if `folder` holds a run trained (or started) under another config or data."""
  changed = training_differences(cfg, folder, ignore, data_inputs)
  if changed:
    hint = (' Runs from before embedding padding read with --config.model.vocab_multiple=1.'
            if any(path == 'model.vocab_multiple' for path, _, _ in changed) else '')
    raise ValueError(
        f'Run folder {folder!r} was trained with another config ({describe(changed)}). Use '
        f'a new --workdir for the changed run, or delete that run folder to train it '
        f'again.{hint}')


def claim_workdir(workdir: str, config, ignore=(), data_inputs: str | None = None) -> None:
  """Checks that `workdir` holds no run of another config or data, then records this one."""
  check_same_training(config, workdir, ignore, data_inputs)
  write_config(workdir, config, data_inputs)


def _from_json(value):
  if isinstance(value, dict):
    return ml_collections.ConfigDict({k: _from_json(v) for k, v in value.items()})
  if isinstance(value, list):  # Configs hold tuples, and lists of sections (participants).
    items = [_from_json(v) for v in value]
    return items if any(isinstance(v, ml_collections.ConfigDict) for v in items) else tuple(items)
  return value


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """A config to run with from its JSON (config.json, or what a Flower server sends):
  the types of the configs' own fields come back (tuples, lists of sections)."""
  return _from_json(json.loads(text))


def write_config(workdir: str, config, data_inputs: str | None = None) -> None:
  """The resolved config, as JSON, beside the run's outputs (and the data's inputs)."""
  io.atomic_write_text(os.path.join(workdir, CONFIG_JSON), config.to_json_best_effort(
      indent=2, sort_keys=True) + '\n')
  if data_inputs:
    io.atomic_write_json(os.path.join(workdir, DATA_INPUTS_JSON), {'inputs': data_inputs})


FINAL_DIR = 'final'  # The final model, as a Hugging Face GPT-2 folder.
TRAIN_JSON = 'train.json'  # Written last: its presence means the run finished.
SNAPSHOTS_DIR = 'snapshots'  # Intermediate models (config.train.snapshot_fractions).


def finish(workdir: str, params: PyTree, model_config: ModelConfig, eot_id: int,
           summary: dict, tokenizer_dir: str = '') -> dict:
  """Exports the final model to WORKDIR/final, then writes train.json (in that order).

  Every setting ends here, so evaluation reads one format whatever trained the model,
  and the model is usable from transformers as it is: `tokenizer_dir` (the data
  folder's tokenizer) is copied beside the weights.
  """
  hf.export_hf(jax.device_get(params), model_config, os.path.join(workdir, FINAL_DIR),
               bos_token_id=eot_id, eos_token_id=eot_id, tokenizer_dir=tokenizer_dir)
  io.atomic_write_json(os.path.join(workdir, TRAIN_JSON), summary)
  return summary


def tokenizer_dir_of(data_dir: str) -> str:
  return os.path.join(data_dir, 'tokenizer')


def snapshot_points(fractions, total: int) -> dict:
  """{step (or round): requested fraction} for the fractions of a run of `total` steps
  (or rounds) strictly inside it: the end of the run is the final model itself. The
  step is the nearest one (its own fraction, step / total, is what plots use)."""
  points = {}
  for f in sorted(float(x) for x in fractions):
    if not 0.0 < f < 1.0:
      raise ValueError(f'config.train.snapshot_fractions has {f}; each must lie strictly '
                       'between 0 and 1 (the final model is always evaluated).')
    at = max(1, int(round(f * total)))
    if at < total:
      points.setdefault(at, f)
  return points


def save_snapshot(workdir: str, at: int, params: PyTree, model_config: ModelConfig,
                  eot_id: int, info: dict, tokenizer_dir: str = '') -> str:
  """WORKDIR/snapshots/NNNNNN/{final/, train.json}: a run folder evaluation can read as
  it reads the finished run (collab.evaluate.evaluate_snapshots); written atomically."""
  folder = os.path.join(workdir, SNAPSHOTS_DIR, f'{int(at):06d}')
  with io.atomic_dir(folder) as tmp:
    finish(tmp, params, model_config, eot_id, info, tokenizer_dir)
  return folder


def is_done(workdir: str) -> bool:
  return os.path.isfile(os.path.join(workdir, TRAIN_JSON))
