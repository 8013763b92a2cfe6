"""Tests for collab.evals.perplexity: exact sums and counts, independent of batching."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collab import model as model_lib
from collab.evals import perplexity

CFG = model_lib.ModelConfig(vocab_size=101, num_layers=2, num_heads=4, d_model=32,
                            d_ff=128, max_len=64, dropout=0.0)
L = 16


@pytest.fixture(scope='module')
def model_and_params():
  model = model_lib.GPT2(CFG)
  # Jitted: Flax dispatched op by op costs seconds here and below.
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, L), jnp.int32))['params']
  return model, params


@pytest.fixture(scope='module')
def blocks():
  rng = np.random.default_rng(0)
  # uint16 like the built data folder; 7 and 3 blocks so batches end part-full.
  return {'alpha': rng.integers(0, CFG.vocab_size, (7, L)).astype(np.uint16),
          'beta': rng.integers(0, CFG.vocab_size, (3, L)).astype(np.uint16)}


def numpy_nll_sum(model, params, blocks_NxL):
  """Sum of next-token negative log-likelihoods, in float64 from the model's logits."""
  logits = np.asarray(jax.jit(model.apply)({'params': params},
                                           jnp.asarray(blocks_NxL, jnp.int32)),
                      np.float64)[:, :-1]
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  targets = blocks_NxL[:, 1:].astype(np.int64)
  return -np.take_along_axis(logp, targets[..., None], axis=-1).sum()


def test_matches_direct_numpy_computation(model_and_params, blocks):
  model, params = model_and_params
  got = perplexity.evaluate(params, model, blocks, batch_size=4, progress=False)
  assert set(got) == {'alpha', 'beta', 'pooled'}
  sums = {name: numpy_nll_sum(model, params, b) for name, b in blocks.items()}
  for name, b in blocks.items():
    assert got[name]['tokens'] == len(b) * (L - 1)
    np.testing.assert_allclose(got[name]['loss_sum'], sums[name], rtol=1e-5)
    np.testing.assert_allclose(got[name]['perplexity'],
                               math.exp(sums[name] / (len(b) * (L - 1))), rtol=1e-5)
  pooled_tokens = 10 * (L - 1)
  assert got['pooled']['tokens'] == pooled_tokens
  np.testing.assert_allclose(got['pooled']['perplexity'],
                             math.exp(sum(sums.values()) / pooled_tokens), rtol=1e-5)


def test_invariant_to_batch_size(model_and_params, blocks):
  model, params = model_and_params
  runs = [perplexity.evaluate(params, model, blocks, batch_size=b, progress=False)
          for b in (1, 4, 6, 16)]  # Rounded up to 4 devices: 4, 4, 8, 16.
  for run in runs[1:]:
    for name in ('alpha', 'beta', 'pooled'):
      assert run[name]['tokens'] == runs[0][name]['tokens']
      np.testing.assert_allclose(run[name]['loss_sum'], runs[0][name]['loss_sum'],
                                 rtol=1e-6)


def test_empty_participant_is_reported_not_pooled(model_and_params, blocks):
  model, params = model_and_params
  got = perplexity.evaluate(params, model, {**blocks, 'gamma': np.zeros((0, L), np.uint16)},
                            batch_size=4, progress=False)
  assert got['gamma'] == {'loss_sum': 0.0, 'tokens': 0, 'perplexity': None,
                          'block_losses': []}
  assert got['pooled']['tokens'] == 10 * (L - 1)


@pytest.mark.parametrize('bad, message', [
    ({'pooled': np.zeros((2, L), np.int32)}, 'reserved'),
    ({'alpha': np.zeros((L,), np.int32)}, r'\[N, L\]'),
    ({'alpha': np.zeros((0, L), np.int32)}, 'No validation blocks'),
])
def test_bad_input_is_rejected(model_and_params, bad, message):
  model, params = model_and_params
  with pytest.raises(ValueError, match=message):
    perplexity.evaluate(params, model, bad, batch_size=4, progress=False)


def test_block_losses_are_each_blocks_mean_loss(model_and_params, blocks):
  """One mean loss per block, in block order: they average to the participant's loss."""
  model, params = model_and_params
  got = perplexity.evaluate(params, model, blocks, batch_size=3, progress=False)
  for name, tokens_NxL in blocks.items():
    losses = got[name]['block_losses']
    assert len(losses) == len(tokens_NxL)
    np.testing.assert_allclose(np.mean(losses), got[name]['loss_sum'] / got[name]['tokens'],
                               rtol=1e-6)
    one = perplexity.evaluate(params, model, {name: tokens_NxL[1:2]}, batch_size=4,
                              progress=False)
    np.testing.assert_allclose(one[name]['block_losses'][0], losses[1], rtol=1e-5)
  assert 'block_losses' not in got['pooled']


def test_evaluating_again_reuses_the_compiled_step(model_and_params, blocks, monkeypatch):
  """A run validates every few steps: an equal model must not trace the step again."""
  model, params = model_and_params
  original, traces = perplexity.row_sums, []

  def counted(params, batch, *, model):
    traces.append(1)
    return original(params, batch, model=model)
  monkeypatch.setattr(perplexity, 'row_sums', counted)
  first = perplexity.evaluate(params, model, blocks, 4, progress=False)
  again = perplexity.evaluate(params, model_lib.GPT2(model.config), blocks, 4, progress=False)
  assert len(traces) == 1
  assert first == again
