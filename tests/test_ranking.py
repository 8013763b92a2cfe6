"""Tests for collab.evals.memorization.ranking: extraction rankings and their top-n precision."""

import zlib

import flax.linen as nn
import jax
import numpy as np
import pytest

from collab import model as model_lib
from collab.data import tokenizer as tokenizer_lib
from collab.evals.generation import scoring
from collab.evals.memorization import audit
from collab.evals.memorization import ranking

PLANTED = ('def parse_header(buffer, offset):\n'
           '    magic = buffer[offset:offset + 4]\n'
           '    if magic != b"\\x89PNG":\n'
           '        raise ValueError("not a png: %r" % magic)\n'
           '    width = int.from_bytes(buffer[offset + 16:offset + 20], "big")\n'
           '    height = int.from_bytes(buffer[offset + 20:offset + 24], "big")\n'
           '    depth, color = buffer[offset + 24], buffer[offset + 25]\n'
           '    return {"width": width, "height": height, "depth": depth, "color": color}\n')
REPETITIVE = 'pass\n' * 80


def random_code(rng, lines: int) -> str:
  words = ['x', 'value', 'items', 'count', 'total', 'result', 'i', 'name', 'data', 'key']
  return ''.join(f'{rng.choice(words)}_{rng.integers(100)} = {rng.choice(words)}'
                 f'({rng.integers(1000)}, {rng.choice(words)})\n' for _ in range(lines))


def planted_study(num: int = 30, planted: int = 17, repetitive: int = 4):
  """Ordinary samples (target ~ reference, nll 1.5 to 3), one planted memorized sample
  (lowest target nll, high reference nll) and one repetitive sample (easy for both)."""
  rng = np.random.default_rng(0)
  texts = [random_code(rng, int(rng.integers(3, 12))) for _ in range(num)]
  nll = rng.uniform(1.5, 3.0, num)
  ref = nll + rng.normal(0.0, 0.3, num)
  texts[planted], nll[planted], ref[planted] = PLANTED, 0.05, 2.5
  texts[repetitive], nll[repetitive], ref[repetitive] = REPETITIVE, 0.08, 0.06
  memorized_by = [frozenset()] * num
  memorized_by[planted] = frozenset({'alpha'})
  return texts, memorized_by, nll, [ranking.Reference(ref, frozenset({'beta'}))]


def test_planted_memorized_sample_tops_every_ranking():
  texts, memorized_by, nll, refs = planted_study()
  result = ranking.evaluate(texts, memorized_by, nll, refs, participants=['alpha', 'beta'],
                            ns=(1, 2, 10))
  assert result['samples'] == 30 and result['memorized'] == 1 and result['ns'] == [1, 2, 10]
  assert result['random_precision'] == pytest.approx(1 / 30)
  assert set(result['rankings']) == {'perplexity', 'zlib', 'reference'}
  for name, counts in result['rankings'].items():
    assert counts['1'] == {'memorized': 1, 'precision': 1.0}, name
    assert counts['10'] == {'memorized': 1, 'precision': 0.1}, name
  alpha = result['participants']['alpha']
  assert alpha['memorized'] == 1 and alpha['rankings'] == result['rankings']
  beta = result['participants']['beta']  # No sample clones beta; the one reference saw it.
  assert beta['memorized'] == 0 and set(beta['rankings']) == {'perplexity', 'zlib'}
  assert beta['rankings']['perplexity']['10']['memorized'] == 0


def test_repetitive_sample_ranks_high_by_perplexity_but_not_top_by_reference():
  texts, memorized_by, nll, refs = planted_study()
  order = ranking.orders(texts, nll, refs)
  assert list(order['perplexity'][:2]) == [17, 4]
  assert order['reference'][0] == 17 and list(order['reference']).index(4) > 0
  # Its compressibility lifts its zlib ratio, yet low perplexity still keeps it near the top.
  scores = ranking.zlib_scores(nll, texts)
  assert scores[17] < scores[4] < np.median(scores)


def test_directions_lower_is_more_suspicious():
  texts = ['a = 1\n', 'a = 1\n']
  assert list(ranking.rank(ranking.zlib_scores(np.array([2.0, 1.0]), texts))) == [1, 0]
  ref = [np.array([3.0, 1.0]), np.array([1.0, 1.0])]  # Mean 2.0 and 1.0.
  np.testing.assert_allclose(ranking.reference_scores(np.array([1.0, 1.0]), ref), [-1.0, 0.0])


def brute_counts(scores, flags, n):
  order = sorted(range(len(scores)), key=lambda i: (np.isnan(scores[i]), scores[i], i))
  return sum(flags[i] for i in order[:n])


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_counts_equal_brute_force_on_random_data(seed):
  rng = np.random.default_rng(seed)
  num, names = 40, ['alpha', 'beta', 'gamma']
  texts = [random_code(rng, int(rng.integers(1, 6))) for _ in range(num)]
  nll = rng.integers(1, 5, num).astype(float)  # Integer scores: many ties, by sample order.
  nll[rng.integers(num)] = np.nan
  memorized_by = [frozenset(p for p in names if rng.random() < 0.2) for _ in range(num)]
  refs = [ranking.Reference(rng.integers(1, 5, num).astype(float), frozenset({p}))
          for p in names[:2]]  # gamma: both blind; alpha, beta: one each.
  result = ranking.evaluate(texts, memorized_by, nll, refs, ns=(10, 25))
  flags = [bool(m) for m in memorized_by]
  assert result['memorized'] == sum(flags)
  assert result['random_precision'] == pytest.approx(sum(flags) / num)
  zbytes = [len(zlib.compress(t.encode())) for t in texts]

  def scores(name, blind):
    if name == 'perplexity':
      return list(nll)
    if name == 'zlib':
      return [v / b for v, b in zip(nll, zbytes)]
    return list(nll - np.mean([r.nll_S for r in blind], axis=0))

  for who, block in [(None, result)] + list(result['participants'].items()):
    fl = flags if who is None else [who in m for m in memorized_by]
    blind = refs if who is None else [r for r in refs if who not in r.saw]
    assert set(block['rankings']) == {'perplexity', 'zlib', 'reference'}
    for name, counts in block['rankings'].items():
      for n in (10, 25):
        want = brute_counts(scores(name, blind), fl, n)
        assert counts[str(n)] == {'memorized': want, 'precision': want / n}, (who, name, n)
  assert sorted(result['participants']) == sorted({p for m in memorized_by for p in m})


def test_n_capped_at_the_number_of_samples():
  texts, memorized_by, nll, refs = planted_study(num=7, planted=2, repetitive=5)
  result = ranking.evaluate(texts, memorized_by, nll, refs)
  assert result['ns'] == [7]
  assert result['rankings']['perplexity'] == {'7': {'memorized': 1, 'precision': 1 / 7}}
  empty = ranking.evaluate([], [], np.zeros(0), participants=['alpha'])
  assert empty == {'samples': 0, 'memorized': 0, 'ns': [],
                   'rankings': {'perplexity': {}, 'zlib': {}},
                   'participants': {'alpha': {'memorized': 0, 'rankings': {
                       'perplexity': {}, 'zlib': {}}}}, 'random_precision': None}
  with pytest.raises(ValueError):
    ranking.evaluate(texts, memorized_by[:3], nll)
  with pytest.raises(ValueError):
    ranking.capped_ns([0], 5)


def test_unprompted_inputs_from_samples_and_rows():
  s = lambda i, protocol, text: audit.Sample(i, protocol, 'alpha' if protocol == audit.PROMPTED
                                            else '', '', '', 0, '', '', text)
  samples = [s('alpha/0/0', audit.PROMPTED, 'p'), s('unprompted/0', audit.UNPROMPTED, 'u0'),
             s('unprompted/1', audit.UNPROMPTED, 'u1')]
  rows = [{'sample_id': 'alpha/0/0', 'participants': ['alpha']},
          {'sample_id': 'unprompted/1', 'participants': ['alpha', 'beta']},
          {'sample_id': 'unprompted/1', 'participants': ['gamma']}]
  ids, texts, memorized_by = ranking.unprompted_inputs(samples, rows)
  assert ids == ['unprompted/0', 'unprompted/1'] and texts == ['u0', 'u1']
  assert memorized_by == [frozenset(), frozenset({'alpha', 'beta', 'gamma'})]


@pytest.fixture(scope='module')
def tokenizer():
  texts = ['def f(x):\n    return x + 1\n', 'for i in range(10):\n    print(i)\n'] * 20
  return tokenizer_lib.train_bpe(texts, 300, progress=False)


def test_score_texts_leads_with_eot_cuts_and_marks_empty_texts(tokenizer):
  seen = []

  def score(seqs):
    seen.extend(seqs)
    return [-np.arange(1, len(q), dtype=float) for q in seqs]  # Token t: log-prob -t.

  eot, encode = tokenizer_lib.eot_id(tokenizer), tokenizer_lib.make_encoder(tokenizer)
  texts = ['def f(x):\n', '', 'print(i) ' * 20]
  nll = ranking.score_texts(score, tokenizer, texts, eot, max_len=8)
  ids = [list(map(int, encode([t])[0])) for t in texts]
  assert seen == [[eot] + ids[0][:7], [eot] + ids[2][:7]]
  assert nll[0] == pytest.approx(np.mean(np.arange(1, len(seen[0]))))
  assert np.isnan(nll[1]) and nll[2] == pytest.approx(4.0)  # Mean of 1..7.


def test_score_texts_with_a_tiny_model_equals_direct_forward(tokenizer):
  cfg = model_lib.ModelConfig(vocab_size=len(tokenizer), num_layers=1, num_heads=2,
                              d_model=16, d_ff=32, max_len=32, dropout=0.0)
  # numpy params: eager jax.random per leaf over the test's 4 virtual devices is slow.
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda x: (0.5 * rng.standard_normal(x.shape)).astype(np.float32),
      nn.meta.unbox(model_lib.abstract_params(cfg)))
  score = scoring.make_scorer(params, cfg, batch_size=4)
  eot, encode = tokenizer_lib.eot_id(tokenizer), tokenizer_lib.make_encoder(tokenizer)
  texts = ['def f(x):\n    return x\n', 'print(i)\n']
  nll = ranking.score_texts(score, tokenizer, texts, eot, max_len=cfg.max_len)
  forward = jax.jit(lambda t: model_lib.GPT2(cfg).apply({'params': params}, t))
  for text, got in zip(texts, nll):
    tokens = [eot] + list(map(int, encode([text])[0]))
    logits = np.asarray(forward(np.array([tokens], np.int32))[0], np.float64)
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -np.mean([logprobs[t, tokens[t + 1]] for t in range(len(tokens) - 1)])
    assert got == pytest.approx(float(want), rel=1e-4)
