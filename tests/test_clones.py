"""Clone index: planted clones, attribution, normalization rules, persistence."""

import random
import textwrap

import numpy as np
import pytest

from collab.evals.clones import index as clones


def _code_lines(tag: str, n: int, seed: int):
  """n distinct, non-trivial code lines."""
  rng = random.Random(seed)
  return [f'{tag}_{i} = compute_{rng.randrange(10**6)}({i}, "{tag}{i}")' for i in range(n)]


def _doc(repo, path, lines):
  return {'repo': repo, 'path': path, 'content': '\n'.join(lines) + '\n'}


@pytest.fixture(scope='module')
def corpus():
  a_lines = _code_lines('alpha', 40, 0)
  b_lines = _code_lines('beta', 40, 1)
  shared = _code_lines('shared', 8, 2)
  a = [_doc('org_a/x', 'one.py', ['import os', ''] + a_lines[:20]),
       _doc('org_a/y', 'two.py', a_lines[20:] + ['# tail'] + shared)]
  b = [_doc('org_b/z', 'three.py', ['def f():'] + ['    ' + s for s in shared] + b_lines)]
  index_a = clones.build_index(a, participant='A', progress=False)
  index_b = clones.build_index(b, participant='B', progress=False)
  return dict(a_lines=a_lines, b_lines=b_lines, shared=shared, a=index_a, b=index_b)


def test_six_copied_lines_are_found_with_both_line_ranges(corpus):
  # a_lines[5:11] are lines 8..13 of one.py (after `import os` and a blank line).
  copied = textwrap.indent('\n'.join(corpus['a_lines'][5:11]), '        ')
  sample = f'def g():\n    """Doc."""\n    if x:\n{copied}\n    return 1\n'
  spans = clones.find_spans(sample, [corpus['a'], corpus['b']])
  assert len(spans) == 1
  span = spans[0]
  assert (span.start_line, span.end_line, span.num_lines) == (4, 9, 6)
  assert span.participants == ('A',) and span.exclusive
  ref = span.refs[0]
  assert (ref.repo, ref.path, ref.start_line, ref.end_line) == ('org_a/x', 'one.py', 8, 13)
  assert ref.num_lines == 6


def test_five_copied_lines_are_not_found(corpus):
  sample = 'x = 1\n' + '\n'.join(corpus['a_lines'][5:10]) + '\ny = 2\n'
  assert clones.find_spans(sample, [corpus['a']]) == []


def test_dropped_lines_neither_count_nor_break_a_run(corpus):
  lines = corpus['a_lines'][0:6]
  # Blank, comment-only and trivial lines inside the copy; reformatted whitespace.
  noisy = [lines[0], '', '# note', lines[1].replace(' = ', '='), ')', lines[2], 'pass',
           lines[3], 'else :', lines[4], lines[5]]
  spans = corpus['a'].find_spans('\n'.join(noisy))
  assert [(s.start_line, s.end_line, s.num_lines) for s in spans] == [(1, 11, 6)]
  assert (spans[0].refs[0].start_line, spans[0].refs[0].end_line) == (3, 8)
  only_five_real = [lines[0], lines[1], 'return', 'try:', ']', lines[2], lines[3], lines[4]]
  assert corpus['a'].find_spans('\n'.join(only_five_real)) == []


def test_long_copy_is_one_maximal_span(corpus):
  sample = '\n'.join(corpus['a_lines'][2:17])
  (span,) = corpus['a'].find_spans(sample)
  assert (span.start_line, span.end_line, span.num_lines) == (1, 15, 15)
  assert len(span.window_hashes) == 10
  assert (span.refs[0].start_line, span.refs[0].end_line, span.refs[0].num_lines) == (5, 19, 15)


def test_type2_finds_renamed_copy_that_type1_misses(corpus):
  renamed = [line.replace('alpha', 'gamma').replace('compute', 'calc')
             for line in corpus['a_lines'][10:17]]
  docs = [_doc('org_a/x', 'one.py', corpus['a_lines'])]
  type1 = clones.build_index(docs, participant='A', clone_type=1, progress=False)
  type2 = clones.build_index(docs, participant='A', clone_type=2, progress=False)
  assert type1.find_spans('\n'.join(renamed)) == []
  (span,) = type2.find_spans('\n'.join(renamed))
  assert (span.start_line, span.end_line, span.num_lines) == (1, 7, 7)
  # Keywords survive abstraction: the same shape with another keyword is no clone.
  other = [line.replace(' = ', ' = not ') for line in renamed]
  assert type2.find_spans('\n'.join(other)) == []


def test_span_in_two_participants_is_shared(corpus):
  sample = 'def h():\n' + '\n'.join('  ' + s for s in corpus['shared'][:7])
  (span,) = clones.find_spans(sample, [corpus['a'], corpus['b']])
  assert span.participants == ('A', 'B') and not span.exclusive
  assert span.participant_lines == (7, 7)
  assert {(r.participant, r.path, r.start_line, r.end_line) for r in span.refs} == {
      ('A', 'two.py', 22, 28), ('B', 'three.py', 2, 8)}


def test_exclude_lines_drops_prompt_lines_and_breaks_windows(corpus):
  sample = '\n'.join(corpus['a_lines'][0:9])
  index = corpus['a']
  assert [(s.start_line, s.end_line) for s in index.find_spans(sample)] == [(1, 9)]
  assert [(s.start_line, s.end_line)
          for s in index.find_spans(sample, exclude_lines=[1, 2, 3])] == [(4, 9)]
  assert index.find_spans(sample, exclude_lines=[1, 2, 3, 4]) == []
  # An excluded line in the middle: 4 + 4 lines remain, no window may bridge it.
  assert index.find_spans(sample, exclude_lines=[5]) == []


def test_doc_frequency_and_occurrences():
  block = _code_lines('dup', 6, 3)
  docs = [_doc('r', 'a.py', block), _doc('r', 'b.py', ['z = 0'] + block + block),
          _doc('r', 'c.py', _code_lines('solo', 6, 4))]
  index = clones.build_index(docs, participant='P', progress=False)
  u = index.lookup(index.win_hash_N[:1])[0]
  assert index.count_U[u] == 3 and index.doc_freq_U[u] == 2
  assert index.hashes_U.size == np.unique(index.win_hash_N).size
  assert np.all(index.hashes_U[1:] > index.hashes_U[:-1])
  (span,) = index.find_spans('\n'.join(block))
  assert sorted((r.path, r.start_line) for r in span.refs) == [
      ('a.py', 1), ('b.py', 2), ('b.py', 8)]


def test_occurrences_are_in_document_order():
  # Large enough for the unstable SIMD sort to shuffle equal hashes.
  block = _code_lines('dup', 8, 3)
  docs = [_doc('r', f'{i}.py', _code_lines(f'u{i}', 20, i) + block) for i in range(60)]
  index = clones.build_index(docs, participant='P', progress=False)
  np.testing.assert_array_equal(index.order_N, np.argsort(index.win_hash_N, kind='stable'))
  assert index.doc_freq_U.max() == 60 and index.count_U.max() == 60
  (span,) = index.find_spans('\n'.join(block), max_refs=3)
  assert [r.path for r in span.refs] == ['0.py', '1.py', '2.py']


def _reference_windows(text: str, w: int):
  """Pure-Python type-1 rules of the module docstring: the set of window tuples."""
  kept = []
  for line in text.replace('\r\n', '\n').split('\n'):
    norm = ''.join(line.split())
    if (not norm or norm.startswith('#') or norm in clones.TRIVIAL_LINES
        or not set(norm) - set('()[]{},:;')):
      continue
    kept.append(norm)
  return {tuple(kept[i:i + w]) for i in range(len(kept) - w + 1)}


def test_window_set_matches_pure_python_reference():
  rng = random.Random(7)
  pool = _code_lines('p', 12, 5) + ['', '  # c', ')', 'pass', '  return', 'x = (', '],']
  docs = [_doc('r', f'{i}.py', [rng.choice(pool) for _ in range(60)]) for i in range(5)]
  index = clones.build_index(docs, participant='P', progress=False)
  expected = set().union(*(_reference_windows(d['content'], 6) for d in docs))
  assert index.hashes_U.size == len(expected)


def test_normalize_tolerates_truncated_code_and_keeps_lines():
  broken = 'def f(x:\n    s = "unterminated\n    t = """open doc\n  y = 1e5 + 0x1F # c\n)]'
  for clone_type in (1, 2):
    assert clones.normalize(broken, clone_type).count('\n') == broken.count('\n')
  assert clones.normalize(broken, 2).split('\n')[1:4] == [
      '    x = ""', '    x = ""', '  x = 0 + 0 ']
  with pytest.raises(ValueError, match='clone_type'):
    clones.normalize('x', 3)


def test_save_load_round_trip(corpus, tmp_path):
  path = str(tmp_path / 'sub' / 'a.npz')
  corpus['a'].save(path)
  loaded = clones.CloneIndex.load(path)
  assert (loaded.participant, loaded.min_lines, loaded.clone_type) == ('A', 6, 1)
  for name, value in vars(corpus['a']).items():
    if isinstance(value, np.ndarray):
      np.testing.assert_array_equal(getattr(loaded, name), value)
  sample = '\n'.join(corpus['a_lines'][3:12])
  assert loaded.find_spans(sample) == corpus['a'].find_spans(sample)
  assert [p.name for p in (tmp_path / 'sub').iterdir()] == ['a.npz']  # No temporaries.


def test_bad_inputs_raise_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='build_index'):
    clones.CloneIndex.load(str(tmp_path / 'missing.npz'))
  bad = tmp_path / 'bad.npz'
  bad.write_bytes(b'not an index')
  with pytest.raises(clones.IndexFormatError, match='rebuild'):
    clones.CloneIndex.load(str(bad))
  with pytest.raises(ValueError, match='content'):
    clones.build_index([{'path': 'x.py'}], progress=False)
  a = clones.build_index(['x = 1'], min_lines=6, progress=False)
  b = clones.build_index(['x = 1'], min_lines=5, progress=False)
  with pytest.raises(ValueError, match='min_lines'):
    clones.find_spans('x = 1', [a, b])


def test_batch_lookup_equals_one_by_one(corpus):
  texts = ['\n'.join(corpus['a_lines'][3:12]), 'nothing = here',
           '\n'.join(corpus['shared'] + corpus['a_lines'][:7]), '']
  excludes = [None, None, [1, 2], range(1, 3)]
  indexes = [corpus['a'], corpus['b']]
  batch = clones.find_spans_batch(texts, indexes, exclude_lines=excludes)
  assert batch == [clones.find_spans(t, indexes, exclude_lines=e)
                   for t, e in zip(texts, excludes)]
  assert [len(spans) for spans in batch] == [1, 0, 2, 0]
  with pytest.raises(ValueError, match='one'):
    clones.find_spans_batch(texts, indexes, exclude_lines=[None])


def test_single_line_windows_never_cross_texts():
  index = clones.build_index(['alpha = 1\nbeta = 2'], min_lines=1, progress=False)
  spans = clones.find_spans_batch(['x = 0\nalpha = 1', 'beta = 2'], [index])
  assert [[(s.start_line, s.end_line) for s in t] for t in spans] == [[(2, 2)], [(1, 1)]]
