"""Membership scores of token windows and how well they separate members from non-members.

Every score is oriented so that higher means "member". Per window (T scored tokens):
  loss       minus the mean next-token NLL (Yeom et al. 2018);
  zlib       minus the NLL sum over the zlib-compressed length of the window's text
             (Carlini et al. 2021): low loss on text that does not compress well;
  min_k      Min-K% Prob (Shi et al. 2024): mean log-probability of the k share of
             tokens the model finds least likely;
  min_k_pp   Min-K%++ (Zhang et al. 2024): the same over (log p(x_t) - mu_t) / sigma_t,
             mu_t and sigma_t the mean and standard deviation of log p(z) for z drawn
             from the model's own next-token distribution at t;
  lira       offline LiRA (Carlini et al. 2022): (phi - mu_out) / sigma_out, phi the
             target model's mean log-probability of the window and mu_out, sigma_out a
             Gaussian fit to the reference models' (models that never saw the window's
             owner); with fewer than MIN_REFS_PER_WINDOW references sigma_out is the
             global one (LiRA's "fixed variance");
  rmia       offline RMIA (Zarifzadeh et al. 2024): the share of population windows z
             with LR(x, z) = [p(x|target)/p(x)] / [p(z|target)/p(z)] >= gamma, where
             p(.) is the references' mean probability, corrected offline with `a`:
             p(x) = ((1 + a) p_out(x) + (1 - a)) / 2. Probabilities are per-token
             geometric means (windows have one length, so the order is the sequence
             likelihood's).
"""

import math
import zlib
from typing import Sequence

import numpy as np
from scipy import stats as scipy_stats

MODEL_SCORES = ('loss', 'zlib', 'min_k', 'min_k_pp')  # The target model alone.
REFERENCE_SCORES = ('lira', 'rmia')  # Need reference models.
SCORES = MODEL_SCORES + REFERENCE_SCORES
MIN_REFS_PER_WINDOW = 4  # Fewer references: LiRA's global sigma.


def _lowest_mean(values_T: np.ndarray, k: float) -> float:
  if not 0 < k <= 1:
    raise ValueError(f'config.eval.membership.min_k={k} must be in (0, 1].')
  v = np.sort(np.asarray(values_T, np.float64))
  return float(np.mean(v[:max(1, int(len(v) * k))]))


def model_scores(logprob_T, mu_T, sigma_T, text: str, k: float = 0.2) -> dict:
  """{score: value} of one window from its token log-probabilities and the model's
  next-token log-probability mean and standard deviation at each position."""
  lp = np.asarray(logprob_T, np.float64)
  z = (lp - np.asarray(mu_T, np.float64)) / np.maximum(np.asarray(sigma_T, np.float64), 1e-6)
  return {'loss': float(np.mean(lp)),
          'zlib': float(np.sum(lp)) / len(zlib.compress(text.encode('utf-8'))),
          'min_k': _lowest_mean(lp, k),
          'min_k_pp': _lowest_mean(z, k)}


def lira(phi_N, reference_phi_RxN) -> np.ndarray:
  """Offline LiRA scores of N windows from the target's and R references' phi (mean
  log-probability per token): (phi - mu_out) / sigma_out."""
  phi_N = np.asarray(phi_N, np.float64)
  ref_RxN = np.asarray(reference_phi_RxN, np.float64).reshape(-1, len(phi_N))
  if not len(ref_RxN):
    raise ValueError('LiRA needs at least one reference model.')
  mu_N = ref_RxN.mean(axis=0)
  if len(ref_RxN) >= MIN_REFS_PER_WINDOW:
    sigma_N = ref_RxN.std(axis=0, ddof=1)
  elif len(ref_RxN) > 1:  # Too few per window: one sigma from every window's deviations
    # from its own mean (R - 1 degrees of freedom each).
    sigma_N = np.full_like(mu_N, math.sqrt(np.sum((ref_RxN - mu_N) ** 2)
                                           / (ref_RxN.shape[1] * (len(ref_RxN) - 1))))
  else:  # One reference: its spread over the windows.
    sigma_N = np.full_like(mu_N, np.std(ref_RxN))
  return (phi_N - mu_N) / np.maximum(sigma_N, 1e-6)


def rmia(phi_N, reference_phi_RxN, population_phi_M, population_reference_phi_RxM, *,
         a: float = 0.3, gamma: float = 1.0) -> np.ndarray:
  """Offline RMIA scores of N windows against M population windows (never members)."""
  def ratio(phi, ref_phi):
    p_target = np.exp(np.asarray(phi, np.float64))
    p_out = np.exp(np.asarray(ref_phi, np.float64)).reshape(-1, len(p_target)).mean(axis=0)
    return p_target / (0.5 * ((1.0 + a) * p_out + (1.0 - a)))
  if not 0 <= a <= 1 or gamma <= 0:
    raise ValueError(f'RMIA needs 0 <= a <= 1 and gamma > 0, got a={a}, gamma={gamma}.')
  x_N = ratio(phi_N, reference_phi_RxN)
  z_M = np.sort(ratio(population_phi_M, population_reference_phi_RxM))
  if not len(z_M):
    raise ValueError('RMIA needs population windows.')
  # LR(x, z) >= gamma  <=>  ratio(z) <= ratio(x) / gamma.
  return np.searchsorted(z_M, x_N / gamma, side='right') / len(z_M)


# ---- Attack quality.

def auroc(members, nonmembers) -> float:
  """P(member score > non-member score) + P(tie) / 2, from ranks (Mann-Whitney U)."""
  m, n = np.asarray(members, np.float64), np.asarray(nonmembers, np.float64)
  if not len(m) or not len(n):
    raise ValueError('AUROC needs at least one member and one non-member score.')
  ranks = scipy_stats.rankdata(np.concatenate([m, n]))
  return (float(np.sum(ranks[:len(m)])) - len(m) * (len(m) + 1) / 2) / (len(m) * len(n))


def auroc_ci(members, nonmembers, seed: int, resamples: int = 1000) -> list:
  """Percentile-bootstrap 95% interval of the AUROC (members and non-members resampled),
  every resample ranked at once."""
  m, n = np.asarray(members, np.float64), np.asarray(nonmembers, np.float64)
  rng = np.random.default_rng(seed)
  if len(m) * len(n) <= 4_000_000:
    # Exact and fast: a resample is a multiplicity per unit, its AUROC w' C v / (sum w
    # sum v) with C the win (1), tie (1/2) or loss (0) of each member against each
    # non-member.
    wins_MxN = (m[:, None] > n[None, :]) + 0.5 * (m[:, None] == n[None, :])
    def multiplicities(size):  # [resamples, size]: each row a draw with replacement.
      draws = rng.integers(0, size, (resamples, size)) + size * np.arange(resamples)[:, None]
      return np.bincount(draws.ravel(), minlength=resamples * size).reshape(
          resamples, size).astype(np.float64)
    w_RxM, v_RxN = multiplicities(len(m)), multiplicities(len(n))
    values = np.einsum('rn,rn->r', w_RxM @ wins_MxN, v_RxN) / (len(m) * len(n))
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]
  values, chunk = [], max(1, 2_000_000 // (len(m) + len(n)))  # Bounded memory.
  for start in range(0, resamples, chunk):
    rows = min(chunk, resamples - start)
    both_RxK = np.concatenate([m[rng.integers(0, len(m), (rows, len(m)))],
                               n[rng.integers(0, len(n), (rows, len(n)))]], axis=1)
    ranks_RxK = scipy_stats.rankdata(both_RxK, axis=1)
    values.append((ranks_RxK[:, :len(m)].sum(axis=1) - len(m) * (len(m) + 1) / 2)
                  / (len(m) * len(n)))
  values = np.concatenate(values)
  return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def tpr_at_fpr(members, nonmembers, fpr: float) -> dict:
  """The highest TPR at FPR <= fpr (member when score > threshold), with what it rests on.

  `false_positives_allowed` = floor(fpr * non-members): 0 means the point is in effect
  the TPR at zero false positives (too few non-members to resolve `fpr`).
  """
  m, n = np.asarray(members, np.float64), np.sort(np.asarray(nonmembers, np.float64))[::-1]
  if not len(m) or not len(n):
    raise ValueError('TPR at FPR needs at least one member and one non-member score.')
  allowed = int(math.floor(fpr * len(n) + 1e-9))
  tpr = 1.0 if allowed >= len(n) else float(np.mean(m > n[allowed]))
  return {'tpr': tpr, 'fpr': float(fpr), 'nonmembers': int(len(n)),
          'false_positives_allowed': allowed}


def roc_curve(members, nonmembers) -> tuple:
  """(fpr, tpr) arrays of every threshold, from (0, 0) to (1, 1)."""
  scores = np.concatenate([np.asarray(members, np.float64), np.asarray(nonmembers, np.float64)])
  labels = np.concatenate([np.ones(len(members)), np.zeros(len(nonmembers))])
  order = np.argsort(-scores, kind='stable')
  scores, labels = scores[order], labels[order]
  last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # Ties step together.
  tp, fp = np.cumsum(labels)[last], np.cumsum(1 - labels)[last]
  return (np.r_[0.0, fp / max(len(nonmembers), 1)], np.r_[0.0, tp / max(len(members), 1)])


# ---- Dataset inference (Maini et al. 2024): was this organization's code in training?

def welch_p(members, nonmembers) -> float:
  """One-sided Welch t-test p-value of 'members score higher than non-members'."""
  m, n = np.asarray(members, np.float64), np.asarray(nonmembers, np.float64)
  if len(m) < 2 or len(n) < 2:
    return float('nan')
  return float(welch_p_rows(m[None], n[None])[0])


def welch_p_rows(m_DxA, n_DxB) -> np.ndarray:
  """welch_p of each row pair (one-sided, members greater), all rows at once."""
  m, n = np.asarray(m_DxA, np.float64), np.asarray(n_DxB, np.float64)
  vm, vn = m.var(axis=1, ddof=1) / m.shape[1], n.var(axis=1, ddof=1) / n.shape[1]
  diff, se2 = m.mean(axis=1) - n.mean(axis=1), vm + vn
  with np.errstate(divide='ignore', invalid='ignore'):
    t = diff / np.sqrt(se2)
    dof = se2 ** 2 / (vm ** 2 / (m.shape[1] - 1) + vn ** 2 / (n.shape[1] - 1))
  p = scipy_stats.t.sf(t, dof)
  # No spread on either side: the difference alone decides.
  return np.where(se2 > 0, p, np.where(diff > 0, 0.0, 1.0))


def combine_weights(member_SxN, nonmember_SxM) -> np.ndarray:
  """Weights of a linear combination of S scores: each score's mean difference over its
  pooled variance (a diagonal discriminant), fitted on one half, and never negative:
  every score is oriented so that higher means member, so a score that separates the
  sides the other way measures something else (e.g. a shift between the sets) and must
  not be turned into evidence of membership."""
  m, n = np.asarray(member_SxN, np.float64), np.asarray(nonmember_SxM, np.float64)
  pooled = 0.5 * (m.var(axis=1) + n.var(axis=1))
  return np.maximum((m.mean(axis=1) - n.mean(axis=1)) / np.maximum(pooled, 1e-12), 0.0)


def dataset_inference(member_scores: dict, nonmember_scores: dict, seed: int, *,
                      alpha: float = 0.01, sizes=(5, 10, 20, 50, 100, 200, 500, 1000),
                      draws: int = 200) -> dict:
  """Maini et al.'s test on {score: values} of suspect (member) and held-out windows.

  Both sides are split in halves (seeded): the first fits the weights of the scores'
  combination, the second is tested with a one-sided Welch t-test. `sequences_needed` is
  the smallest n of `sizes` (then: every window the smaller side of the second half
  has) at which the median p-value over `draws` seeded subsamples of n windows per side
  falls below `alpha` (None: never).
  """
  names = sorted(set(member_scores) & set(nonmember_scores))
  m_SxN = np.array([member_scores[s] for s in names], np.float64)
  n_SxM = np.array([nonmember_scores[s] for s in names], np.float64)
  rng = np.random.default_rng(seed)
  pm, pn = rng.permutation(m_SxN.shape[1]), rng.permutation(n_SxM.shape[1])
  fit_m, test_m = pm[:len(pm) // 2], pm[len(pm) // 2:]
  fit_n, test_n = pn[:len(pn) // 2], pn[len(pn) // 2:]
  if min(len(fit_m), len(fit_n), len(test_m), len(test_n)) < 2:
    return {'p_value': None, 'sequences_needed': None, 'members': int(m_SxN.shape[1]),
            'nonmembers': int(n_SxM.shape[1]), 'scores': names}
  # Standardized by the fitting half, so no score dominates by its scale.
  both = np.concatenate([m_SxN[:, fit_m], n_SxM[:, fit_n]], axis=1)
  center, scale = both.mean(axis=1, keepdims=True), np.maximum(both.std(axis=1, keepdims=True),
                                                                1e-12)
  w = combine_weights((m_SxN[:, fit_m] - center) / scale, (n_SxM[:, fit_n] - center) / scale)
  if not np.any(w > 0):  # No score puts the suspect windows above the held-out ones.
    return {'p_value': 1.0, 'sequences_needed': None, 'alpha': float(alpha),
            'members': int(m_SxN.shape[1]), 'nonmembers': int(n_SxM.shape[1]),
            'tested': [int(len(test_m)), int(len(test_n))], 'scores': names,
            'weights': [0.0] * len(names)}
  tm = w @ ((m_SxN[:, test_m] - center) / scale)
  tn = w @ ((n_SxM[:, test_n] - center) / scale)
  needed, most = None, min(len(tm), len(tn))
  for size in [x for x in sizes if x < most] + [most]:  # Ending with every window.
    pick_m = np.argsort(rng.random((draws, len(tm))), axis=1)[:, :size]  # Without
    pick_n = np.argsort(rng.random((draws, len(tn))), axis=1)[:, :size]  # replacement.
    if np.median(welch_p_rows(tm[pick_m], tn[pick_n])) < alpha:
      needed = int(size)
      break
  return {'p_value': welch_p(tm, tn), 'sequences_needed': needed, 'alpha': float(alpha),
          'members': int(m_SxN.shape[1]), 'nonmembers': int(n_SxM.shape[1]),
          'tested': [int(len(tm)), int(len(tn))], 'scores': names,
          'weights': [float(x) for x in w]}


# ---- An empirical lower bound on epsilon (Jagielski et al. 2020).

def clopper_pearson(successes, trials, confidence: float) -> tuple:
  """Two-sided Clopper-Pearson interval of binomial proportions (arrays welcome)."""
  k, n = np.asarray(successes, np.float64), np.asarray(trials, np.float64)
  tail = (1.0 - confidence) / 2
  with np.errstate(invalid='ignore'):
    lo = np.where(k == 0, 0.0, scipy_stats.beta.ppf(tail, k, n - k + 1))
    hi = np.where(k == n, 1.0, scipy_stats.beta.ppf(1 - tail, k + 1, n - k))
  return lo, hi


def epsilon_lower_bound(members, nonmembers, delta: float, confidence: float = 0.95) -> dict:
  """A lower bound on epsilon that holds at `confidence` over every threshold at once.

  A (epsilon, delta)-DP mechanism bounds every test between a member and a non-member
  world: TPR <= e^epsilon FPR + delta and TNR <= e^epsilon FNR + delta. At each threshold
  (every distinct score) Clopper-Pearson bounds TPR from below and FPR from above; their
  confidence is Bonferroni-corrected for the number of thresholds tried, so the largest
  log((TPR_lo - delta) / FPR_hi) (or its complement) is a bound at `confidence` overall
  (Jagielski et al. 2020), if the trials are independent, which one training run only
  approximates (Steinke et al. 2023 analyse that case exactly).
  """
  m, n = np.sort(np.asarray(members, np.float64)), np.sort(np.asarray(nonmembers, np.float64))
  out = {'epsilon_lower_bound': 0.0, 'threshold': None, 'confidence': float(confidence),
         'members': int(len(m)), 'nonmembers': int(len(n)), 'delta': float(delta)}
  if not len(m) or not len(n):
    return out
  t = np.unique(np.concatenate([m, n]))
  tp = len(m) - np.searchsorted(m, t, side='left')  # Scores >= t.
  fp = len(n) - np.searchsorted(n, t, side='left')
  each = 1.0 - (1.0 - confidence) / (2 * len(t))  # Two one-sided bounds per threshold.
  tpr_lo, _ = clopper_pearson(tp, len(m), 2 * each - 1)
  _, fpr_hi = clopper_pearson(fp, len(n), 2 * each - 1)
  tnr_lo, _ = clopper_pearson(len(n) - fp, len(n), 2 * each - 1)
  _, fnr_hi = clopper_pearson(len(m) - tp, len(m), 2 * each - 1)
  best, at = 0.0, None
  for num, den in ((tpr_lo - delta, fpr_hi), (tnr_lo - delta, fnr_hi)):
    with np.errstate(divide='ignore', invalid='ignore'):
      eps = np.where((num > 0) & (den > 0), np.log(np.maximum(num, 1e-300) / den), 0.0)
    i = int(np.argmax(eps))
    if eps[i] > best:
      best, at = float(eps[i]), float(t[i])
  return {**out, 'epsilon_lower_bound': best, 'threshold': at}
