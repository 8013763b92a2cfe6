"""Memorization prompts: every documented function of a participant's training files.

PROTOCOL (Memorization): each function or method (async and nested ones included) with a
non-empty docstring gives one prompt, the source text from its `def` line through the
end of its docstring. The runner prepends the end-of-text token; it is not counted here.
Prompts are dedented by default (the `def` at column 0); `keep_indent` keeps a method's
original indentation, as the paper's released prompts do. The paper's own prompts CSV is
read by `released_prompts.py`.
"""

import ast
import dataclasses
import warnings
from typing import Iterable, Optional

import numpy as np
from absl import logging

from collab.data import tokenizer as tokenizer_lib


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One prompt and where it comes from."""
  participant: str
  repo: str
  path: str
  line: int  # 1-based line of the `def` in the training file (decorators not included).
  end_line: int  # 1-based line where the docstring ends.
  name: str  # Qualified name, e.g. `Class.method` or `outer.<locals>.inner`.
  text: str
  num_tokens: int  # Tokens of `text` as sampling encodes it (make_encoder); -1: no tokenizer.
  body: str = ''  # The function's reference body after the prompt (released prompts); '': none.


def _function_nodes(tree: ast.AST):
  """(qualified name, node) of every function and method, in source order."""
  found = []

  def visit(node, prefix):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
        found.append((prefix + child.name, child))
        visit(child, prefix + child.name + '.<locals>.')
      elif isinstance(child, ast.ClassDef):
        visit(child, prefix + child.name + '.')
      else:
        visit(child, prefix)

  visit(tree, '')
  return sorted(found, key=lambda item: (item[1].lineno, item[1].col_offset))


def dedent(chunk: list) -> list:
  """The first line's indentation removed from every line that starts with it (lines of a
  docstring indented less keep their text as written)."""
  indent = chunk[0][:len(chunk[0]) - len(chunk[0].lstrip(' \t'))] if chunk else ''
  return [line[len(indent):] if line.startswith(indent) else line for line in chunk]


def _prompt_text(lines: list, node, keep_indent: bool = False) -> Optional[str]:
  """Source from the `def` line through the docstring's end; None: no docstring.

  Dedented (see `dedent`) so the prompt starts with `def` (or `async def`) at column 0,
  unless keep_indent.
  """
  first = node.body[0] if node.body else None
  if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
          and isinstance(first.value.value, str) and first.value.value.strip()):
    return None
  start, end = node.lineno - 1, first.end_lineno - 1
  last = lines[end].encode('utf-8')[:first.end_col_offset].decode('utf-8', 'replace')
  chunk = lines[start:end] + [last]
  return '\n'.join(chunk if keep_indent else dedent(chunk))


def _parse(content: str):
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # Invalid escapes etc. in old code: not our concern.
    try:
      return ast.parse(content)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
      return None


def _record_fields(record, i: int):
  try:
    content = record['content']
  except (KeyError, TypeError):
    raise ValueError(f'Record {i} has no "content" field; records must be dicts with '
                     '"repo", "path" and "content" (as load_split yields).') from None
  if not isinstance(content, str):
    raise ValueError(f'Record {i}: "content" must be str, got {type(content).__name__}.')
  repo = record.get('repo', record.get('repo_name', ''))
  return str(repo), str(record.get('path', '')), content


def extract_prompts(records: Iterable[dict], *, participant: str, tokenizer=None,
                    max_tokens: int = 512, max_prompts: int = 0, seed: int = 1,
                    keep_indent: bool = False):
  """Prompts of one participant's records ({repo, path, content}).

  Files that do not parse (invalid or truncated code) are skipped and counted. With a
  tokenizer, prompts longer than `max_tokens` tokens are skipped and counted (not cut:
  a cut prompt would not end at its docstring); without one no token cap applies.
  `max_prompts` > 0 keeps a seeded random subset of that size, in source order.

  Returns (prompts, counts) with counts of files, unparsable files, functions, functions
  with a docstring, prompts too long, and prompts kept.
  """
  counts = dict(files=0, unparsable=0, functions=0, documented=0, too_long=0, kept=0)
  found = []
  for i, record in enumerate(records):
    repo, path, content = _record_fields(record, i)
    counts['files'] += 1
    content = content.replace('\r\n', '\n').replace('\r', '\n')
    tree = _parse(content)
    if tree is None:
      counts['unparsable'] += 1
      continue
    lines = content.split('\n')
    for name, node in _function_nodes(tree):
      counts['functions'] += 1
      text = _prompt_text(lines, node, keep_indent)
      if text is not None:
        found.append((repo, path, node.lineno, node.body[0].end_lineno, name, text))
  counts['documented'] = len(found)
  prompts = select(found, counts, participant=participant, tokenizer=tokenizer,
                   max_tokens=max_tokens, max_prompts=max_prompts, seed=seed)
  return prompts, counts


def select(found: list, counts: dict, *, participant: str, tokenizer, max_tokens: int,
           max_prompts: int, seed: int) -> list:
  """Prompts of `found` (Prompt fields after participant, text before num_tokens, then
  the body) under the token cap and the seeded subsample; fills counts' too_long, kept."""
  num_tokens = [-1] * len(found)
  if tokenizer is not None and found:
    # Counted as the sampler encodes prompts (a literal '<|endoftext|>' is text there, not
    # one special token), so a prompt under the cap is never cut before sampling.
    ids = tokenizer_lib.make_encoder(tokenizer)([f[5] for f in found])
    num_tokens = [len(x) for x in ids]
    keep = [n <= max_tokens for n in num_tokens]
    counts['too_long'] = keep.count(False)
    found = [f for f, k in zip(found, keep) if k]
    num_tokens = [n for n, k in zip(num_tokens, keep) if k]
  chosen = range(len(found))
  if 0 < max_prompts < len(found):
    chosen = np.sort(np.random.default_rng(seed).choice(len(found), max_prompts,
                                                        replace=False))
  prompts = [Prompt(participant, *found[i][:6], num_tokens[i], *found[i][6:]) for i in chosen]
  counts['kept'] = len(prompts)
  logging.info('Prompts of %r: %s', participant, counts)
  return prompts
