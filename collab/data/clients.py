"""Who a federated client is: a participant, one of its repositories or directories, or a shard.

`config.federated.clients` picks the granularity:
  participants  one client per organization (the paper); `train` is returned as is.
  repositories  every repository of every participant: `{participant}/{repo}` with a
                `pkg:` source's `==VERSION` dropped (`google/jax`); the stdlib's repositories
                are its first-level packages (`python/stdlib/json`, and `python/stdlib`
                for its top-level modules).
  directories   `{participant}/{repo}/{folder}`: the first `directory_depth` folders of the
                file's path inside its repository (files less deep: their own folder; files
                at the repository's root: the repository). A `pkg:` path starts with its
                import package (`jax/_src/...`), so depth 2 gives sub-packages. Files
                without a path (the paper's release) refuse this granularity.
  synthetic     each participant's training blocks cut into `synthetic_clients` contiguous
                shards `{participant}#0042`, of equal sizes or sizes drawn from a seeded
                Dirichlet(alpha); every shard holds >= 1 block.

Block provenance. A participant's blocks cut the packed stream `[EOT f1 EOT f2 ...]`
(collab/data/blocks.py); the build saves, next to `blocks/{participant}_{split}.npy`, each
file's start offset in that stream (its EOT) and its repository and path
(`{participant}_{split}_files.npz`). A block belongs to the file that holds the most of
its tokens (a file's tokens include its leading EOT; on a tie, the earlier file), hence to
that file's repository or directory. A repository or directory that owns no block (its
files are small and sit in blocks other files dominate, or in the dropped tail) is no
client; their number is logged.

Clients are views, never copies: a client whose blocks are contiguous is a slice of the
participant's memory-mapped array; otherwise an `IndexedBlocks` (the memmap plus sorted
row indices) that reads rows only when indexed.
"""

import collections
import os
import zlib
from typing import NamedTuple

from absl import logging
import numpy as np

from collab import io
from collab.data import blocks as blocks_lib

GRANULARITIES = ('participants', 'repositories', 'directories', 'synthetic')


class Clients(NamedTuple):
  """The federation: each client's blocks (sorted by name) and the participant it belongs to."""
  blocks: dict  # client name -> blocks_like [n, L] (np.ndarray, memmap slice or IndexedBlocks).
  owner: dict  # client name -> participant name.


class IndexedBlocks:
  """Rows `index_n` (sorted) of a participant's blocks_NxL; rows are read when indexed."""

  def __init__(self, base_NxL, index_n: np.ndarray):
    self._base = base_NxL
    self.index = np.asarray(index_n, np.int64)
    self.shape = (len(self.index),) + tuple(base_NxL.shape[1:])
    self.dtype = base_NxL.dtype

  def __len__(self) -> int:
    return len(self.index)

  def __getitem__(self, idx) -> np.ndarray:
    """x[idx] for an int, slice or int array of client rows; sorted idx reads in file order."""
    return np.asarray(self._base[self.index[idx]])

  def __array__(self, dtype=None, copy=None):
    del copy  # Always a new array: the rows are read from the base now.
    rows = self[np.arange(len(self))]
    return rows if dtype is None else rows.astype(dtype)


# --- Block provenance: which file each block came from.

class Provenance(NamedTuple):
  start_F: np.ndarray  # int64 offset of each file's EOT in the packed stream.
  total: int  # Tokens in the packed stream (the tail past the last full block included).
  repo_F: list  # Each file's repository.
  path_F: list  # Each file's path inside its repository (or its identity, see below).
  # int64 duplication count of each file (the source's `copies`, else 1 + the identical
  # files exact dedup collapsed into it); None in folders built before it existed.
  copies_F: np.ndarray | None = None
  # Sources whose files have no path (the paper's release): path_F holds their identity
  # (`hash:...`), so clients by directory cannot be formed from them.
  pathless_sources: tuple = ()


def provenance_path(data_dir: str, participant: str, split: str) -> str:
  return os.path.join(data_dir, 'blocks', f'{participant}_{split}_files.npz')


def _strings(values) -> tuple:
  """A list of str as (utf-8 bytes uint8, end offsets int64): compact, no pickling."""
  encoded = [v.encode('utf-8', 'surrogatepass') for v in values]
  ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)
  return np.frombuffer(b''.join(encoded), np.uint8), ends


def _unstrings(data: np.ndarray, ends: np.ndarray) -> list:
  blob, starts = data.tobytes(), np.concatenate([[0], ends[:-1]]).tolist()
  return [blob[s:e].decode('utf-8', 'surrogatepass') for s, e in zip(starts, ends.tolist())]


def save_provenance(path: str, records, ids_per_file) -> None:
  """Writes the file table of one packed split (see the module docstring), atomically."""
  lengths_F = np.asarray([len(ids) + 1 for ids in ids_per_file], np.int64)  # + its EOT.
  start_F = np.concatenate([[0], np.cumsum(lengths_F)[:-1]]).astype(np.int64)
  repos, repo_ends = _strings([r['repo'] for r in records])
  paths, path_ends = _strings([r['path'] for r in records])
  copies_F = np.asarray([r.get('copies', 1) for r in records], np.int64)
  pathless = sorted({r['source'] for r in records if r.get('identity') and 'source' in r})
  io.atomic_write(path, lambda f: np.savez(
      f, start_F=start_F, total=np.int64(lengths_F.sum()), repos=repos, repo_ends=repo_ends,
      paths=paths, path_ends=path_ends, copies_F=copies_F,
      pathless=np.asarray(pathless, dtype=np.str_)), binary=True)


def load_provenance(data_dir: str, participant: str, split: str = 'train') -> Provenance:
  """The file table of a participant's split; raises if the folder predates provenance."""
  path = provenance_path(data_dir, participant, split)
  if not os.path.isfile(path):
    raise blocks_lib.DataNotBuiltError(
        f'{data_dir!r} has no block provenance for {participant!r} ({path} is missing): it '
        'was built before clients by repository/directory existed; rebuild it with '
        'python -m launch.build_data --config=... --data_dir=NEW_DIR (or delete it; runs '
        'rebuild their data folder when the build version changes).')
  with np.load(path, allow_pickle=False) as z:
    return Provenance(z['start_F'], int(z['total']), _unstrings(z['repos'], z['repo_ends']),
                      _unstrings(z['paths'], z['path_ends']),
                      z['copies_F'] if 'copies_F' in z.files else None,
                      tuple(z['pathless'].tolist()) if 'pathless' in z.files else ())


def majority(starts_A: np.ndarray, starts_B: np.ndarray, end: int) -> np.ndarray:
  """For each interval of A, the interval of B overlapping it most (ties: the earlier B).

  A and B each cut [0, end) into consecutive intervals starting at their sorted starts
  (starts_B[0] must be 0). A's intervals starting at or past `end` get -1.
  """
  starts_A, starts_B = np.asarray(starts_A, np.int64), np.asarray(starts_B, np.int64)
  points = np.unique(np.concatenate([starts_A, starts_B]))
  points = points[points < end]
  length = np.diff(np.append(points, end))
  a = np.searchsorted(starts_A, points, 'right') - 1
  b = np.searchsorted(starts_B, points, 'right') - 1
  order = np.lexsort((b, -length, a))  # By A, then longest overlap, then earliest B.
  first = order[np.r_[True, a[order][1:] != a[order][:-1]]]
  out = np.full(len(starts_A), -1, np.int64)
  valid = a[first] >= 0
  out[a[first][valid]] = b[first][valid]
  return out


def block_files(prov: Provenance, num_blocks: int, seq_len: int, where: str = '') -> np.ndarray:
  """file_N: the file holding most of each block's tokens (`where` names them in errors)."""
  if num_blocks != prov.total // seq_len:
    raise ValueError(f'{num_blocks} blocks of {seq_len} tokens do not match the provenance '
                     f'{where}({prov.total} stream tokens); rebuild the data folder.')
  return majority(np.arange(num_blocks, dtype=np.int64) * seq_len, prov.start_F,
                  num_blocks * seq_len)


# --- Client names.

def repository_client(participant: str, repo: str) -> str:
  """`google/jax` for repo 'jax==0.4.30' (an installed package's version is dropped)."""
  return f"{participant}/{repo.split('==')[0] or '_'}"


def directory_client(participant: str, repo: str, path: str, depth: int) -> str:
  """`{participant}/{repo}/{first `depth` folders of path}`."""
  folders = path.split('/')[:-1][:depth]
  return '/'.join([repository_client(participant, repo)] + folders)


def _check(fed_cfg) -> None:
  mode = fed_cfg.clients
  if mode not in GRANULARITIES:
    raise ValueError(f'Unknown config.federated.clients {mode!r}; use one of {GRANULARITIES}.')
  if mode == 'directories' and int(fed_cfg.directory_depth) < 1:
    raise ValueError(f'config.federated.directory_depth={fed_cfg.directory_depth} must be '
                     '>= 1 (folders naming a client).')
  if mode == 'synthetic':
    if int(fed_cfg.synthetic_clients) < 1:
      raise ValueError(f'config.federated.synthetic_clients={fed_cfg.synthetic_clients}: '
                       "set the number of clients per participant (>= 1) for 'synthetic'.")
    if fed_cfg.synthetic_partition not in ('equal', 'dirichlet'):
      raise ValueError(f'Unknown config.federated.synthetic_partition '
                       f"{fed_cfg.synthetic_partition!r}; use 'equal' or 'dirichlet'.")
    if fed_cfg.synthetic_partition == 'dirichlet' and not fed_cfg.dirichlet_alpha > 0:
      raise ValueError(f'config.federated.dirichlet_alpha={fed_cfg.dirichlet_alpha} must '
                       'be > 0.')


def synthetic_sizes(num_blocks: int, num_clients: int, kind: str, alpha: float,
                    rng: np.random.Generator) -> np.ndarray:
  """Shard sizes (>= 1, summing to num_blocks): equal, or 1 + a Dirichlet share of the rest."""
  if num_clients > num_blocks:
    raise ValueError(f'{num_clients} synthetic clients need at least as many blocks; there '
                     f'are {num_blocks}: lower config.federated.synthetic_clients or '
                     'data.seq_len, or raise the participants\' max_bytes.')
  if kind == 'equal':
    return num_blocks // num_clients + (np.arange(num_clients) < num_blocks % num_clients)
  rest = num_blocks - num_clients
  share = rest * rng.dirichlet(np.full(num_clients, float(alpha)))
  sizes = np.floor(share).astype(np.int64)
  extra = np.argsort(-(share - sizes), kind='stable')[:rest - sizes.sum()]  # Largest remainders.
  sizes[extra] += 1
  return sizes + 1


def _shard_bounds(fed_cfg, participant: str, num_blocks: int, seed: int) -> np.ndarray:
  """Block offsets [0, ..., num_blocks] of a participant's synthetic shards."""
  if int(fed_cfg.synthetic_clients) > num_blocks:
    raise ValueError(f'Participant {participant!r} has {num_blocks} training blocks for '
                     f'config.federated.synthetic_clients={fed_cfg.synthetic_clients}; '
                     'lower it or data.seq_len, or raise its max_bytes.')
  rng = np.random.default_rng([seed, zlib.crc32(participant.encode())])
  sizes = synthetic_sizes(num_blocks, int(fed_cfg.synthetic_clients),
                          fed_cfg.synthetic_partition, fed_cfg.dirichlet_alpha, rng)
  return np.concatenate([[0], np.cumsum(sizes)])


def _shard_names(participant: str, count: int) -> list:
  width = max(4, len(str(count - 1)))
  return [f'{participant}#{i:0{width}d}' for i in range(count)]


def _file_names(fed_cfg, participant: str, prov: Provenance) -> list:
  """The repository or directory client of each file."""
  if fed_cfg.clients == 'repositories':
    return [repository_client(participant, r) for r in prov.repo_F]
  if prov.pathless_sources:
    raise ValueError(f'config.federated.clients=\'directories\' needs file paths, and '
                     f'participant {participant!r} has files without one (source '
                     f'{prov.pathless_sources[0]}, the release format); use \'repositories\' '
                     "or 'synthetic' clients.")
  depth = int(fed_cfg.directory_depth)
  return [directory_client(participant, r, p, depth) for r, p in zip(prov.repo_F, prov.path_F)]


def file_clients(fed_cfg, data_dir: str, participant: str, seed: int) -> list:
  """The client of each training file, in stored (TFDS and clone index) order.

  Repositories and directories: the file's own. Synthetic: the shard holding most of the
  file's tokens ('' for a file wholly in the dropped tail). Participants: the participant.
  """
  _check(fed_cfg)
  if fed_cfg.clients == 'participants':
    return [participant] * len(load_provenance(data_dir, participant).start_F)
  prov = load_provenance(data_dir, participant)
  if fed_cfg.clients != 'synthetic':
    return _file_names(fed_cfg, participant, prov)
  seq_len = int(blocks_lib.load_manifest(data_dir)['seq_len'])
  num_blocks = prov.total // seq_len
  bounds = _shard_bounds(fed_cfg, participant, num_blocks, seed)
  names = _shard_names(participant, len(bounds) - 1)
  shard_F = majority(prov.start_F, bounds[:-1] * seq_len, num_blocks * seq_len)
  return [names[s] if s >= 0 else '' for s in shard_F.tolist()]


def _view(blocks_NxL, index_n: np.ndarray):
  """A slice of blocks_NxL when index_n is a contiguous range, else an IndexedBlocks."""
  if index_n[-1] - index_n[0] + 1 == len(index_n):
    return blocks_NxL[int(index_n[0]):int(index_n[-1]) + 1]
  return IndexedBlocks(blocks_NxL, index_n)


def _by_files(fed_cfg, data_dir: str, participant: str, blocks_NxL) -> tuple:
  """({client: view}, clients that own no block) of one participant by repository/directory."""
  prov = load_provenance(data_dir, participant)
  file_N = block_files(prov, len(blocks_NxL), blocks_NxL.shape[1],
                       f"of {participant!r} in {provenance_path(data_dir, participant, 'train')} ")
  names, client_F = np.unique(_file_names(fed_cfg, participant, prov), return_inverse=True)
  client_N = client_F.reshape(-1)[file_N]
  counts = np.bincount(client_N, minlength=len(names))
  order = np.argsort(client_N, kind='stable')  # Rows grouped by client, ascending inside.
  groups = np.split(order, np.cumsum(counts)[:-1])
  views = {str(n): _view(blocks_NxL, g) for n, g, k in zip(names, groups, counts) if k}
  return views, int(np.sum(counts == 0))


def partition(fed_cfg, data_dir: str, train: dict, seed: int) -> Clients:
  """The federation's clients over the participants' training blocks (see module docstring).

  `train`: participant -> blocks_NxL (memory-mapped); `seed`: the run's seed (config.seed),
  which draws Dirichlet shard sizes. Clients come sorted by name; each has >= 1 block.
  """
  _check(fed_cfg)
  if fed_cfg.clients == 'participants':
    return Clients(dict(train), {p: p for p in train})
  blocks, owner, empty = {}, {}, collections.Counter()
  for participant, blocks_NxL in train.items():
    if fed_cfg.clients == 'synthetic':
      bounds = _shard_bounds(fed_cfg, participant, len(blocks_NxL), seed)
      views = {name: blocks_NxL[int(s):int(e)] for name, s, e in zip(
          _shard_names(participant, len(bounds) - 1), bounds[:-1], bounds[1:])}
    else:
      views, empty[participant] = _by_files(fed_cfg, data_dir, participant, blocks_NxL)
    blocks.update(views)
    owner.update({name: participant for name in views})
  if sum(empty.values()):
    logging.info('Clients by %s: dropped %d that own no block of their own (%s).',
                 fed_cfg.clients, sum(empty.values()), dict(empty))
  logging.info('Clients by %s: %d clients over %d participants.', fed_cfg.clients,
               len(blocks), len(train))
  names = sorted(blocks)
  return Clients({n: blocks[n] for n in names}, {n: owner[n] for n in names})
