"""Memorization audit: an overfit model end to end, aggregation, prompt exclusion, indexes."""

import dataclasses
import os
import random

import numpy as np
import pytest

from collab import evaluate
from collab import io
from collab import train as train_lib
from collab.data import build
from collab.data import tfds_builder
from collab.evals.clones import index as clones
from collab.evals.memorization import audit as memorization
from collab.evals.generation import sampling

NAMES = ('alpha', 'beta', 'gamma')
WORDS = {'alpha': ('table', 'row', 'column', 'cell', 'width', 'margin', 'border', 'header'),
         'beta': ('packet', 'socket', 'buffer', 'stream', 'frame', 'channel', 'payload', 'crc'),
         'gamma': ('pixel', 'color', 'image', 'canvas', 'brush', 'layer', 'shade', 'tone')}
# Files 0-4 of beta and gamma end with this helper: cross-organization clones.
SHARED_HELPER = ['', '', 'def checksum(data, seed):', '    """Folds bytes into a checksum."""',
                 '    acc = seed ^ 0x5bd1', '    for byte in data:',
                 '        acc = (acc * 31 + byte) & 0xFFFF', '        acc ^= acc >> 7',
                 '    mixed = acc * 2654435761 % 65521', '    folded = (mixed >> 3) + acc',
                 '    return folded & 0xFFFF']


def _write_corpus(root, org, files=10, body=8):
  """One documented function per file with a body of random, distinct assignment lines."""
  rng = random.Random(org)
  w = WORDS[org]
  for i in range(files):
    lines = [f'def {org}_update_{i}({w[0]}, {w[1]}):',
             f'    """Updates the {org} {w[2]} number {i}."""']
    for j in range(body):
      a, b, c = rng.sample(w, 3)
      lines.append(f'    {a}_{j} = {b} {rng.choice("+-*%")} {c} * {rng.randrange(2, 99)}')
    lines.append(f'    return {w[0]}_{body - 1}')
    if org != 'alpha' and i < 5:
      lines += SHARED_HELPER
    path = os.path.join(root, org, f'{org}_repo{i % 3}', f'mod{i}.py')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
      f.write('\n'.join(lines) + '\n')
  return os.path.join(root, org)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  from configs import common
  root = str(tmp_path_factory.mktemp('mem_corpora'))
  parts = [common.participant(n, (f'dir:{_write_corpus(root, n)}',)) for n in NAMES]
  cfg = common.data_config(parts, seq_len=128)
  cfg.tokenizer.vocab_size = 400
  out = os.path.join(str(tmp_path_factory.mktemp('mem_data')), 'data')
  build.build_data(cfg, out, progress=False)
  return out


def _run_config(data_dir):
  """A 2-layer d=64 model trained on alpha alone, long enough to overfit it."""
  from configs import common
  c = common.base_config('tiny')
  c.model.num_layers, c.model.num_heads, c.model.d_model = 2, 2, 64
  c.model.d_ff, c.model.max_len, c.model.dropout = 256, 128, 0.0
  c.data = common.data_config([common.participant(n, ('dir:built',)) for n in NAMES],
                              seq_len=128)
  c.data.tokenizer.vocab_size = 400
  c.data.data_dir = data_dir
  c.setting, c.single = 'single', 'alpha'
  c.train.batch_size, c.train.steps, c.train.warmup_steps = 4, 120, 10
  c.train.learning_rate, c.train.log_every, c.train.checkpoint_every = 1e-2, 50, 10_000
  c.eval.passk.enabled = False
  m = c.eval.memorization
  m.max_prompts, m.samples_per_prompt, m.max_new_tokens, m.unprompted_samples = 4, 2, 100, 4
  return c


@pytest.fixture(scope='module')
def audited(data_dir, tmp_path_factory):
  """(config, workdir, result) of the memorization audit of an overfit alpha model."""
  config = _run_config(data_dir)
  workdir = str(tmp_path_factory.mktemp('mem_run'))
  train_lib.train(config, workdir)
  result = evaluate.evaluate_part(config, workdir, 'memorization')
  return config, workdir, result


def test_dataset_inference_finds_the_trained_participant_only(audited):
  """Dataset inference on a real model: it rejects the null for the participant the model
  trained on (alpha) and not for the one it never saw (beta)."""
  config, workdir, _ = audited
  config.eval.membership.window = 16
  result = evaluate.evaluate_part(config, workdir, 'membership')
  alpha, beta = (result['participants'][p]['dataset_inference'] for p in ('alpha', 'beta'))
  assert not alpha['calibrated']  # No study around it: no reference model left.
  assert alpha['p_value'] < 0.01 and alpha['sequences_needed'] is not None
  assert beta['p_value'] >= 0.01 and beta['sequences_needed'] is None
  loss = result['participants']['alpha']['scores']['loss']
  assert loss['auroc'] > 0.9 > result['participants']['beta']['scores']['loss']['auroc']


def test_overfit_model_memorizes_its_participant_only(audited, data_dir):
  _, _, result = audited
  alpha, beta = result['participants']['alpha'], result['participants']['beta']
  assert alpha['samples'] == 4 * 2 and beta['samples'] == 4 * 2
  assert alpha['ratio'] > 0 and alpha['memorized_lines'] >= 6 and alpha['fingerprints'] >= 1
  lo, hi = alpha['ratio_ci95']
  assert lo <= alpha['ratio'] <= hi
  assert alpha['exclusive_spans'] + alpha['shared_spans'] == alpha['spans'] > 0
  # beta's code shares no 6-line window with alpha's, and the model never saw it.
  summary = memorization.crossorg_summary(data_dir, list(NAMES))
  assert summary['matrix'][0][1] == summary['matrix'][1][0] == 0.0
  assert beta['ratio'] == 0.0 and alpha['ratio_by_index']['beta'] == 0.0
  assert result['leakage']['beta'] == 0.0
  # Unprompted samples of an alpha model are alpha's code if anything.
  unprompted = result['unprompted']
  assert unprompted['samples'] == 4
  assert unprompted['participants']['beta']['ratio'] == 0.0
  assert result['prompts']['alpha']['kept'] == 4
  assert (result['prompts']['alpha']['source'],
          result['prompts']['alpha']['indentation']) == ('training files', 'dedented')


def test_default_study_gets_the_duplication_breakdown(audited):
  _, _, result = audited
  dup = result['duplication']  # dir: sources: every file once, so all in bucket '1'.
  alpha = dup['participants']['alpha']
  assert alpha['spans'] == result['participants']['alpha']['spans'] > 0
  assert alpha['buckets']['1']['spans'] == alpha['spans']
  assert alpha['buckets']['1']['window_share'] == 1.0
  assert alpha['buckets']['1']['relative_rate'] == 1.0


def _normalized(lines):
  """Kept normalized lines, as the clone detector compares them."""
  hashes, _ = clones.line_hashes('\n'.join(lines))
  return hashes.tolist()


def test_memorized_jsonl_points_at_the_training_lines(audited, data_dir):
  _, workdir, result = audited
  rows = io.read_jsonl(os.path.join(workdir, 'memorization', 'memorized.jsonl'))
  samples = {r['id']: r for r in io.read_jsonl(os.path.join(workdir, 'samples',
                                                            'memorization.jsonl'))}
  assert len(rows) == result['spans'] > 0
  train = {(r['repo'], r['path']): r['content']
           for r in tfds_builder.load_split(data_dir, 'alpha', 'train')}
  for row in rows:
    sample = samples[row['sample_id']]
    assert (row['prompt_participant'], row['prompt_repo'], row['prompt_path'],
            row['prompt_line']) == (sample['participant'], sample['repo'], sample['path'],
                                    sample['line'])
    # Only generated lines: the span starts after the prompt's lines.
    assert row['sample_start_line'] > sample['prompt'].count('\n') + 1 or not sample['prompt']
    assert row['matched_participant'] == 'alpha' and row['participants'] == ['alpha']
    assert row['exclusive'] and not row['cross_org']
    source = train[(row['matched_repo'], row['matched_path'])].split('\n')
    matched = source[row['matched_start_line'] - 1:row['matched_end_line']]
    assert _normalized(matched) == _normalized(row['text'].split('\n'))
    assert len(_normalized(matched)) == row['lines'] >= 6
    text = (sample['prompt'] + sample['completion']).split('\n')
    assert text[row['sample_start_line'] - 1:row['sample_end_line']] == row['text'].split('\n')


def test_samples_jsonl_holds_every_sample(audited):
  config, workdir, result = audited
  samples = io.read_jsonl(os.path.join(workdir, 'samples', 'memorization.jsonl'))
  assert len(samples) == result['samples'] == 3 * 4 * 2 + 4
  prompted = [s for s in samples if s['protocol'] == 'prompted']
  assert {s['participant'] for s in prompted} == set(NAMES)
  for s in prompted:
    assert s['prompt'].startswith('def ') and s['repo'] and s['path'] and s['line'] >= 1
    assert not any(stop in s['completion'] for stop in config.eval.stop_strings)
  assert not os.path.exists(os.path.join(workdir, 'memorization', 'parts'))


def test_rerun_reuses_samples_and_gives_the_same_result(audited, monkeypatch):
  config, workdir, _ = audited
  cached = os.path.join(workdir, 'memorization', 'result.json')
  before = io.read_json(cached)
  os.unlink(cached)

  def no_sampling(*args, **kwargs):
    raise AssertionError('samples should have been reused')
  monkeypatch.setattr(sampling, 'generate', no_sampling)
  again = evaluate.evaluate_part(config, workdir, 'memorization')
  assert io.read_json(cached) == before
  assert again['participants'] == before['participants']


def test_indexes_are_built_once_then_loaded(data_dir, monkeypatch):
  built = memorization.build_indexes(data_dir, ['beta'], min_lines=7)
  path = memorization.index_path(data_dir, 'beta', 'train', 7, 1)
  assert os.path.isfile(path) and os.path.dirname(path) == os.path.join(data_dir, 'clones')
  real_build = clones.build_index

  def no_build(*args, **kwargs):
    raise AssertionError('the cached index should have been loaded')
  monkeypatch.setattr(clones, 'build_index', no_build)
  loaded = memorization.build_indexes(data_dir, ['beta'], min_lines=7)
  for split in ('train', 'valid'):
    np.testing.assert_array_equal(loaded[split]['beta'].hashes_U,
                                  built[split]['beta'].hashes_U)
  assert loaded['valid']['beta'].hashes_U.size < loaded['train']['beta'].hashes_U.size
  with open(path, 'wb') as f:
    f.write(b'not an index')
  monkeypatch.setattr(clones, 'build_index', real_build)
  rebuilt = memorization.build_indexes(data_dir, ['beta'], min_lines=7, splits=('train',))
  np.testing.assert_array_equal(rebuilt['train']['beta'].hashes_U, built['train']['beta'].hashes_U)


def test_crossorg_summary_finds_the_shared_helper(data_dir):
  summary = memorization.crossorg_summary(data_dir, list(NAMES))
  assert summary['participants'] == list(NAMES)
  matrix = np.array(summary['matrix'])
  np.testing.assert_array_equal(np.diag(matrix), 1.0)
  assert matrix[1, 2] > 0 and matrix[2, 1] > 0 and matrix[0, 1:].sum() == 0
  assert summary['num_cross_org_fingerprints'] >= 1
  example = summary['examples'][0]
  assert example['participants'] == ['beta', 'gamma']
  assert {r['participant'] for r in example['refs']} == {'beta', 'gamma'}
  records = {(r['repo'], r['path']): r['content'] for n in ('beta', 'gamma')
             for r in tfds_builder.load_split(data_dir, n, 'train')}
  for ref in example['refs']:
    lines = records[(ref['repo'], ref['path'])].split('\n')
    assert _normalized(lines[ref['start_line'] - 1:ref['end_line']]) == _normalized(
        SHARED_HELPER)[:example['num_lines']]


# --- Hand-made indexes and samples.

def _lines(tag, n):
  rng = random.Random(tag)
  return [f'{tag}_{i} = compute_{rng.randrange(10**6)}({i}, "{tag}{i}")' for i in range(n)]


A, B, S, V, NOISE = (_lines(t, 20) for t in ('a', 'b', 's', 'v', 'noise'))
PROMPT = 'def f():\n    """Doc."""'


def _index(name, *docs):
  return clones.build_index([{'repo': f'{name}_repo', 'path': f'{i}.py', 'content': '\n'.join(d)}
                             for i, d in enumerate(docs)], participant=name, progress=False)


def _sample(sid, participant, lines, prompt=PROMPT):
  protocol = 'prompted' if participant else 'unprompted'
  return memorization.Sample(sid, protocol, participant, 'r', 'p.py', 3, 'f',
                             prompt if participant else '', '\n' + '\n'.join(lines))


@pytest.fixture(scope='module')
def hand_audit():
  train = {'A': _index('A', A, S[:8]), 'B': _index('B', B, ['x = 0'] + S[:8])}
  valid = {'A': _index('A', V), 'B': _index('B', NOISE[10:])}
  samples = [_sample('a0', 'A', A[:7]),  # A's code only: exclusive, 7 lines.
             _sample('a1', 'A', S[:8]),  # In A and B: shared, cross-org, 8 lines.
             _sample('a2', 'A', NOISE[:8]),  # Nothing.
             _sample('a3', 'A', V[:6]),  # A's validation code: the null baseline.
             _sample('b0', 'B', B[:6] + NOISE[:1] + A[10:16]),  # B's code, then A's.
             _sample('u0', '', A[:7])]  # Unprompted, the same span as a0.
  result, rows = memorization.audit(samples, train, valid, seed=1)
  return samples, result, rows


def test_aggregation_per_participant(hand_audit):
  _, result, _ = hand_audit
  a, b = result['participants']['A'], result['participants']['B']
  assert (a['samples'], a['memorized_samples'], a['ratio']) == (4, 2, 0.5)
  assert (a['memorized_lines'], a['fingerprints'], a['spans']) == (15, 2, 2)
  assert (a['exclusive_spans'], a['shared_spans']) == (1, 1)
  assert a['null_ratio'] == 0.25 and a['ratio_by_index'] == {'A': 0.5, 'B': 0.25}
  assert a['ratio_ci95'][0] <= 0.5 <= a['ratio_ci95'][1] and a['ratio_ci95'][0] < 0.5
  assert (b['samples'], b['ratio'], b['memorized_lines'], b['fingerprints']) == (1, 1.0, 6, 1)
  assert (b['exclusive_spans'], b['shared_spans'], b['null_ratio']) == (1, 0, 0.0)
  assert b['ratio_by_index'] == {'A': 1.0, 'B': 1.0}
  # Leakage: A's code in b0 and u0; B's (the shared helper) in a1 of a0-a3 and u0.
  assert result['leakage'] == {'A': 1.0, 'B': 0.2}
  assert result['cross_org_share'] == 1 / 5 and result['spans'] == 5
  un = result['unprompted']
  assert (un['samples'], un['ratio'], un['participants']['A']['memorized_lines']) == (1, 1.0, 7)


def test_span_rows_carry_provenance(hand_audit):
  _, _, rows = hand_audit
  by_sample = {}
  for row in rows:
    by_sample.setdefault(row['sample_id'], []).append(row)
  assert sorted(by_sample) == ['a0', 'a1', 'b0', 'u0']
  (a0,) = by_sample['a0']
  assert (a0['matched_participant'], a0['matched_repo'], a0['matched_path']) == ('A', 'A_repo',
                                                                                 '0.py')
  assert (a0['matched_start_line'], a0['matched_end_line'], a0['lines']) == (1, 7, 7)
  assert (a0['sample_start_line'], a0['sample_end_line']) == (3, 9)  # After 2 prompt lines.
  assert a0['text'] == '\n'.join(A[:7]) and a0['prompt_participant'] == 'A'
  (a1,) = by_sample['a1']
  assert a1['participants'] == ['A', 'B'] and not a1['exclusive'] and a1['cross_org']
  assert {r['participant'] for r in a1['refs']} == {'A', 'B'}
  b_rows = sorted(by_sample['b0'], key=lambda r: r['sample_start_line'])
  assert [r['matched_participant'] for r in b_rows] == ['B', 'A']
  assert (b_rows[1]['matched_start_line'], b_rows[1]['matched_end_line']) == (11, 16)


def test_only_generated_lines_count():
  index = _index('A', A)
  prompt = 'def f():\n' + '\n'.join(A[:3])
  five = memorization.Sample('s', 'prompted', 'A', '', '', 1, 'f', prompt,
                             '\n' + '\n'.join(A[3:8]))
  six = dataclasses.replace(five, completion='\n' + '\n'.join(A[3:9]))
  # The prompt's last line is cut mid-line: the line the completion finishes is excluded.
  head, tail = A[2][:9], A[2][9:]
  mixed = memorization.Sample('m', 'prompted', 'A', '', '', 1, 'f',
                              'def f():\n' + '\n'.join(A[:2] + [head]),
                              tail + '\n' + '\n'.join(A[3:8]))
  copied_prompt = memorization.Sample('c', 'prompted', 'A', '', '', 1, 'f',
                                      '\n'.join(A[:8]), '\n' + NOISE[0])
  spans = memorization.detect([five, six, mixed, copied_prompt], [index])
  assert spans[0] == [] and spans[2] == [] and spans[3] == []
  # Without the exclusion all of these texts hold >= 6 copied lines.
  assert all(clones.find_spans(s.text, [index]) for s in (five, mixed, copied_prompt))
  (span,) = spans[1]
  assert (span.start_line, span.end_line, span.num_lines) == (5, 10, 6)
  assert (span.refs[0].start_line, span.refs[0].end_line) == (4, 9)


def test_null_ratio_uses_the_validation_index_only(hand_audit):
  _, result, rows = hand_audit
  assert not any(r['sample_id'] == 'a3' for r in rows)  # Validation code is not memorized.
  assert result['participants']['A']['null_ratio'] > 0
