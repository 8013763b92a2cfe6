"""GPT-2 in Flax linen with logical axis names and an explicit KV cache.

Pre-LayerNorm blocks, GELU (tanh approximation, GPT-2's `gelu_new`), learned positions,
tied input/output embeddings and dropout on embeddings, attention probabilities and
residual branches (attention dropout can differ: the fused attention kernels have none).
Parameters are float32; `ModelConfig.dtype` sets the compute dtype; logits are always
float32 and always `vocab_size` wide, even where `vocab_multiple` pads the embedding
table (a vocabulary like GPT-2's 50257 = 29 x 1733 neither tiles on matrix units nor
shards over devices). Padding rows start at zero, get no gradient and reach no logit.
The parameter tree mirrors transformers' GPT-2 names (`wte`, `wpe`,
`h_{i}/{ln_1,attn,ln_2,mlp}`, `ln_f`) and layouts up to reshapes, which keeps `collab.hf`
a table of renames.

Shapes: B batch, L query length, T cache slots, D d_model, H heads, K head width,
F MLP width, V vocabulary, P max positions.
"""

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from collab import dropout

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
ATTENTION = ('xla', 'cudnn')
LAYER_NORM_EPS = 1e-5  # GPT-2's layer_norm_epsilon.
INIT_STD = 0.02  # GPT-2's initializer_range.

# One {'k': k_BxHxTxK, 'v': v_BxHxTxK} dict per layer. Heads before slots: decoding then
# reads each head's keys contiguously, and XLA needs no per-step transpose of the cache.
Cache = list


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static GPT-2 hyperparameters (hashable, so it can be a jit static argument)."""
  vocab_size: int
  num_layers: int
  num_heads: int
  d_model: int
  d_ff: int
  max_len: int
  dropout: float = 0.1
  dtype: str = 'float32'
  layer_norm_eps: float = LAYER_NORM_EPS
  attention: str = 'xla'  # 'cudnn': fused kernel (GPU) wherever attention dropout is off.
  attention_dropout: Optional[float] = None  # None: `dropout`.
  vocab_multiple: int = 1  # Embedding rows are padded to a multiple of this.
  # Training loss: positions (of every row) per chunk of the LM head + cross entropy,
  # recomputed in the backward pass, so no [B, L, V] logits are held; 0: all at once.
  loss_chunk: int = 0

  def __post_init__(self):
    for name in ('vocab_size', 'num_layers', 'num_heads', 'd_model', 'd_ff', 'max_len',
                 'vocab_multiple'):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f'ModelConfig.{name} must be a positive int, got {value!r}.')
    if self.d_model % self.num_heads:
      raise ValueError(f'ModelConfig.d_model ({self.d_model}) must be divisible by '
                       f'num_heads ({self.num_heads}).')
    if self.dtype not in DTYPES:
      raise ValueError(f'ModelConfig.dtype must be one of {sorted(DTYPES)}, '
                       f'got {self.dtype!r}.')
    if self.attention not in ATTENTION:
      raise ValueError(f'ModelConfig.attention must be one of {ATTENTION}, '
                       f'got {self.attention!r}.')
    if not isinstance(self.loss_chunk, int) or self.loss_chunk < 0:
      raise ValueError(f'ModelConfig.loss_chunk must be an int >= 0 (0: off), '
                       f'got {self.loss_chunk!r}.')
    for name in ('dropout', 'attention_dropout'):
      value = getattr(self, name)
      if value is not None and not 0.0 <= value < 1.0:
        raise ValueError(f'ModelConfig.{name} must be in [0, 1), got {value!r}.')

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def attn_dropout(self) -> float:
    """Dropout on attention probabilities (`dropout` unless set apart)."""
    return self.dropout if self.attention_dropout is None else self.attention_dropout

  @property
  def padded_vocab(self) -> int:
    """Rows of the embedding table: vocab_size rounded up to vocab_multiple."""
    return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @classmethod
  def from_config(cls, model_cfg, vocab_size: int = 0) -> 'ModelConfig':
    """From `cfg.model` (configs/common.model_config); its vocab_size 0 takes the argument."""
    vocab = int(model_cfg.vocab_size) or int(vocab_size)
    if vocab <= 0:
      raise ValueError('No vocabulary size: config.model.vocab_size is 0 (take it from the '
                       'tokenizer) and no vocab_size argument was given.')
    attention_dropout = model_cfg.get('attention_dropout')
    return cls(vocab_size=vocab, num_layers=int(model_cfg.num_layers),
               num_heads=int(model_cfg.num_heads), d_model=int(model_cfg.d_model),
               d_ff=int(model_cfg.d_ff), max_len=int(model_cfg.max_len),
               dropout=float(model_cfg.dropout), dtype=str(model_cfg.dtype),
               attention=str(model_cfg.get('attention', 'xla')),
               attention_dropout=(None if attention_dropout is None
                                  else float(attention_dropout)),
               vocab_multiple=int(model_cfg.get('vocab_multiple', 1)),
               loss_chunk=int(model_cfg.get('loss_chunk', 0)))


def _param(module: nn.Module, name: str, shape, axes, std: Optional[float]):
  """A float32 parameter with logical axis names: normal(std), or zeros if std is None."""
  init = nn.initializers.zeros if std is None else nn.initializers.normal(std)
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def _layer_norm(config: ModelConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=config.layer_norm_eps, dtype=config.compute_dtype, param_dtype=jnp.float32,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)),
      name=name)


def _embedding_init(config: ModelConfig):
  """normal(INIT_STD) rows for the vocabulary, then zero padding rows.

  Zero rows stay zero under AdamW and weight decay (their gradient is zero; DP-FedAvg's
  noise is the exception, and still reaches no logit), and the real rows are what an
  unpadded model draws from the same key.
  """
  def init(key, shape, dtype=jnp.float32):
    rows = nn.initializers.normal(INIT_STD)(key, (config.vocab_size,) + shape[1:], dtype)
    return jnp.pad(rows, ((0, shape[0] - config.vocab_size), (0, 0)))
  return init


def _residual_std(config: ModelConfig) -> float:
  """GPT-2 scales residual projections by 1/sqrt(2 * layers) so depth keeps the variance."""
  return INIT_STD / math.sqrt(2 * config.num_layers)


def unembed(x_NxD, wte_VxD, config: ModelConfig, axes=None, transposed: bool = False):
  """float32 logits over the real vocabulary from final hidden states (tied `wte`, or
  its transpose [D, V] if `transposed`), constrained to logical `axes` if given."""
  spec = '...d,dv->...v' if transposed else '...d,vd->...v'
  logits_NxV = jnp.einsum(spec, x_NxD, wte_VxD.astype(config.compute_dtype),
                          preferred_element_type=jnp.float32)
  if axes is not None:  # At the padded width, which divides over devices.
    logits_NxV = nn.with_logical_constraint(logits_NxV, axes)
  # The padded product runs at the aligned width; consumers of the slice fuse it.
  return logits_NxV[..., :config.vocab_size] if config.padded_vocab != config.vocab_size \
      else logits_NxV


def _write_cache(cache_BxHxTxK, new_BxLxHxK, positions_BxL):
  """Each row writes its L entries at its own slots; slots past the cache are dropped."""
  rows_Bx1 = jnp.arange(cache_BxHxTxK.shape[0])[:, None]
  # Advanced indices around a slice: the indexed view is [B, L, H, K], like the update.
  return cache_BxHxTxK.at[rows_Bx1, :, positions_BxL].set(
      new_BxLxHxK.astype(cache_BxHxTxK.dtype), mode='drop')


class Attention(nn.Module):
  """Causal multi-head self-attention, optionally reading and writing a KV cache."""
  config: ModelConfig

  def _attend(self, q_BxLxHxK, k, v, mask_Bx1xLxT, deterministic, kv_axes='bthk'):
    """Attention of q over keys/values laid out as `kv_axes` (t: key slots)."""
    cfg = self.config
    scores_BxHxLxT = jnp.einsum(f'blhk,{kv_axes}->bhlt', q_BxLxHxK, k)
    # Softmax in float32: bfloat16 logits lose the small differences that matter here.
    scores_BxHxLxT = scores_BxHxLxT.astype(jnp.float32) / math.sqrt(cfg.head_dim)
    scores_BxHxLxT = jnp.where(mask_Bx1xLxT, scores_BxHxLxT, jnp.finfo(jnp.float32).min)
    probs_BxHxLxT = jax.nn.softmax(scores_BxHxLxT, axis=-1).astype(cfg.compute_dtype)
    probs_BxHxLxT = dropout.Dropout(cfg.attn_dropout)(probs_BxHxLxT,
                                                      deterministic=deterministic)
    out_BxLxHxK = jnp.einsum(f'bhlt,{kv_axes}->blhk', probs_BxHxLxT, v)
    return nn.with_logical_constraint(out_BxLxHxK, ('batch', 'length', 'heads', 'kv'))

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, cache, deterministic):
    cfg = self.config
    dt = cfg.compute_dtype
    H, K, D = cfg.num_heads, cfg.head_dim, cfg.d_model
    w_Dx3xHxK = _param(self, 'c_attn_kernel', (D, 3, H, K),
                       ('embed', None, 'heads', 'kv'), INIT_STD)
    b_3xHxK = _param(self, 'c_attn_bias', (3, H, K), (None, 'heads', 'kv'), None)
    B, L = x_BxLxD.shape[:2]
    # Products over B * L rows (also in Mlp): the weight gradient then contracts one axis,
    # so XLA:CPU no longer copies the output gradient to [features, B, L] first; the same
    # bits (docs/BENCHMARKS.md). Not for c_proj below: over (h, k) that changes rounding.
    qkv_Nx3xHxK = jnp.einsum('nd,dshk->nshk', x_BxLxD.reshape(B * L, D), w_Dx3xHxK.astype(dt))
    qkv_BxLx3xHxK = qkv_Nx3xHxK.reshape(B, L, 3, H, K) + b_3xHxK.astype(dt)
    q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = (
        nn.with_logical_constraint(qkv_BxLx3xHxK[:, :, i], ('batch', 'length', 'heads', 'kv'))
        for i in range(3))
    if cache is None and cfg.attention == 'cudnn' and (deterministic or not cfg.attn_dropout):
      # jax's fused attention has no dropout, hence only where attention dropout is off.
      if jax.default_backend() != 'gpu':
        raise ValueError(f"model.attention='cudnn' needs an NVIDIA GPU, but JAX runs on "
                         f"{jax.default_backend()}; use model.attention='xla'.")
      out_BxLxHxK = jax.nn.dot_product_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK,
                                                 is_causal=True, implementation='cudnn')
      # Declared, not called, as `_attend` does: flax names (and keys) dropout modules by
      # order, so the residual dropout draws the same masks on either path.
      dropout.Dropout(cfg.attn_dropout)
    elif cache is None:
      mask_Bx1xLxT = jnp.tril(jnp.ones((L, L), bool))[None, None]
      out_BxLxHxK = self._attend(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask_Bx1xLxT,
                                 deterministic)
    else:
      cache = {'k': _write_cache(cache['k'], k_BxLxHxK, positions_BxL),
               'v': _write_cache(cache['v'], v_BxLxHxK, positions_BxL)}
      T = cache['k'].shape[2]
      # Slot t holds position t: a query at p sees slots <= p, all written by then.
      mask_Bx1xLxT = (jnp.arange(T)[None, None, :] <= positions_BxL[:, :, None])[:, None]
      out_BxLxHxK = self._attend(q_BxLxHxK, cache['k'].astype(dt), cache['v'].astype(dt),
                                 mask_Bx1xLxT, deterministic, kv_axes='bhtk')
    w_HxKxD = _param(self, 'c_proj_kernel', (H, K, D), ('heads', 'kv', 'embed'),
                     _residual_std(cfg))
    b_D = _param(self, 'c_proj_bias', (D,), ('embed',), None)
    y_BxLxD = jnp.einsum('blhk,hkd->bld', out_BxLxHxK, w_HxKxD.astype(dt)) + b_D.astype(dt)
    y_BxLxD = dropout.Dropout(cfg.dropout)(y_BxLxD, deterministic=deterministic)
    return nn.with_logical_constraint(y_BxLxD, ('batch', 'length', 'embed')), cache


class Mlp(nn.Module):
  """Position-wise feed-forward: D -> F (GELU, tanh approximation) -> D."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, deterministic):
    cfg = self.config
    dt = cfg.compute_dtype
    w_DxF = _param(self, 'c_fc_kernel', (cfg.d_model, cfg.d_ff), ('embed', 'mlp'), INIT_STD)
    b_F = _param(self, 'c_fc_bias', (cfg.d_ff,), ('mlp',), None)
    B, L, D = x_BxLxD.shape
    h_NxF = jnp.einsum('nd,df->nf', x_BxLxD.reshape(B * L, D), w_DxF.astype(dt))
    h_BxLxF = h_NxF.reshape(B, L, cfg.d_ff) + b_F.astype(dt)
    h_BxLxF = nn.with_logical_constraint(jax.nn.gelu(h_BxLxF, approximate=True),
                                         ('batch', 'length', 'mlp'))
    w_FxD = _param(self, 'c_proj_kernel', (cfg.d_ff, cfg.d_model), ('mlp', 'embed'),
                   _residual_std(cfg))
    b_D = _param(self, 'c_proj_bias', (cfg.d_model,), ('embed',), None)
    y_NxD = jnp.einsum('nf,fd->nd', h_BxLxF.reshape(B * L, cfg.d_ff), w_FxD.astype(dt))
    y_BxLxD = y_NxD.reshape(B, L, D) + b_D.astype(dt)
    y_BxLxD = dropout.Dropout(cfg.dropout)(y_BxLxD, deterministic=deterministic)
    return nn.with_logical_constraint(y_BxLxD, ('batch', 'length', 'embed'))


class Block(nn.Module):
  """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, cache, deterministic):
    cfg = self.config
    y_BxLxD, cache = Attention(cfg, name='attn')(
        _layer_norm(cfg, 'ln_1')(x_BxLxD), positions_BxL, cache, deterministic)
    x_BxLxD = x_BxLxD + y_BxLxD
    x_BxLxD = x_BxLxD + Mlp(cfg, name='mlp')(_layer_norm(cfg, 'ln_2')(x_BxLxD),
                                             deterministic)
    return nn.with_logical_constraint(x_BxLxD, ('batch', 'length', 'embed')), cache


def check_context(length: int, config: ModelConfig) -> None:
  """Raises when a sequence cannot fit the model's learned positions."""
  if length > config.max_len:
    raise ValueError(
        f"context {length} is longer than the model's max_len {config.max_len}: the model "
        f'has only {config.max_len} learned positions. Use blocks of at most '
        f'{config.max_len} tokens (data.seq_len <= model.max_len).')


class GPT2(nn.Module):
  """GPT-2 language model; see `__call__` for the cached and uncached contracts."""
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL, *, positions_BxL=None, cache: Optional[Cache] = None,
               deterministic: bool = True, unembed_DxV=None, hidden: bool = False):
    """Logits for every position.

    Without a cache returns logits_BxLxV (float32), causal within the L tokens. With a
    cache (from `init_cache`) returns (logits_BxLxV, cache): row b writes its keys and
    values at slots positions_BxL[b] and a query at position p attends to slots <= p.
    Positions default to 0..L-1. A token outside the vocabulary or a position at or
    past max_len turns its row's logits to NaN (a query past the cache length: that
    query's logits), rather than a silently wrong value.

    `unembed_DxV`, if given, must be the `wte` parameter transposed: decoding loops
    transpose it once, because XLA's CPU matmul reads a [D, V] matrix faster than the
    [V, D] one at the few rows of a decoding step. `hidden=True` (no cache) returns the
    final LayerNorm's output x_BxLxD instead of logits, for `unembed` in chunks.
    """
    cfg = self.config
    dt = cfg.compute_dtype
    B, L = tokens_BxL.shape
    check_context(L, cfg)
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    if cache is not None:
      _check_cache(cache, cfg, B, L)
    V = cfg.vocab_size
    wte_VxD = self.param('wte', nn.with_logical_partitioning(_embedding_init(cfg),
                                                             ('vocab', 'embed')),
                         (cfg.padded_vocab, cfg.d_model), jnp.float32)
    wpe_PxD = _param(self, 'wpe', (cfg.max_len, cfg.d_model), (None, 'embed'), INIT_STD)
    # mode='fill' turns an out-of-range token or position into NaN, which training's
    # NaN check reports, instead of silently clamping to the last row. Negative ids
    # (which take would wrap) and padding rows go to an index past the table.
    tokens_BxL = jnp.where((tokens_BxL >= 0) & (tokens_BxL < V), tokens_BxL,
                           cfg.padded_vocab)
    x_BxLxD = (jnp.take(wte_VxD, tokens_BxL, axis=0, mode='fill', fill_value=jnp.nan)
               + jnp.take(wpe_PxD, positions_BxL, axis=0, mode='fill',
                          fill_value=jnp.nan)).astype(dt)
    x_BxLxD = dropout.Dropout(cfg.dropout)(x_BxLxD, deterministic=deterministic)
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ('batch', 'length', 'embed'))
    new_cache = []
    for i in range(cfg.num_layers):
      x_BxLxD, layer_cache = Block(cfg, name=f'h_{i}')(
          x_BxLxD, positions_BxL, None if cache is None else cache[i], deterministic)
      new_cache.append(layer_cache)
    if cache is not None:
      T = cache[0]['k'].shape[2]
      # A query past the cache would have attended to a cache missing its own key; NaN
      # here (D wide, not V) turns all of its logits to NaN.
      x_BxLxD = jnp.where((positions_BxL < T)[:, :, None], x_BxLxD, jnp.nan)
    x_BxLxD = _layer_norm(cfg, 'ln_f')(x_BxLxD)
    if hidden and cache is None:
      return x_BxLxD
    logits_BxLxV = unembed(x_BxLxD, wte_VxD if unembed_DxV is None else unembed_DxV, cfg,
                           ('batch', 'length', 'vocab'), transposed=unembed_DxV is not None)
    return logits_BxLxV if cache is None else (logits_BxLxV, new_cache)


def init_cache(config: ModelConfig, batch: int, length: int, dtype: Any = None) -> Cache:
  """Zeroed KV cache: per layer {'k', 'v'} of shape [batch, heads, length, head_dim]."""
  if length <= 0 or batch <= 0:
    raise ValueError(f'init_cache needs a positive batch and length, got {batch}, {length}.')
  check_context(length, config)
  dtype = config.compute_dtype if dtype is None else dtype
  shape = (batch, config.num_heads, length, config.head_dim)
  return [{'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}
          for _ in range(config.num_layers)]


def cache_partition_spec(config: ModelConfig) -> Cache:
  """Logical axis names of `init_cache`'s leaves, for sharding a cache like activations."""
  names = jax.sharding.PartitionSpec('batch', 'heads', 'length', 'kv')
  return [{'k': names, 'v': names} for _ in range(config.num_layers)]


def _check_cache(cache, config: ModelConfig, batch: int, length: int) -> None:
  """Static checks of a cache against the model and the call, at trace time."""
  if len(cache) != config.num_layers:
    raise ValueError(f'cache has {len(cache)} layers but the model has {config.num_layers}; '
                     'make it with init_cache(config, ...).')
  k = cache[0]['k']
  expect = (batch, config.num_heads, None, config.head_dim)
  if k.ndim != 4 or any(e is not None and e != s for e, s in zip(expect, k.shape)):
    raise ValueError(f'cache keys have shape {tuple(k.shape)}, expected '
                     f'[{batch}, {config.num_heads}, T, {config.head_dim}] for this batch.')
  if length > k.shape[2]:
    raise ValueError(f'{length} tokens do not fit a cache of {k.shape[2]} slots; make a '
                     'longer cache with init_cache.')


def count_params(params) -> int:
  """Number of scalars in a parameter tree (boxed or not)."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(nn.meta.unbox(params)))


def abstract_params(config: ModelConfig):
  """Boxed (logically partitioned) parameter shapes, without allocating anything."""
  tokens_1x1 = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(GPT2(config).init, jax.random.key(0), tokens_1x1)['params']
