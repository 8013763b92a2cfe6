"""Cross-organization clones: the clone detector run between participants' corpora.

PROTOCOL (Cross-organization clones): how much of each participant's code also occurs
in another participant's training data (a containment matrix over distinct windows),
which clones they share (fingerprints with provenance), and, for a model's memorized
spans, the share that are cross-organization clones.
"""

import collections
import itertools
from typing import Sequence

import numpy as np

from collab.evals.clones import index as clones


def _check(indexes: Sequence[clones.CloneIndex]):
  names = [ix.participant for ix in indexes]
  if len(set(names)) != len(names):
    raise ValueError(f'Participant names of the indexes must be unique, got {names}.')
  kinds = {(ix.min_lines, ix.clone_type) for ix in indexes}
  if len(kinds) > 1:
    raise ValueError(f'Indexes disagree on (min_lines, clone_type): {sorted(kinds)}; '
                     'build them all with the same settings.')
  return names


def containment_matrix(indexes: Sequence[clones.CloneIndex]) -> np.ndarray:
  """M_PxP: M[a, b] is the share of a's distinct windows present in b (diagonal 1)."""
  _check(indexes)
  return np.array([[clones.containment(a, b) for b in indexes] for a in indexes])


def cross_org_windows(indexes: Sequence[clones.CloneIndex]):
  """Windows held by >= 2 participants: (hashes_X sorted uint64, members_XxP bool)."""
  _check(indexes)
  if not indexes:
    return np.zeros(0, np.uint64), np.zeros((0, 0), bool)
  hashes_X, counts = np.unique(np.concatenate([ix.hashes_U for ix in indexes]),
                               return_counts=True)
  hashes_X = hashes_X[counts >= 2]
  members_XxP = np.stack([ix.contains(hashes_X) for ix in indexes], axis=1)
  return hashes_X, members_XxP.reshape(hashes_X.size, len(indexes))


def is_cross_org(window_hashes, cross_hashes_X: np.ndarray) -> bool:
  """Whether any of a span's windows (CloneSpan.window_hashes) is a cross-org window."""
  return bool(np.isin(np.asarray(window_hashes, np.uint64), cross_hashes_X).any())


def cross_org_share(spans, cross_hashes_X: np.ndarray) -> float:
  """Share of clone spans that are cross-organization clones (0.0 without spans)."""
  if not spans:
    return 0.0
  return sum(is_cross_org(s.window_hashes, cross_hashes_X) for s in spans) / len(spans)


def cross_org_clones(indexes: Sequence[clones.CloneIndex], max_refs: int = 10) -> list:
  """Clones shared across participants, one record per fingerprint, with provenance.

  In each participant's documents, every maximal run of consecutive windows that are
  cross-org windows is a clone; runs with the same windows (same fingerprint) are one
  record. `participants` names every participant holding any of its windows; `refs`
  (at most `max_refs`; `num_refs` counts all) give (participant, repo, path, lines).
  """
  names = _check(indexes)
  hashes_X, members_XxP = cross_org_windows(indexes)
  records = {}
  for ix in indexes:
    first_R, length_R = ix.runs(np.isin(ix.win_hash_N, hashes_X))
    for g, n in zip(first_R.tolist(), length_R.tolist()):
      run = ix.win_hash_N[g:g + n]
      fp = clones.fingerprint(run)
      rec = records.get(fp)
      if rec is None:
        held = members_XxP[np.searchsorted(hashes_X, run)].any(0)
        rec = records[fp] = dict(fingerprint=fp, num_lines=n + ix.min_lines - 1,
                                 participants=[p for p, h in zip(names, held) if h],
                                 num_refs=0, refs=[])
      rec['num_refs'] += 1
      if len(rec['refs']) < max_refs:
        d = int(ix.win_doc_N[g])
        rec['refs'].append(dict(participant=ix.participant, repo=str(ix.repo_D[d]),
                                path=str(ix.path_D[d]), start_line=int(ix.win_start_N[g]),
                                end_line=int(ix.win_end_N[g + n - 1])))
  return sorted(records.values(), key=lambda r: (-r['num_lines'], r['fingerprint']))


def repository_pairs(indexes: Sequence[clones.CloneIndex], top: int = 10) -> list:
  """Which repositories of different participants share windows, most first.

  Each record names both sides (participant, repository), the distinct windows they
  share, and the first file of each side that holds one of them (an example to open).
  """
  _check(indexes)
  hashes_X, _ = cross_org_windows(indexes)
  holders = collections.defaultdict(dict)  # window -> {(participant, repo): path}
  for ix in indexes:
    at_N = np.flatnonzero(np.isin(ix.win_hash_N, hashes_X))
    for h, d in zip(ix.win_hash_N[at_N].tolist(), ix.win_doc_N[at_N].tolist()):
      holders[h].setdefault((ix.participant, str(ix.repo_D[d])), str(ix.path_D[d]))
  counts, examples = collections.Counter(), {}
  for held in holders.values():
    for a, b in itertools.combinations(sorted(held), 2):
      if a[0] != b[0]:
        counts[a, b] += 1
        examples.setdefault((a, b), (held[a], held[b]))
  ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
  return [dict(a={'participant': a[0], 'repo': a[1], 'path': examples[a, b][0]},
               b={'participant': b[0], 'repo': b[1], 'path': examples[a, b][1]}, windows=n)
          for (a, b), n in ranked]


def report(indexes: Sequence[clones.CloneIndex], max_refs: int = 10) -> dict:
  """JSON-ready summary: containment matrix, cross-org window count and clone list."""
  names = _check(indexes)
  hashes_X, members_XxP = cross_org_windows(indexes)
  return dict(participants=names,
              distinct_windows=[int(ix.hashes_U.size) for ix in indexes],
              containment=containment_matrix(indexes).tolist(),
              cross_org_windows=int(hashes_X.size),
              cross_org_windows_per_participant=members_XxP.sum(0).astype(int).tolist(),
              clones=cross_org_clones(indexes, max_refs),
              repository_pairs=repository_pairs(indexes))
