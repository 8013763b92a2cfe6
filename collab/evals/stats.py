"""Uncertainty: percentile-bootstrap 95% intervals for ratios and pass@k."""

from typing import Mapping, Sequence

import numpy as np

from collab.evals.execution import passk

RESAMPLES = 1000


def bootstrap_ratio(flags_N: Sequence[bool], seed: int, resamples: int = RESAMPLES) -> list:
  """95% interval of the share of True flags (e.g. samples holding a clone)."""
  flags_N = np.asarray(flags_N, np.float64)
  if flags_N.size == 0:
    return None
  rng = np.random.default_rng(seed)
  means_R = flags_N[rng.integers(0, flags_N.size, (resamples, flags_N.size))].mean(axis=1)
  return [float(np.percentile(means_R, 2.5)), float(np.percentile(means_R, 97.5))]


def passk_bootstrap(counts: Mapping[str, tuple], ks: Sequence[int], seed: int,
                    resamples: int = RESAMPLES) -> dict:
  """95% interval of each pass@k, resampling problems (their (n, c) counts) with replacement."""
  if not counts:
    return {}
  per_problem_PxK = np.array([[passk.estimate(n, c, k) for k in ks]
                              for n, c in counts.values()])
  rng = np.random.default_rng(seed)
  idx_RxP = rng.integers(0, len(per_problem_PxK), (resamples, len(per_problem_PxK)))
  means_RxK = per_problem_PxK[idx_RxP].mean(axis=1)
  return {f'pass@{k}': [float(np.percentile(means_RxK[:, i], 2.5)),
                        float(np.percentile(means_RxK[:, i], 97.5))]
          for i, k in enumerate(ks)}
