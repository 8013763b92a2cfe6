"""Dropout whose masks are flax's, bit for bit, at a fraction of the CPU cost.

`flax.linen.Dropout` draws its mask with `jax.random.bernoulli`, whose threefry hash XLA
compiles on the CPU as a rolled 5-iteration loop (jax lowers it so to save compile
time): every round writes its two uint32 words per element to memory and reads them back,
and the loop keeps XLA from fusing the hash with the comparison and the select. That was
~17-20% of a CPU train step. `Dropout` here computes the same threefry-2x32 hash written
out in jnp (the same adds, rotations and xors as jax's unrolled lowering), which XLA fuses
into one elementwise loop with the mask's use; the comparison is done on the integer
mantissa bits, exactly equivalent to `uniform(...) < keep_prob`. Where its shortcut does
not apply (a non-threefry key, `jax_threefry_partitionable` off, more than 2**32
elements) it calls `jax.random.bernoulli` itself, so it is flax's Dropout everywhere;
tests/test_model.py checks the masks are identical.
"""

import math

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KS_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(x, d: int):
  return lax.shift_left(x, np.uint32(d)) | lax.shift_right_logical(x, np.uint32(32 - d))


def threefry2x32(k1, k2, x1, x2) -> tuple:
  """jax's threefry-2x32 hash of the words (x1, x2) under key (k1, k2), unrolled."""
  ks = (k1, k2, k1 ^ k2 ^ _KS_PARITY)
  x = [x1 + ks[0], x2 + ks[1]]
  for i in range(5):
    for r in _ROTATIONS[i % 2]:
      x[0] = x[0] + x[1]
      x[1] = x[0] ^ _rotate_left(x[1], r)
    x = [x[0] + ks[(i + 1) % 3], x[1] + ks[(i + 2) % 3] + np.uint32(i + 1)]
  return x[0], x[1]


def _fast_path(key) -> bool:
  return (jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
          and str(jax.random.key_impl(key)) == 'threefry2x32'
          and jax.config.jax_threefry_partitionable)


def bernoulli(key: jax.Array, p: float, shape: tuple) -> jax.Array:
  """`jax.random.bernoulli(key, p, shape)` (float32 p), computed as a fusible expression."""
  if not shape or not _fast_path(key) or math.prod(shape) >= 2**32:
    return jax.random.bernoulli(key, p, shape)
  k1, k2 = jax.random.key_data(key)
  # The row-major uint64 iota of jax's partitionable bits (high words 0 below 2**32
  # elements), built per axis as jax does so a sharded mask is computed shard by shard.
  strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
  counts_lo = sum(lax.broadcasted_iota(np.uint32, shape, i) * np.uint32(stride)
                  for i, stride in enumerate(strides))
  bits1, bits2 = threefry2x32(k1, k2, jnp.zeros_like(counts_lo), counts_lo)
  # uniform() is mantissa / 2**23 for the top 23 bits (exact in float32), so
  # `uniform < p` is `mantissa < ceil(p * 2**23)` (exact in float64).
  threshold = math.ceil(float(np.float32(p)) * 2**23)
  return lax.shift_right_logical(bits1 ^ bits2, np.uint32(9)) < np.uint32(threshold)


class Dropout(nn.Module):
  """`nn.Dropout(rate)` (no broadcast dims) with the mask from `bernoulli` above."""
  rate: float
  rng_collection: str = 'dropout'

  @nn.compact
  def __call__(self, inputs, deterministic: bool):
    if self.rate == 0.0 or deterministic:
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    keep_prob = 1.0 - self.rate
    mask = bernoulli(self.make_rng(self.rng_collection), keep_prob, inputs.shape)
    return lax.select(mask, inputs / keep_prob, jnp.zeros_like(inputs))
