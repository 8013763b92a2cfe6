"""Membership units: non-overlapping token windows of the built blocks, scored in context.

Members are windows of a participant's training blocks, non-members windows of its
validation blocks. A block is scored once, whole (the context it was trained in), and
window j of it is tokens [j * width, (j + 1) * width): its scores use the predictions of
those tokens (window 0 has one fewer, the block's first token having no prediction).
Windows whose tokens also occur in another split of the participant or anywhere in
another participant's data (vendored code, licence headers) are *ambiguous*: they are
members of someone, so they are counted apart and left out of the attacks.
"""

from typing import NamedTuple, Sequence

import numpy as np

from collab.data import blocks as blocks_lib
from collab.data import canaries as canaries_lib
from collab.evals.clones import token_search

SIDES = (('member', 'train'), ('nonmember', 'valid'))


class Windows(NamedTuple):
  """The windows of one participant and split."""
  blocks_NxL: np.ndarray  # The split's blocks (memory-mapped).
  block_ids_N: np.ndarray  # Block of each window.
  offsets_N: np.ndarray  # First token of each window in its block.
  tokens_NxW: np.ndarray
  ambiguous_N: np.ndarray  # bool: its tokens occur elsewhere (see the module docstring).


def cut(blocks_NxL, width: int, max_windows: int, seed: int, tag: str) -> tuple:
  """(block ids, offsets) of every whole window, or a seeded choice of max_windows."""
  num, length = blocks_NxL.shape
  if not 2 <= width <= length:
    raise ValueError(f'config.eval.membership.window={width} must be in [2, {length}] '
                     '(the block length).')
  per = length // width
  block_N, offset_N = np.divmod(np.arange(num * per), per)
  offset_N = offset_N * width
  if 0 < max_windows < len(block_N):
    keep = np.sort(canaries_lib.seeded_rng('membership', seed, tag).choice(
        len(block_N), max_windows, replace=False))
    block_N, offset_N = block_N[keep], offset_N[keep]
  return block_N, offset_N


def load(data_dir: str, names: Sequence[str], width: int, max_windows: int, seed: int,
         others: Sequence[tuple] = ()) -> dict:
  """{(participant, split): Windows} of every participant's training and validation data.

  A window is ambiguous if its tokens occur in any other (participant, split) of this
  folder or of `others` ((data folder, participants) pairs, e.g. the study's data for a
  folder of held-out files).
  """
  streams = {(data_dir, p, s): blocks_lib.load_blocks(data_dir, p, s)
             for p in names for _, s in SIDES}
  elsewhere = {(d, p, s): blocks_lib.load_blocks(d, p, s)
               for d, ps in others for p in ps for _, s in SIDES}
  out = {}
  for (_, p, s), blocks_NxL in streams.items():
    block_N, offset_N = cut(blocks_NxL, width, max_windows, seed, f'{p}\0{s}')
    tokens_NxW = np.stack([blocks_NxL[b, o:o + width] for b, o in zip(block_N, offset_N)]
                          ) if len(block_N) else np.zeros((0, width), np.int64)
    rest = [v for k, v in {**streams, **elsewhere}.items() if k != (data_dir, p, s) and len(v)]
    ambiguous_N = (token_search.occurs_in(tokens_NxW, rest) if rest and len(tokens_NxW)
                   else np.zeros(len(block_N), bool))
    out[p, s] = Windows(blocks_NxL, block_N, offset_N, np.asarray(tokens_NxW), ambiguous_N)
  return out


def prediction_rows(offset: int, width: int) -> tuple:
  """(first, end) rows of a block's per-prediction stats that score the window of
  `width` tokens at `offset`: row t predicts token t + 1, so a window at the start of its
  block has width - 1 of them."""
  return max(int(offset) - 1, 0), int(offset) + width - 1


def window_stats(block_stats: Sequence[np.ndarray], w: Windows, width: int) -> list:
  """Per window, the [T, C] rows of its block's per-prediction stats."""
  return [block_stats[b][slice(*prediction_rows(o, width))]
          for b, o in zip(w.block_ids_N, w.offsets_N)]
