"""The paper's prompts CSV: read as released, located in training files, bad files refused."""

import collections
import csv
import os

import ml_collections
import pytest

from collab.data import sources
from collab.evals.memorization import prompts as prompts_lib
from collab.evals.memorization import released_prompts

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')
HEADER = ['function id', 'signature with docstring', 'function body']
# Scaler.update of the release fixture, as the artifact releases a method: 4 spaces in.
UPDATE_PROMPT = ('    def update(self, overflow):\n'
                 '        """Halves the scale on overflow, grows it after a clean window."""')
UPDATE_BODY = ('        if overflow:\n'
               '            self.scale = self.scale / self.factor\n'
               '            self.iterations = 0\n'
               '        else:\n'
               '            self.iterations = self.iterations + 1\n'
               '            if self.iterations % self.window == 0:\n'
               '                self.scale = self.scale * self.factor\n'
               '        return self.scale\n')
# iou is a function of the valid file: not training data.
IOU_PROMPT = 'def iou(a, b):\n    """Intersection over union of two boxes."""'


def _records(side='train'):
  spec = f"jsonl:{os.path.join(FIXTURES, f'facebook_{side}.jsonl')}"
  return list(sources.iter_source(spec, 'facebook', 0, collections.Counter()))


def _write_csv(path, rows, header=HEADER):
  with open(path, 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  return str(path)


@pytest.fixture
def prompts_csv(tmp_path):
  return _write_csv(tmp_path / 'facebook_prompts.csv', [
      ['0', UPDATE_PROMPT, UPDATE_BODY], ['1', IOU_PROMPT, '    return 0.0\n']])


def test_released_prompts_keep_their_indentation_and_provenance(prompts_csv):
  records = _records()
  prompts, counts = released_prompts.csv_prompts(prompts_csv, records, participant='facebook')
  assert counts == {'source': prompts_csv, 'indentation': 'original', 'rows': 2,
                    'not_in_training': 1, 'too_long': 0, 'kept': 1}
  (p,) = prompts
  assert p.text == UPDATE_PROMPT and p.body == UPDATE_BODY and p.name == '0'
  assert (p.repo, p.path) == (records[0]['repo'], records[0]['path'])
  lines = records[0]['content'].split('\n')
  assert lines[p.line - 1] == UPDATE_PROMPT.split('\n')[0] and p.end_line == p.line + 1


def test_dedented_released_prompt_equals_collabs_own_extraction(prompts_csv):
  records = _records()
  (p,), counts = released_prompts.csv_prompts(prompts_csv, records, participant='facebook',
                                               keep_indent=False)
  own, _ = prompts_lib.extract_prompts(records[:1], participant='facebook')
  assert counts['indentation'] == 'dedented'
  assert p.text == next(q.text for q in own if q.name == 'Scaler.update')
  kept, _ = prompts_lib.extract_prompts(records[:1], participant='facebook', keep_indent=True)
  assert next(q.text for q in kept if q.name == 'Scaler.update') == UPDATE_PROMPT


def test_participant_prompts_say_their_source_and_indentation(prompts_csv, tmp_path):
  cfg = ml_collections.ConfigDict({'max_prompts': 0})
  _, counts = released_prompts.participant_prompts(cfg, _records(), 'facebook', None, 512, 1)
  assert (counts['source'], counts['indentation']) == ('training files', 'dedented')
  cfg.prompts_csv = str(tmp_path / '{participant}_prompts.csv')
  cfg.keep_indent = True
  (p,), counts = released_prompts.participant_prompts(cfg, _records(), 'facebook', None, 512, 1)
  assert (counts['source'], counts['indentation']) == (prompts_csv, 'original')


def test_bad_prompts_files_are_one_line_errors(tmp_path, prompts_csv):
  records = _records()
  empty = tmp_path / 'empty.csv'
  empty.write_text('')
  cases = [
      (str(empty), 'is empty; expected the header function id'),
      (_write_csv(tmp_path / 'cols.csv', [['0', UPDATE_PROMPT]], ['id', 'prompt']),
       r"lacks column\(s\) \['function id', 'signature with docstring', 'function body'\]"),
      (_write_csv(tmp_path / 'other.csv', [['1', IOU_PROMPT, 'return 0']]),
       r"none of its 1 prompts occurs in 'facebook'\'s training files"),
      (str(tmp_path / 'absent.csv'), 'No prompts file'),
  ]
  for path, message in cases:
    with pytest.raises(released_prompts.PromptsFileError, match=message) as e:
      released_prompts.csv_prompts(path, records, participant='facebook')
    assert '\n' not in str(e.value)
  with pytest.raises(ValueError, match=r'must name each participant.*\{participant\}'):
    released_prompts.prompts_path('/data/prompts.csv', 'facebook')
  assert released_prompts.prompts_path('/d/{participant}.csv', 'google') == '/d/google.csv'


def test_reproduces_the_reference_body():
  body = UPDATE_BODY  # 7 normalized lines ('else:' is trivial): 6 in a row reproduce it.
  lines = body.split('\n')
  assert released_prompts.reproduces('\n'.join(lines[:7]), body)
  assert not released_prompts.reproduces('\n'.join(lines[:4]), body)
  assert released_prompts.reproduces('  x = compute(a, b)\n  return x * 2\n',
                                     'x = compute(a, b)\nreturn x * 2')  # Whole short body.
  assert released_prompts.reproduces('anything', '\n\n') is None
  samples = [type('S', (), {'completion': c, 'reference': body})
             for c in ('\n'.join(lines[:7]), 'pass')]
  assert released_prompts.reference_stats(samples, 6, 1) == {
      'samples': 2, 'reproduced': 1, 'ratio': 0.5}


def test_paper_config_prompts_from_the_artifact(tmp_path):
  from configs import paper
  (tmp_path / 'prompts').mkdir()
  path = _write_csv(tmp_path / 'prompts' / 'facebook_prompts.csv',
                    [['7', UPDATE_PROMPT, UPDATE_BODY]])
  cfg = paper.get_config(str(tmp_path)).eval.memorization
  (p,), counts = released_prompts.participant_prompts(cfg, _records(), 'facebook', None, 512, 1)
  assert (counts['source'], counts['indentation'], p.text) == (path, 'original', UPDATE_PROMPT)
  with pytest.raises(released_prompts.PromptsFileError, match='google_prompts.csv'):
    released_prompts.participant_prompts(cfg, _records(), 'google', None, 512, 1)
