"""Memorization by duplication: are training files that exist in more copies emitted more?

Every training file has a duplication count (collab/data/clean.py `exact_dedup`): the
source's `copies` when it has one (the paper's release: how often the file occurs on
GitHub), else 1 + the identical files exact dedup collapsed into it. The build saves it
with the block provenance; `memorization.load_or_build_index` attaches it to each training
clone index as `copies_D`. Buckets are clean.COPY_BUCKETS: 1, 2-4, >= 5 copies.

For participant p, the memorized spans are those of results['memorization']['participants']
[p]['spans']: spans of samples prompted from p's code that p's training data holds. A span
falls in the bucket of the most duplicated of p's training files holding any of its
windows. Per bucket: the files and training windows (p's clone index) in it, the spans,
their share of p's spans, the bucket's share of p's training windows, and the relative
rate, span share / window share (1: memorized in proportion to its size; > 1: more).
`all` pools the participants whose copies are known.
"""

from typing import Sequence

import numpy as np

from collab.data import clean
from collab.evals.clones import index as clones

BUCKETS = clean.COPY_BUCKETS


def bucket_of(copies_D: np.ndarray) -> np.ndarray:
  """bucket_D: the index in BUCKETS of each document's copy count."""
  return np.searchsorted(np.asarray([2, 5]), np.asarray(copies_D, np.int64), side='right')


def span_bucket(window_hashes: Sequence[int], index: clones.CloneIndex,
                bucket_D: np.ndarray) -> int:
  """The largest bucket among the index's documents holding any of the span's windows;
  -1 when the index holds none of them."""
  u_N = index.lookup(np.asarray(window_hashes, np.uint64))
  best = -1
  for u in u_N[u_N >= 0].tolist():
    occ = index.order_N[index.first_U[u]:index.first_U[u] + index.count_U[u]]
    best = max(best, int(bucket_D[index.win_doc_N[occ]].max()))
  return best


def _rows(files_B, windows_B, spans_B) -> dict:
  """Per bucket: counts, shares and the relative rate (None where undefined)."""
  total_spans, total_windows = int(spans_B.sum()), int(windows_B.sum())
  out = {}
  for b, name in enumerate(BUCKETS):
    span_share = spans_B[b] / total_spans if total_spans else None
    window_share = windows_B[b] / total_windows if total_windows else None
    rate = span_share / window_share if span_share is not None and window_share else None
    out[name] = {'files': int(files_B[b]), 'windows': int(windows_B[b]),
                 'spans': int(spans_B[b]),
                 'span_share': None if span_share is None else float(span_share),
                 'window_share': None if window_share is None else float(window_share),
                 'relative_rate': None if rate is None else float(rate)}
  return {'spans': total_spans, 'buckets': out}


def breakdown(spans_by_participant: dict, indexes: dict) -> dict | None:
  """results['memorization']['duplication'] (see the module docstring); None when no
  training index knows its documents' copies (a data folder built before they existed).

  spans_by_participant: p -> p's memorized spans (CloneSpan); indexes: p -> training index.
  """
  n = len(BUCKETS)
  per, pooled = {}, [np.zeros(n, np.int64) for _ in range(3)]
  for p, index in indexes.items():
    if index.copies_D is None or len(index.copies_D) != index.num_docs:
      continue
    bucket_D = bucket_of(index.copies_D)
    files_B = np.bincount(bucket_D, minlength=n)
    windows_B = np.bincount(bucket_D[index.win_doc_N], minlength=n)
    spans_B = np.zeros(n, np.int64)
    for span in spans_by_participant.get(p, ()):
      b = span_bucket(span.window_hashes, index, bucket_D)
      if b >= 0:
        spans_B[b] += 1
    per[p] = _rows(files_B, windows_B, spans_B)
    for acc, part in zip(pooled, (files_B, windows_B, spans_B)):
      acc += part
  if not per:
    return None
  return {'bucket_names': list(BUCKETS), 'participants': per, 'all': _rows(*pooled)}
