"""Hashed-window clone index: which runs of >= W lines of a text occur in training code.

A *normalized line* is a source line without its ASCII whitespace and control bytes
(type-1 clones); with `clone_type=2` identifiers (keywords stay), numbers and string
literals are first abstracted by a regular-expression lexer that never fails on
truncated or invalid code (type-2 clones).
Lines that are blank, comment-only or trivial (see `TRIVIAL_LINES`) are dropped before
windows are formed, so they neither count towards W nor break a run. Every window of W
consecutive normalized lines of one document is hashed to 64 bits; each participant's
index is the sorted array of its window hashes with document frequencies and
back-references (document, original line range) for provenance.

Everything per byte, line and window is numpy; Python loops run per batch of files,
per reported span and per reference only. Normalization and line and window hashing are
in `clone_hashing.py`; this module holds the index, its lookups and clone spans.
"""

import dataclasses
import json
import os
from typing import Iterable, Sequence

import numpy as np
from absl import logging
from tqdm import tqdm

from collab import io
from collab.evals.clones import hashing as clone_hashing

# Normalization and hashing live in clone_hashing; these stay importable from here.
TRIVIAL_LINES = clone_hashing.TRIVIAL_LINES
normalize = clone_hashing.normalize
line_hashes = clone_hashing.line_hashes
window_hashes = clone_hashing.window_hashes
fingerprint = clone_hashing.fingerprint

_FORMAT_VERSION = 1


class IndexFormatError(ValueError):
  """A file is not a clone index written by `CloneIndex.save`."""


@dataclasses.dataclass(frozen=True)
class Ref:
  """Where (part of) a clone span occurs in one participant's training data."""
  participant: str
  doc: int
  repo: str
  path: str
  start_line: int  # 1-based, inclusive, in the training file.
  end_line: int
  num_lines: int  # Normalized lines of the span matched contiguously at this place.


@dataclasses.dataclass(frozen=True)
class CloneSpan:
  """A maximal run of >= min_lines normalized lines of a text found in training data."""
  start_line: int  # 1-based, inclusive, in the query text.
  end_line: int
  num_lines: int  # Normalized (kept) lines in the span.
  fingerprint: str  # 16 hex digits: hash of the span's window hashes.
  participants: tuple  # Names of the indexes holding any window of the span.
  participant_lines: tuple  # Per participant: normalized lines its windows cover.
  window_hashes: tuple  # The span's window hashes (ints), e.g. for crossorg.is_cross_org.
  refs: tuple  # Ref per place of occurrence, longest matches first.

  @property
  def exclusive(self) -> bool:
    return len(self.participants) == 1


def _doc_fields(doc, i: int):
  if isinstance(doc, str):
    return '', f'doc{i}', doc
  try:
    repo = doc.get('repo', doc.get('repo_name', ''))
    return str(repo), str(doc.get('path', '')), doc['content']
  except (AttributeError, KeyError, TypeError):
    raise ValueError(f'Document {i} must be a str or a dict with a "content" field '
                     f'(and "repo", "path"); got {type(doc).__name__}.') from None


def _index_batch(texts, first_doc: int, min_lines: int, clone_type: int):
  """Windows of a batch of documents: (hash, doc, start_line, end_line), doc order."""
  hash_L, counts_L, doc_L, line_L = clone_hashing.batch_lines(texts, clone_type)
  kept = np.flatnonzero(counts_L)
  win, start = window_hashes(hash_L[kept], doc_L[kept], min_lines)
  first, last = kept[start], kept[start + min_lines - 1]
  return (win, (doc_L[first] + first_doc).astype(np.int32), line_L[first].astype(np.int32),
          line_L[last].astype(np.int32))


@dataclasses.dataclass(eq=False)
class CloneIndex:
  """One participant's windows: sorted distinct hashes, document frequency, provenance.

  N windows in document order, U distinct hashes, D documents. Occurrences of hashes_U[u]
  are order_N[first_U[u]:first_U[u] + count_U[u]] (positions in the win_*_N arrays).
  """
  participant: str
  min_lines: int
  clone_type: int
  win_hash_N: np.ndarray  # uint64 window hashes, document order.
  win_doc_N: np.ndarray  # int32 document of each window.
  win_start_N: np.ndarray  # int32 1-based first and last original line of each window.
  win_end_N: np.ndarray
  order_N: np.ndarray  # int64 stable argsort of win_hash_N.
  hashes_U: np.ndarray  # uint64 distinct hashes, sorted.
  first_U: np.ndarray  # int64
  count_U: np.ndarray  # int64 occurrences.
  doc_freq_U: np.ndarray  # int32 distinct documents holding the hash.
  repo_D: np.ndarray  # str
  path_D: np.ndarray  # str
  # int64 duplication count of each document (data provenance, collab/data/clean.py);
  # attached after loading by whoever knows it (memorization.load_or_build_index), never
  # saved with the index. None: unknown.
  copies_D: np.ndarray | None = None

  @classmethod
  def from_windows(cls, participant, min_lines, clone_type, win_hash_N, win_doc_N,
                   win_start_N, win_end_N, repo_D, path_D):
    order_N = np.argsort(win_hash_N)  # SIMD quicksort: several times a stable sort's speed.
    sorted_N = win_hash_N[order_N]
    new_hash = np.ones(sorted_N.size, bool)
    new_hash[1:] = sorted_N[1:] != sorted_N[:-1]
    first_U = np.flatnonzero(new_hash)
    count_U = np.diff(np.append(first_U, sorted_N.size))
    # Back to document order inside the (few) groups of equal hashes, as a stable sort
    # would give: refs list occurrences in order, and a new document is a change below.
    sub = np.flatnonzero(np.repeat(count_U > 1, count_U))
    group = np.repeat(np.arange(first_U.size, dtype=np.int64), count_U)[sub]
    order_N[sub] = order_N[sub][np.argsort(group * max(sorted_N.size, 1) + order_N[sub])]
    docs = win_doc_N[order_N]
    new_doc = new_hash.copy()
    new_doc[1:] |= docs[1:] != docs[:-1]
    doc_freq_U = (np.add.reduceat(new_doc.astype(np.int32), first_U) if first_U.size
                  else np.zeros(0, np.int32))
    return cls(participant, int(min_lines), int(clone_type), win_hash_N, win_doc_N,
               win_start_N, win_end_N, order_N.astype(np.int64), sorted_N[first_U],
               first_U.astype(np.int64), count_U.astype(np.int64),
               doc_freq_U.astype(np.int32), np.asarray(repo_D, str), np.asarray(path_D, str))

  @property
  def num_docs(self) -> int:
    return int(self.repo_D.size)

  def lookup(self, hash_Q: np.ndarray) -> np.ndarray:
    """Position of each hash in hashes_U, or -1 where the index lacks it."""
    u = np.searchsorted(self.hashes_U, hash_Q)
    found = u < self.hashes_U.size
    found[found] = self.hashes_U[u[found]] == hash_Q[found]
    return np.where(found, u, -1)

  def contains(self, hash_Q) -> np.ndarray:
    return self.lookup(np.asarray(hash_Q, np.uint64)) >= 0

  def refs(self, run_hashes: np.ndarray, max_refs: int = 5) -> list:
    """Places where a run of query windows starts; each extended as far as it matches."""
    u = int(self.lookup(run_hashes[:1])[0])
    if u < 0:
      return []
    # Up to 8x more candidates than kept, so that full-length matches are preferred.
    g_C = self.order_N[self.first_U[u]:self.first_U[u] + min(self.count_U[u], 8 * max_refs)]
    at_CxR = g_C[:, None] + np.arange(run_hashes.size)
    inside = at_CxR < self.win_hash_N.size
    at_CxR = np.minimum(at_CxR, self.win_hash_N.size - 1)
    same_CxR = (inside & (self.win_hash_N[at_CxR] == run_hashes)
                & (self.win_doc_N[at_CxR] == self.win_doc_N[g_C][:, None]))
    length_C = np.where(same_CxR.all(1), run_hashes.size, same_CxR.argmin(1))
    found = []
    for c in np.argsort(-length_C, kind='stable')[:max_refs]:
      g, n, d = int(g_C[c]), int(length_C[c]), int(self.win_doc_N[g_C[c]])
      found.append(Ref(self.participant, d, str(self.repo_D[d]), str(self.path_D[d]),
                       int(self.win_start_N[g]), int(self.win_end_N[g + n - 1]),
                       n + self.min_lines - 1))
    return found

  def find_spans(self, text: str, exclude_lines=None, max_refs: int = 5) -> list:
    """Clone spans of `text` in this index (see `find_spans`)."""
    return find_spans(text, [self], exclude_lines=exclude_lines, max_refs=max_refs)

  def runs(self, mask_N: np.ndarray):
    """(first_R, length_R): maximal runs of consecutive windows of one document in mask_N."""
    idx = np.flatnonzero(mask_N)
    brk = np.ones(idx.size, bool)
    brk[1:] = (np.diff(idx) != 1) | (self.win_doc_N[idx[1:]] != self.win_doc_N[idx[:-1]])
    first = np.flatnonzero(brk)
    return idx[first], np.diff(np.append(first, idx.size))

  def save(self, path: str) -> None:
    """Writes the index to `path` (.npz), atomically."""
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
              if f.name != 'copies_D'}
    meta = {k: fields.pop(k) for k in ('participant', 'min_lines', 'clone_type')}
    meta['version'] = _FORMAT_VERSION
    io.atomic_write(path, lambda f: np.savez(f, meta=np.array([json.dumps(meta)]), **fields),
                    binary=True)

  @classmethod
  def load(cls, path: str) -> 'CloneIndex':
    if not os.path.exists(path):
      raise FileNotFoundError(f'No clone index at {path}; build one with '
                              'collab.evals.clones.index.build_index(...).save(path).')
    try:
      with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
      meta = json.loads(str(arrays.pop('meta')[0]))
      if meta.pop('version') != _FORMAT_VERSION:
        raise ValueError(f'index format is not {_FORMAT_VERSION}')
      return cls(**meta, **arrays)
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise IndexFormatError(f'{path} is not a clone index of this version ({e}); '
                             'rebuild it with collab.evals.clones.index.build_index.') from e


def build_index(docs: Iterable, min_lines: int = 6, clone_type: int = 1, *,
                participant: str = '', batch_bytes: int = 131_072,
                progress: bool = True) -> CloneIndex:
  """Indexes every window of `min_lines` kept lines of `docs` (str or {repo, path, content}).

  Documents are hashed `batch_bytes` at a time: small batches keep numpy's temporaries
  in cache (128 KB is about twice as fast as 4 MB).
  """
  if min_lines < 1:
    raise ValueError(f'min_lines must be >= 1, got {min_lines}.')
  normalize('', clone_type)  # Validates clone_type.
  parts, repos, paths, batch, size = [], [], [], [], 0

  def flush():
    if batch:
      parts.append(_index_batch(batch, len(repos) - len(batch), min_lines, clone_type))
      batch.clear()

  for i, doc in enumerate(tqdm(docs, desc=f'index {participant}', disable=not progress,
                               unit='file', mininterval=5)):
    repo, path, content = _doc_fields(doc, i)
    repos.append(repo)
    paths.append(path)
    batch.append(content)
    size += len(content)
    if size >= batch_bytes:
      flush()
      size = 0
  flush()
  empty = (np.zeros(0, np.uint64),) + (np.zeros(0, np.int32),) * 3
  cols = list(zip(*parts, empty))
  index = CloneIndex.from_windows(participant, min_lines, clone_type,
                                  *(np.concatenate(c) for c in cols), repos, paths)
  logging.info('Clone index %r: %d documents, %d windows, %d distinct.', participant,
               index.num_docs, index.win_hash_N.size, index.hashes_U.size)
  return index


def _settings(indexes) -> tuple:
  kinds = {(ix.min_lines, ix.clone_type) for ix in indexes}
  if len(kinds) != 1:
    raise ValueError(f'Indexes disagree on (min_lines, clone_type): {sorted(kinds)}; '
                     'build them all with the same settings.' if kinds else
                     'Clone lookups need at least one CloneIndex.')
  return kinds.pop()


def _excluded(exclude_lines, text_L) -> np.ndarray:
  """excluded_L: lines named in exclude_lines[t] (1-based lines of text t)."""
  excluded_L = np.zeros(text_L.size, bool)
  if exclude_lines is None:
    return excluded_L
  per_text = np.bincount(text_L, minlength=len(exclude_lines))
  offsets = np.cumsum(per_text) - per_text
  for t, lines in enumerate(exclude_lines):
    if lines is not None:
      lines = np.fromiter(lines, np.int64)
      lines = lines[(lines >= 1) & (lines <= per_text[t])]
      excluded_L[offsets[t] + lines - 1] = True
  return excluded_L


def _span(run, hash_N, start_N, hit_PxN, indexes, line_K, max_refs):
  """The CloneSpan of one run of consecutive hit windows (positions `run`)."""
  w = indexes[0].min_lines
  k0, k1 = int(start_N[run[0]]), int(start_N[run[-1]]) + w - 1
  names, covered, refs = [], [], []
  for ix, hit_N in zip(indexes, hit_PxN):
    own = run[hit_N[run]]
    if own.size:
      names.append(ix.participant)
      # Kept lines covered by this participant's windows (a union of W-line intervals).
      covered.append(int(np.minimum(np.diff(start_N[own]), w).sum()) + w)
      refs += ix.refs(hash_N[own[0]:run[-1] + 1], max_refs)
  return CloneSpan(int(line_K[k0]), int(line_K[k1]), k1 - k0 + 1, fingerprint(hash_N[run]),
                   tuple(names), tuple(covered), tuple(int(h) for h in hash_N[run]),
                   tuple(refs))


def find_spans_batch(texts: Sequence[str], indexes: Sequence[CloneIndex],
                     exclude_lines=None, max_refs: int = 5) -> list:
  """`find_spans` of many texts in one vectorized pass: one list of spans per text.

  exclude_lines: None, or one entry per text (None or 1-based line numbers). Calls of
  about 200 texts are the fastest (temporaries stay in cache).
  """
  w, clone_type = _settings(indexes)
  if exclude_lines is not None and len(exclude_lines) != len(texts):
    raise ValueError(f'exclude_lines has {len(exclude_lines)} entries for {len(texts)} '
                     'texts; give one (None or line numbers) per text.')
  out = [[] for _ in texts]
  if not texts:
    return out
  hash_L, counts_L, text_L, line_L = clone_hashing.batch_lines(texts, clone_type)
  excluded_L = _excluded(exclude_lines, text_L)
  # A new segment at each text's first line and at each excluded line: no window spans them.
  segment_L = np.cumsum((line_L == 1) | excluded_L)
  kept = np.flatnonzero(counts_L & ~excluded_L)
  hash_N, start_N = window_hashes(hash_L[kept], segment_L[kept], w)
  hit_PxN = np.stack([ix.contains(hash_N) for ix in indexes])
  idx = np.flatnonzero(hit_PxN.any(0))
  segment_N = segment_L[kept][start_N[idx]]
  brk = np.ones(idx.size, bool)  # Runs stop at gaps and (for W = 1) at segment changes.
  brk[1:] = (start_N[idx[1:]] != start_N[idx[:-1]] + 1) | (segment_N[1:] != segment_N[:-1])
  bounds = np.append(np.flatnonzero(brk), idx.size)
  text_K, line_K = text_L[kept], line_L[kept]
  for s, e in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
    run = idx[s:e]
    out[int(text_K[start_N[run[0]]])].append(
        _span(run, hash_N, start_N, hit_PxN, indexes, line_K, max_refs))
  return out


def find_spans(text: str, indexes: Sequence[CloneIndex], exclude_lines=None,
               max_refs: int = 5) -> list:
  """Maximal clone spans of `text` found in any of `indexes` (one per participant).

  A span is a maximal run of consecutive windows of `text` each present in at least one
  index; its participants are the indexes holding any of its windows (one: exclusive,
  several: shared). `exclude_lines` (1-based lines of `text`, e.g. a prompt's own) are
  dropped and no window spans them. Spans have at least min_lines normalized lines.
  """
  excluded = None if exclude_lines is None else [exclude_lines]
  return find_spans_batch([text], indexes, excluded, max_refs)[0]


def containment(a: CloneIndex, b: CloneIndex) -> float:
  """Share of a's distinct windows that also occur in b (0.0 when a has none)."""
  if a.hashes_U.size == 0:
    return 0.0
  return float(np.isin(a.hashes_U, b.hashes_U, assume_unique=True).mean())
