"""The paper's released memorization prompts, `{org}_prompts.csv`, read as released.

Columns `function id, signature with docstring, function body` (header names matched
ignoring case, spaces and underscores). The released prompts keep a method's original
indentation (4 spaces inside a class); `keep_indent=False` dedents them as collab's own
extraction does. Each prompt is located in the participant's training files (the same
lines, whitespace at their ends ignored, in a row) so that its samples keep their
provenance; prompts found in no training file are dropped and counted (`not_in_training`:
a prompt of a validation file does not test memorization of training data), and a file
with none found is refused: it is not this participant's, or the split is not the paper's.

`reproduces(completion, body, ...)` says whether a sample gives back the released body;
`participant_prompts` picks a participant's prompts: this CSV, or collab's extraction.
"""

import csv
import os

import numpy as np

from collab.evals.clones import hashing as clone_hashing
from collab.evals.memorization import prompts as prompts_lib

COLUMNS = ('function id', 'signature with docstring', 'function body')
_FIELD_LIMIT = 1 << 30  # Bodies of whole classes exceed csv's 128 KB default.


class PromptsFileError(ValueError):
  """A prompts CSV that cannot be used as the paper's (missing, empty, wrong columns)."""


def prompts_path(pattern: str, participant: str) -> str:
  """eval.memorization.prompts_csv with `{participant}` filled in."""
  if '{participant}' not in pattern:
    raise PromptsFileError(f'eval.memorization.prompts_csv={pattern!r} must name each '
                           "participant's file with {participant}, e.g. "
                           "'/data/prompts/{participant}_prompts.csv'.")
  return pattern.format(participant=participant)


def _column(name: str) -> str:
  return ' '.join(name.replace('_', ' ').split()).lower()


def read_csv(path: str) -> list:
  """[(function id, prompt, body)] of a prompts CSV, newlines normalized to '\\n'."""
  if not os.path.isfile(path):
    raise PromptsFileError(f'No prompts file {path}; point eval.memorization.prompts_csv '
                           "at the artifact's prompts/{participant}_prompts.csv files.")
  limit = csv.field_size_limit()
  csv.field_size_limit(max(limit, _FIELD_LIMIT))
  try:
    with open(path, newline='', encoding='utf-8-sig') as f:
      reader = csv.reader(f)
      header = next(reader, None)
      if header is None:
        raise PromptsFileError(f'{path} is empty; expected the header '
                               f"{', '.join(COLUMNS)} and one row per function.")
      at = {_column(h): i for i, h in enumerate(header)}
      missing = [c for c in COLUMNS if c not in at]
      if missing:
        raise PromptsFileError(f'{path} lacks column(s) {missing} (its header: {header}); '
                               f"expected the artifact's {', '.join(COLUMNS)}.")
      cols = [at[c] for c in COLUMNS]
      rows = [tuple(row[i].replace('\r\n', '\n').replace('\r', '\n') if i < len(row)
                    else '' for i in cols) for row in reader if any(row)]
  except (UnicodeDecodeError, csv.Error) as e:
    raise PromptsFileError(f'{path} is not a UTF-8 CSV file ({e}); expected the '
                           "artifact's prompts CSV.") from None
  finally:
    csv.field_size_limit(limit)
  return rows


def _lines(text: str) -> list:
  return [line.strip() for line in text.split('\n')]


def locate(prompts: list, records) -> list:
  """Where each prompt text starts in the records: (repo, path, line, end_line) or None.

  One pass over the training files: lines equal to a prompt's first line are candidates,
  checked line by line (the prompt's last line may end before the file's does).
  """
  wanted = [_lines(p) for p in prompts]
  firsts = {w[0] for w in wanted if w and w[0]}
  starts = {}  # First line -> [(record, 0-based line, stripped file lines)].
  for r in records:
    lines = None
    content = r['content'].replace('\r\n', '\n').replace('\r', '\n')
    for i, line in enumerate(content.split('\n')):
      key = line.strip()
      if key in firsts:
        if lines is None:
          lines = _lines(content)
        starts.setdefault(key, []).append((r, i, lines))
  out = []
  for w in wanted:
    hit = None
    for r, i, lines in starts.get(w[0], []) if w and w[0] else []:
      got = lines[i:i + len(w)]
      if (len(got) == len(w) and got[:-1] == w[:-1] and got[-1].startswith(w[-1])):
        hit = (r.get('repo', ''), r.get('path', ''), i + 1, i + len(w))
        break
    out.append(hit)
  return out


def csv_prompts(path: str, records, *, participant: str, tokenizer=None,
                max_tokens: int = 512, max_prompts: int = 0, seed: int = 1,
                keep_indent: bool = True):
  """(prompts, counts) of a released prompts CSV over a participant's training records.

  Prompts keep the CSV's indentation when keep_indent, else are dedented; each carries
  its released body. counts: source, indentation, rows, not_in_training, too_long, kept.
  """
  rows = read_csv(path)
  places = locate([prompt for _, prompt, _ in rows], records)
  found = []
  for (function_id, prompt, body), place in zip(rows, places):
    if place is not None:
      text = prompt if keep_indent else '\n'.join(prompts_lib.dedent(prompt.split('\n')))
      found.append((*place, function_id, text, body))
  if rows and not found:
    raise PromptsFileError(
        f"{path}: none of its {len(rows)} prompts occurs in {participant!r}'s training "
        f"files; is it {participant}'s prompts file, and is the split the paper's "
        "(data.split='given')?")
  counts = dict(source=path, indentation='original' if keep_indent else 'dedented',
                rows=len(rows), not_in_training=len(rows) - len(found), too_long=0, kept=0)
  prompts = prompts_lib.select(found, counts, participant=participant, tokenizer=tokenizer,
                               max_tokens=max_tokens, max_prompts=max_prompts, seed=seed)
  return prompts, counts


def reproduces(completion: str, body: str, min_lines: int = 6, clone_type: int = 1):
  """Whether `completion` holds a run of min(min_lines, the body's) normalized lines of
  `body` in a row (the whole body when it is shorter); None when the body has no line."""
  body_K, _ = clone_hashing.line_hashes(body, clone_type)
  if not body_K.size:
    return None
  w = min(min_lines, body_K.size)
  text_K, _ = clone_hashing.line_hashes(completion, clone_type)
  body_N, _ = clone_hashing.window_hashes(body_K, np.zeros(body_K.size, np.int64), w)
  text_N, _ = clone_hashing.window_hashes(text_K, np.zeros(text_K.size, np.int64), w)
  return bool(np.isin(text_N, body_N).any())


def reference_stats(samples, min_lines: int, clone_type: int) -> dict:
  """How often samples (with `completion` and `reference`) give back the released body."""
  flags = [reproduces(x.completion, x.reference, min_lines, clone_type) for x in samples]
  flags = [f for f in flags if f is not None]
  return {'samples': len(flags), 'reproduced': int(sum(flags)),
          'ratio': float(np.mean(flags)) if flags else None}


def participant_prompts(cfg, records, participant: str, tokenizer, max_tokens: int,
                        seed: int) -> tuple:
  """(prompts, counts): from the released prompts CSV when eval.memorization.prompts_csv
  is set, else every documented function of the training records; counts say which
  source and indentation were used."""
  pattern, keep_indent = cfg.get('prompts_csv', ''), bool(cfg.get('keep_indent', False))
  options = dict(participant=participant, tokenizer=tokenizer, max_tokens=max_tokens,
                 max_prompts=int(cfg.max_prompts), seed=seed, keep_indent=keep_indent)
  if pattern:
    return csv_prompts(
        prompts_path(pattern, participant), records, **options)
  prompts, counts = prompts_lib.extract_prompts(records, **options)
  return prompts, {'source': 'training files',
                   'indentation': 'original' if keep_indent else 'dedented', **counts}
