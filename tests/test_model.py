"""GPT-2 model: causality, KV cache, dtypes, sharding names, and that it can learn."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from collab import dropout
from collab import model as M
from configs import common

CFG = M.ModelConfig(vocab_size=128, num_layers=2, num_heads=4, d_model=64, d_ff=256,
                    max_len=32)


@functools.lru_cache
def _init(cfg=CFG, seed=0):
  tokens_1x4 = jnp.zeros((1, 4), jnp.int32)
  return nn.meta.unbox(jax.jit(M.GPT2(cfg).init)(jax.random.key(seed), tokens_1x4)['params'])


@functools.lru_cache
def _apply(cfg=CFG):
  """Jitted uncached forward: eager Flax dispatch would dominate these tests' time."""
  return jax.jit(lambda params, tokens_BxL: M.GPT2(cfg).apply({'params': params}, tokens_BxL))


def _tokens(shape, seed=1, vocab=CFG.vocab_size):
  return jax.random.randint(jax.random.key(seed), shape, 0, vocab, jnp.int32)


def test_from_config_takes_vocab_from_argument_only_when_zero():
  c = common.model_config('tiny')
  assert M.ModelConfig.from_config(c, 300).vocab_size == 300
  c.vocab_size = 77
  assert M.ModelConfig.from_config(c, 300).vocab_size == 77
  c.vocab_size = 0
  with pytest.raises(ValueError, match='vocab'):
    M.ModelConfig.from_config(c, 0)
  with pytest.raises(ValueError, match='dtype'):
    dataclasses.replace(CFG, dtype='float16')
  with pytest.raises(ValueError, match='divisible'):
    dataclasses.replace(CFG, num_heads=5)
  with pytest.raises(ValueError, match='attention'):
    dataclasses.replace(CFG, attention='flash')


@pytest.mark.skipif(jax.default_backend() == 'gpu', reason='checks the non-GPU message')
def test_cudnn_attention_off_gpu_says_so():
  cfg = dataclasses.replace(CFG, attention='cudnn')
  with pytest.raises(ValueError, match="needs an NVIDIA GPU.*attention='xla'"):
    jax.eval_shape(M.GPT2(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


def test_parameter_counts_of_size_presets():
  counts = {size: M.count_params(M.abstract_params(
      M.ModelConfig.from_config(common.model_config(size), vocab)))
            for size, vocab in (('tiny', 8192), ('small', 8192), ('gpt2', 50257))}
  assert 1.3e6 < counts['tiny'] < 1.7e6
  assert 6e6 < counts['small'] < 8e6
  # transformers' GPT2LMHeadModel('gpt2'), tied, plus the preset's 47 padding rows.
  gpt2 = M.ModelConfig.from_config(common.model_config('gpt2'), 50257)
  assert gpt2.padded_vocab == 50304
  assert counts['gpt2'] == 124_439_808 + (50304 - 50257) * 768


def test_causality():
  params = _init()
  tokens_BxL = _tokens((2, 16))
  t = 9
  changed_BxL = tokens_BxL.at[:, t + 1:].set((tokens_BxL[:, t + 1:] + 1) % CFG.vocab_size)
  a = _apply()(params, tokens_BxL)
  b = _apply()(params, changed_BxL)
  np.testing.assert_allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-6, rtol=0)
  assert np.abs(a[:, t + 1:] - b[:, t + 1:]).max() > 1e-3  # The change is visible later.


def test_context_longer_than_positions_raises():
  with pytest.raises(ValueError, match=r"context 33 is longer than the model's max_len 32"):
    jax.eval_shape(M.GPT2(CFG).init, jax.random.key(0), jnp.zeros((1, 33), jnp.int32))
  with pytest.raises(ValueError, match='max_len'):
    M.init_cache(CFG, 1, 40)


def test_out_of_range_positions_and_tokens_give_nan_not_garbage():
  params = _init()
  apply = jax.jit(M.GPT2(CFG).apply)
  positions_2x4 = jnp.array([[0, 1, 2, 3], [0, 1, 2, CFG.max_len]])
  logits = apply({'params': params}, _tokens((2, 4)), positions_BxL=positions_2x4)
  assert np.isfinite(logits[0]).all() and np.isnan(logits[1]).all()
  for bad in (CFG.vocab_size, -1):  # take() would wrap -1 to the last row.
    logits = apply({'params': params}, jnp.array([[1, 2], [1, bad]]))
    assert np.isfinite(logits[0]).all() and np.isnan(logits[1]).all()


def _decode_with_cache(params, cfg, seqs, prompt_lens, steps):
  """Prefills right-padded prompts in one call, then feeds one token per row per step."""
  B = len(seqs)
  width = max(prompt_lens)
  prompts_BxW = np.zeros((B, width), np.int32)
  for b, (s, n) in enumerate(zip(seqs, prompt_lens)):
    prompts_BxW[b, :n] = s[:n]
  apply = jax.jit(lambda p, t, pos, c: M.GPT2(cfg).apply({'params': p}, t, positions_BxL=pos,
                                                          cache=c))
  cache = M.init_cache(cfg, B, width + steps)
  prefill_BxWxV, cache = apply(params, prompts_BxW,
                               np.broadcast_to(np.arange(width), (B, width)), cache)
  lens_B = np.array(prompt_lens)
  decoded = []  # decoded[j][b]: logits at position lens_B[b] + j.
  for j in range(steps):
    tokens_Bx1 = np.array([[s[n + j]] for s, n in zip(seqs, prompt_lens)], np.int32)
    logits_Bx1xV, cache = apply(params, tokens_Bx1, (lens_B + j)[:, None], cache)
    decoded.append(logits_Bx1xV[:, 0])
  return prefill_BxWxV, decoded


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_cached_decoding_equals_full_recompute(dtype):
  cfg = dataclasses.replace(CFG, dtype=dtype)
  params = _init(cfg)
  prompt_lens, steps = [3, 7, 5], 6
  seqs = [np.asarray(_tokens((n + steps,), seed=10 + b)) for b, n in enumerate(prompt_lens)]
  prefill_BxWxV, decoded = _decode_with_cache(params, cfg, seqs, prompt_lens, steps)
  # One query at a time is another program than L at once: its sums run in another
  # order. float32 agrees to rounding (used <5% of 1e-5, AVX-512 and AVX2); bfloat16's
  # 8-bit mantissa rounds each differently ordered product visibly (~4% of 5e-2 used).
  tol = 1e-5 if dtype == 'float32' else 5e-2
  # One uncached forward of all rows right-padded: causal, so padding changes nothing.
  padded_BxL = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
  for b, s in enumerate(seqs):
    padded_BxL[b, :len(s)] = s
  full_BxLxV = _apply(cfg)(params, padded_BxL)
  for b, (s, n) in enumerate(zip(seqs, prompt_lens)):
    full_LxV = full_BxLxV[b]
    np.testing.assert_allclose(prefill_BxWxV[b, :n], full_LxV[:n], atol=tol, rtol=0)
    for j in range(steps):
      np.testing.assert_allclose(decoded[j][b], full_LxV[n + j], atol=tol, rtol=0)


def test_cache_misuse_is_reported():
  params = _init()
  model = M.GPT2(CFG)
  # These raise at trace time; the last call is small enough to run eagerly.
  with pytest.raises(ValueError, match='do not fit a cache of 4 slots'):
    model.apply({'params': params}, _tokens((2, 5)), cache=M.init_cache(CFG, 2, 4))
  with pytest.raises(ValueError, match='cache keys have shape'):
    model.apply({'params': params}, _tokens((2, 3)), cache=M.init_cache(CFG, 3, 4))
  # A decode step past the cache cannot attend to its own key: NaN, not a wrong answer.
  cache = M.init_cache(CFG, 1, 4)
  logits, _ = model.apply({'params': params}, _tokens((1, 1)), positions_BxL=jnp.array([[4]]),
                          cache=cache)
  assert np.isnan(logits).all()


def test_bfloat16_computes_in_bfloat16_with_float32_params_and_logits():
  cfg = dataclasses.replace(CFG, dtype='bfloat16')
  params = _init(cfg)  # The bfloat16 model's own init (jitted, shared with the cache test).
  assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype('float32')}
  tokens_BxL = _tokens((2, 16))
  logits16 = _apply(cfg)(params, tokens_BxL)
  logits32 = _apply()(params, tokens_BxL)
  assert logits16.dtype == jnp.float32
  assert np.isfinite(logits16).all()
  assert 0 < np.abs(logits16 - logits32).max() < 0.1  # Rounded, yet the same function.
  jaxpr = str(jax.make_jaxpr(lambda p: M.GPT2(cfg).apply({'params': p}, tokens_BxL))(params))
  assert 'bf16' in jaxpr
  grads = jax.eval_shape(jax.grad(lambda p: _apply(cfg)(p, tokens_BxL).mean()), params)
  assert {x.dtype for x in jax.tree_util.tree_leaves(grads)} == {jnp.dtype('float32')}


@functools.partial(jax.jit, static_argnums=(0,))
def _dropped_out(cfg, params, tokens_BxL, seed):
  return M.GPT2(cfg).apply({'params': params}, tokens_BxL, deterministic=False,
                           rngs={'dropout': jax.random.key(seed)})


def test_dropout_is_active_only_when_not_deterministic():
  params = _init()
  tokens_BxL = _tokens((2, 8))
  run = lambda cfg, seed: _dropped_out(cfg, params, tokens_BxL, seed)
  assert np.abs(run(CFG, 0) - run(CFG, 1)).max() > 1e-3
  np.testing.assert_array_equal(run(CFG, 0), run(CFG, 0))
  no_dropout = dataclasses.replace(CFG, dropout=0.0)
  np.testing.assert_allclose(run(no_dropout, 0), _apply()(params, tokens_BxL), atol=1e-6)


def test_every_parameter_has_logical_names_and_shards_over_a_mesh():
  tokens_BxL = _tokens((4, 16))
  boxed = jax.eval_shape(M.GPT2(CFG).init, jax.random.key(0), tokens_BxL)
  specs = nn.get_partition_spec(boxed)
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  rules = common.parallel_config().rules
  # Auto axes: logical constraints are hints here, not assertions as under Explicit axes.
  mesh = jax.make_mesh((2, 2), ('data', 'model'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  init = jax.jit(M.GPT2(CFG).init, out_shardings=shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    variables = init(jax.random.key(0), tokens_BxL)
    wte = variables['params']['wte'].value
    assert wte.sharding.spec == jax.sharding.PartitionSpec('model', None)
    logits = jax.jit(M.GPT2(CFG).apply)(variables, tokens_BxL)
  expected = _apply()(_init(), tokens_BxL)
  np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)


def test_tiny_model_overfits_a_tiny_batch():
  model = M.GPT2(CFG)
  params = _init()
  tokens_BxL = _tokens((4, 17), seed=3)
  optimizer = optax.adamw(3e-3, weight_decay=0.0)

  def loss_fn(p, rng):
    logits = model.apply({'params': p}, tokens_BxL[:, :-1], deterministic=False,
                         rngs={'dropout': rng})
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens_BxL[:, 1:]).mean()

  @jax.jit
  def step(p, opt_state, rng):
    loss, grads = jax.value_and_grad(loss_fn)(p, rng)
    updates, opt_state = optimizer.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  opt_state = optimizer.init(params)
  losses = []
  for i in range(30):
    params, opt_state, loss = step(params, opt_state, jax.random.key(i))
    losses.append(float(loss))
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.5 * losses[0], losses


PADDED = dataclasses.replace(CFG, vocab_size=120, vocab_multiple=64)  # 128 embedding rows.


def test_vocab_padding_changes_no_logit_and_padding_rows_are_not_tokens():
  assert PADDED.padded_vocab == 128
  assert dataclasses.replace(PADDED, vocab_size=128).padded_vocab == 128
  params = _init(PADDED)
  assert params['wte'].shape == (128, CFG.d_model)
  unpadded = dataclasses.replace(PADDED, vocab_multiple=1)
  real = {**params, 'wte': params['wte'][:120]}
  # Padding rows start at zero; the real ones are what the unpadded model draws: the same
  # normals, elementwise, but from another program (the pad fuses in and the loops may
  # vectorize otherwise), so to a few ulps rather than to the bit.
  np.testing.assert_array_equal(params['wte'][120:], 0.0)
  for x, y in zip(jax.tree_util.tree_leaves(real), jax.tree_util.tree_leaves(_init(unpadded))):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=0)
  tokens_BxL = _tokens((2, 16), vocab=120)
  logits = _apply(PADDED)(params, tokens_BxL)
  assert logits.shape == (2, 16, 120)
  # Equal up to the matmul's blocking, which depends on the padded width.
  np.testing.assert_allclose(logits, _apply(unpadded)(real, tokens_BxL), atol=1e-5, rtol=0)
  # A padding row is no token: id 120 gives NaN as an id past the table does.
  bad_2x2 = jnp.array([[1, 2], [1, 120]])
  logits = _apply(PADDED)(params, bad_2x2)
  assert np.isfinite(logits[0]).all() and np.isnan(logits[1]).all()
  with pytest.raises(ValueError, match='vocab_multiple'):
    dataclasses.replace(CFG, vocab_multiple=0)


def test_padded_vocabulary_shards_where_the_real_one_cannot():
  """GPT-2's 50257 is odd: its rows split over no device count; padded ones do."""
  mesh = jax.make_mesh((1, 4), ('data', 'model'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = common.parallel_config().rules
  for cfg, splits in ((dataclasses.replace(CFG, vocab_size=122), False),
                      (dataclasses.replace(CFG, vocab_size=122, vocab_multiple=8), True)):
    specs = nn.get_partition_spec(M.abstract_params(cfg))
    sharding = nn.logical_to_mesh_sharding(specs, mesh, rules)['wte']
    assert sharding.spec == jax.sharding.PartitionSpec('model', None)
    assert (cfg.padded_vocab % 4 == 0) == splits
    if splits:
      wte = jax.device_put(np.zeros((cfg.padded_vocab, cfg.d_model), np.float32), sharding)
      assert wte.addressable_shards[0].data.shape == (cfg.padded_vocab // 4, cfg.d_model)
    else:
      with pytest.raises(ValueError, match='divisible|evenly'):
        jax.device_put(np.zeros((cfg.padded_vocab, cfg.d_model), np.float32), sharding)


def test_attention_dropout_is_set_apart_from_residual_dropout():
  params = _init()
  tokens_BxL = _tokens((2, 8))
  run = lambda cfg, seed: _dropped_out(cfg, params, tokens_BxL, seed)
  assert CFG.attn_dropout == CFG.dropout == 0.1
  attention_only = dataclasses.replace(CFG, dropout=0.0, attention_dropout=0.5)
  assert np.abs(run(attention_only, 0) - run(attention_only, 1)).max() > 1e-3
  residual_only = dataclasses.replace(CFG, attention_dropout=0.0)
  # Same residual masks, no attention masks: differs from dropping out both.
  assert np.abs(run(residual_only, 0) - run(CFG, 0)).max() > 1e-3
  with pytest.raises(ValueError, match='attention_dropout'):
    dataclasses.replace(CFG, attention_dropout=1.0)
  c = common.model_config('tiny')
  assert M.ModelConfig.from_config(c, 300).attention_dropout is None
  c.attention_dropout = 0.0
  assert M.ModelConfig.from_config(c, 300).attn_dropout == 0.0


@pytest.mark.skipif(jax.default_backend() == 'gpu', reason='checks the non-GPU message')
def test_training_takes_the_fused_path_when_only_attention_dropout_is_off():
  """cudnn attention has no dropout: with attention dropout 0, training can use it."""
  def train_forward(cfg):
    params = jax.eval_shape(M.GPT2(dataclasses.replace(cfg, attention='xla')).init,
                            jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params']
    return jax.eval_shape(functools.partial(M.GPT2(cfg).apply, deterministic=False),
                          {'params': params}, jnp.zeros((1, 4), jnp.int32),
                          rngs={'dropout': jax.random.key(0)})
  fused = dataclasses.replace(CFG, attention='cudnn', attention_dropout=0.0)
  with pytest.raises(ValueError, match='needs an NVIDIA GPU'):
    train_forward(fused)  # The fused kernel is chosen (and refused off GPU).
  assert train_forward(dataclasses.replace(fused, attention_dropout=None)).shape[-1] == 128


def test_fused_and_einsum_attention_draw_the_same_dropout_masks(monkeypatch):
  """Switching model.attention resumes a run as is: same function, same residual masks.
  The cuDNN kernel is swapped for XLA's implementation of the same call (no GPU here)."""
  fused_call = jax.nn.dot_product_attention
  monkeypatch.setattr(M.jax, 'default_backend', lambda: 'gpu')
  monkeypatch.setattr(M.jax.nn, 'dot_product_attention',
                      lambda *a, implementation=None, **k: fused_call(*a, **k))
  params, tokens_BxL = _init(), _tokens((2, 8))
  einsum = dataclasses.replace(CFG, attention_dropout=0.0)
  fused = dataclasses.replace(einsum, attention='cudnn')
  a, b = (_dropped_out(cfg, params, tokens_BxL, 0) for cfg in (einsum, fused))
  np.testing.assert_allclose(a, b, atol=1e-5)
  assert np.abs(a - _dropped_out(einsum, params, tokens_BxL, 1)).max() > 1e-3


@pytest.mark.parametrize('rate', [0.1, 0.5, 1 / 3, 0.999])
@pytest.mark.parametrize('shape', [(7,), (3, 5, 11), (2, 4, 16, 16)])
def test_dropout_masks_are_flax_masks_bit_for_bit(rate, shape):
  """collab.dropout's fused threefry draws exactly jax.random.bernoulli's bits."""
  x = jax.random.normal(jax.random.key(2), shape)
  for seed in range(3):
    rngs = {'dropout': jax.random.fold_in(jax.random.key(7), seed)}
    ours = jax.jit(lambda x, r: dropout.Dropout(rate).apply({}, x, False, rngs=r))(x, rngs)
    flax_ = nn.Dropout(rate).apply({}, x, deterministic=False, rngs=rngs)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(flax_))


def test_dropout_falls_back_to_jax_for_other_keys():
  """A non-threefry key takes jax.random.bernoulli itself: the same masks as flax."""
  x = jnp.ones((4, 64))
  rngs = {'dropout': jax.random.key(3, impl='rbg')}
  ours = dropout.Dropout(0.25).apply({}, x, False, rngs=rngs)
  np.testing.assert_array_equal(ours, nn.Dropout(0.25).apply({}, x, deterministic=False,
                                                             rngs=rngs))


def test_model_dropout_matches_flax_dropout():
  """The model draws the masks flax's nn.Dropout would: training is unchanged."""
  params, tokens_BxL = _init(), _tokens((2, 16))
  rngs = {'dropout': jax.random.key(5)}
  run = jax.jit(lambda p: M.GPT2(CFG).apply({'params': p}, tokens_BxL,
                                             deterministic=False, rngs=rngs))
  ours = run(params)
  original = dropout.Dropout
  try:
    dropout.Dropout = nn.Dropout
    theirs = jax.jit(lambda p: M.GPT2(CFG).apply({'params': p}, tokens_BxL,
                                                 deterministic=False, rngs=rngs))(params)
  finally:
    dropout.Dropout = original
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_mlp_products_over_rows_keep_the_3d_einsum_bits():
  """Mlp multiplies [B * L, D] rows (no weight-gradient transpose on the CPU): its output
  and gradients are bit for bit those of the [B, L, D] einsums it replaced."""
  cfg = dataclasses.replace(CFG, dropout=0.0)
  mlp = M.Mlp(cfg)
  x_BxLxD = jax.random.normal(jax.random.key(0), (4, 16, cfg.d_model))
  params = nn.meta.unbox(mlp.init(jax.random.key(1), x_BxLxD, True)['params'])

  def einsum_mlp(p, x):
    h = jax.nn.gelu(jnp.einsum('bld,df->blf', x, p['c_fc_kernel']) + p['c_fc_bias'],
                    approximate=True)
    return jnp.einsum('blf,fd->bld', h, p['c_proj_kernel']) + p['c_proj_bias']

  def loss(fn):
    return jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(fn(p, x) ** 2), argnums=(0, 1)))
  ours = loss(lambda p, x: mlp.apply({'params': p}, x, True))(params, x_BxLxD)
  theirs = loss(einsum_mlp)(params, x_BxLxD)
  jax.tree.map(np.testing.assert_array_equal, ours, theirs)
