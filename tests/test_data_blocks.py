"""Tokenizer, block packing round trip, storage, and resumable batch iterators."""

import os

import numpy as np
import pytest

from collab.data import blocks
from collab.data import tokenizer as tokenizer_lib

FILES = [f'def f{i}(x):\n    return x * {i} + {i % 3}  # step {i}\n' for i in range(40)]
FILES.append('EOT = "<|endoftext|>"  # a literal, not a boundary\n')


@pytest.fixture(scope='module')
def tok():
  return tokenizer_lib.train_bpe(FILES, vocab_size=300, progress=False)


def test_tokenizer_saves_and_reloads_with_end_of_text(tok, tmp_path):
  assert tok.eos_token == tok.bos_token == tokenizer_lib.EOT
  tok.save_pretrained(str(tmp_path / 'tokenizer'))
  loaded = tokenizer_lib.load_tokenizer(str(tmp_path))  # A data folder holding tokenizer/.
  assert loaded.eos_token_id == tokenizer_lib.eot_id(tok) and len(loaded) == len(tok)
  assert loaded(FILES[3])['input_ids'] == tok(FILES[3])['input_ids']
  with pytest.raises(FileNotFoundError, match='build the data'):
    tokenizer_lib.load_tokenizer(str(tmp_path / 'missing'))
  with pytest.raises(ValueError, match='vocab_size'):
    tokenizer_lib.train_bpe(FILES, vocab_size=100)


def test_pack_round_trip(tok):
  encode, eot, seq_len = tokenizer_lib.make_encoder(tok), tokenizer_lib.eot_id(tok), 16
  ids = encode(FILES)
  blocks_NxL = blocks.pack(ids, eot, seq_len)
  # The stream, built independently with the transformers API.
  stream = []
  for text in FILES:
    stream += [eot] + tok(text, add_special_tokens=False, split_special_tokens=True)['input_ids']
  n = len(stream) // seq_len
  assert blocks_NxL.shape == (n, seq_len) and len(stream) - n * seq_len < seq_len
  assert blocks.stream_length(ids) == len(stream)
  joined = ''.join(tokenizer_lib.EOT + t for t in FILES)
  head = tok.decode(blocks_NxL.ravel().tolist())
  tail = tok.decode(stream[n * seq_len:])
  assert head + tail == joined  # Decoding the blocks gives the text minus the remainder.
  assert len(tail) > 0 and joined.startswith(head)
  # Only the packer inserts end-of-text; the literal in the last file stays text.
  assert int((blocks.pack(ids, eot, 1) == eot).sum()) == len(FILES)


def test_block_dtype_and_atomic_storage(tmp_path):
  assert blocks.block_dtype(8192) == 'uint16' and blocks.block_dtype(65536) == 'uint16'
  assert blocks.block_dtype(65537) == 'uint32'
  data = blocks.pack([np.arange(100, dtype=np.uint32)], 7, 10, 'uint16')
  path = blocks.blocks_path(str(tmp_path), 'org', 'train')
  blocks.save_blocks(path, data)
  assert os.listdir(os.path.dirname(path)) == ['org_train.npy']  # No temporary left.
  loaded = np.load(path, mmap_mode='r')
  assert isinstance(loaded, np.memmap) and loaded.dtype == np.uint16
  np.testing.assert_array_equal(loaded, data)


def test_load_before_build_raises_data_not_built(tmp_path):
  with pytest.raises(blocks.DataNotBuiltError, match='launch.build_data'):
    blocks.load_manifest(str(tmp_path))
  with pytest.raises(ValueError, match=str(tmp_path)):
    blocks.load_blocks(str(tmp_path), 'org', 'train')


def _numbered(n, seq_len=3):
  return np.repeat(np.arange(n, dtype=np.uint16)[:, None], seq_len, axis=1)  # Row i is all i.


def test_epochs_visit_distinct_blocks_in_seeded_order():
  it = blocks.BatchIterator(_numbered(10), batch_size=4, seed=3)
  assert it.steps_per_epoch == 2
  first = np.concatenate([next(it)[:, 0] for _ in range(2)])
  second = np.concatenate([next(it)[:, 0] for _ in range(2)])
  assert len(set(first)) == 8 and len(set(second)) == 8
  assert not np.array_equal(first, second)  # A fresh permutation each epoch.
  again = blocks.BatchIterator(_numbered(10), batch_size=4, seed=3)
  np.testing.assert_array_equal(np.concatenate([next(again)[:, 0] for _ in range(2)]), first)
  batch = next(again)
  assert batch.dtype == np.int32 and batch.shape == (4, 3)
  assert it.position == {'epoch': 1, 'index': 2}


def test_resume_from_saved_position_gives_the_same_batches():
  data = _numbered(11)
  it = blocks.BatchIterator(data, batch_size=3, seed=0)
  for _ in range(5):  # Crosses an epoch boundary (3 steps per epoch).
    next(it)
  saved = dict(it.position)
  expected = [next(it) for _ in range(6)]
  resumed = blocks.BatchIterator(data, batch_size=3, seed=0, position=saved)
  for want in expected:
    np.testing.assert_array_equal(next(resumed), want)
  with pytest.raises(ValueError, match='position'):
    blocks.BatchIterator(data, 3, 0, position={'epoch': 0, 'index': 9})
  with pytest.raises(ValueError, match='batch'):
    blocks.BatchIterator(data, batch_size=12, seed=0)


def test_multi_iterator_gives_one_batch_per_client_and_resumes():
  clients = [_numbered(8), _numbered(12) + 100]
  it = blocks.MultiIterator(clients, batch_size=2, seed=5)
  assert it.steps_per_epoch == [4, 6]
  tokens_CxBxL = next(it)
  assert tokens_CxBxL.shape == (2, 2, 3)
  assert (tokens_CxBxL[0] < 100).all() and (tokens_CxBxL[1] >= 100).all()
  saved = it.position
  tokens_CxKxBxL = it.take(5)
  assert tokens_CxKxBxL.shape == (2, 5, 2, 3)
  resumed = blocks.MultiIterator(clients, batch_size=2, seed=5, positions=saved)
  np.testing.assert_array_equal(resumed.take(5), tokens_CxKxBxL)


def test_padded_iterator_fills_small_sources_with_zero_weight_rows():
  data = _numbered(3) + 1  # Rows 1, 2, 3: never zero, unlike padding.
  with pytest.raises(ValueError, match='batch'):
    blocks.BatchIterator(data, batch_size=5, seed=0)  # Unpadded: fewer blocks than a batch.
  it = blocks.BatchIterator(data, batch_size=5, seed=0, pad=True)
  assert it.steps_per_epoch == 1
  tokens_KxBxL, weights_KxB = it.take_weighted(3)
  assert tokens_KxBxL.shape == (3, 5, 3) and weights_KxB.shape == (3, 5)
  np.testing.assert_array_equal(weights_KxB, [[1, 1, 1, 0, 0]] * 3)
  for tokens_BxL in tokens_KxBxL:  # Every block once per batch, shuffled; then zeros.
    assert sorted(tokens_BxL[:3, 0]) == [1, 2, 3] and not tokens_BxL[3:].any()
  assert len({tuple(t[:3, 0]) for t in tokens_KxBxL}) > 1  # A fresh shuffle every epoch.
  resumed = blocks.BatchIterator(data, 5, 0, position={'epoch': 1, 'index': 1}, pad=True)
  np.testing.assert_array_equal(next(resumed), tokens_KxBxL[2])
  # A source of a batch or more behaves exactly as unpadded; its rows all weigh 1.
  full, padded = blocks.BatchIterator(_numbered(7), 3, 4), blocks.MultiIterator(
      [_numbered(7), data], 3, 4, pad=True).iterators[0]
  tokens, weights = padded.take_weighted(4)
  np.testing.assert_array_equal(tokens, full.take(4))
  assert weights.all()
  with pytest.raises(ValueError, match='0 blocks'):
    blocks.BatchIterator(data[:0], 5, 0, pad=True)


@pytest.mark.parametrize('dtype', ['uint16', 'uint32'])
def test_write_packed_is_the_same_file_as_pack_then_save(tmp_path, dtype):
  rng = np.random.default_rng(0)
  ids = [rng.integers(0, 5000, n) for n in (0, 7, 30, 3, 55, 1)]
  reference, streamed = str(tmp_path / 'a.npy'), str(tmp_path / 'b.npy')
  blocks.save_blocks(reference, blocks.pack(ids, 9, 8, dtype))
  # A buffer smaller than one file: several flushes, the tail cut at the last whole block.
  assert blocks.write_packed(streamed, ids, 9, 8, dtype, chunk_tokens=5) == 102 // 8
  with open(reference, 'rb') as a, open(streamed, 'rb') as b:
    assert a.read() == b.read()
