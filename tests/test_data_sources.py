"""Sources: pkg:, stdlib, dir:, jsonl: records, and every bad input skipped or reported."""

import collections
import gzip
import hashlib
import importlib.metadata
import json
import os
import platform

import pytest

from collab.data import build
from collab.data import corpus
from collab.data import sources
from tests import conftest


def _read(spec, max_file_bytes=1_000_000):
  skipped = collections.Counter()
  records = list(sources.iter_source(spec, 'org', max_file_bytes, skipped))
  return records, skipped


def _write(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  mode = 'wb' if isinstance(data, bytes) else 'w'
  with open(path, mode) as f:
    f.write(data)


def test_pkg_source_reads_the_distribution_py_files():
  dist = importlib.metadata.distribution('ml-collections')
  expected = sorted(str(f) for f in dist.files if f.suffix == '.py'
                    and os.path.isfile(dist.locate_file(f)))
  records, skipped = _read('pkg:ml-collections')
  assert [r['path'] for r in records] == expected
  assert {r['repo'] for r in records} == {f"{dist.metadata['Name']}=={dist.version}"}
  assert all(r['participant'] == 'org' and isinstance(r['content'], str) for r in records)
  first = records[0]
  with open(dist.locate_file(first['path']), encoding='utf-8') as f:
    assert first['content'] == f.read()
  assert sum(skipped.values()) == 0
  assert sources.package_versions(['pkg:ml-collections']) == {'ml-collections': dist.version}


def test_unknown_package_is_a_clear_error():
  with pytest.raises(sources.SourceError, match='no-such-package-xyz'):
    _read('pkg:no-such-package-xyz')
  with pytest.raises(ValueError, match='Unknown source'):
    sources.parse_source('git:foo')


def test_stdlib_source_never_reads_site_packages():
  records, _ = _read('stdlib')
  paths = {(r['repo'], r['path']) for r in records}
  assert ('stdlib', 'os.py') in paths
  assert ('stdlib/json', 'decoder.py') in paths
  assert not any('site-packages' in r['path'] or 'dist-packages' in r['path']
                 or 'site-packages' in r['repo'] for r in records)
  assert all(r['license'] == 'PSF-2.0' for r in records)


def test_dir_source_repo_is_the_first_level_folder(tmp_path):
  _write(str(tmp_path / 'repo_a' / 'pkg' / 'mod.py'), 'a = 1\n')
  _write(str(tmp_path / 'repo_a' / 'README.md'), 'not python')
  _write(str(tmp_path / 'repo_b' / 'main.py'), 'b = 2\n')
  _write(str(tmp_path / 'loose.py'), 'c = 3\n')
  records, _ = _read(f'dir:{tmp_path}')
  got = [(r['repo'], r['path'], r['content']) for r in records]
  assert got == [(tmp_path.name, 'loose.py', 'c = 3\n'), ('repo_a', 'pkg/mod.py', 'a = 1\n'),
                 ('repo_b', 'main.py', 'b = 2\n')]


def test_missing_dir_is_a_clear_error(tmp_path):
  missing = tmp_path / 'nope'
  with pytest.raises(FileNotFoundError, match='nope'):
    _read(f'dir:{missing}')
  with pytest.raises(ValueError):  # Also a ValueError, so callers can catch either.
    _read(f'dir:{missing}')


def test_binary_non_utf8_and_oversized_files_are_skipped_and_counted(tmp_path):
  _write(str(tmp_path / 'r' / 'good.py'), 'x = 1\n')
  _write(str(tmp_path / 'r' / 'binary.py'), b'x = 1\x00\x01\x02')
  _write(str(tmp_path / 'r' / 'latin1.py'), 'name = "caf\xe9"\n'.encode('latin-1'))
  _write(str(tmp_path / 'r' / 'big.py'), 'y = 2\n' * 100)
  records, skipped = _read(f'dir:{tmp_path}', max_file_bytes=100)
  assert [r['path'] for r in records] == ['good.py']
  assert (skipped['binary'], skipped['non_utf8'], skipped['oversized']) == (1, 1, 1)


def test_symlink_loops_are_skipped_and_counted(tmp_path):
  _write(str(tmp_path / 'r' / 'sub' / 'mod.py'), 'x = 1\n')
  os.symlink(str(tmp_path / 'r'), str(tmp_path / 'r' / 'sub' / 'back'))  # Loop to an ancestor.
  os.symlink(str(tmp_path / 'r' / 'sub'), str(tmp_path / 'r' / 'again'))  # Second way in.
  os.symlink('self_loop.py', str(tmp_path / 'r' / 'self_loop.py'))  # ELOOP on open.
  records, skipped = _read(f'dir:{tmp_path}')
  assert [r['path'] for r in records] == ['sub/mod.py']
  assert skipped['symlink_loop'] == 2
  assert skipped['symlink_duplicate'] == 1


def _paper_rows():
  """Rows in the paper's release format (codeparrot-style: copies and size as strings)."""
  return [{'repo_name': f'google/repo{i % 2}', 'path': f'src/m{i}.py', 'copies': '1',
           'size': str(len(f'v{i} = {i}\n')), 'content': f'v{i} = {i}\n',
           'license': 'apache-2.0'} for i in range(5)]


def test_jsonl_source_reads_the_paper_format_gzipped_and_plain(tmp_path):
  rows = _paper_rows()
  text = ''.join(json.dumps(r) + '\n' for r in rows)
  with gzip.open(tmp_path / 'google_train.json.gz', 'wt', encoding='utf-8') as f:
    f.write(text)
  _write(str(tmp_path / 'google_valid.jsonl'), text + '\n')  # A blank line is fine.
  expected = [(r['repo_name'], r['path'], r['content'], r['license']) for r in rows]
  for name in ('google_train.json.gz', 'google_valid.jsonl'):
    records, _ = _read(f'jsonl:{tmp_path / name}')
    assert [(r['repo'], r['path'], r['content'], r['license']) for r in records] == expected
    assert set(records[0]) == {'participant', 'repo', 'path', 'content', 'license', 'copies'}
    assert records[0]['copies'] == 1  # The collected format's copies, as a count.
  both, _ = _read(f'jsonl:{tmp_path}/google_*')  # A glob takes both files, sorted.
  assert len(both) == 2 * len(rows)


def test_jsonl_malformed_line_names_its_number(tmp_path):
  lines = [json.dumps(r) for r in _paper_rows()[:2]] + ['{"repo_name": "x", oops']
  _write(str(tmp_path / 'bad.jsonl'), '\n'.join(lines) + '\n')
  with pytest.raises(sources.SourceError, match=r'bad.jsonl, line 3: malformed JSON'):
    _read(f'jsonl:{tmp_path / "bad.jsonl"}')
  _write(str(tmp_path / 'nofield.jsonl'), json.dumps({'repo_name': 'x', 'path': 'p'}) + '\n')
  with pytest.raises(sources.SourceError, match=r"line 1: missing .*'content'"):
    _read(f'jsonl:{tmp_path / "nofield.jsonl"}')
  with pytest.raises(FileNotFoundError, match='absent.json.gz'):
    _read(f'jsonl:{tmp_path / "absent.json.gz"}')


FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')
RELEASE_FIELDS = ['repo_name', 'copies', 'size', 'content', 'license', 'hash', 'line_mean',
                  'line_max', 'alpha_frac', 'ratio', 'autogenerated', 'config_or_test',
                  'has_no_keywords', 'has_few_assignments']


def test_jsonl_reads_the_release_schema_without_path():
  path = os.path.join(FIXTURES, 'facebook_train.jsonl')
  with open(path) as f:
    rows = [json.loads(line) for line in f]
  assert all(list(r) == RELEASE_FIELDS for r in rows)  # The fixture is the release schema.
  records, skipped = _read(f'jsonl:{path}')
  assert len(records) == len(rows) and sum(skipped.values()) == 0
  for r, row in zip(records, rows):
    assert (r['repo'], r['content'], r['license']) == (row['repo_name'], row['content'],
                                                      row['license'])
    assert r['path'] == f"hash:{row['hash']}" and r['identity'] == 'hash'
    assert r['copies'] == int(row['copies'])
    assert r['flags'] == {k: row[k] for k in sources.RELEASE_FLAGS}
    assert r['ratio'] == row['ratio'] and isinstance(r['ratio'], float)


def test_jsonl_without_path_or_hash_is_named_by_its_content(tmp_path):
  row = {'repo_name': 'org/r', 'content': 'x = 1\n', 'license': 'mit'}
  _write(str(tmp_path / 'a.jsonl'), json.dumps(row) + '\n')
  _write(str(tmp_path / 'b.jsonl'), json.dumps({**row, 'repo_name': 'org/s'}) + '\n')
  (a,), _ = _read(f'jsonl:{tmp_path / "a.jsonl"}')
  (b,), _ = _read(f'jsonl:{tmp_path / "b.jsonl"}')
  assert a['identity'] == 'content' and a['path'].startswith('sha256:')
  assert a['path'] == b['path'] and 'copies' not in a and 'flags' not in a


@pytest.mark.parametrize('text, message', [
    ('[1, 2]\n', r'line 1: expected a JSON object, got list'),
    ('', r'holds no JSON lines'),
    ('\n\n', r'holds no JSON lines'),
    ('version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n', r'Git LFS pointer'),
    (json.dumps({'repo_name': 'r', 'content': 'x', 'copies': 'many'}) + '\n',
     r"line 1: field copies='many' is not a positive whole number"),
    (json.dumps({'repo_name': 'r', 'content': 'x', 'config_or_test': 'maybe'}) + '\n',
     r"line 1: flag config_or_test='maybe' is not true or false"),
    (json.dumps({'repo_name': 'r', 'content': 'x', 'ratio': 'high'}) + '\n',
     r"line 1: field ratio='high' is not a number"),
    (json.dumps({'repo_name': 'r', 'content': 'x', 'path': 3}) + '\n',
     r"line 1: field 'path' must be a string"),
])
def test_jsonl_bad_inputs_are_one_line_errors(tmp_path, text, message):
  _write(str(tmp_path / 'bad.jsonl'), text)
  with pytest.raises(sources.SourceError, match=message) as e:
    _read(f'jsonl:{tmp_path / "bad.jsonl"}')
  assert '\n' not in str(e.value) and 'bad.jsonl' in str(e.value)


def test_jsonl_oversized_and_binary_contents_are_skipped_and_counted(tmp_path):
  rows = _paper_rows()[:2]
  rows.append({**rows[0], 'content': 'z = 0\n' * 50})
  rows.append({**rows[0], 'content': 'a\x00b'})
  _write(str(tmp_path / 'x.jsonl'), ''.join(json.dumps(r) + '\n' for r in rows))
  records, skipped = _read(f'jsonl:{tmp_path / "x.jsonl"}', max_file_bytes=100)
  assert len(records) == 2
  assert (skipped['oversized'], skipped['binary']) == (1, 1)


def test_fingerprint_changes_with_the_files(tmp_path):
  _write(str(tmp_path / 'r' / 'a.py'), 'x = 1\n')
  before = sources.source_fingerprint(f'dir:{tmp_path}')
  assert sources.source_fingerprint(f'dir:{tmp_path}') == before
  _write(str(tmp_path / 'r' / 'b.py'), 'y = 2\n')
  assert sources.source_fingerprint(f'dir:{tmp_path}') != before


def test_iter_participant_counts_and_requires_sources(tmp_path):
  _write(str(tmp_path / 'r' / 'a.py'), 'x = 1\n')
  _write(str(tmp_path / 'r' / 'b.py'), b'\xff\xfe')
  skipped = sources.new_skipped()
  records = list(sources.iter_participant('org', [f'dir:{tmp_path}'], 0, skipped))
  assert len(records) == 1 and skipped['non_utf8'] == 1
  assert set(sources.SKIP_REASONS) <= set(skipped)  # Every reason shows in the card.
  with pytest.raises(ValueError, match='no sources'):
    list(sources.iter_participant('org', [], 0, sources.new_skipped()))


def test_every_package_read_has_its_version_in_the_card(tmp_path):
  """Participants' pkg:NAME/PREFIX sources and a tokenizer trained on a pkg: source alone."""
  version = importlib.metadata.version('ml-collections')
  assert sources.package_versions(['pkg:ml-collections/ml_collections/config_dict',
                                   'stdlib:json']) == {'ml-collections': version,
                                                       'python': platform.python_version()}
  cfg = conftest.tiny_data_config(str(tmp_path), names=('a', 'b'))
  cfg.tokenizer.vocab_size = 1000  # Trained on other code: enough tokens to keep the files.
  cfg.tokenizer.train_on = 'pkg:ml-collections/ml_collections/config_dict'
  card = build.build_data(cfg, str(tmp_path / 'data'), progress=False)
  assert card['packages'] == {'ml-collections': version}
  assert card['participants']['a']['packages'] == {}


def test_corpus_source_reads_the_manifest_in_order(tmp_path):
  stored = tmp_path / 'c' / 'third_party' / 'p-1' / 'p'
  stored.mkdir(parents=True)
  files = []
  for name, text in (('b.py', 'b = 1\n'), ('a.py', 'a = 2\n'), ('big.py', 'x = 3\n' * 50)):
    (stored / name).write_text(text)
    files.append({'organization': 'org', 'package': 'p', 'version': '1',
                  'file': f'third_party/p-1/p/{name}', 'repo': 'p==1', 'path': f'p/{name}',
                  'license': 'MIT', 'sha256': hashlib.sha256(text.encode()).hexdigest()})
  (tmp_path / 'c' / 'MANIFEST.json').write_text(json.dumps({'files': files}))
  records, skipped = _read(f'corpus:{tmp_path}/c/org', max_file_bytes=100)
  assert [(r['repo'], r['path'], r['license']) for r in records] == [
      ('p==1', 'p/b.py', 'MIT'), ('p==1', 'p/a.py', 'MIT')]
  assert skipped['oversized'] == 1
  assert sources.package_versions([f'corpus:{tmp_path}/c']) == {'p': '1'}
  assert sources.corpus_fingerprints([f'corpus:{tmp_path}/c', 'stdlib']) == {
      f'corpus:{tmp_path}/c': corpus.fingerprint(files)}
