"""Membership scores, reference attacks, ROC points, dataset inference and epsilon bounds."""

import math
import zlib

import numpy as np
import pytest
from scipy import stats as scipy_stats

from collab.evals.privacy import attacks


def test_model_scores_by_hand():
  lp, mu, sigma = [-1.0, -3.0, -0.5, -2.0, -4.0], [-2.0] * 5, [0.5, 1.0, 0.5, 2.0, 1.0]
  s = attacks.model_scores(lp, mu, sigma, 'abc', k=0.4)
  assert s['loss'] == pytest.approx(-2.1)
  assert s['zlib'] == pytest.approx(-10.5 / len(zlib.compress(b'abc')))
  assert s['min_k'] == pytest.approx(-3.5)  # The 2 least likely: -4 and -3.
  # z = [2, -1, 3, 0, -2]: the 2 lowest are -2 and -1.
  assert s['min_k_pp'] == pytest.approx(-1.5)


def test_a_repeated_member_outranks_non_members_under_every_score():
  """Planted: windows the target fits far better than its references (as a member
  repeated many times is) come out on top of every score."""
  rng = np.random.default_rng(0)
  n, refs = 200, 3
  ref_phi_RxN = rng.normal(-3.0, 0.3, (refs, n))
  phi_N = ref_phi_RxN.mean(axis=0) + rng.normal(0, 0.05, n)
  planted = np.arange(5)
  phi_N[planted] += 2.0  # Memorized: far likelier under the target than anywhere else.
  population = rng.normal(-3.0, 0.3, (refs + 1, 100))
  # Per-token views of the same windows (32 tokens): a memorized window's tokens are all
  # likely, most of all where the model's own distribution is flat (Min-K%++).
  texts = [f'x{i} = {i}' for i in range(n)]
  model = []
  for i in range(n):
    lp_T = phi_N[i] + rng.normal(0, 0.3, 32)
    model.append(attacks.model_scores(np.minimum(lp_T, 0), np.full(32, -3.0),
                                      np.full(32, 1.0), texts[i]))
  by_score = {s: np.array([m[s] for m in model]) for s in attacks.MODEL_SCORES}
  by_score.update({
      'lira': attacks.lira(phi_N, ref_phi_RxN),
      'rmia': attacks.rmia(phi_N, ref_phi_RxN, population[0], population[1:]),
  })
  assert set(by_score) == set(attacks.SCORES)
  for name, values in by_score.items():
    top = set(np.argsort(-values, kind='stable')[:len(planted)].tolist())
    assert top == set(planted.tolist()), name


def _lira_reference(phi, refs):
  """LiRA by the paper's formula with scipy: Phi((phi - mu) / sigma), per window."""
  out = []
  for i, x in enumerate(phi):
    col = refs[:, i]
    sigma = col.std(ddof=1)
    out.append(scipy_stats.norm.cdf((x - col.mean()) / sigma))
  return np.array(out)


def test_lira_is_the_gaussian_likelihood_test_in_order_and_value():
  rng = np.random.default_rng(1)
  refs, phi = rng.normal(-2, 0.5, (6, 40)), rng.normal(-2, 0.7, 40)
  ours = attacks.lira(phi, refs)
  np.testing.assert_allclose(scipy_stats.norm.cdf(ours), _lira_reference(phi, refs),
                             rtol=1e-12)
  # Few references: one global sigma, the deviations of every reference from its mean.
  few = refs[:2]
  sigma = np.sqrt(np.sum((few - few.mean(axis=0)) ** 2) / (few.shape[1] * (len(few) - 1)))
  np.testing.assert_allclose(attacks.lira(phi, few), (phi - few.mean(axis=0)) / sigma)


def test_rmia_counts_population_windows_by_the_likelihood_ratio():
  rng = np.random.default_rng(2)
  phi, refs = rng.normal(-2, 0.4, 7), rng.normal(-2, 0.4, (3, 7))
  pop, pop_refs = rng.normal(-2, 0.4, 11), rng.normal(-2, 0.4, (3, 11))
  a, gamma = 0.3, 1.5
  def pr(x, r):  # p(x|theta) / p(x), offline.
    return np.exp(x) / (0.5 * ((1 + a) * np.exp(r).mean(axis=0) + (1 - a)))
  expected = [np.mean([(pr(phi, refs)[i] / pr(pop, pop_refs)[j]) >= gamma
                       for j in range(11)]) for i in range(7)]
  np.testing.assert_allclose(attacks.rmia(phi, refs, pop, pop_refs, a=a, gamma=gamma),
                             expected)


def test_auroc_tpr_and_roc_agree_with_brute_force():
  rng = np.random.default_rng(3)
  m, n = rng.integers(0, 6, 30).astype(float), rng.integers(0, 5, 50).astype(float)
  brute = np.mean([(x > y) + 0.5 * (x == y) for x in m for y in n])
  assert attacks.auroc(m, n) == pytest.approx(brute)
  fpr, tpr = attacks.roc_curve(m, n)
  assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
  assert np.trapezoid(tpr, fpr) == pytest.approx(brute)
  point = attacks.tpr_at_fpr(m, n, 0.1)
  assert point['nonmembers'] == 50 and point['false_positives_allowed'] == 5
  best = max(np.mean(m > t) for t in np.r_[n, np.inf] if np.sum(n > t) <= 5)
  assert point['tpr'] == pytest.approx(best)
  # Below one false positive: stated, not hidden.
  assert attacks.tpr_at_fpr(m, n, 0.001)['false_positives_allowed'] == 0
  lo, hi = attacks.auroc_ci(m, n, seed=0)
  assert lo <= attacks.auroc(m, n) <= hi


def test_dataset_inference_finds_members_and_not_a_null():
  rng = np.random.default_rng(4)
  def sides(shift):
    members = {s: rng.normal(shift, 1, 400) for s in ('loss', 'min_k')}
    return members, {s: rng.normal(0, 1, 400) for s in ('loss', 'min_k')}
  found = attacks.dataset_inference(*sides(0.5), seed=0)
  assert found['p_value'] < 1e-6 and 5 <= found['sequences_needed'] <= 200
  null = attacks.dataset_inference(*sides(0.0), seed=0)
  assert null['p_value'] > 0.01 and null['sequences_needed'] is None


def test_epsilon_lower_bound_is_sound_and_finds_a_leak():
  rng = np.random.default_rng(5)
  # A mechanism with known epsilon: randomized response at epsilon = 1 (members report
  # 1 with probability e/(1+e), non-members with 1/(1+e)). The bound must stay below 1.
  p = math.e / (1 + math.e)
  m = (rng.random(2000) < p).astype(float)
  n = (rng.random(2000) < 1 - p).astype(float)
  bound = attacks.epsilon_lower_bound(m, n, delta=0.0)['epsilon_lower_bound']
  assert 0.5 < bound < 1.0
  # No leak: both sides from one distribution give (nearly) nothing.
  same = attacks.epsilon_lower_bound(rng.normal(size=300), rng.normal(size=300), 1e-5)
  assert same['epsilon_lower_bound'] < 0.5


def test_token_stats_are_the_label_logprob_and_the_distribution_moments():
  import jax
  import jax.numpy as jnp
  from collab import model as model_lib
  from collab.evals.generation import scoring
  cfg = model_lib.ModelConfig(vocab_size=37, num_layers=1, num_heads=2, d_model=16, d_ff=32,
                              max_len=16, dropout=0.0)
  model = model_lib.GPT2(cfg)
  params = model.init({'params': jax.random.key(0)}, jnp.zeros((1, 4), jnp.int32),
                      deterministic=True)['params']
  seqs = [[1, 5, 7, 2, 9], [3, 4]]
  stats = scoring.make_scorer(params, cfg, 2, fn=scoring.token_stats)(seqs)
  plain = scoring.make_scorer(params, cfg, 2)(seqs)
  for seq, st, lp in zip(seqs, stats, plain):
    logits = np.asarray(model.apply({'params': params}, jnp.asarray([seq]),
                                    deterministic=True)[0, :-1], np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                           keepdims=True)) - logits.max(-1, keepdims=True)
    p = np.exp(logp)
    mu = (p * logp).sum(-1)
    sigma = np.sqrt((p * (logp - mu[:, None]) ** 2).sum(-1))
    np.testing.assert_allclose(st[:, 0], lp, atol=1e-5)
    np.testing.assert_allclose(st[:, 0], logp[np.arange(len(seq) - 1), seq[1:]], atol=1e-5)
    np.testing.assert_allclose(st[:, 1], mu, atol=1e-5)
    np.testing.assert_allclose(st[:, 2], sigma, atol=1e-5)


def test_windows_cut_blocks_and_take_their_predictions_in_context():
  from collab.evals.privacy import windows
  blocks = np.arange(3 * 8).reshape(3, 8)
  b, o = windows.cut(blocks, 4, 0, 1, 'x')
  assert b.tolist() == [0, 0, 1, 1, 2, 2] and o.tolist() == [0, 4, 0, 4, 0, 4]
  b2, o2 = windows.cut(blocks, 4, 3, 1, 'x')
  assert len(b2) == 3 and list(zip(b2, o2)) == sorted(zip(b2, o2))
  assert (b2.tolist(), o2.tolist()) == tuple(x.tolist() for x in windows.cut(blocks, 4, 3, 1, 'x'))
  # Row t of a block's stats predicts token t + 1: window [o, o + 4) uses rows o - 1 ...
  stats = [np.arange(7)[:, None] + 100 * i for i in range(3)]
  w = windows.Windows(blocks, b, o, None, None)
  rows = windows.window_stats(stats, w, 4)
  assert rows[0][:, 0].tolist() == [0, 1, 2]  # Tokens 1..3: the first has no prediction.
  assert rows[1][:, 0].tolist() == [3, 4, 5, 6]  # Tokens 4..7.
  assert rows[3][:, 0].tolist() == [103, 104, 105, 106]
  with pytest.raises(ValueError, match='window'):
    windows.cut(blocks, 9, 0, 1, 'x')


def test_welch_rows_equal_scipy():
  rng = np.random.default_rng(6)
  m, n = rng.normal(0.3, 1, (5, 12)), rng.normal(0, 2, (5, 9))
  expected = [scipy_stats.ttest_ind(a, b, equal_var=False, alternative='greater').pvalue
              for a, b in zip(m, n)]
  np.testing.assert_allclose(attacks.welch_p_rows(m, n), expected, rtol=1e-10)


def test_dataset_inference_never_turns_a_reversed_score_into_evidence():
  rng = np.random.default_rng(7)
  members = {'lira': rng.normal(-1.0, 1, 300)}  # Members score lower: not membership.
  out = attacks.dataset_inference(members, {'lira': rng.normal(0, 1, 300)}, seed=0)
  assert out['p_value'] == 1.0 and out['sequences_needed'] is None
