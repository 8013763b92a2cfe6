"""Optimizer, schedule and the pure train/eval steps on a tiny GPT-2."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from collab import steps
from configs import common
from tests.multihost_worker import SEQ_LEN, tiny_setup

B = 4


def _train_cfg(**overrides):
  cfg = common.train_config()
  cfg.update(overrides)
  return cfg


def _batch(seed=0, rows=B, weights=None):
  tokens = np.random.RandomState(seed).randint(0, 128, (rows, SEQ_LEN)).astype(np.int32)
  batch = {'tokens': tokens}
  if weights is not None:
    batch['weights'] = np.asarray(weights, np.float32)
  return batch


@pytest.fixture(scope='module')
def setup():
  _, model, optimizer = tiny_setup()
  init = jax.jit(functools.partial(steps.init_state, model=model, optimizer=optimizer,
                                   seq_len=SEQ_LEN))
  step = jax.jit(functools.partial(steps.train_step, model=model, optimizer=optimizer))
  evaluate = jax.jit(functools.partial(steps.eval_step, model=model))
  return model, optimizer, init(jax.random.key(0)), step, evaluate


def test_schedule_known_values_and_optax_reference():
  cfg = _train_cfg(learning_rate=1e-3, warmup_steps=10, min_lr_ratio=0.1)
  schedule = steps.make_schedule(cfg, total_steps=110)
  assert float(schedule(0)) == 0.0
  assert math.isclose(float(schedule(5)), 5e-4, rel_tol=1e-6)
  assert math.isclose(float(schedule(10)), 1e-3, rel_tol=1e-6)
  assert math.isclose(float(schedule(60)), 1e-4 + 0.9e-3 * 0.5, rel_tol=1e-5)  # Half-way.
  assert math.isclose(float(schedule(110)), 1e-4, rel_tol=1e-5)
  assert math.isclose(float(schedule(500)), 1e-4, rel_tol=1e-5)  # Stays at the floor.
  reference = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 110, end_value=1e-4)
  ours = np.array([schedule(s) for s in range(120)])
  np.testing.assert_allclose(ours, [reference(s) for s in range(120)], rtol=1e-5, atol=1e-9)
  assert np.all(np.diff(ours[10:111]) <= 0) and np.all(np.diff(ours[:11]) > 0)


def test_schedule_warmup_is_capped_and_zero_warmup_starts_at_peak():
  capped = steps.make_schedule(_train_cfg(learning_rate=1e-3, warmup_steps=50), total_steps=20)
  assert math.isclose(float(capped(10)), 5e-4, rel_tol=1e-6)
  assert math.isclose(float(capped(20)), 1e-3, rel_tol=1e-6)
  no_warmup = steps.make_schedule(_train_cfg(learning_rate=1e-3, warmup_steps=0), total_steps=20)
  assert math.isclose(float(no_warmup(0)), 1e-3, rel_tol=1e-6)
  assert math.isclose(float(no_warmup(20)), 0.0, abs_tol=1e-12)
  with pytest.raises(ValueError, match='total_steps'):
    steps.make_schedule(_train_cfg(), total_steps=0)


def test_optimizer_config_errors():
  with pytest.raises(ValueError, match="'adam'"):
    steps.make_optimizer(_train_cfg(optimizer='adam'), 10)
  with pytest.raises(ValueError, match='grad_clip'):
    steps.make_optimizer(_train_cfg(grad_clip=-1.0), 10)


def test_decay_mask_excludes_biases_and_layernorm(setup):
  model = setup[0]
  boxed = jax.eval_shape(model.init, jax.random.key(0),
                         jnp.zeros((1, SEQ_LEN), jnp.int32))['params']
  mask = steps.decay_mask(nn.meta.unbox(boxed))
  flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
  assert flat["['wte']"] and flat["['wpe']"] and flat["['h_0']['mlp']['c_fc_kernel']"]
  assert flat["['h_1']['attn']['c_attn_kernel']"]
  for name, decays in flat.items():
    if 'bias' in name or 'ln_' in name:
      assert not decays, name
  assert not flat["['h_0']['attn']['c_attn_bias']"]  # [3, H, K]: rank alone would decay it.
  # The boxed tree (what sharded init hands the optimizer) gets the same decisions.
  boxed_mask = nn.meta.unbox(steps.decay_mask(boxed))
  assert jax.tree_util.tree_leaves(boxed_mask) == jax.tree_util.tree_leaves(mask)


def test_weight_decay_applies_only_where_masked(setup):
  params = setup[2]['params']
  cfg = _train_cfg(learning_rate=0.1, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.5)
  optimizer = steps.make_optimizer(cfg, 10)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  update = jax.jit(lambda p: optax.apply_updates(p, optimizer.update(zeros, optimizer.init(p),
                                                                    p)[0]))
  new = update(params)
  mask = steps.decay_mask(params)
  for p, n, m in zip(*(jax.tree_util.tree_leaves(t) for t in (params, new, mask))):
    np.testing.assert_allclose(n, p * (1 - 0.1 * 0.5) if m else p, rtol=1e-6)


def test_sgd_is_plain_gradient_descent(setup):
  model, _, state, _, _ = setup
  cfg = _train_cfg(optimizer='sgd', learning_rate=0.1, warmup_steps=0, min_lr_ratio=1.0,
                   grad_clip=0.0)
  optimizer = steps.make_optimizer(cfg, 10)
  state = {**state, 'opt_state': optimizer.init(state['params'])}
  batch = _batch(1)
  new, metrics = jax.jit(functools.partial(steps.train_step, model=model, optimizer=optimizer))(
      state, batch, jax.random.key(0))

  def mean_loss(params):
    loss_sum, count = steps.loss_sums(params, batch, model=model)
    return loss_sum / count
  grads = jax.jit(jax.grad(mean_loss))(state['params'])
  expected = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, state['params'], grads)
  for e, n in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(new['params'])):
    np.testing.assert_allclose(n, e, rtol=1e-5, atol=1e-7)
  assert math.isclose(float(metrics['lr']), 0.1, rel_tol=1e-6)


def test_train_steps_reduce_loss_and_report_metrics(setup):
  _, _, state, step, evaluate = setup
  batch = _batch(2)
  before = evaluate(state['params'], batch)
  metrics = []
  for _ in range(4):
    state, m = step(state, batch, jax.random.key(1))
    metrics.append(m)
  after = evaluate(state['params'], batch)
  assert int(state['step']) == 4
  assert float(before[1]) == float(after[1]) == B * (SEQ_LEN - 1)
  assert float(after[0]) < 0.97 * float(before[0])
  train_cfg = tiny_setup()[0]
  schedule = steps.make_schedule(train_cfg, 5)
  for i, m in enumerate(metrics):
    assert math.isclose(float(m['lr']), float(schedule(i)), rel_tol=1e-6, abs_tol=1e-12)
    assert float(m['tokens']) == B * (SEQ_LEN - 1) and float(m['grad_norm']) > 0


def test_eval_step_is_weighted_cross_entropy(setup):
  model, _, state, _, evaluate = setup
  batch = _batch(3, weights=[1.0, 0.0, 2.0, 1.0])
  loss_sum, count = evaluate(state['params'], batch)
  logits = np.asarray(model.apply({'params': state['params']}, batch['tokens']), np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp[:, :-1], batch['tokens'][:, 1:, None], -1)[..., 0]
  np.testing.assert_allclose(float(loss_sum), (nll.sum(1) * batch['weights']).sum(), rtol=1e-5)
  assert float(count) == 4 * (SEQ_LEN - 1)
  assert math.isclose(steps.perplexity(loss_sum, count),
                      math.exp(float(loss_sum) / float(count)), rel_tol=1e-12)
  with pytest.raises(ValueError, match='token count'):
    steps.perplexity(0.0, 0)


def test_zero_weight_rows_do_not_affect_the_update(setup):
  _, _, state, step, _ = setup
  real = _batch(4)['tokens']
  weights = np.array([1, 1, 0, 0], np.float32)
  a = {'tokens': np.concatenate([real[:2], _batch(5)['tokens'][:2]]), 'weights': weights}
  b = {'tokens': np.concatenate([real[:2], _batch(6)['tokens'][:2]]), 'weights': weights}
  new_a, ma = step(state, a, jax.random.key(0))
  new_b, mb = step(state, b, jax.random.key(0))
  assert float(ma['tokens']) == 2 * (SEQ_LEN - 1)
  np.testing.assert_array_equal(ma['loss_sum'], mb['loss_sum'])
  for x, y in zip(jax.tree_util.tree_leaves(new_a), jax.tree_util.tree_leaves(new_b)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-8)


def test_nan_loss_is_reported_with_its_step(setup):
  _, _, state, step, _ = setup
  batch = _batch(8)
  batch['tokens'][0, 3] = 1000  # Outside the vocabulary: the model returns NaN logits.
  _, metrics = step(state, batch, jax.random.key(0))
  assert not math.isfinite(float(metrics['loss_sum']))
  with pytest.raises(steps.NonFiniteLossError, match='step 7'):
    steps.check_finite(metrics, 7)
  steps.check_finite({'loss_sum': np.float32(2.0)}, 8)  # Finite: no error.


def _padded_and_real_models():
  """(padded, unpadded, params, real_params): GPT-2s over a 120-token vocabulary with the
  embedding padded to 128 rows and not; the padded model's initial parameters, and the
  same numbers without the padding rows, so that only the programs differ."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from collab import model as model_lib  # pylint: disable=g-import-not-at-top
  _, model, optimizer = tiny_setup()
  padded = model_lib.GPT2(dataclasses.replace(model.config, vocab_size=120, vocab_multiple=64))
  unpadded = model_lib.GPT2(dataclasses.replace(padded.config, vocab_multiple=1))
  init = lambda m: jax.jit(functools.partial(steps.init_state, model=m, optimizer=optimizer,
                                             seq_len=SEQ_LEN))(jax.random.key(0))['params']
  params, real_init = init(padded), init(unpadded)
  assert params['wte'].shape == (128, 32)
  np.testing.assert_array_equal(params['wte'][120:], 0.0)  # jnp.pad's zeros, one program.
  # Both draw the same [120, D] normals elementwise; the padded program fuses the pad in
  # and may vectorize its loops otherwise: equal to a few ulps, not necessarily the bit.
  np.testing.assert_allclose(params['wte'][:120], real_init['wte'], rtol=1e-6, atol=0)
  return padded, unpadded, params, {**params, 'wte': params['wte'][:120]}


@pytest.fixture(scope='module')
def padded_and_real():
  """_padded_and_real_models(), built (and its init checked) once for the tests below."""
  return _padded_and_real_models()


def _assert_equal_to_rounding(padded_tree, real_tree, atol_scale):
  """Leaf by leaf, wte cut to its real rows: |a - b| <= 1e-5 |b| + atol_scale max |b|."""
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(padded_tree),
                          jax.tree_util.tree_leaves(real_tree)):
    np.testing.assert_allclose(np.asarray(a)[:b.shape[0]], b, rtol=1e-5,
                               atol=atol_scale * float(np.abs(b).max()),
                               err_msg=jax.tree_util.keystr(path))


def test_padded_vocabulary_computes_what_the_real_one_does(padded_and_real):
  """Same logits (vocab_size wide), loss and gradients; padding rows get exactly none."""
  padded, unpadded, params, real = padded_and_real
  batch = {'tokens': _batch(1)['tokens'] % 120,
           'weights': np.array([1., 2., 0., 1.], np.float32)}
  out = {}
  for name, m, p in (('padded', padded, params), ('unpadded', unpadded, real)):
    fn = functools.partial(steps.loss_sums, model=m)
    out[name] = (jax.jit(m.apply)({'params': p}, batch['tokens']),
                 *jax.jit(jax.value_and_grad(fn, has_aux=True))(p, batch))
  (logits, (loss, count), grads), (real_logits, (real_loss, real_count), real_grads) = (
      out['padded'], out['unpadded'])
  assert logits.shape == real_logits.shape == (B, SEQ_LEN, 120)
  assert float(count) == float(real_count) == 4 * (SEQ_LEN - 1)
  # Each logit is one D=32 dot product, each loss a sum of 60 log-sum-exps over V: other
  # shapes add them in another order, ~1e-7 relative; the bounds leave 100x room, while
  # padding in the softmax (8 more classes of 128) would move them by percents.
  np.testing.assert_allclose(logits, real_logits, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss, real_loss, rtol=1e-5)
  # Exactly zero, within one program: the sliced-off logits' cotangent is 0 and no token
  # looks a padding row up, so a padding row that receives anything has leaked.
  np.testing.assert_array_equal(grads['wte'][120:], 0.0)
  # Gradients are sums over the B x L positions (and over V or D), reordered by the other
  # shapes: ~4e-7 of the leaf's largest entry where such reordering was measured (chunked
  # vs whole loss); atol bounds entries that cancel to ~0, where relative bounds mean
  # nothing. Padding in the softmax moves some gradients by 4e3 times this bound.
  _assert_equal_to_rounding(grads, real_grads, atol_scale=1e-5)


def test_padded_vocabulary_trains_like_the_real_one(padded_and_real):
  """One SGD step lands where the unpadded one does; AdamW with weight decay keeps the
  padding rows at exactly 0 and follows the unpadded losses."""
  padded, unpadded, params, real = padded_and_real
  sgd = steps.make_optimizer(_train_cfg(optimizer='sgd', warmup_steps=0, learning_rate=0.5), 10)
  adamw = steps.make_optimizer(_train_cfg(warmup_steps=0, learning_rate=0.05), 10)
  assert _train_cfg().weight_decay > 0 and steps.decay_mask(params)['wte']
  runs = {}
  for name, m, p in (('padded', padded, params), ('unpadded', unpadded, real)):
    for opt_name, opt, n in (('sgd', sgd, 1), ('adamw', adamw, 3)):
      step = jax.jit(functools.partial(steps.train_step, model=m, optimizer=opt))
      st, losses = {'step': jnp.zeros((), jnp.int32), 'params': p, 'opt_state': opt.init(p)}, []
      for i in range(n):
        st, metrics = step(st, {'tokens': _batch(i)['tokens'] % 120}, jax.random.key(1))
        losses.append(float(metrics['loss_sum']))
      runs[name, opt_name] = st['params'], losses
  # SGD moves a parameter by lr x its (clipped) gradient, nothing divides by a tiny number:
  # the gradients' rounding carries over unamplified, so the gradients' bound holds.
  sgd_params = runs['padded', 'sgd'][0]
  np.testing.assert_array_equal(sgd_params['wte'][120:], 0.0)
  _assert_equal_to_rounding(sgd_params, runs['unpadded', 'sgd'][0], atol_scale=1e-5)
  # AdamW: no gradient, no moments, no update, and decay of 0 is 0: exactly 0, one program.
  adamw_wte = runs['padded', 'adamw'][0]['wte']
  np.testing.assert_array_equal(adamw_wte[120:], 0.0)
  assert np.abs(adamw_wte[:120] - params['wte'][:120]).min() > 0  # Every real entry moved.
  # Not AdamW's parameters: Adam divides by sqrt(v), so where a gradient is ~0 a last-bit
  # difference between the two programs' products grows into an update difference of up
  # to ~lr (4.2e-4 on an AVX2 EPYC after these 3 steps). The loss barely depends on those
  # entries (to first order it moves by gradient x change, ~0), so the losses still agree
  # to float32 rounding, as above.
  np.testing.assert_allclose(runs['padded', 'adamw'][1], runs['unpadded', 'adamw'][1],
                             rtol=1e-5)


_CHUNK_BATCH = {'tokens': _batch(0)['tokens'] % 120,
                'weights': np.array([1., 0., 2., 1.], np.float32)}


def _chunk_grads(model, params):
  """(loss, count) and gradients on _CHUNK_BATCH with dropout on (key 3)."""
  fn = functools.partial(steps.loss_sums, model=model, deterministic=False,
                         dropout_rng=jax.random.key(3))
  (loss, count), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params, _CHUNK_BATCH)
  return (float(loss), float(count)), grads


def _chunk_sgd(model, params):
  """(parameters, last loss) after 3 SGD steps (lr 0.5, dropout on) from `params`."""
  sgd = steps.make_optimizer(_train_cfg(optimizer='sgd', warmup_steps=0, learning_rate=0.5), 10)
  step = jax.jit(functools.partial(steps.train_step, model=model, optimizer=sgd))
  st = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': sgd.init(params)}
  for i in range(3):
    st, metrics = step(st, {'tokens': _batch(i)['tokens'] % 120}, jax.random.key(1))
  return st['params'], float(metrics['loss_sum'])


@pytest.fixture(scope='module')
def whole_logits_reference(padded_and_real):
  """The unpadded whole-logits GPT-2 with dropout 0.1 from padded_and_real's real
  parameters: its config, loss and gradients, and where 3 SGD steps take it. One
  reference for both chunked variants below (the padded whole model equals it to rounding:
  the padded-vocabulary tests above)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from collab import model as model_lib  # pylint: disable=g-import-not-at-top
  _, model, _ = tiny_setup(dropout=0.1)
  config = dataclasses.replace(model.config, vocab_size=120)
  whole = model_lib.GPT2(config)
  real = padded_and_real[3]
  return config, _chunk_grads(whole, real), _chunk_sgd(whole, real)


@pytest.mark.parametrize('vocab_multiple', [1, 64])
def test_chunked_loss_equals_whole_logits_loss_and_trains_alike(vocab_multiple, padded_and_real,
                                                               whole_logits_reference):
  """Chunks that do not divide L (padded), padded vocabulary or not: same loss,
  same gradients, same trajectory as the unpadded whole-logits model."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from collab import model as model_lib  # pylint: disable=g-import-not-at-top
  config, (whole_loss, whole_grads), (whole_params, whole_last) = whole_logits_reference
  # The same numbers either way: the padded parameters are the real ones plus zero rows.
  params = padded_and_real[2] if vocab_multiple == 64 else padded_and_real[3]
  base = dataclasses.replace(config, vocab_multiple=vocab_multiple)
  chunked = model_lib.GPT2(dataclasses.replace(base, loss_chunk=5))
  assert chunked.config.padded_vocab == params['wte'].shape[0]
  assert SEQ_LEN % 5 != 0  # The last chunk is padded.
  chunked_loss, chunked_grads = _chunk_grads(chunked, params)
  # Chunks reorder the sums of the loss (~2e-7 relative measured) and of the gradients
  # (~4e-7 of a leaf's largest entry): bounds with room for other CPUs' kernels, scaled
  # to each leaf since these summed gradients reach ~15 (a fixed atol of 1e-6 was a
  # third used). A padded wte is compared on its real rows.
  np.testing.assert_allclose(chunked_loss, whole_loss, rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(chunked_grads),
                  jax.tree_util.tree_leaves(whole_grads)):
    np.testing.assert_allclose(np.asarray(a)[:b.shape[0]], b, rtol=1e-4,
                               atol=1e-5 * float(np.abs(b).max()))
  # SGD: AdamW's m / sqrt(v) would blow float32 reordering up where a gradient is ~0.
  chunked_params, chunked_last = _chunk_sgd(chunked, params)
  assert chunked_last == pytest.approx(whole_last, rel=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(chunked_params),
                  jax.tree_util.tree_leaves(whole_params)):
    np.testing.assert_allclose(np.asarray(a)[:b.shape[0]], b, atol=1e-5)
  with pytest.raises(ValueError, match='loss_chunk'):
    dataclasses.replace(base, loss_chunk=-1)


def test_a_chunk_longer_than_the_rows_is_one_chunk_of_the_row():
  import dataclasses  # pylint: disable=g-import-not-at-top
  cfg = dataclasses.replace(tiny_setup()[1].config, loss_chunk=SEQ_LEN)
  x_BxLxD = jax.random.normal(jax.random.key(0), (2, SEQ_LEN, cfg.d_model))
  wte_VxD = jax.random.normal(jax.random.key(1), (cfg.vocab_size, cfg.d_model))
  labels_BxL = jax.random.randint(jax.random.key(2), (2, SEQ_LEN), 0, cfg.vocab_size)
  exact = steps.chunked_nll(x_BxLxD, wte_VxD, labels_BxL, cfg)
  long = steps.chunked_nll(x_BxLxD, wte_VxD, labels_BxL,
                           dataclasses.replace(cfg, loss_chunk=4 * SEQ_LEN))
  np.testing.assert_array_equal(long, exact)
  lowered = jax.jit(functools.partial(steps.chunked_nll, config=dataclasses.replace(
      cfg, loss_chunk=4 * SEQ_LEN))).lower(x_BxLxD, wte_VxD, labels_BxL).as_text()
  assert f'2x{SEQ_LEN}x{cfg.vocab_size}xf32' in lowered  # The row's logits, no padding.
  assert f'x{4 * SEQ_LEN}x{cfg.vocab_size}x' not in lowered
