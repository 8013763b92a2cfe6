"""Exact search of token sequences in other token streams (cross-organization windows).

`occurs_in` says which of N m-token sequences occur contiguously in any of several
streams (e.g. the other participants' packed training blocks): m-grams are hashed by a
polynomial modulo 2^64 in bounded chunks, and every hash hit is confirmed token by token,
so the answer is exact whatever the hash.
"""

from typing import Sequence

import numpy as np

# Odd, so multiplying by it modulo 2^64 loses nothing; the golden-ratio constant mixes well.
_HASH_BASE = np.uint64(0x9E3779B97F4A7C15)
_CHUNK_TOKENS = 1 << 20  # Stream tokens hashed at a time: bounded memory on big corpora.


def _hashes(grams_NxM) -> np.ndarray:
  """Polynomial hash (mod 2^64) of each row, by Horner's rule over the columns.

  Columns of a sliding window view of a uint64 stream are strided views: hashing every
  m-gram of a chunk copies nothing m-fold.
  """
  grams_NxM = np.asarray(grams_NxM, np.uint64)
  h_N = np.zeros(len(grams_NxM), np.uint64)
  for j in range(grams_NxM.shape[1]):
    h_N *= _HASH_BASE  # Arrays wrap around modulo 2^64 silently, as wanted.
    h_N += grams_NxM[:, j]
  return h_N


def _confirm(grams_PxM, h_P, sorted_U, order_U, unique_UxM, found_U) -> None:
  """Marks the suffixes equal to some gram: every suffix sharing a gram's hash is compared
  token by token, so a hash collision neither finds nor hides anything."""
  lo_P = np.searchsorted(sorted_U, h_P, 'left')
  count_P = np.searchsorted(sorted_U, h_P, 'right') - lo_P
  hits_H = np.flatnonzero(count_P)
  if not hits_H.size:
    return
  count_H = count_P[hits_H]  # Nearly always 1: one suffix per hash.
  gram_G = np.repeat(hits_H, count_H)  # G: each (gram, suffix) pair sharing a hash.
  rank_G = np.arange(len(gram_G)) - np.repeat(np.cumsum(count_H) - count_H, count_H)
  query_G = order_U[np.repeat(lo_P[hits_H], count_H) + rank_G]
  same_G = (grams_PxM[gram_G] == unique_UxM[query_G]).all(axis=1)
  found_U[query_G[same_G]] = True


def occurs_in(suffixes_NxM, other_blocks: Sequence, chunk_tokens: int = _CHUNK_TOKENS
              ) -> np.ndarray:
  """found_N: suffix i occurs contiguously in one of `other_blocks` (each flattened).

  Each stream is hashed m-gram by m-gram in chunks (memory bounded, memmaps read once)
  and looked up among the distinct suffixes' hashes; hits are confirmed token by token,
  so the answer is exact whatever the hash. Streams are searched one by one: an m-gram
  spanning the end of one participant's stream and the start of another's is in neither.
  """
  suffixes_NxM = np.asarray(suffixes_NxM, np.int64)
  num, m = suffixes_NxM.shape
  if num == 0 or m == 0:
    return np.zeros(num, bool)
  unique_UxM, inverse_N = np.unique(suffixes_NxM, axis=0, return_inverse=True)
  unique_UxM = unique_UxM.astype(np.uint64)  # The streams' type: no float comparisons.
  hash_U = _hashes(unique_UxM)
  order_U = np.argsort(hash_U, kind='stable')
  sorted_U = hash_U[order_U]
  found_U = np.zeros(len(unique_UxM), bool)
  for piece_P in _pieces(other_blocks, m, chunk_tokens):
    grams_PxM = np.lib.stride_tricks.sliding_window_view(piece_P, m)
    _confirm(grams_PxM, _hashes(grams_PxM), sorted_U, order_U, unique_UxM, found_U)
    if found_U.all():
      break
  return found_U[inverse_N.reshape(-1)]


def _pieces(other_blocks: Sequence, m: int, chunk_tokens: int):
  """Overlapping uint64 chunks of each flattened stream: each m-gram lies in exactly one."""
  for blocks in other_blocks:
    stream_T = np.reshape(blocks, -1)  # A memmap stays one: chunks are read when sliced.
    for start in range(0, max(len(stream_T) - m + 1, 0), chunk_tokens):
      yield np.asarray(stream_T[start:start + chunk_tokens + m - 1], np.uint64)
