"""One federated client's round: start from the server, then a scan of train_steps.

Everything here is written for a single client and is pure; a round `jax.vmap`s it over
a leading client axis C (collab/settings/federated.py), and the reference path calls the
same functions client by client.

A client's state is the centralized one, `{"step", "params", "opt_state"}`. Its
optimizer state is either kept per client across rounds (the paper's artifact) or fresh
every round; in both cases the learning-rate schedule sits at position
`round * steps_per_round` when a round starts, so every client follows one schedule over
the run's `rounds * steps_per_round` local steps whatever its data size. `step` starts at
the same position, and dropout folds it into the client's own key.

FedProx (Li et al. 2020) adds mu/2 ||w - w_server||^2 to the client's objective: its
gradient mu (w - w_server) is added to the loss gradient before the client optimizer
(clipping included, as when the term is part of the loss). The anchor w_server rides in
the round's optimizer state and is never stored across rounds.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from collab import steps

PyTree = Any


class ProxState(NamedTuple):
  anchor: PyTree  # The server parameters of this round.


def prox_term(mu: float) -> optax.GradientTransformation:
  """Adds mu * (params - anchor) to the gradient; the anchor is the params at init."""

  def update(grads, state, params):
    grads = jax.tree_util.tree_map(lambda g, w, w0: g + mu * (w - w0), grads, params,
                                   state.anchor)
    return grads, state
  return optax.GradientTransformation(lambda params: ProxState(params), update)


def round_optimizer(optimizer: optax.GradientTransformation,
                    prox_mu: float) -> optax.GradientTransformation:
  """The client optimizer of one round: `optimizer`, behind the prox term when mu > 0."""
  if prox_mu < 0:
    raise ValueError(f'config.federated.prox_mu must be >= 0, got {prox_mu}.')
  # mu == 0 returns the optimizer itself, so FedProx(0) is FedAvg bit for bit.
  return optimizer if prox_mu == 0 else optax.chain(prox_term(float(prox_mu)), optimizer)


def to_round_state(inner_opt: PyTree, anchor: PyTree, prox_mu: float) -> PyTree:
  """The round optimizer's state from the client optimizer's (works on sharding trees too)."""
  return inner_opt if prox_mu == 0 else (ProxState(anchor), inner_opt)


def from_round_state(round_opt: PyTree, prox_mu: float) -> PyTree:
  """The client optimizer's state (what is kept across rounds) from the round's."""
  return round_opt if prox_mu == 0 else round_opt[1]


def _is_schedule_count(path) -> bool:
  # optax.inject_hyperparams keeps the schedule position in `count` fields outside its
  # `inner_state`; counts inside it belong to the wrapped optimizer (Adam's bias
  # correction), which must restart with a fresh state.
  names = [getattr(k, 'name', None) for k in path]
  return bool(names) and names[-1] == 'count' and 'inner_state' not in names


def at_schedule_step(opt_state: PyTree, step: jax.Array) -> PyTree:
  """opt_state with its learning-rate schedule moved to `step`."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.asarray(step, x.dtype) if _is_schedule_count(path) else x,
      opt_state)


def start_client(server_params: PyTree, stored_N: PyTree, client_id: jax.Array,
                 round_: jax.Array, *, optimizer: optax.GradientTransformation,
                 steps_per_round: int, keep_state: bool, prox_mu: float) -> dict:
  """The client's state at the start of a round.

  `stored_N` holds every participant's optimizer state stacked on a leading axis (read
  at `client_id` when `keep_state`; padding clients have an id past the end and read
  zeros); without `keep_state` it is unused and the optimizer starts fresh.
  """
  if keep_state:
    inner = jax.tree_util.tree_map(
        lambda x: x.at[client_id].get(mode='fill', fill_value=0), stored_N)
  else:
    inner = optimizer.init(server_params)
  position = jnp.asarray(round_, jnp.int32) * steps_per_round
  inner = at_schedule_step(inner, position)
  return {'step': position, 'params': server_params,
          'opt_state': to_round_state(inner, server_params, prox_mu)}


def run_client(state: dict, tokens_KxBxL: jax.Array, weights_KxB: jax.Array,
               rng: jax.Array, *, model, optimizer: optax.GradientTransformation) -> tuple:
  """K local train_steps (a lax.scan); steps whose weights are all zero change nothing.

  `optimizer` is the round optimizer (round_optimizer). Returns (state, {'loss_sum',
  'tokens'}) summed over the real steps.
  """
  step_fn = functools.partial(steps.train_step, model=model, optimizer=optimizer)

  def body(state, batch):
    new, metrics = step_fn(state, batch, rng)
    real = jnp.any(batch['weights'] > 0)  # Padding steps (past the client's data) are skipped.
    state = jax.tree_util.tree_map(lambda n, o: jnp.where(real, n, o), new, state)
    return state, (jnp.where(real, metrics['loss_sum'], 0.0), metrics['tokens'])

  state, (loss_K, tokens_K) = jax.lax.scan(
      body, state, {'tokens': tokens_KxBxL, 'weights': weights_KxB})
  return state, {'loss_sum': jnp.sum(loss_K), 'tokens': jnp.sum(tokens_K)}
