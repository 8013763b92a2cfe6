"""build_data end to end on small dir:/jsonl: corpora: outputs, no-op, atomicity, bad input."""

import collections
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from collab.data import blocks
from collab.data import build
from collab.data import clean
from collab.data import clients as clients_lib
from collab.data import sources
from collab.data import streaming
from collab.data import tfds_builder
from collab.data import tokenizer as tokenizer_lib
from configs import common

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _code(org, i):
  """A file that passes the deterministic filters (keywords, > 4 '=', short lines)."""
  return (f'def {org}_fn_{i}(alpha, beta):\n    gamma = alpha + beta * {i}\n'
          f'    delta = gamma - {i % 7}\n    for k in range({i % 5 + 1}):\n'
          f'        delta = delta + k\n    return delta == {i}\n')


def _make_dir(root, org, repos=3, files=10):
  for r in range(repos):
    for i in range(files):
      path = os.path.join(root, org, f'{org}_repo{r}', 'src', f'm{i}.py')
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, 'w') as f:
        f.write(_code(org, r * 100 + i))
  return os.path.join(root, org)


def _make_jsonl(root, org, n=30):
  path = os.path.join(root, f'{org}_train.json.gz')
  with gzip.open(path, 'wt', encoding='utf-8') as f:
    for i in range(n):
      content = _code(org, i)
      f.write(json.dumps({'repo_name': f'{org}/r{i % 4}', 'path': f'p{i}.py', 'copies': '1',
                          'size': str(len(content)), 'content': content,
                          'license': 'mit'}) + '\n')
  return path


def _cfg(participants, **overrides):
  c = common.data_config(participants, seq_len=32)
  c.tokenizer.vocab_size = 300
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


@pytest.fixture(scope='module')
def corpora(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('corpora'))
  alpha = _make_dir(root, 'alpha')
  with open(os.path.join(alpha, 'alpha_repo0', 'blob.py'), 'wb') as f:
    f.write(b'\x00\x01binary')  # Skipped and counted, not a crash.
  os.symlink(alpha, os.path.join(alpha, 'alpha_repo1', 'loop'))
  return {'alpha': alpha, 'beta': _make_jsonl(root, 'beta'), 'root': root}


@pytest.fixture(scope='module')
def built(corpora, tmp_path_factory):
  cfg = _cfg([common.participant('alpha', [f"dir:{corpora['alpha']}"]),
              common.participant('beta', [f"jsonl:{corpora['beta']}"])])
  data_dir = str(tmp_path_factory.mktemp('built') / 'data')
  card = build.build_data(cfg, data_dir, progress=False)
  return cfg, data_dir, card


def test_build_writes_the_documented_folder(built):
  _, data_dir, card = built
  assert sorted(os.listdir(data_dir)) == ['blocks', 'data_card.json', 'manifest.json', 'tfds',
                                          'tokenizer']
  manifest = blocks.load_manifest(data_dir)
  assert manifest['participants'] == ['alpha', 'beta'] and manifest['seq_len'] == 32
  assert manifest['block_dtype'] == 'uint16' and manifest['vocab_size'] <= 300
  tok = tokenizer_lib.load_tokenizer(data_dir)
  assert manifest['eot_id'] == tok.eos_token_id and manifest['vocab_size'] == len(tok)
  skipped = card['participants']['alpha']['skipped']
  assert skipped['binary'] == 1 and skipped['symlink_loop'] == 1
  for name in ('alpha', 'beta'):
    entry = card['participants'][name]
    assert entry['read']['files'] == 30 and entry['filters'][0]['before'] == 30
    for split in ('train', 'valid'):
      s = entry['splits'][split]
      b = blocks.load_blocks(data_dir, name, split)
      assert b.shape == (s['blocks'], 32) and s['tokens'] // 32 == s['blocks']
      assert len(s['sha256']) == 64


def test_tfds_and_blocks_agree_with_the_cleaned_files(built, corpora):
  _, data_dir, card = built
  tok = tokenizer_lib.load_tokenizer(data_dir)
  encode, eot = tokenizer_lib.make_encoder(tok), tok.eos_token_id
  for split in ('train', 'valid'):
    records = tfds_builder.load_split(data_dir, 'alpha', split)
    assert len(records) == card['participants']['alpha']['splits'][split]['files']
    for r in records:  # Every stored file is the file on disk, byte for byte.
      with open(os.path.join(corpora['alpha'], r['repo'], r['path']), encoding='utf-8') as f:
        assert r['content'] == f.read()
    expected = blocks.pack(encode([r['content'] for r in records]), eot, 32)
    np.testing.assert_array_equal(blocks.load_blocks(data_dir, 'alpha', split), expected)


def test_tfds_read_back_equals_input(tmp_path):
  splits = {'org_train': [{'repo': 'r', 'path': f'{i}.py', 'content': f'x = "é{i}"\n',
                           'license': 'mit'} for i in range(5)],
            'org_valid': [{'repo': 'q', 'path': 'v.py', 'content': '', 'license': ''}]}
  tfds_builder.write_tfds(splits, str(tmp_path / 'tfds'))
  for split in ('train', 'valid'):
    got = tfds_builder.load_split(str(tmp_path), 'org', split)
    assert list(got) == splits[f'org_{split}']
  assert got[-1] == splits['org_valid'][-1]
  with pytest.raises(ValueError, match='org_test'):
    tfds_builder.load_split(str(tmp_path), 'org', 'test')


def test_second_build_is_a_no_op_until_inputs_change(built, corpora, monkeypatch, tmp_path):
  cfg, data_dir, card = built
  mtime = os.path.getmtime(os.path.join(data_dir, 'manifest.json'))

  def fail(*args, **kwargs):
    raise AssertionError('the sources were read again')

  with monkeypatch.context() as m:
    m.setattr(sources, 'iter_participant', fail)
    assert build.build_data(cfg, data_dir, progress=False) == card
  assert os.path.getmtime(os.path.join(data_dir, 'manifest.json')) == mtime
  # Changing the inputs rebuilds (in a copy, so the module fixture stays as it was).
  corpus = _make_dir(str(tmp_path), 'gamma')
  cfg2 = _cfg([common.participant('gamma', [f'dir:{corpus}'])])
  other = str(tmp_path / 'data')
  first = build.build_data(cfg2, other, progress=False)
  with open(os.path.join(corpus, 'gamma_repo0', 'src', 'extra.py'), 'w') as f:
    f.write(_code('gamma', 999))
  second = build.build_data(cfg2, other, progress=False)
  assert second['inputs'] != first['inputs']
  assert second['participants']['gamma']['read']['files'] == 31


def test_interrupted_build_leaves_nothing(corpora, monkeypatch, tmp_path):
  cfg = _cfg([common.participant('alpha', [f"dir:{corpora['alpha']}"])])
  data_dir = str(tmp_path / 'data')

  def interrupt(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(tfds_builder, 'write_tfds', interrupt)
  with pytest.raises(KeyboardInterrupt):
    build.build_data(cfg, data_dir, progress=False)
  assert os.listdir(str(tmp_path)) == []  # Neither the folder nor a temporary sibling.


def test_repo_split_dedup_across_and_tokenizer_choice(corpora, tmp_path):
  alpha = f"dir:{corpora['alpha']}"
  cfg = _cfg([common.participant('alpha', [alpha]), common.participant('copy', [alpha])],
             split='repo', dedup_across=True)
  with pytest.raises(build.EmptyParticipantError, match="'copy'"):
    build.build_data(cfg, str(tmp_path / 'd1'), progress=False)  # All clones of alpha.
  cfg = _cfg([common.participant('alpha', [alpha])], split='repo')
  cfg.tokenizer.train_on = 'alpha'
  card = build.build_data(cfg, str(tmp_path / 'd2'), progress=False)
  splits = card['participants']['alpha']['splits']
  repos = {s: {r['repo'] for r in tfds_builder.load_split(str(tmp_path / 'd2'), 'alpha', s)}
           for s in ('train', 'valid')}
  assert repos['train'] and repos['valid'] and not repos['train'] & repos['valid']
  assert splits['valid']['repos'] == 1 and card['tokenizer']['trained_on'] == ['alpha']
  # A local tokenizer folder is used as is, and copied beside the data.
  cfg.tokenizer.path = str(tmp_path / 'd2' / 'tokenizer')
  card3 = build.build_data(cfg, str(tmp_path / 'd3'), progress=False)
  assert card3['vocab_size'] == card['vocab_size']
  assert splits == card3['participants']['alpha']['splits']


def test_bad_inputs_raise_clear_errors(corpora, tmp_path):
  alpha = f"dir:{corpora['alpha']}"
  data_dir = str(tmp_path / 'data')
  cases = [
      ([common.participant('a', [alpha]), common.participant('a', [alpha])], 'Duplicate'),
      ([common.participant('a', ['pkg:not-a-real-package-xyz'])], 'not-a-real-package-xyz'),
      ([common.participant('a', [f'dir:{tmp_path}/missing'])], 'missing'),
      ([common.participant('a-b', [alpha])], 'letters, digits'),
      ([common.participant('pooled', [alpha])], "'pooled' is reserved"),
      ([], 'participants is empty'),
  ]
  for participants, message in cases:
    with pytest.raises(ValueError, match=message):
      build.build_data(_cfg(participants), data_dir, progress=False)
  few = tmp_path / 'few' / 'repo'
  few.mkdir(parents=True)
  (few / 'a.py').write_text('def f():\n    return 1\n')  # Fails filter 8.
  with pytest.raises(build.EmptyParticipantError, match="'few'.*no train blocks"):
    build.build_data(_cfg([common.participant('few', [f'dir:{few.parent}'])]), data_dir,
                     progress=False)
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"repo_name": "r", "path": "p", "content": "x", "license": ""}\n{oops\n')
  with pytest.raises(ValueError, match='line 2'):
    build.build_data(_cfg([common.participant('j', [f'jsonl:{bad}'])]), data_dir,
                     progress=False)
  assert not os.path.exists(data_dir)
  (tmp_path / 'mine').mkdir()
  (tmp_path / 'mine' / 'thesis.tex').write_text('precious')
  with pytest.raises(ValueError, match='not a collab data folder'):
    build.build_data(_cfg([common.participant('a', [alpha])]), str(tmp_path / 'mine'),
                     progress=False)
  assert (tmp_path / 'mine' / 'thesis.tex').read_text() == 'precious'


def test_reserved_names_cover_the_pooled_result_key():
  from collab.evals import perplexity  # Validation refuses what evaluation would.
  assert perplexity.POOLED in build.RESERVED_NAMES


def test_launcher_prints_the_card_or_a_clear_error(corpora, tmp_path):
  config = tmp_path / 'cfg.py'
  config.write_text(
      'from configs import common\n'
      'def get_config(arg=None):\n'
      '  c = common.base_config("tiny")\n'
      '  c.data.participants = [common.participant("alpha", [arg])]\n'
      '  c.data.seq_len = 32\n'
      '  c.data.tokenizer.vocab_size = 300\n'
      '  return c\n')
  env = {**os.environ, 'PYTHONPATH': REPO_ROOT}

  def run(arg, data_dir):
    return subprocess.run([sys.executable, '-m', 'launch.build_data', f'--config={config}:{arg}',
                           f'--data_dir={data_dir}'], capture_output=True, text=True,
                          cwd=REPO_ROOT, env=env, timeout=120)

  ok = run(f"dir:{corpora['alpha']}", tmp_path / 'data')
  assert ok.returncode == 0, ok.stderr
  assert '== alpha' in ok.stdout and 'exact_dedup' in ok.stdout and 'blocks' in ok.stdout
  bad = run(f'dir:{tmp_path}/nowhere', tmp_path / 'data2')
  assert bad.returncode == 1
  assert 'nowhere' in bad.stderr and 'Traceback' not in bad.stderr


def test_tokenizer_can_train_on_a_public_source_only(corpora, tmp_path):
  cfg = _cfg([common.participant('alpha', [f"dir:{corpora['alpha']}"])])
  cfg.tokenizer.train_on = f"jsonl:{corpora['beta']}"  # No participant's code pooled.
  card = build.build_data(cfg, str(tmp_path / 'data'), progress=False)
  assert card['tokenizer']['trained_on'] == [cfg.tokenizer.train_on]
  assert card['tokenizer']['train_files'] == 30  # beta's 30 files, alpha's none.
  cfg.tokenizer.train_on = 'nobody'
  with pytest.raises(ValueError, match='train_on'):
    build.build_data(cfg, str(tmp_path / 'data2'), progress=False)


FIXTURES = os.path.join(REPO_ROOT, 'tests', 'fixtures')


def _release_participant(**options):
  """facebook as configs/paper.py reads it: the release's train and valid files."""
  train, valid = (f"jsonl:{os.path.join(FIXTURES, f'facebook_{s}.jsonl')}"
                  for s in ('train', 'valid'))
  p = common.participant('facebook', (train, valid))
  for k, v in options.items():
    setattr(p, k, v)
  return p


def _release_cfg(participants, **overrides):
  c = _cfg(participants, **overrides)
  c.tokenizer.vocab_size = 2000  # 8 small files: a 300-token BPE fails filter 5 on most.
  return c


def test_release_files_build_as_given_with_trusted_flags(tmp_path):
  p = _release_participant(valid_sources=(f"jsonl:{FIXTURES}/facebook_valid.jsonl",),
                           trusted_flags=('config_or_test', 'has_no_keywords'))
  card = build.build_data(_release_cfg([p], split='given'), str(tmp_path / 'data'),
                          progress=False)
  e = card['participants']['facebook']
  assert e['read']['files'] == 8 and e['identity'] == {'path': 0, 'hash': 8, 'content': 0}
  assert all(f['before'] == f['after'] for f in e['filters'])  # Deterministic: none dropped.
  for side, n in (('train', 6), ('valid', 2)):  # The given split, every file kept.
    s = e['splits'][side]
    assert s['files'] == n and all(f['before'] == f['after'] for f in s['filters'])
  assert e['splits']['train']['copies'] == {'1': 2, '2-4': 2, '>=5': 2}
  assert e['valid_sources'] == [f"jsonl:{FIXTURES}/facebook_valid.jsonl"]
  assert e['trusted_flags'] == [
      {'flag': 'config_or_test', 'replaces': 'config_or_test', 'flagged': 1, 'removed': 0},
      {'flag': 'has_no_keywords', 'replaces': 'no_keywords', 'flagged': 1, 'removed': 0}]
  prov = clients_lib.load_provenance(str(tmp_path / 'data'), 'facebook')
  with open(os.path.join(FIXTURES, 'facebook_train.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert prov.path_F == [f"hash:{r['hash']}" for r in rows]  # Identity stands in for path.
  assert prov.copies_F.tolist() == [int(r['copies']) for r in rows]
  assert prov.pathless_sources == (f"jsonl:{FIXTURES}/facebook_train.jsonl",)
  fed = common.federated_config()
  fed.clients = 'directories'
  with pytest.raises(ValueError, match=r"needs file paths.*'facebook'.*facebook_train"):
    clients_lib.file_clients(fed, str(tmp_path / 'data'), 'facebook', 1)
  fed.clients = 'repositories'  # Repositories need no path.
  assert 'facebook/facebook/prophet' in clients_lib.file_clients(
      fed, str(tmp_path / 'data'), 'facebook', 1)


def test_release_flags_untrusted_draw_again_and_options_fingerprint_only_when_set(tmp_path):
  card = build.build_data(_release_cfg([_release_participant()]), str(tmp_path / 'a'),
                          progress=False)
  e = card['participants']['facebook']
  dropped = {f['filter']: f['before'] - f['after'] for s in e['splits'].values()
             for f in s['filters'] if f['before'] != f['after']}
  assert dropped == {'config_or_test': 1}  # The release's survivor, drawn a second time.
  assert 'trusted_flags' not in e and 'valid_sources' not in e
  plain = _cfg([_release_participant()])
  defaults = _cfg([_release_participant(valid_sources=(), trusted_flags=())])
  assert build.inputs_fingerprint(plain) == build.inputs_fingerprint(defaults)


def test_release_options_refuse_clearly(tmp_path):
  valid = f"jsonl:{FIXTURES}/facebook_valid.jsonl"
  cases = [
      (_release_participant(), 'given', r"'facebook': data.split='given' needs its "
                                        'valid_sources'),
      (_release_participant(valid_sources=('jsonl:elsewhere.jsonl',)), 'given',
       r"valid_sources \['jsonl:elsewhere.jsonl'\] are not among its sources"),
      (_release_participant(trusted_flags=('autogenerated',)), 'file',
       r"trusted_flags \['autogenerated'\] unknown"),
  ]
  for p, split, message in cases:
    with pytest.raises(ValueError, match=message):
      build.build_data(_cfg([p], split=split), str(tmp_path / 'data'), progress=False)
  alpha = tmp_path / 'src' / 'repo'
  alpha.mkdir(parents=True)
  (alpha / 'a.py').write_text(_code('a', 1))
  mixed = common.participant('mixed', (f'dir:{alpha.parent}', valid))
  mixed.trusted_flags = ('config_or_test',)
  with pytest.raises(ValueError, match=r"trusts flag 'config_or_test', but source dir:"):
    build.build_data(_cfg([mixed]), str(tmp_path / 'data'), progress=False)
  mixed.trusted_flags = ('ratio',)  # The release's ratio, refused alike where it is missing.
  with pytest.raises(ValueError, match=r"trusts flag 'ratio', but source dir:"):
    build.build_data(_cfg([mixed]), str(tmp_path / 'data'), progress=False)
  assert not os.path.exists(tmp_path / 'data')


def test_paper_config_reads_an_artifact_checkout_as_released(tmp_path):
  from configs import paper
  for org in paper.PAPER_ORGS:  # The artifact's layout, each org holding the fixture.
    folder = tmp_path / 'artifact' / 'dataset' / org
    folder.mkdir(parents=True)
    for side in ('train', 'valid'):
      with open(os.path.join(FIXTURES, f'facebook_{side}.jsonl'), 'rb') as src:
        with gzip.open(folder / f'{org}_{side}.json.gz', 'wb') as dst:
          dst.write(src.read())
  config = paper.get_config(str(tmp_path / 'artifact'))
  config.data.seq_len, config.data.tokenizer.vocab_size = 32, 2000
  config.data.tokenizer.max_bytes = 0
  card = build.build_data(config.data, str(tmp_path / 'data'), progress=False)
  assert card['split']['split'] == 'given'
  for org in paper.PAPER_ORGS:
    e = card['participants'][org]
    assert e['read']['files'] == 8 and e['identity']['hash'] == 8
    assert (e['splits']['train']['files'], e['splits']['valid']['files']) == (6, 2)
    assert [(t['flag'], t['removed']) for t in e['trusted_flags']] == [
        ('config_or_test', 0), ('has_no_keywords', 0), ('ratio', 0)]


def test_a_kill_while_replacing_leaves_the_old_folder_or_the_new(corpora, monkeypatch,
                                                                 tmp_path):
  alpha = f"dir:{corpora['alpha']}"
  data_dir = str(tmp_path / 'data')
  old_card = build.build_data(_cfg([common.participant('alpha', [alpha])]), data_dir,
                              progress=False)
  new_cfg = _cfg([common.participant('alpha', [alpha])], seed=2)
  real_replace = os.replace

  def killed_between_renames(src, dst):  # The new folder never arrives.
    if dst == data_dir:
      raise KeyboardInterrupt
    return real_replace(src, dst)

  monkeypatch.setattr(os, 'replace', killed_between_renames)
  with pytest.raises(KeyboardInterrupt):
    build.build_data(new_cfg, data_dir, progress=False)
  monkeypatch.setattr(os, 'replace', real_replace)
  old_cfg = _cfg([common.participant('alpha', [alpha])])
  assert build.build_data(old_cfg, data_dir, progress=False) == old_card  # Old, whole.
  real_rmtree = build.shutil.rmtree

  def killed_while_removing_the_old(path, *args, **kwargs):
    if path.endswith('.data.old'):
      raise KeyboardInterrupt
    return real_rmtree(path, *args, **kwargs)

  monkeypatch.setattr(build.shutil, 'rmtree', killed_while_removing_the_old)
  with pytest.raises(KeyboardInterrupt):
    build.build_data(new_cfg, data_dir, progress=False)
  monkeypatch.setattr(build.shutil, 'rmtree', real_rmtree)
  new_card = build.build_data(new_cfg, data_dir, progress=False)  # New, whole: no rebuild.
  assert new_card['seed'] == 2 and new_card['inputs'] != old_card['inputs']
  assert sorted(os.listdir(tmp_path)) == ['data']


# GPT-2's pre-tokenizer pattern: each piece is at least one of its tokens.
_GPT2_PIECES = re.compile(r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?[^\s\w]+|\s+(?!\S)|\s+""")


def _release_row(record):
  """A release line of real code, its fields computed as codeparrot's cleaning does; the
  paper's `ratio` (its GPT-2 tokenizer) stands in as characters per GPT-2 piece."""
  content = record['content']
  lengths = [len(line) for line in content.splitlines()]
  return {'repo_name': record['repo'], 'copies': '1', 'size': str(len(content)),
          'content': content, 'license': record['license'],
          'hash': hashlib.md5(re.sub(r'\s+', '', content).encode()).hexdigest(),
          'line_mean': sum(lengths) / len(lengths), 'line_max': max(lengths),
          'alpha_frac': sum(map(str.isalnum, content)) / len(content),
          'ratio': len(content) / len(_GPT2_PIECES.findall(content)),
          'autogenerated': clean.is_autogenerated(content),
          'config_or_test': clean.is_config_or_test(content),
          'has_no_keywords': clean.has_no_keywords(content),
          'has_few_assignments': clean.has_few_assignments(content)}


def _release_rows(n):
  """n rows of the standard library's files that the paper's cleaning keeps."""
  rows, seen = [], set()
  for r in sources.iter_source('stdlib', 'x', 8000, collections.Counter()):
    key = clean.dedup_key(r['content'])
    if key in seen or clean.pre_filter_reason(r['content']):  # Empty files included.
      continue
    row = _release_row(r)
    if row['has_few_assignments'] or row['ratio'] < clean.MIN_CHARS_PER_TOKEN:
      continue
    seen.add(key)
    rows.append(row)
    if len(rows) == n:
      return rows
  raise AssertionError(f'only {len(rows)} standard library files pass the filters')


def test_a_release_file_of_538_lines_builds_whole_with_trusted_ratio(tmp_path):
  from configs import paper
  rows = _release_rows(538)  # As many lines as the artifact's facebook_valid.json.gz.
  folder = tmp_path / 'artifact' / 'dataset' / 'facebook'
  folder.mkdir(parents=True)
  for side, part in (('train', rows[:430]), ('valid', rows[430:])):
    with gzip.open(folder / f'facebook_{side}.json.gz', 'wt', encoding='utf-8') as f:
      f.writelines(json.dumps(r) + '\n' for r in part)
  p = paper.release_participant(str(tmp_path / 'artifact'), 'facebook')
  assert 'ratio' in p.trusted_flags
  cfg = _cfg([p], split='given')
  cfg.seq_len, cfg.tokenizer.max_bytes = 64, 0
  data_dir = str(tmp_path / 'data')
  e = build.build_data(cfg, data_dir, progress=False)['participants']['facebook']
  assert e['read']['files'] == 538 and e['identity'] == {'path': 0, 'hash': 538, 'content': 0}
  assert all(f['before'] == f['after'] == 538 for f in e['filters'])
  assert [s['files'] for s in e['splits'].values()] == [430, 108]  # All 538 kept.
  assert all(f['before'] == f['after'] for s in e['splits'].values() for f in s['filters'])
  assert {t['flag']: (t['replaces'], t['removed']) for t in e['trusted_flags']} == {
      'config_or_test': ('config_or_test', 0), 'has_no_keywords': ('no_keywords', 0),
      'ratio': ('chars_per_token', 0)}
  # Recounted with this build's BPE, filter 5 would have dropped files the paper kept.
  encode = tokenizer_lib.make_encoder(tokenizer_lib.load_tokenizer(data_dir))
  ours = [len(r['content']) / len(ids) for r, ids in zip(rows, encode([r['content'] for r in rows]))]
  assert sum(x < clean.MIN_CHARS_PER_TOKEN for x in ours) > 0


def test_a_source_changed_between_passes_is_a_clear_error(monkeypatch, tmp_path):
  corpus = _make_dir(str(tmp_path), 'delta', repos=2, files=5)
  real_prepare = tokenizer_lib.prepare_tokenizer

  def edit_then_prepare(*args, **kwargs):  # After pass 1, before the files are read again.
    with open(os.path.join(corpus, 'delta_repo1', 'src', 'm3.py'), 'a') as f:
      f.write('# edited\n')
    return real_prepare(*args, **kwargs)

  monkeypatch.setattr(tokenizer_lib, 'prepare_tokenizer', edit_then_prepare)
  with pytest.raises(streaming.SourceChangedError, match=r"'delta'.*source changed"):
    build.build_data(_cfg([common.participant('delta', [f'dir:{corpus}'])]),
                     str(tmp_path / 'data'), progress=False)
  assert sorted(os.listdir(tmp_path)) == ['delta']  # Nothing half-built.
