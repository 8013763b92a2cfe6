"""Cross-organization matrix and clone list against brute force on a fixture."""

import random

import numpy as np
import pytest

from collab.evals.clones import index as clones

from collab.evals.clones import crossorg

W = 6


def _fixture():
  """Three participants drawing lines from private pools and a common pool."""
  rng = random.Random(3)
  common = [f'shared_{i} = helper({i})' for i in range(10)]
  names = ('A', 'B', 'C')
  corpora = {}
  for p, name in enumerate(names):
    private = [f'{name}_{i} = work_{name}({i}, {i * i})' for i in range(15)]
    docs = []
    for d in range(4):
      lines = []
      for _ in range(rng.randrange(20, 50)):
        pool = common if rng.random() < 0.3 + 0.2 * p else private
        # Runs of consecutive pool lines, so windows repeat across participants.
        start = rng.randrange(len(pool))
        lines += pool[start:start + rng.randrange(1, 9)]
        if rng.random() < 0.2:
          lines.append(rng.choice(['', '# comment', ')', 'pass']))
      docs.append({'repo': f'{name}/repo', 'path': f'f{d}.py', 'content': '\n'.join(lines)})
    corpora[name] = docs
  return corpora


def _windows(text: str):
  """Pure-Python window tuples of one document (type-1 rules of clones.py)."""
  kept = []
  for line in text.split('\n'):
    norm = ''.join(line.split())
    if (norm and not norm.startswith('#') and norm not in clones.TRIVIAL_LINES
        and set(norm) - set('()[]{},:;')):
      kept.append(norm)
  return {tuple(kept[i:i + W]) for i in range(len(kept) - W + 1)}


@pytest.fixture(scope='module')
def setup():
  corpora = _fixture()
  indexes = [clones.build_index(docs, participant=name, progress=False)
             for name, docs in corpora.items()]
  sets = {name: set().union(*(_windows(d['content']) for d in docs))
          for name, docs in corpora.items()}
  return corpora, indexes, sets


def test_containment_matrix_equals_brute_force(setup):
  _, indexes, sets = setup
  names = list(sets)
  expected = np.array([[len(sets[a] & sets[b]) / len(sets[a]) for b in names]
                       for a in names])
  matrix = crossorg.containment_matrix(indexes)
  np.testing.assert_allclose(matrix, expected, rtol=0, atol=1e-12)
  assert np.all(np.diag(matrix) == 1.0)
  assert 0 < matrix[0, 1] < 1 and matrix[0, 1] != matrix[1, 0]  # Not symmetric.


def test_cross_org_windows_equal_brute_force(setup):
  _, indexes, sets = setup
  hashes_X, members_XxP = crossorg.cross_org_windows(indexes)
  names = list(sets)
  brute = [w for w in set().union(*sets.values())
           if sum(w in s for s in sets.values()) >= 2]
  assert hashes_X.size == len(brute)
  expected_per_participant = [sum(w in sets[n] for w in brute) for n in names]
  assert members_XxP.sum(0).tolist() == expected_per_participant
  assert members_XxP.sum(1).min() >= 2


def test_cross_org_clones_have_provenance_in_both_participants():
  block = [f'copied_{i} = vendor.call({i})' for i in range(8)]
  a = [{'repo': 'a/r', 'path': 'x.py', 'content': '\n'.join(['a = 1'] + block + ['b = 2'])}]
  indented = '\n'.join(['class K:'] + ['  ' + s for s in block])
  b = [{'repo': 'b/r', 'path': 'y.py', 'content': indented}]
  c = [{'repo': 'c/r', 'path': 'z.py', 'content': '\n'.join(block[:5])}]
  indexes = [clones.build_index(docs, participant=n, progress=False)
             for n, docs in zip('ABC', (a, b, c))]
  (record,) = crossorg.cross_org_clones(indexes)
  assert record['participants'] == ['A', 'B'] and record['num_lines'] == 8
  assert record['num_refs'] == 2
  assert {(r['participant'], r['path'], r['start_line'], r['end_line'])
          for r in record['refs']} == {('A', 'x.py', 2, 9), ('B', 'y.py', 2, 9)}
  report = crossorg.report(indexes)
  assert report['participants'] == ['A', 'B', 'C'] and report['cross_org_windows'] == 3
  assert report['containment'][2] == [0.0, 0.0, 0.0]  # C has no window at all.


def test_is_cross_org_and_share():
  block = [f'copied_{i} = vendor.call({i})' for i in range(7)]
  own = [f'own_{i} = mine({i})' for i in range(7)]
  a = clones.build_index(['\n'.join(own + ['z = 0'] + block)], participant='A',
                         progress=False)
  b = clones.build_index(['\n'.join(block)], participant='B', progress=False)
  hashes_X, _ = crossorg.cross_org_windows([a, b])
  spans = clones.find_spans('\n'.join(own + ['q = 1'] + block), [a, b])
  assert [(s.start_line, s.participants) for s in spans] == [(1, ('A',)), (9, ('A', 'B'))]
  assert [crossorg.is_cross_org(s.window_hashes, hashes_X) for s in spans] == [False, True]
  assert crossorg.cross_org_share(spans, hashes_X) == 0.5
  assert crossorg.cross_org_share([], hashes_X) == 0.0


def test_inconsistent_indexes_are_rejected():
  a = clones.build_index(['x = 1'], participant='A', progress=False)
  b = clones.build_index(['x = 1'], participant='A', progress=False)
  with pytest.raises(ValueError, match='unique'):
    crossorg.containment_matrix([a, b])
  c = clones.build_index(['x = 1'], participant='C', clone_type=2, progress=False)
  with pytest.raises(ValueError, match='clone_type'):
    crossorg.cross_org_windows([a, c])


def test_repository_pairs_name_the_repositories_of_a_planted_shared_file():
  """A file vendored from C's repository into A's: the pair table names exactly them."""
  vendored = '\n'.join(f'vendored_{i} = upstream.call({i}, {i * 3})' for i in range(12))
  own = lambda tag: '\n'.join(f'{tag}_{i} = local({i})' for i in range(10))
  a = [{'repo': 'acme/app', 'path': 'app/main.py', 'content': own('app')},
       {'repo': 'acme/app', 'path': 'app/_vendor/lib.py', 'content': vendored},
       {'repo': 'acme/tools', 'path': 'tools.py', 'content': own('tools')}]
  b = [{'repo': 'beta/svc', 'path': 'svc.py', 'content': own('svc')}]
  c = [{'repo': 'gamma/lib', 'path': 'lib/core.py', 'content': own('core') + '\n' + vendored}]
  indexes = [clones.build_index(docs, participant=n, progress=False)
             for n, docs in zip(('A', 'B', 'C'), (a, b, c))]
  (pair,) = crossorg.repository_pairs(indexes)
  assert pair['a'] == {'participant': 'A', 'repo': 'acme/app', 'path': 'app/_vendor/lib.py'}
  assert pair['b'] == {'participant': 'C', 'repo': 'gamma/lib', 'path': 'lib/core.py'}
  assert pair['windows'] == 12 - W + 1  # Every window of the 12 shared lines, once.
  assert crossorg.report(indexes)['repository_pairs'] == [pair]
  from analysis import tables
  _, header, rows = tables.repository_pairs({'crossorg': {'repository_pairs': [pair]}})
  assert rows == [['A', 'acme/app', 'C', 'gamma/lib', '7',
                   'app/_vendor/lib.py ~ lib/core.py']] and len(header) == 6
