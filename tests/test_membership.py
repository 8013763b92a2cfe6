"""Membership inference (collab.evals.privacy.membership): scores, AUROC and TPR against direct
computations, and the per-participant evaluation over a built data folder."""

import itertools
import math

import numpy as np
import pytest

from collab.data import canaries
from collab.data import tfds_builder
from collab.data import tokenizer as tokenizer_lib
from collab.evals.privacy import membership


def _pairwise_auroc(members, nonmembers):
  """The definition: P(member > non-member) + P(tie) / 2 over every pair."""
  wins = [1.0 if a > b else 0.5 if a == b else 0.0
          for a, b in itertools.product(members, nonmembers)]
  return sum(wins) / len(wins)


def _brute_force_tpr(members, nonmembers, fpr):
  """Max TPR over every threshold (predict member when score >= t) with FPR <= fpr."""
  best = 0.0
  for t in list(members) + list(nonmembers) + [math.inf]:
    if np.mean(np.asarray(nonmembers) >= t) <= fpr:
      best = max(best, float(np.mean(np.asarray(members) >= t)))
  return best


@pytest.mark.parametrize('seed', range(6))
def test_auroc_and_tpr_equal_direct_computation(seed):
  rng = np.random.default_rng(seed)
  n_m, n_n = rng.integers(5, 60), rng.integers(5, 250)
  # Integer scores (many ties) shifted for members: an attack better than chance.
  members = rng.integers(0, 12, n_m) + rng.integers(0, 4)
  nonmembers = rng.integers(0, 12, n_n)
  assert membership.auroc(members, nonmembers) == pytest.approx(
      _pairwise_auroc(members, nonmembers))
  for fpr in (0.01, 0.05, 0.2):
    assert membership.tpr_at_fpr(members, nonmembers, fpr) == pytest.approx(
        _brute_force_tpr(members, nonmembers, fpr))
  cont_m, cont_n = rng.normal(1, 1, n_m), rng.normal(0, 1, n_n)
  assert membership.auroc(cont_m, cont_n) == pytest.approx(_pairwise_auroc(cont_m, cont_n))
  assert membership.tpr_at_fpr(cont_m, cont_n, 0.01) == pytest.approx(
      _brute_force_tpr(cont_m, cont_n, 0.01))


def test_auroc_and_tpr_extremes():
  assert membership.auroc([3, 4], [1, 2]) == 1.0 and membership.auroc([1], [2, 3]) == 0.0
  assert membership.auroc([1, 1], [1]) == 0.5
  # 100 non-members: 1% FPR allows exactly one above the bar (the 2nd highest, 98).
  nonmembers = list(range(100))
  assert membership.tpr_at_fpr([99, 98.5, 97], nonmembers, 0.01) == pytest.approx(2 / 3)
  assert membership.tpr_at_fpr([99, 98.5, 97], nonmembers[:50], 0.01) == 1.0  # 0 allowed.
  with pytest.raises(ValueError, match='non-member'):
    membership.auroc([1.0], [])


def test_min_k_and_loss_by_hand():
  logprobs = np.log([0.5, 0.1, 0.9, 0.05, 0.6, 0.3, 0.2, 0.8, 0.7, 0.4])
  # K = 20% of 10 tokens: the two least likely, 0.05 and 0.1.
  assert membership.min_k_score(logprobs, 0.2) == pytest.approx((math.log(0.05) +
                                                                 math.log(0.1)) / 2)
  assert membership.min_k_score(logprobs, 0.05) == pytest.approx(math.log(0.05))  # >= 1.
  assert membership.min_k_score(logprobs, 1.0) == pytest.approx(np.mean(logprobs))
  assert membership.loss_score(logprobs) == pytest.approx(np.mean(logprobs))
  with pytest.raises(ValueError, match='min_k'):
    membership.min_k_score(logprobs, 0.0)


def test_sample_files_is_seeded_capped_and_skips_canaries():
  records = [{'content': str(i), 'license': canaries.LICENSE if i % 3 == 0 else 'mit'}
             for i in range(30)]
  a = membership.sample_files(records, 8, seed=1, tag='x')
  assert len(a) == 8 and not any(canaries.is_canary(r) for r in a)
  assert a == membership.sample_files(records, 8, seed=1, tag='x')
  assert a != membership.sample_files(records, 8, seed=2, tag='x')
  assert len(membership.sample_files(records, 0, seed=1, tag='x')) == 20


def test_evaluate_scores_train_against_valid_files(tiny_data):
  tok = tokenizer_lib.load_tokenizer(tiny_data)
  encode, eot = tokenizer_lib.make_encoder(tok), tokenizer_lib.eot_id(tok)
  valid_texts = {r['content'] for r in tfds_builder.load_split(tiny_data, 'alpha', 'valid')}
  valid_ids = {tuple([eot] + encode([t])[0][:15].tolist()) for t in valid_texts}
  seen = []

  def score(seqs):  # A perfect oracle: members get log-prob 0, non-members -1 per token.
    seen.extend(seqs)
    return [np.full(len(s) - 1, -1.0 if tuple(s) in valid_ids else 0.0) for s in seqs]

  result = membership.evaluate(score, encode, eot, tiny_data, ['alpha', 'beta'],
                               max_files=6, seq_len=16, k=0.2, fpr=0.01, seed=1)
  alpha = result['participants']['alpha']
  assert alpha['members'] == 6 and alpha['nonmembers'] == min(6, len(valid_texts))
  assert alpha['loss'] == {'auroc': 1.0, 'tpr_at_fpr': 1.0} == alpha['min_k']
  assert alpha['member_nll'] == 0.0 and alpha['nonmember_nll'] == 1.0
  assert all(s[0] == eot and 2 <= len(s) <= 16 for s in seen)
  assert result['settings'] == {'max_files': 6, 'seq_len': 16, 'min_k': 0.2, 'fpr': 0.01,
                                'seed': 1}
