"""Clients by repository, directory or synthetic shard; block provenance; leakage per client."""

import os

import numpy as np
import pytest

from collab import io
from collab.data import blocks as blocks_lib
from collab.data import build
from collab.data import clients
from collab.data import tfds_builder
from collab.data import tokenizer as tokenizer_lib
from collab.evals.memorization import clients as client_memorization
from collab.evals.clones import index as clones
from collab.evals.memorization import audit as memorization
from configs import common
from tests import conftest

SEQ_LEN = 32
# acme's two sources both hold a repository 'shared' (one client, non-contiguous blocks).
ACME_FILES = {
    'A': [f'shared/pkg/core/c{i}.py' for i in range(5)]
         + [f'shared/pkg/util/u{i}.py' for i in range(5)]
         + [f'shared/top{i}.py' for i in range(5)] + [f'solo/s{i}.py' for i in range(5)],
    'B': [f'other/o{i}.py' for i in range(5)] + [f'shared/docs/d{i}.py' for i in range(5)],
}


def _code(tag: str, i: int) -> str:
  """A file that passes the cleaning filters, distinct per (tag, i)."""
  return (f'def {tag}_compute_{i}(left, right):\n'
          f'    """Combines {tag} values number {i}."""\n'
          f'    total = left + right * {i}\n'
          f'    for step in range({i % 5 + 2}):\n'
          f'        total = total - step * {i % 3}\n'
          f'    result = total == {i * 7}\n'
          f'    return result\n\n\n'
          f'class {tag.title()}Thing{i}:\n'
          f'    size = {i}\n'
          f'    name = "{tag}_{i}"\n')


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('client_corpora'))
  for source, rels in ACME_FILES.items():
    for i, rel in enumerate(rels):
      path = os.path.join(root, 'acme', source, rel)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, 'w', encoding='utf-8') as f:
        f.write(_code(f'acme{source}{os.path.dirname(rel).replace("/", "_")}', i))
  acme = common.participant('acme', tuple(f'dir:{root}/acme/{s}' for s in ACME_FILES))
  beta = common.participant('beta', (f'dir:{conftest.write_tiny_corpus(root, "beta", 24)}',))
  cfg = common.data_config([acme, beta], seq_len=SEQ_LEN)
  cfg.tokenizer.vocab_size = 300
  data_dir = os.path.join(root, 'data')
  build.build_data(cfg, data_dir, progress=False)
  return data_dir


def _fed(clients_mode, **kw):
  c = common.federated_config()
  c.clients = clients_mode
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def _train(data_dir):
  return {p: blocks_lib.load_blocks(data_dir, p, 'train') for p in ('acme', 'beta')}


def _brute_owner(data_dir, participant):
  """(records, owner file of each block): re-tokenized stream, a file label per token."""
  records = list(tfds_builder.load_split(data_dir, participant, 'train'))
  tok = tokenizer_lib.load_tokenizer(data_dir)
  ids = tokenizer_lib.make_encoder(tok)([r['content'] for r in records])
  blocks_NxL = blocks_lib.load_blocks(data_dir, participant, 'train')
  repacked = blocks_lib.pack(ids, tokenizer_lib.eot_id(tok), SEQ_LEN, blocks_NxL.dtype)
  np.testing.assert_array_equal(repacked, blocks_NxL)  # TFDS order is the packing order.
  label_T = np.repeat(np.arange(len(records)), [len(i) + 1 for i in ids])
  owner_N = [int(np.argmax(np.bincount(label_T[b * SEQ_LEN:(b + 1) * SEQ_LEN])))
             for b in range(len(blocks_NxL))]
  return records, owner_N


def test_provenance_maps_each_block_to_the_file_holding_most_of_it(built):
  for participant in ('acme', 'beta'):
    records, owner_N = _brute_owner(built, participant)
    prov = clients.load_provenance(built, participant)
    assert prov.repo_F == [r['repo'] for r in records]
    assert prov.path_F == [r['path'] for r in records]
    file_N = clients.block_files(prov, len(owner_N), SEQ_LEN)
    np.testing.assert_array_equal(file_N, owner_N)


def test_majority_matches_a_direct_count():
  rng = np.random.default_rng(0)
  for _ in range(20):
    end = int(rng.integers(1, 300))
    starts_a = np.unique(np.r_[0, rng.integers(0, end + 20, 6)])
    starts_b = np.unique(np.r_[0, rng.integers(0, end, 5)])
    got = clients.majority(starts_a, starts_b, end)
    a_T = np.searchsorted(starts_a, np.arange(end), 'right') - 1
    b_T = np.searchsorted(starts_b, np.arange(end), 'right') - 1
    want = [int(np.argmax(np.bincount(b_T[a_T == a]))) if np.any(a_T == a) else -1
            for a in range(len(starts_a))]
    np.testing.assert_array_equal(got, want)


def _expected(data_dir, name_of):
  """{client: block indices} of each participant from the brute-force owners."""
  out = {}
  for participant in ('acme', 'beta'):
    records, owner_N = _brute_owner(data_dir, participant)
    for b, f in enumerate(owner_N):
      out.setdefault(name_of(participant, records[f]), []).append(b)
  return out


@pytest.mark.parametrize('mode,depth,known', [
    ('repositories', 1, {'acme/shared', 'acme/solo', 'acme/other'}),
    ('directories', 1, {'acme/shared/pkg', 'acme/shared', 'acme/shared/docs', 'acme/solo',
                        'acme/other'}),
    ('directories', 2, {'acme/shared/pkg/core', 'acme/shared/pkg/util', 'acme/shared',
                        'acme/shared/docs', 'acme/solo', 'acme/other'}),
])
def test_clients_by_files_and_their_blocks(built, mode, depth, known):
  def name_of(p, r):
    if mode == 'repositories':
      return clients.repository_client(p, r['repo'])
    return clients.directory_client(p, r['repo'], r['path'], depth)

  expected = _expected(built, name_of)
  train = _train(built)
  fed = clients.partition(_fed(mode, directory_depth=depth), built, train, seed=1)
  assert list(fed.blocks) == sorted(expected)
  assert {n for n in fed.blocks if n.startswith('acme/')} == known
  assert {n for n in fed.blocks if n.startswith('beta/')} == {f'beta/beta_repo{i}'
                                                            for i in range(4)}
  assert all(fed.owner[n] == n.split('/')[0] for n in fed.blocks)
  kinds = set()
  for name, view in fed.blocks.items():
    want = np.asarray(expected[name])
    base = train[fed.owner[name]]
    assert len(view) == view.shape[0] == len(want) >= 1 and view.shape[1] == SEQ_LEN
    pick = np.sort(np.random.default_rng(len(want)).choice(len(want), min(3, len(want)),
                                                           replace=False))
    np.testing.assert_array_equal(view[pick], base[want[pick]])
    kinds.add(type(view).__name__)
  assert sum(len(v) for v in fed.blocks.values()) == sum(len(b) for b in train.values())
  # acme/shared spans both sources: not a contiguous range of acme's blocks.
  assert kinds == ({'memmap', 'IndexedBlocks'} if mode == 'repositories' else {'memmap'})


def test_a_repository_that_owns_no_block_is_no_client(tmp_path):
  # Files of 101, 4 and 61 stream tokens (EOT included) in 32-token blocks: 'tiny' never
  # holds most of a block, and the last 6 tokens fall in the dropped tail.
  records = [{'repo': r, 'path': 'm.py'} for r in ('big', 'tiny', 'last')]
  ids = [np.zeros(100), np.zeros(3), np.zeros(60)]
  clients.save_provenance(clients.provenance_path(str(tmp_path), 'p', 'train'), records, ids)
  blocks_NxL = np.arange(5 * 32).reshape(5, 32)
  views, dropped = clients._by_files(_fed('repositories'), str(tmp_path), 'p', blocks_NxL)
  # Block 3 = tokens 96..127: big 5, tiny 4, last 23.
  assert {n: len(v) for n, v in views.items()} == {'p/big': 3, 'p/last': 2} and dropped == 1
  np.testing.assert_array_equal(views['p/last'], blocks_NxL[3:])


def test_participants_granularity_is_the_identity(built):
  train = _train(built)
  fed = clients.partition(_fed('participants'), built, train, seed=1)
  assert fed.blocks == train and fed.owner == {'acme': 'acme', 'beta': 'beta'}


def test_indexed_blocks_reads_the_rows_it_names():
  base = np.arange(40, dtype=np.uint16).reshape(10, 4)
  view = clients.IndexedBlocks(base, np.array([1, 4, 5, 9]))
  assert len(view) == 4 and view.shape == (4, 4)
  np.testing.assert_array_equal(view[np.array([0, 2, 3])], base[[1, 5, 9]])
  np.testing.assert_array_equal(np.asarray(view), base[[1, 4, 5, 9]])
  it = blocks_lib.BatchIterator(view, 2, seed=0)  # What the federated side feeds on.
  assert set(next(it)[:, 0].tolist()) <= {4, 16, 20, 36}


def test_synthetic_shards(built):
  rng = np.random.default_rng
  for kind in ('equal', 'dirichlet'):
    for n, k in ((100, 7), (10, 10), (1000, 300)):
      sizes = clients.synthetic_sizes(n, k, kind, 0.3, rng(0))
      assert sizes.sum() == n and sizes.min() >= 1 and len(sizes) == k
  np.testing.assert_array_equal(clients.synthetic_sizes(10, 3, 'equal', 1.0, rng(0)),
                                [4, 3, 3])
  a, b = (clients.synthetic_sizes(1000, 20, 'dirichlet', 0.3, rng(s)) for s in (5, 5))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, clients.synthetic_sizes(1000, 20, 'dirichlet', 0.3, rng(6)))
  assert a.max() > 3 * a.min()  # Small alpha: very unequal clients.
  with pytest.raises(ValueError, match='synthetic_clients'):
    clients.synthetic_sizes(5, 6, 'equal', 1.0, rng(0))

  train = _train(built)
  cfg = _fed('synthetic', synthetic_clients=4, synthetic_partition='dirichlet',
             dirichlet_alpha=0.5)
  fed = clients.partition(cfg, built, train, seed=3)
  again = clients.partition(cfg, built, train, seed=3)
  assert list(fed.blocks) == [f'{p}#{i:04d}' for p in ('acme', 'beta') for i in range(4)]
  assert [len(v) for v in fed.blocks.values()] == [len(v) for v in again.blocks.values()]
  for p in ('acme', 'beta'):  # Contiguous shards that tile the participant's blocks.
    shards = [v for n, v in fed.blocks.items() if fed.owner[n] == p]
    np.testing.assert_array_equal(np.concatenate([np.asarray(s) for s in shards]), train[p])
  files = clients.file_clients(cfg, built, 'acme', seed=3)
  assert set(files) <= set(fed.blocks) and len(files) == len(
      clients.load_provenance(built, 'acme').start_F)


def test_bad_client_configs_name_the_field(built):
  train = _train(built)
  with pytest.raises(ValueError, match='federated.clients'):
    clients.partition(_fed('teams'), built, train, 1)
  with pytest.raises(ValueError, match='synthetic_clients'):
    clients.partition(_fed('synthetic'), built, train, 1)
  with pytest.raises(ValueError, match='directory_depth'):
    clients.partition(_fed('directories', directory_depth=0), built, train, 1)


# --- Memorization per client.

def _lines(tag, n):
  return [f'value_{tag}{i} = compute({i}, "{tag}")' for i in range(n)]


def test_client_table_equals_a_hand_computed_example():
  L, M, N, Z = _lines('l', 8), _lines('m', 2), _lines('n', 7), _lines('z', 6)
  docs_p = [{'repo': 'r1', 'path': 'a.py', 'content': '\n'.join(L)},
            {'repo': 'r2', 'path': 'b.py', 'content': '\n'.join(L[:6] + M)}]
  docs_q = [{'repo': 'r3', 'path': 'c.py', 'content': '\n'.join(N)}]
  indexes = {'p': clones.build_index(docs_p, 6, participant='p', progress=False),
             'q': clones.build_index(docs_q, 6, participant='q', progress=False)}
  doc_clients = {'p': ['p/r1', 'p/r2'], 'q': ['q/r3']}
  rows = [{'sample_id': 's1', 'text': '\n'.join(L)},  # r1: 3 windows (8 lines), r2: 1 (6).
          {'sample_id': 's2', 'text': '\n'.join(N)},  # r3 alone: 7 lines.
          {'sample_id': 's1', 'text': '\n'.join(L[1:7])},  # r1 alone: 6 lines.
          {'sample_id': 's3', 'text': '\n'.join(Z)}]  # Nobody's.
  got = client_memorization.client_table(
      'repositories', rows, indexes, doc_clients, {'p/r1': 3, 'p/r2': 2, 'q/r3': 4},
      {'p/r1': 'p', 'p/r2': 'p', 'q/r3': 'q'})

  def row(c, p, b, spans, excl, lines, dup):
    return {'client': c, 'participant': p, 'blocks': b, 'files': 1, 'memorized_spans': spans,
            'exclusive_spans': excl, 'memorized_lines': lines, 'memorized_samples': 1,
            'duplication': dup}
  assert got['clients'] == [row('p/r1', 'p', 3, 2, 1, 14, 1 / 3),
                            row('q/r3', 'q', 4, 1, 1, 7, 0.0),
                            row('p/r2', 'p', 2, 1, 0, 6, 1 / 3)]
  assert (got['spans'], got['attributed_spans'], got['leaking_clients'],
          got['num_clients']) == (4, 3, 3, 3)
  assert got['duplication_mean']['all'] == pytest.approx(2 / 9)


def test_client_memorization_attributes_training_code_to_its_repository(built):
  indexes = memorization.build_indexes(built, ['acme', 'beta'], splits=('train',))['train']
  records = tfds_builder.load_split(built, 'acme', 'train')
  target = next(r for r in records if r['repo'] == 'solo')
  rows = [{'sample_id': 'x', 'text': target['content']}]
  got = client_memorization.client_memorization(_fed('repositories'), built, rows, indexes,
                                                seed=1)
  assert [r['client'] for r in got['clients']] == ['acme/solo']
  assert got['clients'][0]['blocks'] > 0 and got['num_clients'] == 7
  assert got['clients'][0]['duplication'] == 0.0  # Every tiny file is distinct.


def test_a_federation_of_repositories_trains_end_to_end(built, tmp_path):
  from collab.settings import federated
  c = conftest.tiny_run_config(built)
  c.data.participants = [common.participant(n, ('dir:built',)) for n in ('acme', 'beta')]
  c.setting = 'federated'
  c.model.num_layers = 1  # Compiling dominates; one block trains and samples alike.
  c.federated.clients = 'repositories'
  c.federated.rounds, c.federated.clients_per_round, c.federated.client_block = 2, 3, 2
  c.federated.local_steps = 1
  summary = federated.train(c, str(tmp_path))
  assert summary['rounds'] == 2 and os.path.isfile(tmp_path / 'train.json')
  rows = [r for r in io.read_jsonl(tmp_path / 'metrics.jsonl') if 'train/loss' in r]
  assert [r['clients/sampled'] for r in rows] == [3, 3]
  assert all(np.isfinite(r['train/loss']) for r in rows)
  # Its audit attributes memorization to repositories, and the study tables show them.
  from collab import evaluate
  from collab.evals.memorization import clone_audit
  c.eval.passk.enabled = c.eval.membership.enabled = False
  c.eval.memorization.max_prompts, c.eval.memorization.samples_per_prompt = 2, 1
  c.eval.memorization.max_new_tokens = 16
  block = evaluate.evaluate_run(c, str(tmp_path))['memorization']['clients']
  assert block['granularity'] == 'repositories' and block['num_clients'] >= 3
  assert len(block['clients']) == block['leaking_clients'] <= block['num_clients']
  title, _, table_rows = clone_audit.clients_table([{'run': 'fed', 'memorization': {
      'clients': block}}])[1:]
  assert 'repositories' in title and len(table_rows) == max(1, block['leaking_clients'])
