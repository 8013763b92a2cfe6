"""Memorization per federated client: which repositories, directories or shards leak most.

When `config.federated.clients` is not 'participants', the memorization audit's spans
(memorized.jsonl rows, collab/evals/memorization/audit.py) are attributed to the clients whose
training code they match, beside each client's size and duplication:

  attribution   a span belongs to every client one of whose training files holds any of
                its windows (every place in the clone indexes, not only the up to
                `max_refs` places its refs list); a client's `memorized_lines` are the
                span's normalized lines its windows cover (as per participant in the
                audit). Files belong to clients as in collab/data/clients.py
                (`file_clients`): their repository or directory, or the synthetic shard
                holding most of their tokens.
  duplication   the share of a client's distinct W-line windows that also occur in
                another client's training files (of any participant), from the training
                clone indexes alone: one sort of every (window, client) pair.

Clients are sorted by leakage: memorized lines, then spans, then samples.
"""

from typing import Sequence

import numpy as np

from collab.data import blocks as blocks_lib
from collab.data import clients as clients_lib
from collab.evals.clones import index as clones

_EMPTY_I = np.zeros(0, np.int64)


def span_windows(row: dict, min_lines: int, clone_type: int) -> np.ndarray:
  """hash_N of a memorized.jsonl row's span: its `text` holds exactly the span's lines."""
  hash_K, _ = clones.line_hashes(row['text'], clone_type)
  return clones.window_hashes(hash_K, np.zeros(hash_K.size, np.int64), min_lines)[0]


def span_clients(hash_N: np.ndarray, indexes: dict, cid_D: dict) -> dict:
  """{client id: normalized lines of the span covered by that client's windows}."""
  held = {}  # Client id -> positions n of the span's windows its files hold.
  for p, ix in indexes.items():
    for n, u in enumerate(ix.lookup(hash_N).tolist()):
      if u >= 0:
        occ = ix.order_N[ix.first_U[u]:ix.first_U[u] + ix.count_U[u]]
        for c in np.unique(cid_D[p][ix.win_doc_N[occ]]).tolist():
          held.setdefault(c, []).append(n)
  w = next(iter(indexes.values())).min_lines
  # Lines covered by a set of windows: a union of W-line intervals.
  return {c: int(np.minimum(np.diff(sorted(ns)), w).sum()) + w
          for c, ns in held.items() if c >= 0}


def client_duplication(indexes: dict, cid_D: dict, num_clients: int) -> tuple:
  """(distinct_C, shared_C): each client's distinct windows, and how many of them occur
  in another client's training files too."""
  hash_X = np.concatenate([ix.win_hash_N for ix in indexes.values()] + [
      np.zeros(0, np.uint64)])
  cid_X = np.concatenate([cid_D[p][ix.win_doc_N] for p, ix in indexes.items()] + [_EMPTY_I])
  hash_X, cid_X = hash_X[cid_X >= 0], cid_X[cid_X >= 0]
  order = np.lexsort((cid_X, hash_X))
  hash_X, cid_X = hash_X[order], cid_X[order]
  pair = np.r_[True, (hash_X[1:] != hash_X[:-1]) | (cid_X[1:] != cid_X[:-1])]
  hash_P, cid_P = hash_X[pair], cid_X[pair]  # Distinct (window, client) pairs.
  group_P = np.cumsum(np.r_[True, hash_P[1:] != hash_P[:-1]]) - 1
  shared_P = np.bincount(group_P)[group_P] >= 2 if group_P.size else np.zeros(0, bool)
  return (np.bincount(cid_P, minlength=num_clients),
          np.bincount(cid_P, weights=shared_P, minlength=num_clients).astype(np.int64))


def client_table(granularity: str, rows: Sequence[dict], indexes: dict, doc_clients: dict,
                 blocks: dict, owner: dict) -> dict:
  """The per-client block of results['memorization'] (see the module docstring).

  rows: memorized.jsonl rows (`text`, `sample_id`); indexes:
  participant -> training CloneIndex; doc_clients: participant -> the client of each
  indexed file ('' for none); blocks / owner: client -> training blocks / participant
  (the federation; a client that owns no block is absent and reported with 0 blocks).
  """
  for p, ix in indexes.items():
    if len(doc_clients[p]) != ix.num_docs:
      raise ValueError(f'{len(doc_clients[p])} file clients for the {ix.num_docs} files of '
                       f'{p!r}\'s clone index; build both from the same data folder.')
  owner = {**{c: p for p, cs in doc_clients.items() for c in cs if c}, **owner}
  names = sorted(owner)
  ids = {n: i for i, n in enumerate(names)}
  cid_D = {p: np.asarray([ids.get(c, -1) for c in cs], np.int64)
           for p, cs in doc_clients.items()}
  distinct_C, shared_C = client_duplication(indexes, cid_D, len(names))
  dup_C = np.where(distinct_C > 0, shared_C / np.maximum(distinct_C, 1), np.nan)
  files_C = np.bincount(np.concatenate([c[c >= 0] for c in cid_D.values()] + [_EMPTY_I]),
                        minlength=len(names))
  first = next(iter(indexes.values()))
  w, clone_type = first.min_lines, first.clone_type
  spans_C, exclusive_C, lines_C = (np.zeros(len(names), np.int64) for _ in range(3))
  samples_C = [set() for _ in names]
  attributed = 0
  for row in rows:
    held = span_clients(span_windows(row, w, clone_type), indexes, cid_D)
    attributed += bool(held)
    for c, lines in held.items():
      spans_C[c] += 1
      exclusive_C[c] += len(held) == 1
      lines_C[c] += lines
      samples_C[c].add(row['sample_id'])

  def dup(n):
    return None if np.isnan(dup_C[ids[n]]) else float(dup_C[ids[n]])

  out = [{'client': n, 'participant': owner[n], 'blocks': int(blocks.get(n, 0)),
          'files': int(files_C[c]), 'memorized_spans': int(spans_C[c]),
          'exclusive_spans': int(exclusive_C[c]), 'memorized_lines': int(lines_C[c]),
          'memorized_samples': len(samples_C[c]), 'duplication': dup(n)}
         for n, c in ids.items() if spans_C[c]]
  out.sort(key=lambda r: (-r['memorized_lines'], -r['memorized_spans'],
                          -r['memorized_samples'], r['client']))

  def mean_dup(group):
    vals = [d for d in map(dup, group) if d is not None]
    return float(np.mean(vals)) if vals else None
  return {'granularity': granularity, 'num_clients': len(blocks),
          'leaking_clients': len(out), 'spans': len(rows), 'attributed_spans': attributed,
          'duplication_mean': {'all': mean_dup(blocks),
                               'leaking': mean_dup([r['client'] for r in out])},
          'clients': out}


def client_memorization(fed_cfg, data_dir: str, rows: Sequence[dict], train_indexes: dict,
                        seed: int) -> dict:
  """client_table of the federation `fed_cfg` (config.federated) over data_dir's blocks.

  seed: the run's config.seed (draws Dirichlet shard sizes, as in training).
  """
  names = list(train_indexes)
  train = {p: blocks_lib.load_blocks(data_dir, p, 'train') for p in names}
  fed = clients_lib.partition(fed_cfg, data_dir, train, seed)
  doc_clients = {p: clients_lib.file_clients(fed_cfg, data_dir, p, seed) for p in names}
  return client_table(fed_cfg.clients, rows, train_indexes, doc_clients,
                      {c: len(b) for c, b in fed.blocks.items()}, fed.owner)
