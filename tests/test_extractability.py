"""Tests for collab.evals.memorization.extractability: windows, decoding, rates, provenance."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from collab import hf
from collab import io
from collab import model as model_lib
from collab.data import blocks as blocks_lib
from collab.data import clients as clients_lib
from collab.evals.clones import token_search
from collab.evals.generation import sampling
from collab.evals.memorization import extractability as ex

CFG = model_lib.ModelConfig(vocab_size=64, num_layers=2, num_heads=4, d_model=32, d_ff=64,
                            max_len=64, dropout=0.0)
M = 8  # Suffix tokens; every model test decodes 8 tokens in batches of 8 (one compilation).


def peaked_params(cfg=CFG):
  # Wider than GPT-2's init (embeddings most) so logits are peaked: no near-ties to flip.
  # numpy draws: no jax.random compilation per parameter shape.
  shapes = nn.meta.unbox(model_lib.abstract_params(cfg))
  leaves = jax.tree_util.tree_flatten_with_path(shapes)[0]
  rng = np.random.default_rng(0)
  arrays = [((1.0 if 'wte' in jax.tree_util.keystr(path) else 0.1)
             * rng.standard_normal(leaf.shape)).astype(np.float32) for path, leaf in leaves]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shapes), arrays)


@pytest.fixture(scope='module')
def params():
  return peaked_params()


def argmax_decode(params, prefixes_NxK, new_tokens):
  """No cache: the full model on prefix + generated (positions 0..), argmax, one at a time."""
  forward = jax.jit(lambda t: model_lib.GPT2(CFG).apply({'params': params}, t))
  num, k = prefixes_NxK.shape
  seqs_NxL = np.zeros((num, CFG.max_len), np.int32)
  seqs_NxL[:, :k] = prefixes_NxK
  for t in range(new_tokens):
    logits_NxLxV = np.asarray(forward(seqs_NxL))
    seqs_NxL[:, k + t] = logits_NxLxV[:, k + t - 1].argmax(-1)
  return seqs_NxL[:, k:k + new_tokens]


def write_data(root, blocks, files=None) -> str:
  """A hand-made data folder: blocks {(participant, split): NxL}; files {participant:
  [(repo, path, tokens with EOT, copies)]} become that participant's train provenance."""
  os.makedirs(os.path.join(root, 'blocks'))
  io.atomic_write_json(os.path.join(root, 'manifest.json'),
                       {'participants': sorted({p for p, _ in blocks})})
  for (p, split), blocks_NxL in blocks.items():
    np.save(blocks_lib.blocks_path(root, p, split), np.asarray(blocks_NxL, np.uint16))
  for p, table in (files or {}).items():
    records = [{'repo': r, 'path': path, 'copies': c} for r, path, _, c in table]
    clients_lib.save_provenance(clients_lib.provenance_path(root, p, 'train'), records,
                                [np.zeros(n - 1) for _, _, n, _ in table])
  return root


# --- Pure parts.

def test_windows_come_from_the_block_start_and_ks_that_do_not_fit_are_skipped():
  blocks_NxL = np.arange(3 * 16).reshape(3, 16).astype(np.uint16)
  got, skipped = ex.windows(blocks_NxL, (2, 10, 11, 0, 4), 6)
  assert sorted(got) == [2, 4, 10] and skipped == [11, 0]
  for k, (prefix_NxK, suffix_NxM) in got.items():
    assert prefix_NxK.dtype == suffix_NxM.dtype == np.int32
    np.testing.assert_array_equal(prefix_NxK, blocks_NxL[:, :k])  # Fed at positions 0..k-1.
    np.testing.assert_array_equal(suffix_NxM, blocks_NxL[:, k:k + 6])
  assert got[10][1][:, -1].tolist() == [15, 31, 47]  # k + m = L: the block's last token.
  assert ex.fitting_ks((2, 10, 11), 6, 12) == ([2], [10, 11])  # A shorter context.
  with pytest.raises(ValueError, match='m'):
    ex.windows(blocks_NxL, (2,), 0)


def test_match_lengths_rates_and_wilson_bounds_on_planted_generations():
  rng = np.random.default_rng(0)
  suffix_NxM = rng.integers(0, 50, (6, 5))
  generated_NxM = suffix_NxM.copy()
  generated_NxM[1, 3] = 99  # Matches 3 leading tokens.
  generated_NxM[2, 0] = 99  # None.
  generated_NxM[3, 4:] = -1  # A row that stopped short: the missing token mismatches.
  match_N = ex.match_lengths(generated_NxM, suffix_NxM)
  assert match_N.tolist() == [5, 3, 0, 4, 5, 5]
  entry = ex.rate_entry(match_N == 5, match_N)
  assert entry['windows'] == 6 and entry['extracted'] == 3 and entry['rate'] == 0.5
  assert entry['mean_match'] == pytest.approx(22 / 6)
  lo, hi = entry['ci95']
  assert lo < 0.5 < hi
  np.testing.assert_allclose(ex.wilson(5, 10), [0.236593, 0.763407], atol=1e-6)
  assert ex.wilson(0, 10)[0] == 0.0 and ex.wilson(0, 10)[1] == pytest.approx(0.277533, abs=1e-6)
  assert ex.wilson(10, 10)[1] == 1.0 and ex.wilson(10, 10)[0] < 1
  assert ex.wilson(0, 0) is None and ex.rate_entry([], [])['rate'] is None


def test_sampled_extraction_needs_one_exact_sample_among_n(monkeypatch):
  suffix_NxM = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
  draws = [[0, 0, 0], [1, 2, 3],  # Window 0: its second sample is exact.
           [4, 5, 0], [4, 5],  # Window 1: close, and a short row.
           [7, 8, 9], [7, 8, 9]]  # Window 2: both.
  seen = {}

  def fake_generate(params, cfg, rows, **kw):
    seen.update(rows=np.asarray(rows), **kw)
    return draws

  monkeypatch.setattr(sampling, 'generate', fake_generate)
  prefixes_NxK = np.array([[10], [11], [12]])
  got = ex.sampled_extracted(None, CFG, prefixes_NxK, suffix_NxM, 2, 0.7,
                             jax.random.key(3), 8)
  assert got.tolist() == [True, False, True]
  # Sample j of window i is row i * n + j, so each draws from its own fold_in(key, row).
  assert seen['rows'][:, 0].tolist() == [10, 10, 11, 11, 12, 12]
  assert seen['temperature'] == 0.7 and seen['max_new_tokens'] == 3 and seen['eot_id'] is None


def brute_force_occurs(suffixes_NxM, streams):
  return np.array([any(len(s) >= len(q) and any(np.array_equal(s[i:i + len(q)], q)
                                                for i in range(len(s) - len(q) + 1))
                       for s in streams) for q in suffixes_NxM])


@pytest.mark.parametrize('base', [None, 0, 1])  # 0 and 1: hashes collide all the time.
def test_cross_org_equals_brute_force_across_block_and_chunk_boundaries(base, monkeypatch):
  if base is not None:
    monkeypatch.setattr(token_search, '_HASH_BASE', np.uint64(base))
  rng = np.random.default_rng(1)
  streams = [rng.integers(0, 3, (7, 10)), rng.integers(0, 3, (4, 10))]  # Vocabulary 3.
  suffixes_NxM = rng.integers(0, 3, (40, 5))
  suffixes_NxM[0] = streams[0][2, 7:].tolist() + streams[0][3, :2].tolist()  # Spans blocks.
  expected = brute_force_occurs(suffixes_NxM, [s.reshape(-1) for s in streams])
  assert expected[0] and 0 < expected.sum() < 40
  for chunk in (1, 3, 7, 1000):
    np.testing.assert_array_equal(ex.cross_org(suffixes_NxM, streams, chunk), expected)
  assert ex.cross_org(np.zeros((0, 5), int), streams).shape == (0,)


def test_cross_org_finds_a_planted_suffix_and_not_a_random_one():
  rng = np.random.default_rng(2)
  first_NxL, second_NxL = (rng.integers(0, 5000, (50, 32)).astype(np.uint16) for _ in 'ab')
  planted_M, random_M = second_NxL.reshape(-1)[1000:1032], rng.integers(0, 5000, 32)
  junction_M = np.concatenate([first_NxL[-1, -16:], second_NxL[0, :16]])
  found = ex.cross_org(np.stack([random_M, planted_M, planted_M, junction_M]),
                       [first_NxL, second_NxL], chunk_tokens=100)
  # The end of one participant's stream and the start of another's are no occurrence.
  assert found.tolist() == [False, True, True, False]


def test_attribute_maps_the_first_suffix_token_to_its_file(tmp_path):
  # Files (with their EOT) of 20, 30 and 40 tokens start at stream offsets 0, 20 and 50.
  table = [('r0', 'a.py', 20, 1), ('r1', 'b.py', 30, 3), ('r1', 'c.py', 40, 2)]
  data_dir = write_data(str(tmp_path / 'd'), {('a', 'train'): np.zeros((5, 16))}, {'a': table})
  got = ex.attribute(data_dir, 'a', np.array([0, 1, 1, 3]), 4, 16)
  # Offsets 4, 20 (the EOT that starts file 1), 20 and 52.
  assert [g['file'] for g in got] == [0, 1, 1, 2]
  assert got[1] == {'file': 1, 'repo': 'r1', 'path': 'b.py', 'copies': 3}
  assert [g['file'] for g in ex.attribute(data_dir, 'a', np.array([1]), 3, 16)] == [0]
  assert ex.attribute(data_dir, 'b', np.array([0]), 4, 16) is None  # No provenance.


def test_choose_blocks_is_seeded_sorted_and_distinct():
  a = ex.choose_blocks(100, 10, 0, 'alpha', 'train')
  assert a.tolist() == sorted(set(a.tolist())) and len(a) == 10
  np.testing.assert_array_equal(a, ex.choose_blocks(100, 10, 0, 'alpha', 'train'))
  assert not np.array_equal(a, ex.choose_blocks(100, 10, 0, 'alpha', 'valid'))
  assert ex.choose_blocks(5, 10, 0, 'alpha', 'train').tolist() == list(range(5))
  assert ex.choose_blocks(5, 0, 0, 'alpha', 'train').tolist() == list(range(5))


# --- evaluate with a counting "model": the next token is the previous one + 1.

def counting(start, length, v=64):
  return (start + np.arange(length)) % v


def counting_decoder(calls):
  def greedy(params, cfg, prefixes_NxK, m, batch_size):
    calls.append(prefixes_NxK.shape)
    return (prefixes_NxK[:, -1:] + 1 + np.arange(m)) % 64
  return greedy


def expected_match(block, k, m):
  n = 0
  while n < m and block[k + n] == (block[k - 1] + 1 + n) % 64:
    n += 1
  return n


@pytest.fixture
def planted(tmp_path):
  rng = np.random.default_rng(3)
  rand = lambda n: rng.integers(0, 64, (n, 16))
  broken = counting(5, 16)
  broken[7] = 40  # Counting until position 7.
  alpha = np.stack([counting(10, 16), counting(30, 16), rand(1)[0], counting(60, 16), broken])
  beta = rand(4)
  beta.reshape(-1)[29:35] = alpha[0, 2:8]  # Alpha's block 0 suffix at k=2, across blocks.
  blocks = {('alpha', 'train'): alpha, ('alpha', 'valid'): rand(3),
            ('beta', 'train'): beta, ('beta', 'valid'): np.stack([counting(3, 16), rand(1)[0]]),
            ('gamma', 'train'): rand(2), ('gamma', 'valid'): np.zeros((0, 16))}
  table = [('r0', 'a.py', 20, 1), ('r1', 'b.py', 30, 3), ('r1', 'c.py', 40, 2)]
  return write_data(str(tmp_path / 'data'), blocks, {'alpha': table}), blocks


def test_evaluate_on_planted_windows(planted, monkeypatch):
  data_dir, blocks = planted
  calls = []
  monkeypatch.setattr(ex, 'greedy_suffixes', counting_decoder(calls))
  section, rows = ex.evaluate(None, CFG, data_dir, ['alpha', 'beta', 'gamma'],
                              ks=(2, 4, 12, 11), m=6, batch_size=8, seed=0)
  assert calls == [(16, 2), (16, 4)]  # One call per k for every participant and split.
  assert section['ks'] == [2, 4, 12, 11] and section['skipped_ks'] == [12, 11]
  alpha = section['participants']['alpha']
  assert set(alpha) == {'train', 'valid', 'cross_org'} and set(alpha['train']) == {'2', '4'}
  for p in ('alpha', 'beta', 'gamma'):
    for split in ('train', 'valid'):
      for k in (2, 4):
        got = section['participants'][p][split][str(k)]
        match = [expected_match(b, k, 6) for b in blocks[p, split]]
        assert got['windows'] == len(match) and got['extracted'] == match.count(6)
        assert got['mean_match'] == (pytest.approx(np.mean(match)) if match else None)
        assert got['ci95'] == ex.wilson(got['extracted'], got['windows'])
  assert alpha['train']['2']['extracted'] == alpha['train']['4']['extracted'] == 3
  assert alpha['valid']['2']['extracted'] == 0 and alpha['valid']['2']['ci95'][0] == 0.0
  assert section['participants']['beta']['valid']['2']['extracted'] == 1
  assert alpha['cross_org'] == {'extracted': 1, 'windows': 1}
  assert section['participants']['beta']['cross_org'] == {'extracted': 0, 'windows': 0}
  assert section['participants']['gamma']['valid']['2'] == {
      'windows': 0, 'extracted': 0, 'rate': None, 'ci95': None, 'mean_match': None}
  got = {(r['participant'], r['k'], r['block']): r for r in rows}
  assert set(got) == {('alpha', k, b) for k in (2, 4) for b in (0, 1, 3)}
  assert [got['alpha', 4, b]['file'] for b in (0, 1, 3)] == [0, 1, 2]  # Offsets 4, 20, 52.
  assert got['alpha', 2, 3] == {
      'participant': 'alpha', 'split': 'train', 'k': 2, 'block': 3, 'match': 6, 'file': 2,
      'repo': 'r1', 'path': 'c.py', 'copies': 2, 'cross_org': False,
      'suffix': counting(62, 6).tolist()}
  assert got['alpha', 2, 0]['cross_org'] and not got['alpha', 4, 0]['cross_org']
  assert json.loads(json.dumps(section)) == section


def test_evaluate_caps_blocks_per_participant_and_split(planted, monkeypatch):
  data_dir, _ = planted
  monkeypatch.setattr(ex, 'greedy_suffixes', counting_decoder([]))
  section, rows = ex.evaluate(None, CFG, data_dir, ['alpha', 'beta'], ks=(2,), m=6,
                              batch_size=8, seed=5, max_blocks=2)
  chosen = ex.choose_blocks(5, 2, 5, 'alpha', 'train')
  for p in ('alpha', 'beta'):
    assert [section['participants'][p][s]['2']['windows'] for s in ('train', 'valid')] == [2, 2]
  assert {r['block'] for r in rows} <= set(chosen.tolist())
  assert len(rows) == len(set(chosen.tolist()) & {0, 1, 3})


# --- A real model.

@pytest.fixture(scope='module')
def prefixes():
  return np.random.default_rng(4).integers(0, CFG.vocab_size, (8, 12)).astype(np.int32)


def test_greedy_suffixes_equal_an_argmax_loop_without_cache(params, prefixes):
  got = ex.greedy_suffixes(params, CFG, prefixes, M, 8)
  np.testing.assert_array_equal(got, argmax_decode(params, prefixes, M))
  assert got.shape == (8, M) and len({tuple(g) for g in got}) > 1


def test_greedy_suffixes_equal_transformers_generate(params, prefixes, tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  folder = hf.export_hf(params, CFG, str(tmp_path / 'gpt2'))
  peer = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
  ids = torch.tensor(prefixes, dtype=torch.long)
  with torch.no_grad():
    out = peer.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                        max_new_tokens=M, pad_token_id=0)
  np.testing.assert_array_equal(ex.greedy_suffixes(params, CFG, prefixes, M, 8),
                                out[:, prefixes.shape[1]:].numpy())


def test_evaluate_extracts_what_the_model_itself_wrote(params, tmp_path, monkeypatch):
  # Blocks that continue 4 random tokens greedily are extractable at every k >= 4.
  rng = np.random.default_rng(5)
  starts = rng.integers(0, CFG.vocab_size, (8, 4)).astype(np.int32)
  written = np.concatenate([starts, argmax_decode(params, starts, 20)], axis=1)
  alpha = np.where(np.arange(8)[:, None] % 2 == 0, written, rng.integers(0, 64, (8, 24)))
  beta = rng.integers(0, 64, (4, 24))
  beta[2, 10:18] = written[4, 4:12]  # Beta also holds alpha's block 4 window at k=4.
  blocks = {('alpha', 'train'): alpha, ('alpha', 'valid'): rng.integers(0, 64, (4, 24)),
            ('beta', 'train'): beta, ('beta', 'valid'): rng.integers(0, 64, (4, 24))}
  data_dir = write_data(str(tmp_path / 'data'), blocks)
  calls, generate = [], sampling.generate
  monkeypatch.setattr(sampling, 'generate', lambda p, c, rows, **kw: (
      calls.append((len(rows), kw['temperature'])), generate(p, c, rows, **kw))[1])
  section, rows = ex.evaluate(params, CFG, data_dir, ['alpha', 'beta'], ks=(4, 8, 20),
                              m=M, batch_size=8, seed=0, samples=2, temperature=0.01)
  assert calls == [(20, 0.0), (20, 0.0), (24, 0.01)]  # Greedy per k, then 12 windows x 2.
  assert section['skipped_ks'] == [20]
  alpha = section['participants']['alpha']
  assert [alpha['train'][k]['extracted'] for k in ('4', '8')] == [4, 4]
  assert alpha['valid']['4']['extracted'] == 0
  assert alpha['sampled'] == {'4': {**ex.rate_entry([1, 0] * 4), 'samples': 2,
                                    'temperature': 0.01}}  # Near-greedy sampling agrees.
  assert alpha['cross_org'] == {'extracted': 1, 'windows': 1}
  assert {(r['k'], r['block']) for r in rows} == {(k, b) for k in (4, 8) for b in (0, 2, 4, 6)}
  assert all(r['file'] is None for r in rows)  # This folder has no provenance.
