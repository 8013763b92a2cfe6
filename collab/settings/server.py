"""The federated server: optimizers on the pseudo-gradient, and weighted aggregation.

A round's clients each return their parameters after local training. The server forms
the pseudo-gradient `server_params - weighted mean of client params` (the negated mean
delta) and feeds it to an optax optimizer (Reddi et al. 2021, "Adaptive Federated
Optimization"): FedAvg is SGD with learning rate 1, which lands exactly on the weighted
mean of the clients; FedAvgM adds server momentum; FedAdam, FedYogi and FedAdagrad adapt
per coordinate.

Client weights are raw numbers (training blocks, or 1 each); padding clients weigh 0 and
the mean is normalised over the real clients only, so padding never changes a result.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any
SERVER_OPTIMIZERS = ('fedavg', 'fedavgm', 'fedadam', 'fedyogi', 'fedadagrad')


def make_server_optimizer(fed_cfg) -> optax.GradientTransformation:
  """The optax transformation config.federated.server_optimizer names."""
  name, lr = fed_cfg.server_optimizer, float(fed_cfg.server_learning_rate)
  if lr <= 0:
    raise ValueError(f'config.federated.server_learning_rate must be positive, got {lr}.')
  if name == 'fedavg':
    return optax.sgd(lr)
  if name == 'fedavgm':
    return optax.sgd(lr, momentum=float(fed_cfg.server_momentum))
  b1, b2, eps = (float(fed_cfg.server_b1), float(fed_cfg.server_b2),
                 float(fed_cfg.server_eps))
  if name == 'fedadam':
    return optax.adam(lr, b1=b1, b2=b2, eps=eps)
  if name == 'fedyogi':
    return optax.yogi(lr, b1=b1, b2=b2, eps=eps)
  if name == 'fedadagrad':
    # Reddi et al. start the accumulator at eps^2 (their tau^2), not optax's 0.1.
    return optax.adagrad(lr, initial_accumulator_value=eps**2, eps=0.0)
  raise ValueError(f'Unknown config.federated.server_optimizer {name!r}; use one of '
                   f'{SERVER_OPTIMIZERS}.')


def normalized_weights(weights_C: jax.Array) -> jax.Array:
  """weights_C / their sum (0 for padding clients); all zeros if no client is real."""
  weights_C = weights_C.astype(jnp.float32)
  return weights_C / jnp.maximum(jnp.sum(weights_C), jnp.finfo(jnp.float32).tiny)


def client_deltas(server_params: PyTree, client_params_C: PyTree) -> PyTree:
  """server - client for every client (leading axis C): what each client moved, negated."""
  return jax.tree_util.tree_map(lambda s, c_C: s[None] - c_C, server_params, client_params_C)


def pseudo_gradient(deltas_C: PyTree, weights_C: jax.Array) -> PyTree:
  """The weighted mean of the client deltas (the server optimizer's 'gradient')."""
  w_C = normalized_weights(weights_C)
  return jax.tree_util.tree_map(lambda d_C: jnp.tensordot(w_C, d_C, axes=1).astype(d_C.dtype),
                                deltas_C)


def tree_norms_C(tree_C: PyTree) -> jax.Array:
  """The global L2 norm of each client's slice of a tree with leading axis C."""
  squares = [jnp.sum(jnp.square(x.reshape(x.shape[0], -1)), axis=1)
             for x in jax.tree_util.tree_leaves(tree_C)]
  return jnp.sqrt(sum(squares))


def server_update(server: dict, client_params_C: PyTree, weights_C: jax.Array, *,
                  server_optimizer: optax.GradientTransformation) -> tuple:
  """One server step: (new {'step', 'params', 'opt_state'}, metrics).

  Metrics: `delta_norm` [C] (each client's distance from the server parameters) and
  `update_norm` (how far the server parameters moved).
  """
  deltas_C = client_deltas(server['params'], client_params_C)
  grads = pseudo_gradient(deltas_C, weights_C)
  updates, opt_state = server_optimizer.update(grads, server['opt_state'], server['params'])
  params = optax.apply_updates(server['params'], updates)
  new = {**server, 'step': server['step'] + 1, 'params': params, 'opt_state': opt_state}
  return new, {'delta_norm': tree_norms_C(deltas_C), 'update_norm': optax.tree.norm(updates)}
