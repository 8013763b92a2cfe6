"""Orbax checkpoints of the training state plus a JSON `extra` (data position, round, stage).

Layout: `WORKDIR/checkpoints/<step>/{state,extra}`. A run starts from, in this order,
its own latest checkpoint ('resume'), the parameters of `init_from` ('init_from': another
run's workdir, or a Hugging Face GPT-2 folder read by the caller's `import_params`; the
optimizer starts fresh), or a fresh initialisation ('scratch').

Saves are asynchronous: call `manager.wait_until_finished()` (or `manager.close()`)
before a run returns so its last checkpoint is complete on disk.
"""

import json
import os
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from collab import io

PyTree = Any
STATE, EXTRA = 'state', 'extra'  # Item names inside every checkpoint.
HF_FILES = ('config.json', 'model.safetensors')


class InitFromError(FileNotFoundError):
  """`init_from` is neither a run with checkpoints nor a Hugging Face GPT-2 folder."""


class ParamsMismatchError(ValueError):
  """A checkpoint or parameters to start from do not fit the state being trained."""


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
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_decision_policy=policy,
                                         create=True, enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(
      checkpoint_dir(workdir), options=options,
      item_handlers={STATE: ocp.StandardCheckpointHandler(),
                     EXTRA: ocp.JsonCheckpointHandler()})


def save(manager: ocp.CheckpointManager, step: int, state: PyTree, extra: dict,
         force: bool = False) -> bool:
  """Saves state and extra at `step` if it is on the save interval (or `force`).

  Returns whether a save started. `extra` must be JSON (numpy scalars are converted).
  """
  extra = json.loads(io.dumps(extra))  # Fails here, not in a background thread.
  if not (force or manager.should_save(int(step))):
    return False
  # The background write must not read buffers that the next (donating) step reuses.
  state = jax.tree_util.tree_map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)
  return manager.save(int(step), force=force, args=ocp.args.Composite(**{
      STATE: ocp.args.StandardSave(state), EXTRA: ocp.args.JsonSave(extra)}))


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: PyTree) -> tuple:
  """(state, extra) at `step`, placed like `abstract_state` (ShapeDtypeStructs + shardings)."""
  try:
    restored = manager.restore(int(step), args=ocp.args.Composite(**{
        STATE: ocp.args.StandardRestore(abstract_state), EXTRA: ocp.args.JsonRestore()}))
  except (ValueError, KeyError) as e:
    raise ParamsMismatchError(
        f'The checkpoint at step {step} in {manager.directory} does not match this run\'s '
        'state (did the model or optimizer config change? start a new workdir; runs from '
        'before embedding padding need --config.model.vocab_multiple=1): '
        f'{e}') from e
  return restored[STATE], dict(restored[EXTRA] or {})


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
  step = manager.latest_step()
  if step is not None:
    state, extra = restore(manager, step, abstract_state)
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
