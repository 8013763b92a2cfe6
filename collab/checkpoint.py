"""Orbax checkpoints of the training state plus a JSON `extra` (data position, round, stage).

Layout: `WORKDIR/checkpoints/<step>/{state,extra}`. A run starts from, in this order,
its own latest checkpoint ('resume'), the parameters of `init_from` ('init_from': another
run's workdir, or a Hugging Face GPT-2 folder read by the caller's `import_params`; the
optimizer starts fresh), or a fresh initialisation ('scratch').

Saves are asynchronous: call `manager.wait_until_finished()` (or `manager.close()`)
before a run returns so its last checkpoint is complete on disk.

Faults: a save that cannot fit on the disk raises `io.DiskFullError` (checked before
writing, and caught if the write fails anyway) and leaves no temporary folder. A resume
whose latest checkpoint is unreadable (truncated, garbled or missing files) logs one line,
sets that step aside as `<step>.corrupt` and falls back to the step before it; one that
does not fit the state (another model or optimizer) stays a ParamsMismatchError.
"""

import contextlib
import json
import os
from typing import Any, Callable

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from collab import checkpoint_faults as faults
from collab import io

PyTree = Any
STATE, EXTRA = 'state', 'extra'  # Item names inside every checkpoint.
HF_FILES = ('config.json', 'model.safetensors')


class InitFromError(FileNotFoundError):
  """`init_from` is neither a run with checkpoints nor a Hugging Face GPT-2 folder."""


class ParamsMismatchError(ValueError):
  """A checkpoint or parameters to start from do not fit the state being trained."""


class CorruptCheckpointError(ValueError):
  """A checkpoint's files cannot be read back (truncated, garbled or missing)."""

  def __init__(self, message: str, step: int, path: str):
    super().__init__(message)
    self.step, self.path = step, path


class NoGoodCheckpointError(ValueError):
  """Every checkpoint of a run is unreadable: nothing to resume from."""


CORRUPT_SUFFIX = '.corrupt'  # Outside Orbax's step names, so it never reads them again.
# A checkpoint save wants the state's bytes plus this share and this much for metadata.
SPACE_MARGIN, SPACE_EXTRA = 0.1, 1 << 20


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def make_manager(workdir: str, keep: int, every: int, *,
                 async_save: bool = True) -> ocp.CheckpointManager:
  """Keeps the last `keep` checkpoints; `save` writes every `every` steps (or forced)."""
  if keep < 1 or every < 1:
    raise ValueError(f'config.train.keep_checkpoints ({keep}) and checkpoint_every ({every}) '
                     'must both be >= 1.')
  # Saves land exactly on multiples of `every` (and on preemption). Orbax's default
  # would also save the first step it sees, e.g. right after a resume.
  policy = ocp.checkpoint_managers.AnySavePolicy([
      ocp.checkpoint_managers.FixedIntervalPolicy(int(every)),
      ocp.checkpoint_managers.PreemptionCheckpointingPolicy()])
  # cleanup_tmp_directories: a save killed half-way leaves its temporary folder behind.
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_decision_policy=policy,
                                         create=True, enable_async_checkpointing=async_save,
                                         cleanup_tmp_directories=True)
  return Manager(
      checkpoint_dir(workdir), options=options,
      item_handlers={STATE: ocp.StandardCheckpointHandler(),
                     EXTRA: ocp.JsonCheckpointHandler()})


class Manager(ocp.CheckpointManager):
  """Orbax's manager, whose asynchronous saves end as io.DiskFullError on a full disk.

  A failed background write surfaces in `wait_until_finished` (which `save` and `close`
  call): that is where its temporary folder is removed and the error named.
  """
  need = 0  # Bytes the last save asked for, for the error.

  def wait_until_finished(self):
    with _disk_full(self):
      super().wait_until_finished()


@contextlib.contextmanager
def _disk_full(manager: ocp.CheckpointManager):
  """A full-disk error inside: the unfinished step's temporary folder goes, then
  io.DiskFullError names the checkpoint folder."""
  try:
    yield
  except io.DiskFullError:
    raise
  except Exception as e:
    why = io.disk_full_why(e)
    if not why:
      raise
    faults.remove_tmp_folders(str(manager.directory))
    manager.reload()
    raise io.disk_full_error(str(manager.directory), getattr(manager, 'need', 0), why) from e


def state_bytes(state: PyTree) -> int:
  """Bytes of every array in `state` (global shapes)."""
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(state) if hasattr(x, 'dtype'))


def save(manager: ocp.CheckpointManager, step: int, state: PyTree, extra: dict,
         force: bool = False) -> bool:
  """Saves state and extra at `step` if it is on the save interval (or `force`).

  Returns whether a save started. `extra` must be JSON (numpy scalars are converted).
  """
  extra = json.loads(io.dumps(extra))  # Fails here, not in a background thread.
  if not (force or manager.should_save(int(step))):
    return False
  # The previous save must have taken its space (or failed) before this one is measured;
  # Orbax's save would wait for it anyway.
  manager.wait_until_finished()
  need = int(state_bytes(state) * (1 + SPACE_MARGIN)) + SPACE_EXTRA
  manager.need = need
  io.check_free(_step_path(manager, step), need)
  # The background write must not read buffers that the next (donating) step reuses.
  state = jax.tree_util.tree_map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)
  with _disk_full(manager):
    return manager.save(int(step), force=force, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardSave(state), EXTRA: ocp.args.JsonSave(extra)}))


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: PyTree) -> tuple:
  """(state, extra) at `step`, placed like `abstract_state` (ShapeDtypeStructs + shardings).

  Raises ParamsMismatchError when the checkpoint holds another tree or other shapes, and
  CorruptCheckpointError when its files cannot be read.
  """
  with faults.quiet_closed_loop():
    try:
      restored = manager.restore(int(step), args=ocp.args.Composite(**{
          STATE: ocp.args.StandardRestore(abstract_state), EXTRA: ocp.args.JsonRestore()}))
    except Exception as e:  # Classified below; an error of neither kind is raised as it is.
      raise _restore_error(manager, int(step), abstract_state, e) from e
  extra = restored[EXTRA]
  if extra is not None and not isinstance(extra, dict):
    raise CorruptCheckpointError(_corrupt_message(manager, step, f'its {EXTRA} is not a '
                                                  f'JSON object: {extra!r:.80}'),
                                 int(step), _step_path(manager, step))
  return restored[STATE], dict(extra or {})


def _step_path(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(manager.directory), str(int(step)))


def _corrupt_message(manager, step: int, cause: str) -> str:
  """One line: the step, its folder and why it cannot be read."""
  return ' '.join(f'checkpoint step {step} is corrupt ({_step_path(manager, step)}: '
                  f'{cause})'.split())


def _restore_error(manager: ocp.CheckpointManager, step: int, abstract_state: PyTree,
                   error: Exception) -> Exception:
  """What a failed restore means: another state (ParamsMismatchError, shown by the
  checkpoint's own metadata), unreadable files (CorruptCheckpointError), else `error`."""
  try:
    saved = manager.item_metadata(step)[STATE]
  except Exception as e:  # Unreadable metadata: the checkpoint is damaged.
    saved, damaged = None, faults.unreadable_cause(e) or f'{type(e).__name__}: {e}'
  else:
    damaged = '' if saved is not None else f'its {STATE} metadata is missing'
  difference = saved is not None and faults.tree_difference(saved, abstract_state)
  damaged = damaged or faults.unreadable_cause(error)
  if difference or (not damaged and isinstance(error, (ValueError, KeyError))):
    return ParamsMismatchError(
        f'The checkpoint at step {step} in {manager.directory} does not match this run\'s '
        'state (did the model or optimizer config change? start a new workdir; runs from '
        'before embedding padding need --config.model.vocab_multiple=1): '
        f'{difference or error}')
  if not damaged:
    return error
  return CorruptCheckpointError(_corrupt_message(manager, step, damaged), step,
                                _step_path(manager, step))


def _is_hf_folder(folder: str) -> bool:
  return all(os.path.isfile(os.path.join(folder, f)) for f in HF_FILES)


def _run_params(run_dir: str, abstract_params: PyTree) -> PyTree:
  """The parameters (only) of another run's latest checkpoint, placed like abstract_params."""
  folder = checkpoint_dir(run_dir)
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  with ocp.CheckpointManager(folder, options=options,
                             item_handlers={STATE: ocp.PyTreeCheckpointHandler()}) as other:
    step = other.latest_step()
    if step is None:
      raise InitFromError(f'init_from {run_dir!r} has no finished checkpoint under {folder}; '
                          'train that run first or point init_from at another run.')
    target = {'params': abstract_params}
    # Partial restore: the other run's optimizer state may differ from ours; skip it.
    args = ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)
    try:
      restored = other.restore(step, args=ocp.args.Composite(**{STATE: args}))
    except (ValueError, KeyError) as e:
      raise ParamsMismatchError(f'The parameters of {run_dir!r} (step {step}) do not fit '
                                f'this model: {e}') from e
  return restored[STATE]['params']


def place_params(params: PyTree, abstract_params: PyTree, source: str) -> PyTree:
  """Checks names and shapes against the model, then puts params on their shardings."""
  want = jax.tree_util.tree_structure(abstract_params)
  got = jax.tree_util.tree_structure(params)
  if want != got:
    raise ParamsMismatchError(f'Parameters from {source!r} have a different tree than the '
                              f'model.\n  model: {want}\n  given: {got}')

  def put(path, x, a):
    if tuple(np.shape(x)) != tuple(a.shape):
      raise ParamsMismatchError(
          f'Parameter {jax.tree_util.keystr(path)} from {source!r} has shape '
          f'{tuple(np.shape(x))} but the model needs {tuple(a.shape)}; check config.model.')
    return jax.device_put(np.asarray(x, a.dtype), a.sharding)
  return jax.tree_util.tree_map_with_path(put, params, abstract_params)


def restore_or_init(manager: ocp.CheckpointManager, abstract_state: PyTree,
                    init_fn: Callable[[], PyTree], init_from: str | None = None,
                    import_params: Callable[[str], PyTree] | None = None) -> tuple:
  """(state, extra, source) from this run's latest checkpoint, else init_from, else scratch.

  `abstract_state` holds ShapeDtypeStructs with shardings (parallel.abstract_state);
  restoring against it keeps optimizer state types and places every shard directly.
  `init_fn()` builds a fresh state. `init_from` is another run's workdir (its latest
  parameters, fresh optimizer) or a folder with config.json + model.safetensors, read by
  `import_params(folder) -> params` (collab.settings.run.params_importer(model_config)
  pads and checks them for the model).
  `source` is 'resume', 'init_from' or 'scratch'; `extra` is {} unless resumed.
  """
  if manager.latest_step() is not None:
    state, extra = _restore_newest_readable(manager, abstract_state)
    return state, extra, 'resume'
  if not init_from:
    return init_fn(), {}, 'scratch'
  abstract_params = abstract_state['params']
  if _is_hf_folder(init_from):
    if import_params is None:
      raise ValueError(f'init_from {init_from!r} is a Hugging Face folder; pass '
                       'import_params (collab.settings.run.params_importer(model_config)) '
                       'to read it.')
    params = place_params(import_params(init_from), abstract_params, init_from)
  elif os.path.isdir(checkpoint_dir(init_from)):
    params = _run_params(init_from, abstract_params)
  else:
    raise InitFromError(
        f'init_from {init_from!r} is neither a run workdir with checkpoints/ nor a Hugging '
        f'Face GPT-2 folder with {" + ".join(HF_FILES)}; fix config.train.init_from.')
  # Adam's moments start at zero whatever the parameters, so swapping them in is exact.
  return {**init_fn(), 'params': params}, {}, 'init_from'


def _restore_newest_readable(manager: ocp.CheckpointManager, abstract_state: PyTree) -> tuple:
  """(state, extra) of the newest checkpoint that reads back; newer unreadable ones are
  logged (one line each) and set aside once an older one has been restored."""
  corrupt, steps = [], sorted(manager.all_steps(), reverse=True)
  for i, step in enumerate(steps):
    try:
      state, extra = restore(manager, step, abstract_state)
    except CorruptCheckpointError as e:
      logging.warning('%s; %s.', e, f'falling back to step {steps[i + 1]}'
                      if i + 1 < len(steps) else 'no checkpoint is left before it')
      corrupt.append(step)
      continue
    for bad in corrupt:
      set_aside(manager, bad)
    return state, extra
  # Nothing is moved: the run must not quietly start over from scratch.
  raise NoGoodCheckpointError(
      f'No checkpoint in {manager.directory} can be read (steps {sorted(corrupt)} are '
      'corrupt, see the lines above); remove that checkpoints folder to train this run '
      'again from the start, or restore it from a backup.')


def set_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Renames a corrupt step's folder to `<step>.corrupt` (kept for a look, out of Orbax's
  way, so a later save of that step works); returns the new path."""
  path = _step_path(manager, step)
  target, n = path + CORRUPT_SUFFIX, 1
  if jax.process_index() == 0:  # One process renames; the others wait for it below.
    while os.path.exists(target):
      n += 1
      target = f'{path}{CORRUPT_SUFFIX}{n}'
    os.rename(path, target)
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes(f'collab_set_aside_{step}')
  manager.reload()
  return target
