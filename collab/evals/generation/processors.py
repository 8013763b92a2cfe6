"""Logits processors: how a decoding step's logits become tokens.

Pure functions of logits_BxV, applied in transformers' order (repetition penalty,
temperature, top-k, top-p), then an argmax (greedy) or a Gumbel-max draw. Each is
specialised statically: a processor that is off adds nothing to the compiled step.
"""

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How logits become a token; temperature 0 is greedy (argmax after the penalty)."""
  temperature: float = 1.0
  top_k: int = 0  # 0: off.
  top_p: float = 1.0  # 1.0: off.
  repetition_penalty: float = 1.0  # 1.0: off.

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f'temperature must be >= 0 (0 is greedy), got {self.temperature}.')
    if self.top_k < 0:
      raise ValueError(f'top_k must be >= 0 (0 disables it), got {self.top_k}.')
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f'top_p must be in (0, 1] (1 disables it), got {self.top_p}.')
    if self.repetition_penalty <= 0:
      raise ValueError('repetition_penalty must be > 0 (1 disables it), got '
                       f'{self.repetition_penalty}.')


def apply_repetition_penalty(logits_BxV, seen_BxV, penalty: float):
  """CTRL penalty: logits of seen tokens divided by `penalty` if positive, else multiplied."""
  penalized_BxV = jnp.where(logits_BxV > 0, logits_BxV / penalty, logits_BxV * penalty)
  return jnp.where(seen_BxV, penalized_BxV, logits_BxV)


def _order_keys(x):
  """uint32 keys in the order of float32 values (-0.0 as 0.0; NaN never reaches here)."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32) + 0.0, jnp.uint32)
  negative = bits >= jnp.uint32(0x80000000)
  return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def kth_largest(x_BxV, k: int):
  """The k-th largest value of each row (ties counted), [B, 1], without sorting.

  Bisection over the values' order keys: the largest key t with at least k values at or
  above it is the k-th largest value's, found exactly in 32 halvings of masked counts.
  XLA's CPU top_k sorts every row: ~20x the cost, more than a whole decoding step of a
  small model.
  """
  keys_BxV = _order_keys(x_BxV)
  lo_Bx1 = jnp.min(keys_BxV, axis=-1, keepdims=True)  # count(>= lo) = V >= k.
  hi_Bx1 = jnp.max(keys_BxV, axis=-1, keepdims=True)  # count(> max) = 0 < k.

  def halve(_, bounds):
    lo_Bx1, hi_Bx1 = bounds  # Invariant: count(>= lo) >= k and count(> hi) < k.
    mid_Bx1 = lo_Bx1 + (hi_Bx1 - lo_Bx1 + 1) // 2  # In (lo, hi] while lo < hi.
    enough_Bx1 = jnp.sum(keys_BxV >= mid_Bx1, axis=-1, keepdims=True) >= k
    return (jnp.where(enough_Bx1, mid_Bx1, lo_Bx1),
            jnp.where(enough_Bx1, hi_Bx1, mid_Bx1 - 1))
  lo_Bx1, _ = jax.lax.fori_loop(0, 32, halve, (lo_Bx1, hi_Bx1))
  # lo is a key some value has: the k-th largest's.
  return jnp.max(jnp.where(keys_BxV == lo_Bx1, x_BxV, -jnp.inf), axis=-1, keepdims=True)


def apply_top_k(logits_BxV, k: int):
  """Keeps the k largest logits of each row (and any tied with the k-th); -inf elsewhere."""
  if k >= logits_BxV.shape[-1]:
    return logits_BxV
  return jnp.where(logits_BxV < kth_largest(logits_BxV, k), -jnp.inf, logits_BxV)


# Halvings of the threshold interval in apply_top_p: 32 take a logit range of 40 below
# 1e-8, finer than float32's spacing wherever two logits can be told apart in probability.
TOP_P_HALVINGS = 32


def apply_top_p(logits_BxV, p: float):
  """Nucleus: the smallest set of most likely tokens whose mass is >= p; -inf elsewhere.

  Tokens tied with the least likely kept token are all kept, so the set does not depend
  on an order among ties. The threshold is found by bisection on the logit value (the
  largest t whose tokens at or above it hold >= p of the mass): a few masked sums per
  halving, where sorting every row (XLA's CPU sort) cost ~10x more than the whole rest of
  a decoding step of a small model.
  """
  probs_BxV = jax.nn.softmax(logits_BxV, axis=-1)
  finite_BxV = jnp.isfinite(logits_BxV)
  # mass(lo) = 1 >= p; mass(hi) = 0 < p. The invariant holds at every halving.
  lo_Bx1 = jnp.min(jnp.where(finite_BxV, logits_BxV, jnp.inf), axis=-1, keepdims=True)
  hi_Bx1 = jnp.max(logits_BxV, axis=-1, keepdims=True) + 1.0

  def halve(_, bounds):
    lo_Bx1, hi_Bx1 = bounds
    mid_Bx1 = lo_Bx1 + (hi_Bx1 - lo_Bx1) / 2
    mass_Bx1 = jnp.sum(jnp.where(logits_BxV >= mid_Bx1, probs_BxV, 0.0), axis=-1,
                       keepdims=True)
    enough_Bx1 = mass_Bx1 >= p
    return jnp.where(enough_Bx1, mid_Bx1, lo_Bx1), jnp.where(enough_Bx1, hi_Bx1, mid_Bx1)
  lo_Bx1, _ = jax.lax.fori_loop(0, TOP_P_HALVINGS, halve, (lo_Bx1, hi_Bx1))
  # No logit lies strictly between lo and the least likely kept token.
  return jnp.where(logits_BxV < lo_Bx1, -jnp.inf, logits_BxV)


def process_logits(logits_BxV, seen_BxV, sp: SamplingParams):
  """Repetition penalty, temperature, top-k, top-p (transformers' order)."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  if sp.repetition_penalty != 1.0:
    logits_BxV = apply_repetition_penalty(logits_BxV, seen_BxV, sp.repetition_penalty)
  if sp.temperature == 0.0:
    return logits_BxV
  logits_BxV = logits_BxV / sp.temperature
  if sp.top_k > 0:
    logits_BxV = apply_top_k(logits_BxV, sp.top_k)
  if sp.top_p < 1.0:
    logits_BxV = apply_top_p(logits_BxV, sp.top_p)
  return logits_BxV


def argmax(x_BxV):
  """jnp.argmax over the last axis (first maximum; first NaN if any), as two plain reductions.

  XLA's CPU backend lowers jnp.argmax to a (value, index) pair reduction that is several
  times slower than the vocabulary projection it follows; a max, then the smallest index
  holding it, vectorise. Indices are exact in float32 below 2**24.
  """
  V = x_BxV.shape[-1]
  if V >= 2**24:
    return jnp.argmax(x_BxV, axis=-1).astype(jnp.int32)
  max_Bx1 = jnp.max(x_BxV, axis=-1, keepdims=True)  # NaN if the row has a NaN.
  index_BxV = jax.lax.broadcasted_iota(jnp.float32, x_BxV.shape, x_BxV.ndim - 1)
  hit_BxV = (x_BxV == max_Bx1) | jnp.isnan(x_BxV)
  return jnp.min(jnp.where(hit_BxV, index_BxV, float(V)), axis=-1).astype(jnp.int32)


def sample_tokens(logits_BxV, seen_BxV, keys_B, sp: SamplingParams):
  """One token per row; `keys_B` are the rows' keys for this step."""
  logits_BxV = process_logits(logits_BxV, seen_BxV, sp)
  if sp.temperature == 0.0:
    return argmax(logits_BxV)
  # jax.random.categorical's own Gumbel-max draw (same bits), with the faster argmax.
  gumbel_BxV = jax.vmap(lambda k, x: jax.random.gumbel(k, x.shape, x.dtype))(keys_B,
                                                                            logits_BxV)
  return argmax(gumbel_BxV + logits_BxV)
