"""Tests for collab.evals.generation.sampling: cached decoding against full recomputation, processors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collab import model as model_lib
from collab.evals.generation import decode_loop
from collab.evals.generation import processors
from collab.evals.generation import sampling

CFG = model_lib.ModelConfig(vocab_size=97, num_layers=2, num_heads=4, d_model=32, d_ff=128,
                            max_len=64, dropout=0.0)
LENGTHS = (1, 3, 7, 12, 20, 5)
NEW = 10


def peaked_params(cfg):
  # Wider than GPT-2's init (embeddings most) so logits are peaked and prompts diverge.
  shapes = nn.meta.unbox(model_lib.abstract_params(cfg))
  leaves = jax.tree_util.tree_flatten_with_path(shapes)[0]
  keys = jax.random.split(jax.random.key(0), len(leaves))
  arrays = [(1.0 if 'wte' in jax.tree_util.keystr(path) else 0.1)
            * jax.random.normal(k, leaf.shape) for k, (path, leaf) in zip(keys, leaves)]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shapes), arrays)


@pytest.fixture(scope='module')
def params():
  return peaked_params(CFG)


@pytest.fixture(scope='module')
def prompts():
  rng = np.random.default_rng(0)
  return [rng.integers(0, CFG.vocab_size, size=n).tolist() for n in LENGTHS]


def naive_greedy(params, prompts, new_tokens, penalty=1.0, cfg=CFG):
  """Full no-cache forward of every sequence at every step; numpy penalty and argmax."""
  forward = jax.jit(lambda t: model_lib.GPT2(cfg).apply({'params': params}, t))
  seqs = [list(p) for p in prompts]
  for _ in range(new_tokens):
    tokens_BxL = np.zeros((len(seqs), cfg.max_len), np.int32)
    for b, s in enumerate(seqs):
      tokens_BxL[b, :len(s)] = s
    logits_BxLxV = np.asarray(forward(tokens_BxL))
    for b, s in enumerate(seqs):
      logits_V = logits_BxLxV[b, len(s) - 1].astype(np.float64)
      seen = np.zeros(cfg.vocab_size, bool)
      seen[s] = True
      logits_V = np.where(seen & (logits_V > 0), logits_V / penalty,
                          np.where(seen, logits_V * penalty, logits_V))
      s.append(int(np.argmax(logits_V)))
  return [s[len(p):] for s, p in zip(seqs, prompts)]


def gen(params, prompts, **kw):
  kw = {'key': jax.random.key(7), 'max_new_tokens': NEW, 'batch_size': 8,
        'progress': False, **kw}
  return sampling.generate(params, CFG, prompts, **kw)


@pytest.fixture(scope='module')
def greedy(params, prompts):
  return gen(params, prompts, temperature=0.0)


def test_cached_greedy_equals_full_recompute(params, prompts, greedy):
  assert greedy == naive_greedy(params, prompts, NEW)
  assert len({tuple(g) for g in greedy}) > 1  # The prompts really lead different ways.


def test_cache_grows_between_chunks_and_still_equals_full_recompute(monkeypatch):
  # max_len 128: the 33-token prompt starts with a 64-slot cache, which grows twice.
  cfg = model_lib.ModelConfig(**{**CFG.__dict__, 'max_len': 128})
  params = peaked_params(cfg)
  rng = np.random.default_rng(4)
  prompts = [rng.integers(0, cfg.vocab_size, size=n).tolist() for n in (33, 1, 9, 20)]
  grown, grow = [], decode_loop.grow_cache
  monkeypatch.setattr(decode_loop, 'grow_cache',
                      lambda s, cache_len: (grown.append(cache_len), grow(s, cache_len))[1])
  got = sampling.generate(params, cfg, prompts, key=jax.random.key(0), max_new_tokens=70,
                          temperature=0.0, batch_size=4, progress=False)
  assert grown == [96, 128]
  assert got == naive_greedy(params, prompts, 70, cfg=cfg)


def test_repetition_penalty_tracks_prompt_and_generated_tokens(params, prompts):
  got = gen(params, prompts, temperature=0.0, repetition_penalty=3.0, chunk_size=4)
  assert got == naive_greedy(params, prompts, NEW, penalty=3.0)


SAMPLED = {'temperature': 1.0, 'top_p': 0.9}


@pytest.fixture(scope='module')
def sampled(params, prompts):
  return gen(params, prompts, **SAMPLED)


def test_same_key_same_samples_whatever_the_batching(params, prompts, sampled):
  assert sampled == gen(params, prompts, **SAMPLED)
  assert sampled == gen(params, prompts, batch_size=2, chunk_size=3, **SAMPLED)
  assert sampled != gen(params, prompts, **{**SAMPLED, 'key': jax.random.key(8)})
  # A raw uint32[2] key (jax.random.PRNGKey) is the same key, on any number of devices.
  assert len(jax.devices()) == 4
  assert sampled == gen(params, prompts, **{**SAMPLED, 'key': jax.random.PRNGKey(7)})


def test_shrinking_the_batch_changes_no_sample(params, monkeypatch):
  lengths = (62, 61, 60, 59, 58, 57, 5, 6)  # Budgets max_len - length end rows early.
  rng = np.random.default_rng(3)
  prompts = [rng.integers(0, CFG.vocab_size, size=n).tolist() for n in lengths]
  whole = gen(params, prompts, chunk_size=NEW, **SAMPLED)  # One chunk: nothing to shrink.
  assert [len(w) for w in whole] == [min(NEW, CFG.max_len - n) for n in lengths]
  shrinks, take_rows = [], decode_loop.take_rows
  monkeypatch.setattr(decode_loop, 'take_rows',
                      lambda s, rows: (shrinks.append(len(rows)), take_rows(s, rows))[1])
  assert gen(params, prompts, chunk_size=2, **SAMPLED) == whole
  assert shrinks and shrinks[0] < 8
  if jax.device_count() == 4:  # 8 rows -> 4 once 2 are left (no smaller split over 4).
    assert shrinks == [4]


def test_top_k_1_equals_greedy(params, prompts, greedy):
  assert gen(params, prompts, temperature=1.3, top_k=1) == greedy


def test_end_of_text_ends_a_row(params, prompts, sampled):
  # Row r's step-t draw depends only on (key, r, t), so ending rows early changes no
  # token before the end; chunk_size=2 also shrinks the batch as rows finish.
  eot = sampled[0][3]
  got = gen(params, prompts, eot_id=eot, chunk_size=2, **SAMPLED)
  assert got == [g[:g.index(eot)] if eot in g else g for g in sampled]
  assert len(got[0]) <= 3


class CharTokenizer:
  """Token i decodes to a fixed 1-2 character string, so stop strings can span tokens."""
  TABLE = [chr(ord('a') + i % 26) + ('\n' if i % 5 == 0 else '') for i in range(97)]

  def __init__(self, prompts=()):
    self.known = {self.decode(p): p for p in prompts}  # decode is not injective.

  def decode(self, ids, **_):
    return ''.join(self.TABLE[i] for i in ids)

  def encode(self, text, **_):
    return self.known[text]


def shortest_prefix_with(tokens, stops, tok):
  for n in range(1, len(tokens) + 1):
    if any(s in tok.decode(tokens[:n]) for s in stops):
      return tokens[:n]
  return tokens


def test_stop_strings_cut_tokens_and_text(params, prompts, sampled):
  tok = CharTokenizer(prompts)
  stops = (tok.decode(sampled[1][4:6]), tok.decode(sampled[3][2:3]))
  got = gen(params, prompts, stop_strings=stops, tokenizer=tok, chunk_size=3, **SAMPLED)
  assert got == [shortest_prefix_with(g, stops, tok) for g in sampled]
  assert len(got[1]) <= 6 and len(got[3]) <= 3
  texts = sampling.generate_text(params, CFG, tok, [tok.decode(p) for p in prompts], 1,
                                 key=jax.random.key(7), max_new_tokens=NEW,
                                 stop_strings=stops, batch_size=8, progress=False,
                                 **SAMPLED)
  assert texts == [[sampling.cut_at_stop(tok.decode(g), stops)] for g in sampled]
  assert any(t[0] != tok.decode(g) for t, g in zip(texts, sampled))


def test_context_budget_and_left_truncation(params, greedy, prompts):
  long_prompt = list(range(90)) + prompts[0]  # 91 tokens > max_len 64.
  near_full = list(np.arange(60) % CFG.vocab_size)
  got = gen(params, [long_prompt, near_full], temperature=0.0)
  assert len(got[0]) == 1 and len(got[1]) == CFG.max_len - 60
  assert got[:1] == gen(params, [long_prompt[-(CFG.max_len - 1):]], temperature=0.0)


@pytest.mark.parametrize('bad, message', [([[]], 'empty'), ([[5, 97]], 'outside')])
def test_bad_prompts_are_rejected(params, bad, message):
  with pytest.raises(ValueError, match=message):
    gen(params, bad)


def test_stop_strings_need_a_tokenizer(params, prompts):
  with pytest.raises(ValueError, match='tokenizer'):
    gen(params, prompts, stop_strings=('\n',))


def test_argmax_is_jnp_argmax_with_ties_infinities_and_nans():
  rng = np.random.default_rng(5)
  x_BxV = rng.normal(size=(12, 300)).astype(np.float32)
  x_BxV[0, [7, 40, 299]] = 9.0  # Ties: the first one wins.
  x_BxV[1] = -np.inf
  x_BxV[2, [3, 250]] = np.inf
  x_BxV[3, [17, 100]] = np.nan  # The first NaN wins, as in jnp.argmax.
  x_BxV[4, 5], x_BxV[4, 6] = np.inf, np.nan
  x_BxV[5] = np.nan
  x_BxV[6] = 0.0
  np.testing.assert_array_equal(jax.jit(processors.argmax)(x_BxV),
                                jnp.argmax(x_BxV, axis=-1))


def test_sampling_draws_what_jax_random_categorical_draws():
  rng = np.random.default_rng(6)
  logits_BxV = jnp.asarray(rng.normal(size=(16, 97)).astype(np.float32) * 2)
  keys_B = jax.random.split(jax.random.key(3), 16)
  sp = processors.SamplingParams(temperature=1.0)
  ours = processors.sample_tokens(logits_BxV, None, keys_B, sp)
  np.testing.assert_array_equal(ours, jax.vmap(jax.random.categorical)(keys_B, logits_BxV))


def test_transposed_unembedding_gives_the_tied_logits(params):
  model = model_lib.GPT2(CFG)
  tokens_BxL = jnp.asarray(np.arange(12).reshape(2, 6) % CFG.vocab_size)
  cache = model_lib.init_cache(CFG, 2, 8)
  apply = jax.jit(model.apply)  # Flax dispatched op by op would take seconds.
  tied, _ = apply({'params': params}, tokens_BxL, cache=cache)
  transposed, _ = apply({'params': params}, tokens_BxL, cache=cache,
                        unembed_DxV=params['wte'].T)
  np.testing.assert_allclose(transposed, tied, rtol=1e-5, atol=1e-5)


def test_decode_options_are_used_where_xla_accepts_them(monkeypatch):
  assert decode_loop._decode_options('cpu') == decode_loop._CPU_DECODE_OPTIONS
  assert decode_loop._decode_options('gpu') == {}
  monkeypatch.setattr(decode_loop, '_CPU_DECODE_OPTIONS', {'xla_cpu_no_such_option': 'x'})
  decode_loop._decode_options.cache_clear()
  try:
    assert decode_loop._decode_options('cpu') == {}
  finally:
    decode_loop._decode_options.cache_clear()


def test_top_p_keeps_the_smallest_most_likely_set():
  probs = np.array([0.5, 0.3, 0.15, 0.05])
  logits_4xV = jnp.log(jnp.asarray(np.tile(probs, (4, 1))))
  for p, kept in [(0.5, 1), (0.6, 2), (0.81, 3), (0.99, 4)]:
    out = np.asarray(processors.apply_top_p(logits_4xV, p))
    assert np.isfinite(out).sum(axis=1).tolist() == [kept] * 4, p


def test_top_p_property_on_random_rows():
  rng = np.random.default_rng(1)
  logits_BxV = rng.normal(size=(64, 50)) * rng.uniform(0.1, 4, size=(64, 1))
  p_B = rng.uniform(0.05, 0.99, size=64)
  top_p = jax.jit(processors.apply_top_p)  # p traced: one program for every row's p.
  for logits_V, p in zip(logits_BxV, p_B):
    kept = np.isfinite(np.asarray(top_p(jnp.asarray(logits_V[None]), p)))[0]
    probs = np.exp(logits_V - logits_V.max())
    probs /= probs.sum()
    assert probs[kept].min() > probs[~kept].max(initial=-1)  # The most likely tokens,
    assert probs[kept].sum() >= p - 1e-6  # with enough mass,
    assert probs[kept].sum() - probs[kept].min() < p + 1e-6  # and none to spare.


def _top_p_by_sorting(logits_V, p):
  """The nucleus the slow way: sort, accumulate, keep what is needed (ties included)."""
  order = np.argsort(-logits_V, kind='stable')
  probs = np.exp(logits_V - logits_V.max())
  probs /= probs.sum()
  before = np.cumsum(probs[order]) - probs[order]
  threshold = logits_V[order][np.sum(before < p) - 1]
  return logits_V >= threshold


def test_top_p_bisection_keeps_the_sorted_nucleus():
  """The threshold found by halving is the sorted nucleus's, on wide, peaked and
  top-k-truncated rows of a real vocabulary size."""
  rng = np.random.default_rng(7)
  logits_BxV = (rng.normal(size=(48, 2048)) * rng.uniform(0.5, 12, size=(48, 1))).astype(
      np.float32)
  logits_BxV[:16] = np.asarray(processors.apply_top_k(jnp.asarray(logits_BxV[:16]), 40))
  top_p = jax.jit(processors.apply_top_p)  # p traced: one program for the three.
  for p in (0.1, 0.6, 0.95):
    kept = np.isfinite(np.asarray(top_p(jnp.asarray(logits_BxV), p)))
    for logits_V, kept_V in zip(logits_BxV, kept):
      np.testing.assert_array_equal(kept_V, _top_p_by_sorting(logits_V, p))


def test_top_p_keeps_all_tokens_tied_at_the_threshold():
  logits = jnp.log(jnp.asarray([[0.1, 0.4, 0.2, 0.2, 0.1]]))
  kept = np.isfinite(np.asarray(processors.apply_top_p(logits, 0.5)))[0]
  assert kept.tolist() == [False, True, True, True, False]


def test_top_k_keeps_k_largest():
  logits = jnp.asarray([[0.0, 3.0, 1.0, 2.0, -1.0]])
  kept = np.isfinite(np.asarray(processors.apply_top_k(logits, 2)))[0]
  assert kept.tolist() == [False, True, False, True, False]


def test_kth_largest_by_bisection_equals_lax_top_k():
  """The sort-free k-th largest value is lax.top_k's, ties, -inf and signed zeros included."""
  rng = np.random.default_rng(0)
  rows, vocab = 8, 97  # One shape: one program per k.
  x = [rng.normal(size=(rows, vocab)) * 10.0 ** rng.integers(-3, 4, size=(rows, 1)),
       rng.integers(-3, 4, size=(rows, vocab)).astype(np.float64),  # Many ties.
       rng.normal(size=(rows, vocab))]
  x[1][rng.random((rows, vocab)) < 0.2] = -0.0
  x[2][rng.random((rows, vocab)) < 0.4] = -np.inf  # Masked (e.g. padded) vocabulary.
  x = jnp.asarray(np.concatenate(x), jnp.float32)
  for k in (1, 2, 40, vocab - 1, vocab):
    np.testing.assert_array_equal(processors.kth_largest(x, k), jax.lax.top_k(x, k)[0][:, -1:])


def test_repetition_penalty_divides_positive_and_multiplies_negative():
  logits = jnp.asarray([[2.0, -2.0, 1.0, -1.0, 0.0]])
  seen = jnp.asarray([[True, True, False, False, True]])
  out = np.asarray(processors.apply_repetition_penalty(logits, seen, 2.0))
  np.testing.assert_allclose(out, [[1.0, -4.0, 1.0, -1.0, 0.0]])


def test_processors_match_transformers():
  torch = pytest.importorskip('torch')
  from transformers import generation as hf
  rng = np.random.default_rng(2)
  logits_BxV = rng.normal(size=(8, 40)).astype(np.float32) * 3
  ids_BxS = rng.integers(0, 40, size=(8, 6))
  seen_BxV = np.zeros((8, 40), bool)
  np.put_along_axis(seen_BxV, ids_BxS, True, axis=1)
  sp = processors.SamplingParams(temperature=0.7, top_k=12, top_p=0.8,
                                 repetition_penalty=1.3)
  ours = np.asarray(processors.process_logits(jnp.asarray(logits_BxV),
                                              jnp.asarray(seen_BxV), sp))
  procs = hf.LogitsProcessorList([
      hf.RepetitionPenaltyLogitsProcessor(1.3), hf.TemperatureLogitsWarper(0.7),
      hf.TopKLogitsWarper(12), hf.TopPLogitsWarper(0.8)])
  theirs = procs(torch.tensor(ids_BxS), torch.tensor(logits_BxV)).numpy()
  np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs))
  np.testing.assert_allclose(ours[np.isfinite(ours)], theirs[np.isfinite(theirs)], rtol=1e-5)


def test_generate_text_with_a_trained_bpe():
  from collab.data import tokenizer as tokenizer_lib
  code = ['def add(a, b):\n    """Adds."""\n    return a + b\n'] * 20 + [
      'class A:\n    pass\n# done\nif x:\n    print(x)\n'] * 20
  tok = tokenizer_lib.train_bpe(code, 300, progress=False)
  cfg = model_lib.ModelConfig(vocab_size=len(tok), num_layers=1, num_heads=2, d_model=16,
                              d_ff=32, max_len=64, dropout=0.0)
  params = jax.jit(model_lib.GPT2(cfg).init)(jax.random.key(1),
                                             jnp.zeros((1, 4), jnp.int32))['params']
  stops = ('\nclass', '\ndef', '\n#', '\n@', '\nprint', '\nif')
  prompts = ['<|endoftext|>def add(a, b):\n', '<|endoftext|>']
  kw = {'key': jax.random.key(0), 'max_new_tokens': 24, 'stop_strings': stops,
        'batch_size': 8, 'chunk_size': 24, 'progress': False}  # One batch, one chunk.
  texts = sampling.generate_text(params, cfg, tok, prompts, 3, **kw)
  assert [len(t) for t in texts] == [3, 3]
  assert all(isinstance(t, str) and not any(s in t for s in stops) for ts in texts for t in ts)
  # The end-of-text token is parsed as one token and is the default end of a row.
  assert tok.encode(prompts[1], add_special_tokens=False) == [tokenizer_lib.eot_id(tok)]
  ids = sampling.generate(params, cfg, [tok.encode(p, add_special_tokens=False)
                                        for p in prompts for _ in range(3)],
                          eot_id=tokenizer_lib.eot_id(tok), tokenizer=tok, **kw)
  flat = [sampling.cut_at_stop(tok.decode(i), stops) for i in ids]
  assert flat == [t for ts in texts for t in ts]
