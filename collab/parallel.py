"""Devices: the mesh, logical-axis shardings, the pjit and pmap step wrappers, multi-host.

The pjit path (jax.jit with NamedSharding) is the default: the state is placed by the
logical axis names the model puts on its parameters, mapped to mesh axes by
`config.parallel.rules`, and initialised directly in place (`sharded_init`). The pmap
path replicates the state and splits the batch over local devices: plain data
parallelism, selected by `config.parallel.mode = 'pmap'`.

Multi-host: every process runs the same program; each feeds only its own share of every
global batch (`shard_batch` assembles the global array from the local shares).
"""

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
PMAP_AXIS = 'batch'  # axis_name of the pmap path; train_step psums over it.


class MeshError(ValueError):
  """The configured mesh does not fit the devices."""


class BatchNotDivisibleError(ValueError):
  """A global batch cannot be split evenly over the data-parallel devices."""


def make_mesh(parallel_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with the axes of `parallel_cfg.mesh`, in order; one size may be -1 (the rest)."""
  devices = list(jax.devices() if devices is None else devices)
  names = tuple(parallel_cfg.mesh.keys())
  sizes = [int(parallel_cfg.mesh[n]) for n in names]
  if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise MeshError(f'config.parallel.mesh {dict(zip(names, sizes))}: sizes must be positive, '
                    'with at most one -1 (meaning "all remaining devices").')
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % fixed:
      raise MeshError(f'config.parallel.mesh {dict(zip(names, sizes))}: the fixed axes need a '
                      f'multiple of {fixed} devices but there are {len(devices)}.')
    sizes[sizes.index(-1)] = len(devices) // fixed
  if math.prod(sizes) != len(devices):
    raise MeshError(f'config.parallel.mesh {dict(zip(names, sizes))} needs {math.prod(sizes)} '
                    f'devices but there are {len(devices)}; make the product of the axis '
                    'sizes equal the device count or set one axis to -1.')
  # Auto axes: shardings come from jit's in/out_shardings and flax's logical constraints.
  return jax.make_mesh(tuple(sizes), names, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def _has_logical_names(tree: PyTree) -> bool:
  leaves = jax.tree_util.tree_leaves(tree, is_leaf=nn.meta.is_axis_metadata)
  return any(nn.meta.is_axis_metadata(x) for x in leaves)


def logical_shardings(abstract_tree: PyTree, mesh: Mesh, rules) -> PyTree:
  """NamedShardings for a tree with nn.Partitioned boxes (the result is unboxed-shaped).

  Leaves without logical names (step counters, optimizer counts) are replicated.
  """
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, tuple(rules))


def shardings_of(tree: PyTree) -> PyTree:
  """The `.sharding` of every leaf (arrays or ShapeDtypeStructs)."""
  return jax.tree_util.tree_map(lambda x: x.sharding, tree)


def abstract_state(init_fn: Callable, mesh: Mesh, rules, *args) -> PyTree:
  """ShapeDtypeStructs with shardings of `init_fn(*args)`'s unboxed output; allocates nothing.

  `init_fn` must return nn.Partitioned boxes where parameters have logical names
  (e.g. `partial(steps.init_state, ..., boxed=True)`).
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules)):
    boxed = jax.eval_shape(init_fn, *args)
  if not _has_logical_names(boxed):
    raise ValueError('init_fn returned no logical axis names, so every array would be '
                     'replicated; pass an init that keeps nn.Partitioned boxes, e.g. '
                     'partial(steps.init_state, ..., boxed=True).')
  shardings = logical_shardings(boxed, mesh, rules)
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      nn.meta.unbox(boxed), shardings)


def sharded_init(init_fn: Callable, mesh: Mesh, rules, *args) -> PyTree:
  """Runs `init_fn(*args)` under jit straight into its shardings (unboxed result).

  No array is ever materialised whole on one device: out_shardings come from
  `jax.eval_shape`, so each device computes only its own shards.
  """
  shardings = shardings_of(abstract_state(init_fn, mesh, rules, *args))
  init = jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules)):
    return init(*args)


def batch_sharding(mesh: Mesh, rules=None) -> NamedSharding:
  """Rows split over the mesh axes the logical 'batch' axis maps to (default 'data')."""
  axes = nn.logical_to_mesh_axes(('batch',), tuple(rules)) if rules else P('data')
  return NamedSharding(mesh, P(axes[0]))


def data_parallel_size(sharding: NamedSharding) -> int:
  """How many ways the rows of a batch are split under `sharding`."""
  axes = sharding.spec[0] if len(sharding.spec) else None
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(sharding.mesh.shape[a] for a in axes)


def check_batch_divisible(global_batch: int, num_shards: int, what: str = 'global batch'):
  """Raises BatchNotDivisibleError unless `global_batch` splits evenly into `num_shards`."""
  if global_batch <= 0 or global_batch % num_shards:
    raise BatchNotDivisibleError(
        f'The {what} of {global_batch} rows cannot be split evenly over {num_shards} '
        f'data-parallel devices; set config.train.batch_size (and eval_batch_size) to a '
        f'multiple of {num_shards}.')


def shard_batch(mesh: Mesh, local_batch: PyTree, rules=None) -> PyTree:
  """Global arrays from this process's rows (an array or a dict such as {tokens, weights}).

  With one process the local rows are the whole global batch; with N processes each
  passes its own B/N rows and the global batch has B rows.
  """
  sharding = batch_sharding(mesh, rules)
  rows = {int(np.shape(x)[0]) for x in jax.tree_util.tree_leaves(local_batch)}
  if len(rows) != 1:
    raise ValueError(f'Batch arrays disagree on their number of rows: {sorted(rows)}.')
  check_batch_divisible(rows.pop() * jax.process_count(), data_parallel_size(sharding))
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def jit_train_step(step_fn: Callable, state_shardings: PyTree, mesh: Mesh, rules=(),
                   donate: bool = True) -> Callable:
  """`step_fn(state, batch, rng) -> (state, metrics)` under jit with explicit shardings.

  The state keeps its shardings and is donated (updated in place); the batch is split
  over the data axis; metrics are replicated. Tracing happens inside the mesh and
  logical-rules contexts so the model's activation constraints apply.
  """
  replicated = NamedSharding(mesh, P())
  jitted = jax.jit(step_fn,
                   in_shardings=(state_shardings, batch_sharding(mesh, rules), replicated),
                   out_shardings=(state_shardings, replicated),
                   donate_argnums=(0,) if donate else ())

  def call(state, batch, rng):
    with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules)):
      return jitted(state, batch, rng)
  return call


def jit_eval_step(eval_fn: Callable, param_shardings: PyTree, mesh: Mesh, rules=()) -> Callable:
  """`eval_fn(params, batch) -> (loss_sum, count)` under jit, batch split over data."""
  replicated = NamedSharding(mesh, P())
  jitted = jax.jit(eval_fn, in_shardings=(param_shardings, batch_sharding(mesh, rules)),
                   out_shardings=replicated)

  def call(params, batch):
    with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules)):
      return jitted(params, batch)
  return call


def _frozen(x):
  """Lists (as configs give logical-axis rules) as tuples, so they can key a cache."""
  return tuple(_frozen(v) for v in x) if isinstance(x, (list, tuple)) else x


def model_eval_step(eval_fn: Callable, model: nn.Module, param_shardings: PyTree,
                    mesh: Mesh, rules=()) -> Callable:
  """`jit_eval_step(partial(eval_fn, model=model), ...)`, built once per model and placement.

  A training run evaluates its validation blocks every few steps: a new jit each time
  would trace and compile the same program again (~0.5 s each on a CPU, more than the
  evaluation itself). Modules compare by their fields, so equal models share one.
  """
  leaves, treedef = jax.tree_util.tree_flatten(param_shardings)
  return _cached_eval_step(eval_fn, model, treedef, tuple(leaves), mesh, _frozen(rules))


@functools.lru_cache(maxsize=32)
def _cached_eval_step(eval_fn, model, treedef, sharding_leaves, mesh, rules) -> Callable:
  shardings = jax.tree_util.tree_unflatten(treedef, sharding_leaves)
  return jit_eval_step(functools.partial(eval_fn, model=model), shardings, mesh, rules)


def replicate(tree: PyTree, devices: Sequence[jax.Device] | None = None) -> PyTree:
  """One copy per local device, stacked on a leading axis, as pmap expects."""
  devices = list(jax.local_devices() if devices is None else devices)
  sharding = NamedSharding(Mesh(np.array(devices), (PMAP_AXIS,)), P(PMAP_AXIS))

  def put(x):
    shards = [jax.device_put(x[None], d) for d in devices]
    return jax.make_array_from_single_device_arrays((len(devices),) + x.shape, sharding, shards)
  return jax.tree_util.tree_map(put, tree)


def unreplicate(tree: PyTree) -> PyTree:
  """The first device's copy of a replicated tree."""
  return jax.tree_util.tree_map(lambda x: x[0], tree)


def split_batch(batch: PyTree, num_devices: int | None = None) -> PyTree:
  """[B, ...] -> [devices, B/devices, ...] for pmap (local devices by default)."""
  n = jax.local_device_count() if num_devices is None else num_devices
  rows = {int(np.shape(x)[0]) for x in jax.tree_util.tree_leaves(batch)}
  if len(rows) != 1:
    raise ValueError(f'Batch arrays disagree on their number of rows: {sorted(rows)}.')
  check_batch_divisible(rows.pop(), n, what='per-process batch')
  return jax.tree_util.tree_map(lambda x: np.reshape(x, (n, -1) + np.shape(x)[1:]), batch)


def pmap_train_step(step_fn: Callable, donate: bool = True) -> Callable:
  """`step_fn(state, batch, rng, axis_name=...)` pmapped: replicated state, split batch.

  `step_fn` must accept `axis_name` (steps.train_step does, and psums over it); the rng
  is shared and train_step folds in the device index for dropout.
  """
  return jax.pmap(lambda s, b, r: step_fn(s, b, r, axis_name=PMAP_AXIS),
                  axis_name=PMAP_AXIS, in_axes=(0, 0, None),
                  donate_argnums=(0,) if donate else ())


def start_multihost(coordinator: str | None = None, num_processes: int | None = None,
                    process_id: int | None = None) -> None:
  """Starts jax.distributed; call before anything touches devices.

  With no arguments the cluster is detected from the environment (SLURM, TPU pods,
  Open MPI, ...). On CPU the collectives go through gloo.
  """
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id)
