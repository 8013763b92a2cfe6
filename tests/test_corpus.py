"""The default study's shipped corpus: what it holds, that installs cannot move it, and
that a changed file is refused."""

import collections
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from collab.data import build
from collab.data import corpus
from collab.data import sources
from configs import common
from configs import default
from configs.corpus import vendor

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(corpus.ROOT, 'default')
ORGS = tuple(common.DEFAULT_PARTICIPANTS)
# Builds the default data into argv[1]; prints the installed rich, the card's content
# fingerprints and what the old installed-package spec of a rich file reads.
_BUILD = textwrap.dedent("""
    import collections, hashlib, importlib.metadata, json, sys
    from collab.data import build, sources
    from configs import default
    card = build.build_data(default.get_config().data, sys.argv[1], progress=False)
    old = [(r['repo'], hashlib.sha256(r['content'].encode()).hexdigest()) for r in
           sources.iter_source('pkg:rich/rich/control.py', 'x', 0, collections.Counter())]
    print(json.dumps({'rich': importlib.metadata.version('rich'), 'old': old,
                      'splits': {n: {s: v['sha256'] for s, v in e['splits'].items()}
                                 for n, e in card['participants'].items()}}))
""")


def _manifest():
  with open(os.path.join(DEFAULT, corpus.MANIFEST)) as f:
    return json.load(f)


def _splits(card):
  return {n: {s: v['sha256'] for s, v in e['splits'].items()}
          for n, e in card['participants'].items()}


def _tree(root):
  """Relative path -> bytes of every file under root."""
  out = {}
  for r, _, fs in os.walk(root):
    for f in fs:
      with open(os.path.join(r, f), 'rb') as fh:
        out[os.path.relpath(os.path.join(r, f), root)] = fh.read()
  return out


def _records(org, specs):
  """A participant's records without their source spec (which names how, not what)."""
  return [{k: v for k, v in r.items() if k != 'source'}
          for r in sources.iter_participant(org, specs, 0, sources.new_skipped())]


def _pins_installed() -> bool:
  return all(vendor.installed_version(p) == v for p, v in vendor.PINS.items())


@pytest.fixture(scope='module')
def default_card(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('default') / 'data')
  return build.build_data(default.get_config().data, data_dir, progress=False)


def test_default_participants_read_the_shipped_corpus():
  assert all(s.startswith('corpus:default/') for specs in common.DEFAULT_PARTICIPANTS.values()
             for s in specs)
  assert set(vendor.SOURCES) == set(ORGS)


def test_built_data_is_the_content_the_manifest_names(default_card):
  manifest = _manifest()
  by_org = collections.defaultdict(list)
  for e in manifest['files']:  # Hashed here from the stored bytes, not taken on trust.
    with open(os.path.join(DEFAULT, e['file']), 'rb') as f:
      by_org[e['organization']].append({'sha256': hashlib.sha256(f.read()).hexdigest()})
  assert corpus.fingerprint([e for es in by_org.values() for e in es]) == manifest['sha256']
  for org in ORGS:
    expected = manifest['organizations'][org]
    entry = default_card['participants'][org]
    assert entry['corpus'] == {f'corpus:default/{org}': expected['sha256']}
    assert corpus.fingerprint(by_org[org]) == expected['sha256']
    assert entry['read'] == {'files': expected['files'], 'bytes': expected['bytes']}
    assert entry['packages'] == {e['package']: e['version'] for e in manifest['files']
                                 if e['organization'] == org}


def test_another_rich_installed_changes_nothing(default_card, tmp_path):
  site = tmp_path / 'site'
  (site / 'rich').mkdir(parents=True)
  (site / 'rich' / '__init__.py').write_text('')
  (site / 'rich' / 'control.py').write_text('"""Not the rich that was vendored."""\nX = 99\n')
  info = site / 'rich-99.0.dist-info'
  info.mkdir()
  (info / 'METADATA').write_text('Metadata-Version: 2.1\nName: rich\nVersion: 99.0\n'
                                 'License-Expression: MIT\n')
  (info / 'RECORD').write_text('rich/__init__.py,,\nrich/control.py,,\n'
                               'rich-99.0.dist-info/METADATA,,\nrich-99.0.dist-info/RECORD,,\n')
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(site), REPO_ROOT])}
  out = subprocess.run([sys.executable, '-c', _BUILD, str(tmp_path / 'data')], env=env,
                       cwd=REPO_ROOT, capture_output=True, text=True, check=True)
  faked = json.loads(out.stdout.strip().splitlines()[-1])
  assert faked['rich'] == '99.0'
  assert faked['splits'] == _splits(default_card)
  # The same build from installed packages would have moved: the old spec reads the fake.
  installed = [(r['repo'], hashlib.sha256(r['content'].encode()).hexdigest()) for r in
               sources.iter_source('pkg:rich/rich/control.py', 'x', 0, collections.Counter())]
  assert [repo for repo, _ in faked['old']] == ['rich==99.0']
  assert faked['old'][0][1] != installed[0][1]


@pytest.mark.parametrize('change', ['edit', 'delete'])
def test_a_changed_corpus_file_is_a_one_line_error(tmp_path, change):
  copy = str(tmp_path / 'default')
  shutil.copytree(DEFAULT, copy)
  target = os.path.join(copy, 'third_party', 'rich-15.0.0', 'rich', 'measure.py')
  if change == 'edit':
    with open(target, 'a') as f:
      f.write('# a local edit\n')
  else:
    os.remove(target)
  with pytest.raises(corpus.CorpusError) as e:
    list(sources.iter_source(f'corpus:{copy}/textualize', 'x', 0, collections.Counter()))
  message = str(e.value)
  assert '\n' not in message and target in message
  assert 'git checkout' in message and 'python -m configs.corpus.vendor' in message
  assert ('differs from MANIFEST.json' if change == 'edit' else 'cannot read') in message
  # Other organizations' files are untouched: they still read.
  assert list(sources.iter_source(f'corpus:{copy}/psf', 'x', 0, collections.Counter()))


def test_corpus_resolves_beside_the_code_not_the_working_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  records = list(sources.iter_source('corpus:default/psf', 'psf', 0, collections.Counter()))
  assert [(r['repo'], r['path']) for r in records][-1] == ('stdlib/tomllib', '_re.py')
  with pytest.raises(corpus.CorpusError, match="no files for 'nobody'.*'psf'"):
    corpus.entries('default/nobody')
  with pytest.raises(corpus.CorpusError, match='no MANIFEST.json'):
    corpus.entries('no_such_corpus')


def test_source_fingerprint_follows_the_manifest_not_file_times(tmp_path):
  copy = str(tmp_path / 'default')
  shutil.copytree(DEFAULT, copy)
  spec = f'corpus:{copy}/pypa'
  before = sources.source_fingerprint(spec)
  os.utime(os.path.join(copy, _manifest()['files'][7]['file']), (1, 1))
  assert sources.source_fingerprint(spec) == before
  with open(os.path.join(copy, corpus.MANIFEST), 'a') as f:
    f.write('\n')
  assert sources.source_fingerprint(spec) != before


@pytest.mark.skipif(not _pins_installed(), reason='the installed packages are not the '
                    "versions the corpus was copied from (configs/corpus/vendor.py PINS)")
def test_corpus_gives_the_records_the_installed_packages_give():
  for org in ORGS:
    assert _records(org, common.DEFAULT_PARTICIPANTS[org]) == _records(org,
                                                                       vendor.SOURCES[org])


@pytest.mark.skipif(not _pins_installed(), reason='the installed packages are not the '
                    "versions the corpus was copied from (configs/corpus/vendor.py PINS)")
def test_vendoring_again_writes_the_same_bytes(tmp_path):
  out = str(tmp_path / 'default')
  vendor.vendor(out)
  assert _tree(out) == _tree(DEFAULT)
