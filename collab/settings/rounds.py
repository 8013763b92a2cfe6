"""The compiled pieces of a federated round, and where their arrays live on the mesh.

A round runs its sampled clients in blocks of C (collab/settings/federated.py drives it),
each program compiled once:
  `zeros`       an empty accumulator shaped like the server parameters;
  `start`       every client of a block from the server parameters (and kept state);
  `run`         a chunk of local steps, vmapped over the block's clients;
  `accumulate`  adds the block's weighted (or DP-clipped) delta sum and weight sum to the
                accumulator and stores the clients' kept optimizer states; the block's
                client states are dropped after it, so a round's memory is O(C), not
                O(clients per round);
  `apply`       the accumulator -> pseudo-gradient (weighted mean; with DP the noisy sum
                of clipped deltas over m, collab/settings/dp.py) -> server optimizer.
The vmapped programs put the client axis C first and split it over the mesh axis that
the logical `clients` axis maps to (config.parallel.rules), with each client's batch
split over `data`; `jax.vmap`'s `spmd_axis_name` keeps the model's own sharding
constraints on that axis. The reference path (config.federated.vmap = False) jits the
same single-client functions for C = 1 and is called client by client.

The server state is `{"step": rounds done, "params", "opt_state": server optimizer's,
"clients": every client's optimizer state stacked, "clip_norm": the DP bound}`
('clients' only when they are kept across rounds, 'clip_norm' only with DP).
"""

import functools
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from collab import parallel
from collab import steps
from collab.settings import clients
from collab.settings import dp as dp_lib
from collab.settings import server as server_lib

PyTree = Any


class Programs(NamedTuple):
  """Jitted round pieces over a block of C clients (vmapped, or C = 1 for the loop)."""
  start: Callable  # (server_params, stored_N, ids_C, round) -> client_state_C
  run: Callable  # (client_state_C, tokens_CxKxBxL, weights_CxKxB, keys_C) -> (state_C, metrics_C)
  # (server_state, acc, client_state_C, weights_C, ids_C) -> (server_state, acc, delta_norm_C);
  # donates the server state and the accumulator. client_state_C is {'params'} alone
  # unless the server keeps the clients' optimizer states (plan.keep_state).
  accumulate: Callable
  apply: Callable  # (server_state, acc) -> (server_state, metrics)
  zeros: Callable  # (server_params) -> an empty accumulator
  init: Callable  # () -> a fresh server state
  abstract_state: PyTree  # ShapeDtypeStructs with shardings of the server state.
  block: int  # Clients per start/run call (a multiple of the client-axis size).


class Layout(NamedTuple):
  """Shardings of every argument of the round programs."""
  server: PyTree  # The server state.
  client: PyTree  # A block's client states (leading axis C).
  tokens: NamedSharding  # tokens_CxKxBxL
  weights: NamedSharding  # weights_CxKxB
  per_client: NamedSharding  # ids_C, keys_C, weights_C, metrics_C
  replicated: NamedSharding
  acc: PyTree  # The round's accumulator (server_lib.zeros_accumulator).


def _stack(shardings: PyTree, axis) -> PyTree:
  """The shardings of a tree stacked on a new leading axis split over mesh `axis`."""
  return jax.tree_util.tree_map(lambda s: NamedSharding(s.mesh, P(axis, *s.spec)), shardings)


def _jit(fn, mesh, rules, in_shardings, out_shardings, donate=()) -> Callable:
  """jit with explicit shardings, traced under the mesh and logical rules; inputs are
  moved to their shardings first (a no-op when they are already there)."""
  jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                   donate_argnums=donate)

  def call(*args):
    with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules)):
      return jitted(*jax.device_put(args, in_shardings))
  return call


def _abstract(boxed_fn, mesh, rules, *args) -> tuple:
  """(unboxed shapes, shardings by logical names) of boxed_fn(*args); allocates nothing."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules)):
    boxed = jax.eval_shape(boxed_fn, *args)
  return nn.meta.unbox(boxed), parallel.logical_shardings(boxed, mesh, rules)


def _single(fn, in_axes) -> Callable:
  """fn on a block of one client: squeeze the client axis where in_axes is 0, re-add it."""
  def one(*args):
    args = [a if ax is None else jax.tree_util.tree_map(lambda x: x[0], a)
            for a, ax in zip(args, in_axes)]
    return jax.tree_util.tree_map(lambda x: x[None], fn(*args))
  return one


def layout(config, plan, client_axis, init_boxed, optimizer, init_key, mesh) -> tuple:
  """(Layout, abstract server state) for a federated.Plan's clients on `mesh`."""
  rules, prox_mu = tuple(config.parallel.rules), config.federated.prox_mu
  num_clients, axis_size = len(plan.names), mesh.shape[client_axis] if client_axis else 1
  shapes, server_sh = _abstract(init_boxed, mesh, rules, init_key)
  inner_shapes, inner_sh = _abstract(lambda k: optimizer.init(init_boxed(k)['params']),
                                     mesh, rules, init_key)
  replicated = NamedSharding(mesh, P())
  if plan.keep_state:
    # Stored states are split over clients when the clients divide evenly.
    shapes = {**shapes, 'clients': jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct((num_clients,) + a.shape, a.dtype), inner_shapes)}
    stored_axis = client_axis if client_axis and num_clients % axis_size == 0 else None
    server_sh = {**server_sh, 'clients': _stack(inner_sh, stored_axis)}
  if config.federated.dp.enabled:
    shapes = {**shapes, 'clip_norm': jax.ShapeDtypeStruct((), jnp.float32)}
    server_sh = {**server_sh, 'clip_norm': replicated}
  client_sh = _stack({'step': replicated, 'params': server_sh['params'],
                      'opt_state': clients.to_round_state(inner_sh, server_sh['params'],
                                                          prox_mu)}, client_axis)
  rows = parallel.batch_sharding(mesh, rules)
  parallel.check_batch_divisible(config.train.batch_size, parallel.data_parallel_size(rows),
                                 what='client batch')
  abstract = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, server_sh)
  acc_sh = {'sum': server_sh['params'], 'weight': replicated, 'within': replicated}
  return Layout(server_sh, client_sh,
                NamedSharding(mesh, P(client_axis, None, rows.spec[0], None)),
                NamedSharding(mesh, P(client_axis, None, rows.spec[0])),
                NamedSharding(mesh, P(client_axis)), replicated, acc_sh), abstract


def server_fns(config, plan, init_boxed, optimizer, server_optimizer) -> tuple:
  """(accumulate, apply, init): pure functions behind Programs.accumulate, .apply and .init.

  accumulate(server, acc, client_state_C, weights_C, ids_C) -> (server, acc, delta_norm_C)
  adds a block to the round's sums; apply(server, acc, noise_key) -> (server, metrics) is
  the server step; init(key) -> a fresh server state.
  """
  keep, prox_mu, dp = plan.keep_state, config.federated.prox_mu, config.federated.dp

  def accumulate(server, acc, state_C, weights_C, ids_C):
    clip = server['clip_norm'] if dp.enabled else None
    acc, norms_C = server_lib.accumulate(acc, server['params'], state_C['params'], weights_C,
                                         clip)
    if keep:  # Padding ids are past the end: mode='drop' writes nothing for them.
      inner_C = clients.from_round_state(state_C['opt_state'], prox_mu)
      server = {**server, 'clients': jax.tree_util.tree_map(
          lambda s, x: s.at[ids_C].set(x, mode='drop'), server['clients'], inner_C)}
    return server, acc, norms_C

  def apply(server, acc, noise_key):
    if not dp.enabled:
      return server_lib.apply_gradient(server, server_lib.mean_gradient(acc),
                                       server_optimizer=server_optimizer)
    # The round's keys come from the run's noise key and the round (server['step']), so a
    # resumed run draws the same noise.
    update_key, count_key = dp_lib.round_keys(noise_key, server['step'])
    clip, m = server['clip_norm'], plan.per_round  # A fixed denominator, as DP requires.
    grads = dp_lib.private_mean(acc['sum'], update_key,
                                noise_std=float(dp.noise_multiplier) * clip, count=m)
    new, metrics = server_lib.apply_gradient(server, grads, server_optimizer=server_optimizer)
    metrics.update(clip_norm=clip, unclipped_fraction=acc['within'] / m)
    if dp.adaptive_clip:
      new['clip_norm'], metrics['unclipped_fraction_noisy'] = dp_lib.adapt_clip(
          clip, acc['within'], acc['weight'], count_key, count=m, target_quantile=float(dp.target_quantile),
          learning_rate=float(dp.clip_learning_rate), count_noise=float(dp.clip_count_noise))
      metrics['next_clip_norm'] = new['clip_norm']
    return new, metrics

  def init(key):
    state = nn.meta.unbox(init_boxed(key))
    if keep:
      state['clients'] = jax.tree_util.tree_map(
          lambda x: jnp.broadcast_to(x, (len(plan.names),) + x.shape),
          optimizer.init(state['params']))
    if dp.enabled:
      state['clip_norm'] = jnp.asarray(dp.clip_norm, jnp.float32)
    return state
  return accumulate, apply, init


def make_programs(config, plan, model, optimizer, server_optimizer, init_key, mesh,
                  noise_key: jax.Array | None = None) -> Programs:
  """The jitted round pieces on `mesh` for a federated.Plan, vmapped or (vmap=False) looped.

  `optimizer` is the client optimizer (steps.make_optimizer over the run's local steps);
  `noise_key` (needed with config.federated.dp.enabled) seeds the DP noise of every round.
  """
  fed, rules = config.federated, tuple(config.parallel.rules)
  if fed.dp.enabled and noise_key is None:
    raise ValueError('config.federated.dp.enabled needs a noise_key for make_programs '
                     '(federated.fit derives it from the run seed).')
  client_axis = nn.logical_to_mesh_axes(('clients',), rules)[0] if fed.vmap else None
  axis_size = mesh.shape[client_axis] if client_axis else 1
  block = (-(-(int(fed.client_block) or plan.per_round) // axis_size) * axis_size
           if fed.vmap else 1)
  init_boxed = functools.partial(steps.init_state, model=model, optimizer=server_optimizer,
                                 seq_len=config.data.seq_len, boxed=True)
  sh, abstract = layout(config, plan, client_axis, init_boxed, optimizer, init_key, mesh)
  start = functools.partial(clients.start_client, optimizer=optimizer,
                            steps_per_round=plan.steps_per_round, keep_state=plan.keep_state,
                            prox_mu=fed.prox_mu)
  run_ = functools.partial(clients.run_client, model=model,
                           optimizer=clients.round_optimizer(optimizer, fed.prox_mu))
  start_in, run_in = (None, None, 0, None), (0, 0, 0, 0)
  if fed.vmap:
    start = jax.vmap(start, in_axes=start_in, spmd_axis_name=client_axis)
    run_ = jax.vmap(run_, in_axes=run_in, spmd_axis_name=client_axis)
  else:
    start, run_ = _single(start, start_in), _single(run_, run_in)
  accumulate, apply, init = server_fns(config, plan, init_boxed, optimizer, server_optimizer)
  init_jit = _jit(init, mesh, rules, (sh.replicated,), sh.server)
  apply_jit = _jit(apply, mesh, rules, (sh.server, sh.acc, sh.replicated),
                   (sh.server, sh.replicated), donate=(0,))
  noise_key = jax.random.key(0) if noise_key is None else noise_key  # Unused without DP.
  # What accumulate reads of a block's client states: their optimizer states only when
  # the server keeps them.
  accumulated = sh.client if plan.keep_state else {'params': sh.client['params']}
  return Programs(
      start=_jit(start, mesh, rules, (sh.server['params'], sh.server.get('clients', {}),
                                      sh.per_client, sh.replicated), sh.client),
      run=_jit(run_, mesh, rules, (sh.client, sh.tokens, sh.weights, sh.per_client),
               (sh.client, sh.per_client), donate=(0,)),
      accumulate=_jit(accumulate, mesh, rules,
                      (sh.server, sh.acc, accumulated, sh.per_client, sh.per_client),
                      (sh.server, sh.acc, sh.per_client), donate=(0, 1)),
      apply=lambda server, acc: apply_jit(server, acc, noise_key),
      zeros=_jit(server_lib.zeros_accumulator, mesh, rules, (sh.server['params'],), sh.acc),
      init=lambda: init_jit(init_key), abstract_state=abstract, block=block)
