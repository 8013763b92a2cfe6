"""Token blocks: packing files into fixed-length rows, and deterministic batch iterators.

Packing puts the end-of-text token before every file (so each file starts like a
memorization prompt does), concatenates, and cuts the stream into `[N, L]` blocks,
dropping the partial last block. Blocks are stored as memory-mappable `.npy`.

`BatchIterator` visits the blocks in a fresh permutation every epoch, drawn from
(seed, epoch); an epoch is `N // B` batches of distinct blocks (the leftover blocks of
that permutation wait for the next epoch's shuffle). Its position `{"epoch", "index"}`
is plain JSON, and an iterator restored at a position yields the same batches. In padded
mode (small federated clients) a source of fewer than B blocks makes one batch per
epoch: its N blocks, shuffled, then B - N rows of zeros that weigh 0 (`take_weighted`).
The blocks may be any array-like with `len()`, `.shape` and indexing by a sorted integer
array (a memmap, or a client's view of one).
"""

import os
from typing import Sequence

import numpy as np

from collab import io


class DataNotBuiltError(ValueError):
  """The data folder was never built (or is not a collab data folder)."""


def block_dtype(vocab_size: int) -> str:
  return 'uint16' if vocab_size <= 2**16 else 'uint32'


def pack(ids_per_file: Sequence[np.ndarray], eot_id: int, seq_len: int,
         dtype: str = 'uint32') -> np.ndarray:
  """[EOT f1 EOT f2 ...] cut into blocks_NxL; the remainder (< L tokens) is dropped."""
  if seq_len <= 0:
    raise ValueError(f'data.seq_len must be positive, got {seq_len}.')
  pieces = []
  for ids in ids_per_file:
    pieces.append(np.asarray([eot_id], dtype))
    pieces.append(np.asarray(ids, dtype))
  stream = np.concatenate(pieces) if pieces else np.zeros((0,), dtype)
  n = len(stream) // seq_len
  return stream[:n * seq_len].reshape(n, seq_len)


def stream_length(ids_per_file: Sequence[np.ndarray]) -> int:
  """Tokens in the packed stream, end-of-text tokens included."""
  return sum(len(ids) + 1 for ids in ids_per_file)


def write_packed(path: str, ids_per_file: Sequence, eot_id: int, seq_len: int, dtype: str,
                 read=np.asarray, chunk_tokens: int = 1 << 22) -> int:
  """pack() written straight to a .npy (the same bytes as save_blocks(pack(...))) through a
  buffer of `chunk_tokens`, never the whole stream in memory; `read(ids)` gives a file's
  ids (e.g. from a Spill). Written atomically; returns the number of blocks."""
  num_blocks = stream_length(ids_per_file) // seq_len
  header = {'descr': np.lib.format.dtype_to_descr(np.dtype(dtype)), 'fortran_order': False,
            'shape': (num_blocks, seq_len)}

  def write(f):
    np.lib.format.write_array_header_1_0(f, header)
    left, pieces, buffered = num_blocks * seq_len, [], 0
    for ids in ids_per_file:
      if not left:
        break
      piece = np.concatenate([np.asarray([eot_id], dtype), np.asarray(read(ids), dtype)])
      pieces.append(piece[:left])
      left -= len(pieces[-1])
      buffered += len(pieces[-1])
      if buffered >= chunk_tokens:
        f.write(np.concatenate(pieces).tobytes())
        pieces, buffered = [], 0
    if pieces:
      f.write(np.concatenate(pieces).tobytes())

  io.atomic_write(path, write, binary=True)
  return num_blocks


def save_blocks(path: str, blocks_NxL: np.ndarray) -> None:
  """Writes a .npy atomically (temporary file in the same folder, then rename)."""
  io.atomic_write(path, lambda f: np.save(f, blocks_NxL), binary=True)


def blocks_path(data_dir: str, participant: str, split: str) -> str:
  return os.path.join(data_dir, 'blocks', f'{participant}_{split}.npy')


def load_manifest(data_dir: str) -> dict:
  """manifest.json of a built data folder; DataNotBuiltError when there is none."""
  path = os.path.join(data_dir, 'manifest.json')
  if not os.path.isfile(path):
    raise DataNotBuiltError(
        f'{data_dir!r} holds no built data (manifest.json missing); build it with: '
        f'python -m launch.build_data --config=YOUR_CONFIG --data_dir={data_dir} (the config '
        'this run uses)')
  return io.read_json(path)


def load_blocks(data_dir: str, participant: str, split: str) -> np.ndarray:
  """blocks_NxL of one participant and split, memory-mapped (read-only)."""
  manifest = load_manifest(data_dir)
  if participant not in manifest['participants']:
    raise ValueError(f'Unknown participant {participant!r} in {data_dir!r}; it has '
                     f'{manifest["participants"]}.')
  if split not in ('train', 'valid'):
    raise ValueError(f"Unknown split {split!r}: use 'train' or 'valid'.")
  return np.load(blocks_path(data_dir, participant, split), mmap_mode='r')


class BatchIterator:
  """Shuffled batches of blocks; `next(it) -> tokens_BxL` (int32), resumable by position.

  With `pad`, fewer blocks than a batch are allowed: each batch holds them all, shuffled,
  followed by zero rows; `last_weights` (weights_B, 0 for those rows) says which are real.
  """

  def __init__(self, blocks_NxL: np.ndarray, batch_size: int, seed: int,
               position: dict | None = None, pad: bool = False):
    num_blocks = len(blocks_NxL)
    if batch_size <= 0:
      raise ValueError(f'batch_size must be positive, got {batch_size}.')
    if num_blocks < batch_size and not (pad and num_blocks > 0):
      raise ValueError(f'Only {num_blocks} blocks for a batch of {batch_size}; lower the '
                       'batch size or seq_len, or add data.')
    self._blocks = blocks_NxL
    self._batch_size = batch_size
    self._seed = seed
    self.steps_per_epoch = max(1, num_blocks // batch_size)
    self.last_weights = None
    self._epoch, self._index, self._perm = 0, 0, None
    if position is not None:
      self.position = position

  @property
  def position(self) -> dict:
    """Where the next batch comes from: JSON to save with a checkpoint."""
    return {'epoch': self._epoch, 'index': self._index}

  @position.setter
  def position(self, position: dict) -> None:
    epoch, index = int(position['epoch']), int(position['index'])
    if epoch < 0 or not 0 <= index <= self.steps_per_epoch:
      raise ValueError(f'Bad iterator position {position}: index must be in '
                       f'[0, {self.steps_per_epoch}] and epoch >= 0.')
    self._epoch, self._index, self._perm = epoch, index, None

  def _permutation(self) -> np.ndarray:
    if self._perm is None:
      rng = np.random.default_rng([self._seed, self._epoch])
      self._perm = rng.permutation(len(self._blocks))
    return self._perm

  def __iter__(self):
    return self

  def __next__(self) -> np.ndarray:
    if self._index >= self.steps_per_epoch:
      self._epoch, self._index, self._perm = self._epoch + 1, 0, None
    start = self._index * self._batch_size
    idx_B = self._permutation()[start:start + self._batch_size]
    self._index += 1
    self.last_indices = idx_B  # Which blocks the batch holds (e.g. to count per owner).
    # Read a memmap in file order (sorted rows), then put the rows back in shuffled order.
    sort_R = np.argsort(idx_B)
    rows = len(idx_B)  # < batch size only in padded mode: the rest stays zeros.
    tokens_BxL = np.zeros((self._batch_size, self._blocks.shape[1]), np.int32)
    tokens_BxL[sort_R] = self._blocks[idx_B[sort_R]]
    self.last_weights = (np.arange(self._batch_size) < rows).astype(np.float32)
    return tokens_BxL

  def take(self, steps: int) -> np.ndarray:
    """The next `steps` batches stacked: tokens_KxBxL (e.g. one client's local steps)."""
    return np.stack([next(self) for _ in range(steps)])

  def take_weighted(self, steps: int) -> tuple:
    """(tokens_KxBxL, weights_KxB) of the next `steps` batches; padding rows weigh 0."""
    tokens, weights = [], []
    for _ in range(steps):
      tokens.append(next(self))
      weights.append(self.last_weights)
    return np.stack(tokens), np.stack(weights)


class MultiIterator:
  """One BatchIterator per client; `next(it) -> tokens_CxBxL`, `take(k) -> tokens_CxKxBxL`.

  Client c shuffles with seed `seed + c`, so clients draw independent orders and each
  keeps its own epochs (clients may hold different numbers of blocks; with `pad`, fewer
  than a batch).
  """

  def __init__(self, blocks_per_client: Sequence[np.ndarray], batch_size: int, seed: int,
               positions: Sequence[dict] | None = None, pad: bool = False):
    positions = positions or [None] * len(blocks_per_client)
    if len(positions) != len(blocks_per_client):
      raise ValueError(f'{len(positions)} positions for {len(blocks_per_client)} clients.')
    self.iterators = [BatchIterator(b, batch_size, seed + c, p, pad=pad)
                      for c, (b, p) in enumerate(zip(blocks_per_client, positions))]

  @property
  def steps_per_epoch(self) -> list[int]:
    return [it.steps_per_epoch for it in self.iterators]

  @property
  def position(self) -> list[dict]:
    return [it.position for it in self.iterators]

  @position.setter
  def position(self, positions: Sequence[dict]) -> None:
    for it, p in zip(self.iterators, positions, strict=True):
      it.position = p

  def __iter__(self):
    return self

  def __next__(self) -> np.ndarray:
    return np.stack([next(it) for it in self.iterators])

  def take(self, steps: int) -> np.ndarray:
    return np.stack([it.take(steps) for it in self.iterators])
