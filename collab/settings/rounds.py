"""The compiled pieces of a federated round, and where their arrays live on the mesh.

A round is three jitted programs over a block of C clients (collab/settings/federated.py
runs them): `start` (every client from the server parameters), `run` (a chunk of local
steps, vmapped over clients) and `finish` (the server step). The vmapped programs put the
client axis C first and split it over the mesh axis that the logical `clients` axis maps
to (config.parallel.rules), with each client's batch split over `data`; `jax.vmap`'s
`spmd_axis_name` keeps the model's own sharding constraints on that axis. The reference
path (config.federated.vmap = False) jits the same single-client functions for C = 1 and
is called client by client.

The server state is `{"step": rounds done, "params", "opt_state": server optimizer's,
"clients": every participant's client optimizer state stacked}` ('clients' only when
they are kept across rounds).
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
from collab.settings import server as server_lib

PyTree = Any


class Programs(NamedTuple):
  """Jitted round pieces over a block of C clients (vmapped, or C = 1 for the loop)."""
  start: Callable  # (server_params, stored_N, ids_C, round) -> client_state_C
  run: Callable  # (client_state_C, tokens_CxKxBxL, weights_CxKxB, keys_C) -> (state_C, metrics_C)
  finish: Callable  # (server_state, client_state_C, weights_C, ids_C) -> (server_state, metrics)
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


def layout(config, num_clients: int, client_axis, init_boxed, optimizer, init_key,
           mesh) -> tuple:
  """(Layout, abstract server state) for `num_clients` participants on `mesh`."""
  rules, prox_mu = tuple(config.parallel.rules), config.federated.prox_mu
  axis_size = mesh.shape[client_axis] if client_axis else 1
  shapes, server_sh = _abstract(init_boxed, mesh, rules, init_key)
  inner_shapes, inner_sh = _abstract(lambda k: optimizer.init(init_boxed(k)['params']),
                                     mesh, rules, init_key)
  if config.federated.keep_client_state:
    # Stored states are split over clients when the participants divide evenly.
    shapes = {**shapes, 'clients': jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct((num_clients,) + a.shape, a.dtype), inner_shapes)}
    stored_axis = client_axis if client_axis and num_clients % axis_size == 0 else None
    server_sh = {**server_sh, 'clients': _stack(inner_sh, stored_axis)}
  replicated = NamedSharding(mesh, P())
  client_sh = _stack({'step': replicated, 'params': server_sh['params'],
                      'opt_state': clients.to_round_state(inner_sh, server_sh['params'],
                                                          prox_mu)}, client_axis)
  rows = parallel.batch_sharding(mesh, rules)
  parallel.check_batch_divisible(config.train.batch_size, parallel.data_parallel_size(rows),
                                 what='client batch')
  abstract = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, server_sh)
  return Layout(server_sh, client_sh,
                NamedSharding(mesh, P(client_axis, None, rows.spec[0], None)),
                NamedSharding(mesh, P(client_axis, None, rows.spec[0])),
                NamedSharding(mesh, P(client_axis)), replicated), abstract


def _server_fns(config, num_clients: int, init_boxed, optimizer, server_optimizer) -> tuple:
  """(finish, init): the server step (storing kept client states) and a fresh state."""
  keep, prox_mu = bool(config.federated.keep_client_state), config.federated.prox_mu

  def finish(server, state_C, weights_C, ids_C):
    new, metrics = server_lib.server_update(server, state_C['params'], weights_C,
                                            server_optimizer=server_optimizer)
    if keep:  # Padding ids are past the end: mode='drop' writes nothing for them.
      inner_C = clients.from_round_state(state_C['opt_state'], prox_mu)
      new['clients'] = jax.tree_util.tree_map(lambda s, x: s.at[ids_C].set(x, mode='drop'),
                                              server['clients'], inner_C)
    return new, metrics

  def init(key):
    state = nn.meta.unbox(init_boxed(key))
    if keep:
      state['clients'] = jax.tree_util.tree_map(
          lambda x: jnp.broadcast_to(x, (num_clients,) + x.shape),
          optimizer.init(state['params']))
    return state
  return finish, init


def make_programs(config, plan, model, optimizer, server_optimizer, init_key,
                  mesh) -> Programs:
  """The jitted round pieces on `mesh` for a federated.Plan, vmapped or (vmap=False) looped.

  `optimizer` is the client optimizer (steps.make_optimizer over the run's local steps).
  """
  fed, rules = config.federated, tuple(config.parallel.rules)
  num_clients = len(plan.names)
  client_axis = nn.logical_to_mesh_axes(('clients',), rules)[0] if fed.vmap else None
  axis_size = mesh.shape[client_axis] if client_axis else 1
  block = (-(-(int(fed.client_block) or plan.per_round) // axis_size) * axis_size
           if fed.vmap else 1)
  init_boxed = functools.partial(steps.init_state, model=model, optimizer=server_optimizer,
                                 seq_len=config.data.seq_len, boxed=True)
  sh, abstract = layout(config, num_clients, client_axis, init_boxed, optimizer, init_key,
                        mesh)
  start = functools.partial(clients.start_client, optimizer=optimizer,
                            steps_per_round=plan.steps_per_round,
                            keep_state=bool(fed.keep_client_state), prox_mu=fed.prox_mu)
  run_ = functools.partial(clients.run_client, model=model,
                           optimizer=clients.round_optimizer(optimizer, fed.prox_mu))
  start_in, run_in = (None, None, 0, None), (0, 0, 0, 0)
  if fed.vmap:
    start = jax.vmap(start, in_axes=start_in, spmd_axis_name=client_axis)
    run_ = jax.vmap(run_, in_axes=run_in, spmd_axis_name=client_axis)
  else:
    start, run_ = _single(start, start_in), _single(run_, run_in)
  finish, init = _server_fns(config, num_clients, init_boxed, optimizer, server_optimizer)
  init_jit = _jit(init, mesh, rules, (sh.replicated,), sh.server)
  return Programs(
      start=_jit(start, mesh, rules, (sh.server['params'], sh.server.get('clients', {}),
                                      sh.per_client, sh.replicated), sh.client),
      run=_jit(run_, mesh, rules, (sh.client, sh.tokens, sh.weights, sh.per_client),
               (sh.client, sh.per_client), donate=(0,)),
      finish=_jit(finish, mesh, rules, (sh.server, sh.client, sh.per_client, sh.per_client),
                  (sh.server, sh.replicated), donate=(0,)),
      init=lambda: init_jit(init_key), abstract_state=abstract, block=block)
