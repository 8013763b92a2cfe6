"""The federated server: optimizers on the pseudo-gradient, and weighted aggregation.

A round's clients each return their parameters after local training. The server forms
the pseudo-gradient `server_params - weighted mean of client params` (the negated mean
delta) and feeds it to an optax optimizer (Reddi et al. 2021, "Adaptive Federated
Optimization"): FedAvg is SGD with learning rate 1, which lands exactly on the weighted
mean of the clients; FedAvgM adds server momentum; FedAdam, FedYogi and FedAdagrad adapt
per coordinate.

A round's clients come in blocks (collab/settings/rounds.py): `accumulate` adds each
block's weighted delta sum and weight sum to a running accumulator shaped like the
server parameters, so a round's memory does not grow with its clients; `mean_gradient`
then divides once. Client weights are raw numbers (training blocks, or 1 each); padding
clients weigh 0 and the mean is normalised over the real clients only, so padding never
changes a result. With DP (collab/settings/dp.py) each delta is clipped before it is
added, and the noisy sum is divided by the fixed number of clients per round instead.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from collab.settings import dp as dp_lib

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


def client_deltas(server_params: PyTree, client_params_C: PyTree) -> PyTree:
  """server - client for every client (leading axis C): what each client moved, negated."""
  return jax.tree_util.tree_map(lambda s, c_C: s[None] - c_C, server_params, client_params_C)


def tree_norms_C(tree_C: PyTree) -> jax.Array:
  """The global L2 norm of each client's slice of a tree with leading axis C."""
  squares = [jnp.sum(jnp.square(x.reshape(x.shape[0], -1)), axis=1)
             for x in jax.tree_util.tree_leaves(tree_C)]
  return jnp.sqrt(sum(squares))


def zeros_accumulator(params: PyTree) -> dict:
  """An empty round: {'sum': zeros like params, 'weight': 0, 'within': 0}."""
  zero = jnp.zeros((), jnp.float32)
  return {'sum': jax.tree_util.tree_map(jnp.zeros_like, params), 'weight': zero,
          'within': zero}


def accumulate(acc: dict, server_params: PyTree, client_params_C: PyTree,
               weights_C: jax.Array, clip: jax.Array | None = None) -> tuple:
  """Adds a block of C clients to the round's accumulator: (acc, delta_norm_C).

  acc['sum'] += sum_c w_c s_c delta_c and acc['weight'] += sum_c w_c, with s_c = 1, or
  with a clip bound s_c = min(1, clip / |delta_c|) and acc['within'] += the weight of the
  clients whose |delta_c| <= clip (the adaptive bound's count). Padding clients weigh 0.
  """
  deltas_C = client_deltas(server_params, client_params_C)
  norms_C = tree_norms_C(deltas_C)
  weights_C = weights_C.astype(jnp.float32)
  scale_C = weights_C if clip is None else weights_C * dp_lib.clip_factors(norms_C, clip)
  within = 0.0 if clip is None else jnp.sum(jnp.where(norms_C <= clip, weights_C, 0.0))
  total = jax.tree_util.tree_map(
      lambda a, d_C: a + jnp.tensordot(scale_C, d_C, axes=1).astype(a.dtype),
      acc['sum'], deltas_C)
  return {'sum': total, 'weight': acc['weight'] + jnp.sum(weights_C),
          'within': acc['within'] + within}, norms_C


def mean_gradient(acc: dict) -> PyTree:
  """The weighted mean delta of the round (the server optimizer's 'gradient')."""
  denominator = jnp.maximum(acc['weight'], jnp.finfo(jnp.float32).tiny)
  return jax.tree_util.tree_map(lambda s: (s / denominator).astype(s.dtype), acc['sum'])


def apply_gradient(server: dict, grads: PyTree, *,
                   server_optimizer: optax.GradientTransformation) -> tuple:
  """One server optimizer step on a pseudo-gradient: (new server, {'update_norm'})."""
  updates, opt_state = server_optimizer.update(grads, server['opt_state'], server['params'])
  params = optax.apply_updates(server['params'], updates)
  new = {**server, 'step': server['step'] + 1, 'params': params, 'opt_state': opt_state}
  return new, {'update_norm': optax.tree.norm(updates)}


def server_update(server: dict, client_params_C: PyTree, weights_C: jax.Array, *,
                  server_optimizer: optax.GradientTransformation) -> tuple:
  """A whole round in one block: (new {'step', 'params', 'opt_state'}, metrics).

  The one-block reference the tests hold `rounds`' accumulate + apply path to.

  Metrics: `delta_norm` [C] (each client's distance from the server parameters) and
  `update_norm` (how far the server parameters moved).
  """
  acc, norms_C = accumulate(zeros_accumulator(server['params']), server['params'],
                            client_params_C, weights_C)
  new, metrics = apply_gradient(server, mean_gradient(acc), server_optimizer=server_optimizer)
  return new, {'delta_norm': norms_C, **metrics}
