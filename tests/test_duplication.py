"""Memorization by duplication bucket: hand-made indexes, and the release fixture's copies."""

import json
import os
import random

import numpy as np
import pytest

from collab.data import build
from collab.evals.clones import index as clones
from collab.evals.clones import duplication
from collab.evals.memorization import audit as memorization
from configs import common

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')


def _lines(tag, n):
  rng = random.Random(tag)
  return [f'{tag}_{i} = compute_{rng.randrange(10**6)}({i}, "{tag}{i}")' for i in range(n)]


ONE, FEW, MANY, ALSO_MANY = (_lines(t, 12) for t in ('one', 'few', 'many', 'also'))


def _index(name, docs, copies):
  index = clones.build_index([{'repo': 'r', 'path': f'{i}.py', 'content': '\n'.join(d)}
                              for i, d in enumerate(docs)], participant=name, progress=False)
  index.copies_D = np.asarray(copies, np.int64)
  return index


def _sample(sid, participant, lines):
  return memorization.Sample(sid, 'prompted', participant, 'r', 'p.py', 1, 'f',
                             'def f():\n    """Doc."""', '\n' + '\n'.join(lines))


def test_buckets_shares_and_relative_rates_by_hand():
  # Copies 1, 3 and 7: one file per bucket, 7 windows each (12 lines, W = 6).
  train = {'A': _index('A', [ONE, FEW, MANY], [1, 3, 7])}
  valid = {'A': _index('A', [_lines('v', 12)], [1])}
  samples = [_sample('s0', 'A', MANY[:6]), _sample('s1', 'A', MANY[3:10]),
             _sample('s2', 'A', FEW[:8]), _sample('s3', 'A', _lines('noise', 8))]
  result, rows = memorization.audit(samples, train, valid, seed=1)
  dup = result['duplication']
  assert dup['bucket_names'] == ['1', '2-4', '>=5']
  a = dup['participants']['A']
  assert a['spans'] == 3 == result['participants']['A']['spans']
  got = {b: (r['files'], r['windows'], r['spans']) for b, r in a['buckets'].items()}
  assert got == {'1': (1, 7, 0), '2-4': (1, 7, 1), '>=5': (1, 7, 2)}
  assert a['buckets']['>=5']['span_share'] == pytest.approx(2 / 3)
  assert a['buckets']['>=5']['window_share'] == pytest.approx(1 / 3)
  assert a['buckets']['>=5']['relative_rate'] == pytest.approx(2.0)
  assert a['buckets']['1']['relative_rate'] == 0.0
  assert dup['all'] == a  # One participant: the pool is it.
  assert sorted(r['matched_copies'] for r in rows) == [3, 7, 7]


def test_a_span_takes_the_most_duplicated_file_holding_it():
  shared = ONE[:6]
  index = _index('A', [shared + FEW, shared + MANY], [1, 9])
  bucket_D = duplication.bucket_of(index.copies_D)
  (span,) = clones.find_spans('\n'.join(shared), [index])
  assert duplication.span_bucket(span.window_hashes, index, bucket_D) == 2
  assert duplication.span_bucket([123], index, bucket_D) == -1


def test_no_copies_known_gives_no_breakdown():
  index = _index('A', [ONE], [1])
  index.copies_D = None
  assert duplication.breakdown({'A': []}, {'A': index}) is None
  assert duplication.bucket_of([1, 2, 4, 5, 50]).tolist() == [0, 1, 1, 2, 2]


def test_release_copies_reach_the_clone_index_and_the_breakdown(tmp_path):
  """The fixture's copies (3, 1, 7, 2, 1, 12) travel from the release to the audit."""
  train = f"jsonl:{os.path.join(FIXTURES, 'facebook_train.jsonl')}"
  valid = f"jsonl:{os.path.join(FIXTURES, 'facebook_valid.jsonl')}"
  p = common.participant('facebook', (train, valid))
  p.valid_sources, p.trusted_flags = (valid,), ('config_or_test', 'has_no_keywords')
  cfg = common.data_config([p], seq_len=32)
  cfg.split, cfg.tokenizer.vocab_size = 'given', 2000
  data_dir = str(tmp_path / 'data')
  build.build_data(cfg, data_dir, progress=False)
  indexes = memorization.build_indexes(data_dir, ['facebook'])
  index = indexes['train']['facebook']
  with open(os.path.join(FIXTURES, 'facebook_train.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert index.copies_D.tolist() == [int(r['copies']) for r in rows]
  again = memorization.build_indexes(data_dir, ['facebook'])['train']['facebook']
  assert again.copies_D.tolist() == index.copies_D.tolist()  # Loaded, copies reattached.
  # A sample that copies the 12-copy file's body and one that copies the 3-copy file's.
  bodies = [r['content'].split('\n') for r in rows]
  samples = [_sample('s0', 'facebook', bodies[5][2:]), _sample('s1', 'facebook', bodies[0][6:])]
  result, _ = memorization.audit(samples, indexes['train'], indexes['valid'], seed=1)
  buckets = result['duplication']['participants']['facebook']['buckets']
  assert {b: r['files'] for b, r in buckets.items()} == {'1': 2, '2-4': 2, '>=5': 2}
  assert {b: r['spans'] for b, r in buckets.items()} == {'1': 0, '2-4': 1, '>=5': 1}


def test_the_duplication_table_reads_results_only():
  from analysis import results, tables  # pylint: disable=g-import-not-at-top
  from collab.evals.memorization import clone_audit  # pylint: disable=g-import-not-at-top

  def run(name, spans_many):
    buckets = {b: {'files': 10, 'windows': 100, 'spans': s, 'window_share': w,
                   'span_share': s / 4, 'relative_rate': (s / 4) / w}
               for b, s, w in (('1', 4 - spans_many, 0.5), ('2-4', 0, 0.25),
                               ('>=5', spans_many, 0.25))}
    dup = {'bucket_names': ['1', '2-4', '>=5'],
           'participants': {'A': {'spans': 4, 'buckets': buckets}},
           'all': {'spans': 4, 'buckets': buckets}}
    return {'run': name, 'setting': 'centralized', 'perplexity': {'A': 3.0, 'pooled': 3.0},
            'memorization': {'duplication': dup}}

  older = {'run': 'single', 'setting': 'single', 'perplexity': {'A': 4.0, 'pooled': 4.0},
           'memorization': {}}  # Results from before the breakdown existed.
  runs = [run('centralized@seed1', 2), run('centralized@seed2', 4), older]
  title, header, rows = clone_audit.duplication_table(results.model_views(runs))[1:]
  assert [r[:4] for r in rows] == [['centralized', 'final', 'A', c]
                                   for c in ('1', '2–4', '5+')]
  many = rows[2]
  assert many[header.index('memorized spans')] == '3 ± 1'
  assert many[header.index('spans %')] == '75.0 ± 35.4'
  assert many[header.index('relative rate')] == '3.00 ± 1.41'
  assert 'duplication' in tables.all_tables(runs, {})
  assert 'duplication' not in tables.all_tables(runs[2:], {})
  assert '5+' in tables.latex(title, header, rows)
