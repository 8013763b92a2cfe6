"""DP-FedAvg: client-level clipping, Gaussian noise on the aggregate, and its privacy cost.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language
Models"): each client's delta (server - client parameters) is scaled to L2 norm at most C
(the global norm over the whole parameter tree); the server adds N(0, (z C)^2) to every
coordinate of the sum of clipped deltas and divides by the fixed number of clients per
round m. One client changes that sum by at most C, so the round is a Gaussian mechanism
with noise multiplier z on the client's whole contribution (client-level DP, add/remove
one client). Weights must be uniform: weighting by data size would let one client's
weight, not C, bound its influence.

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive
Clipping") moves C geometrically toward the `target_quantile` of the delta norms:
C <- C * exp(-clip_learning_rate * (b - target_quantile)), where b is the share of the
round's clients whose norm was <= C, released with N(0, clip_count_noise^2) noise on the
count. Both releases together are accounted as one Gaussian mechanism with
z_eff = (z^-2 + (2 clip_count_noise)^-2)^(-1/2), as Andrew et al. account it.

Accounting uses Google's `dp_accounting` RDP accountant: `rounds` self-composed Gaussian
mechanisms, Poisson-subsampled with q = m/N when fewer than all N clients train per
round. Our rounds sample exactly m clients without replacement; as TF Privacy and TFF do,
that is accounted as Poisson sampling with the same q. Without noise (noise_multiplier 0,
or clip_count_noise 0 with adaptive clipping) epsilon is infinite; JSON outputs write it
as None.

The jax functions here are pure and run inside the round's jitted server programs
(collab/settings/rounds.py); the accounting functions are plain Python on the host.
"""

import contextlib
import logging
import math
from typing import Any

import dp_accounting
import jax
import jax.numpy as jnp

PyTree = Any
ACCOUNTANT = 'rdp'  # What `privacy_summary` names as its accountant.
NOISE_STREAM = 0x4450  # Folded into the run's train key for the DP noise ("DP").


def check_config(fed_cfg) -> None:
  """What DP-FedAvg needs from config.federated, with the fields to set."""
  dp = fed_cfg.dp
  if not dp.enabled:
    return
  if fed_cfg.weighting != 'uniform':
    raise ValueError(
        "config.federated.dp.enabled needs uniform client weights (DP bounds each client's "
        f"influence by the clip norm alone), but config.federated.weighting is "
        f"{fed_cfg.weighting!r}; set --config.federated.weighting=uniform or "
        "--config.federated.dp.enabled=False.")
  checks = [('clip_norm', dp.clip_norm > 0, '> 0'),
            ('noise_multiplier', dp.noise_multiplier >= 0, '>= 0'),
            ('delta', 0 < dp.delta < 1, 'in (0, 1)'),
            ('target_quantile', 0 <= dp.target_quantile <= 1, 'in [0, 1]'),
            ('clip_learning_rate', dp.clip_learning_rate >= 0, '>= 0'),
            ('clip_count_noise', dp.clip_count_noise >= 0, '>= 0')]
  for name, ok, want in checks:
    if not ok:
      raise ValueError(f'config.federated.dp.{name} must be {want}, got {getattr(dp, name)}.')


# --- Inside the round (pure jax) -----------------------------------------------------------

def clip_factors(norms_C: jax.Array, clip: jax.Array) -> jax.Array:
  """min(1, C / norm) per client: the scale that brings a delta's norm within C."""
  return jnp.minimum(1.0, clip / jnp.maximum(norms_C, jnp.finfo(jnp.float32).tiny))


def noise_key(train_key: jax.Array) -> jax.Array:
  """The run's DP noise key (every round folds its index into it: round_keys)."""
  return jax.random.fold_in(train_key, NOISE_STREAM)


def round_keys(run_key: jax.Array, round_: jax.Array) -> tuple:
  """(key of the update noise, key of the count noise) of a round, from noise_key(...)."""
  update_key, count_key = jax.random.split(jax.random.fold_in(run_key, round_))
  return update_key, count_key


def gaussian_noise(key: jax.Array, tree: PyTree, std: jax.Array) -> PyTree:
  """N(0, std^2) per coordinate of `tree`; leaf i (tree_leaves order) draws from split(key)[i]."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([(std * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
                            for k, x in zip(keys, leaves)])


def private_mean(sum_tree: PyTree, key: jax.Array, *, noise_std: jax.Array,
                 count: int) -> PyTree:
  """(sum of clipped deltas + N(0, noise_std^2)) / count: the DP pseudo-gradient."""
  noise = gaussian_noise(key, sum_tree, noise_std)
  return jax.tree_util.tree_map(lambda s, n: (s + n) / count, sum_tree, noise)


def adapt_clip(clip: jax.Array, within: jax.Array, present: jax.Array, key: jax.Array, *,
               count: int, target_quantile: float, learning_rate: float,
               count_noise: float) -> tuple:
  """(next bound, noisy share b) after a round where `within` of the `present` clients fit
  `clip`, out of `count` expected.

  As in Andrew et al. (and TFF), the released sum is of the bits shifted to +-1/2, so one
  client moves it by 1/2 (whence the factor 2 in z_eff): b = (sum(bit - 1/2) + noise) /
  count + 1/2. With exactly `count` clients present this is (within + noise) / count.
  """
  shifted = within - present / 2 + count_noise * jax.random.normal(key, (), jnp.float32)
  b = shifted / count + 0.5
  return clip * jnp.exp(-learning_rate * (b - target_quantile)), b


# --- Accounting (host) ---------------------------------------------------------------------

def effective_noise_multiplier(dp_cfg) -> float:
  """z, or with adaptive clipping z_eff = (z^-2 + (2 clip_count_noise)^-2)^(-1/2); 0 if any is 0."""
  z = float(dp_cfg.noise_multiplier)
  if not dp_cfg.adaptive_clip:
    return z
  sigma_b = float(dp_cfg.clip_count_noise)
  if z == 0 or sigma_b == 0:  # One release without noise: no privacy at all.
    return 0.0
  return (z**-2 + (2 * sigma_b)**-2) ** -0.5


def dp_event(noise_multiplier: float, rounds: int, clients_per_round: int,
             clients: int) -> dp_accounting.DpEvent:
  """`rounds` Gaussian mechanisms, Poisson-subsampled with q = m/N when m < N."""
  event = dp_accounting.GaussianDpEvent(noise_multiplier)
  if clients_per_round < clients:
    event = dp_accounting.PoissonSampledDpEvent(clients_per_round / clients, event)
  return dp_accounting.SelfComposedDpEvent(event, rounds)


def epsilon(noise_multiplier: float, rounds: int, clients_per_round: int, clients: int,
            delta: float) -> float:
  """The RDP accountant's epsilon at `delta` after `rounds` rounds (inf without noise)."""
  if rounds == 0:
    return 0.0
  if noise_multiplier == 0:
    return math.inf
  accountant = dp_accounting.rdp.RdpAccountant()
  with _absl_errors_only():
    accountant.compose(dp_event(noise_multiplier, rounds, clients_per_round, clients))
  return float(accountant.get_epsilon(delta))


@contextlib.contextmanager
def _absl_errors_only():
  # For large q the accountant warns once per low RDP order it cannot evaluate (and
  # rightly leaves out) on every call: dozens of lines per round otherwise.
  logger = logging.getLogger('absl')
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def json_epsilon(eps: float) -> float | None:
  """epsilon for JSON: None stands for infinity (no noise), which JSON cannot hold."""
  return eps if math.isfinite(eps) else None


def round_epsilon(dp_cfg, rounds: int, clients_per_round: int, clients: int) -> float | None:
  """epsilon of the run after `rounds` rounds, for JSON (None: infinite)."""
  return json_epsilon(epsilon(effective_noise_multiplier(dp_cfg), rounds, clients_per_round,
                              clients, float(dp_cfg.delta)))


def privacy_summary(dp_cfg, rounds: int, clients_per_round: int, clients: int,
                    clip_norm: float, unit: str = 'participants') -> dict:
  """train.json's `privacy` block; epsilon None means infinite (noise_multiplier 0).

  `unit` is who one DP client is (config.federated.clients): the guarantee is for adding
  or removing one such client. `clip_norm` is the final bound (adaptive clipping moves
  it), `initial_clip_norm` the configured one.
  """
  return {'epsilon': round_epsilon(dp_cfg, rounds, clients_per_round, clients),
          'unit': unit, 'initial_clip_norm': float(dp_cfg.clip_norm),
          'delta': float(dp_cfg.delta), 'noise_multiplier': float(dp_cfg.noise_multiplier),
          'clip_norm': float(clip_norm), 'rounds': int(rounds),
          'clients_per_round': int(clients_per_round), 'clients': int(clients),
          'accountant': ACCOUNTANT}
