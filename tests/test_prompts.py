"""Prompt extraction: exactly the documented functions, with provenance; bad files counted."""

import pytest

from collab.evals.memorization import prompts

SOURCE = '''"""Module docstring: not a function."""
import functools


def plain(a, b):
    """Adds."""
    return a + b


def undocumented(x):
    return x


@functools.lru_cache(maxsize=None)
@staticmethod
def decorated(
        x,
        y=1):
    r"""Multi-line
docstring at column 0."""  # trailing comment
    return x


async def fetch(url):
    \'\'\'Async doc.\'\'\'
    await url


def blank_doc():
    """   """


class Widget:
    """Class docstring: not a prompt."""

    def method(self):
        "Method doc."
        def helper():
            """Nested doc."""
            return 1
        return helper

    class Inner:
        async def deep(self):
            """Deep doc."""
            pass
'''

EXPECTED = [
    ('plain', 5, 6, 'def plain(a, b):\n    """Adds."""'),
    ('decorated', 16, 20,
     'def decorated(\n        x,\n        y=1):\n    r"""Multi-line\n'
     'docstring at column 0."""'),
    ('fetch', 24, 25, "async def fetch(url):\n    '''Async doc.'''"),
    ('Widget.method', 36, 37, 'def method(self):\n    "Method doc."'),
    ('Widget.method.<locals>.helper', 38, 39, 'def helper():\n    """Nested doc."""'),
    ('Widget.Inner.deep', 44, 45, 'async def deep(self):\n    """Deep doc."""'),
]


def _records():
  return [
      {'repo': 'org/good', 'path': 'pkg/mod.py', 'content': SOURCE},
      {'repo': 'org/bad', 'path': 'py2.py', 'content': 'print "hello"\ndef f():\n  """D."""\n'},
      {'repo': 'org/bad', 'path': 'cut.py', 'content': SOURCE[:SOURCE.index('Nested') + 3]},
      {'repo_name': 'org/crlf', 'path': 'win.py',
       'content': 'def w():\r\n    """Windows."""\r\n    return 0\r\n'},
  ]


def test_fixture_yields_exactly_the_expected_prompts():
  found, counts = prompts.extract_prompts(_records(), participant='acme')
  got = [(p.name, p.line, p.end_line, p.text) for p in found if p.path == 'pkg/mod.py']
  assert got == EXPECTED
  for p in found:
    assert p.participant == 'acme' and p.num_tokens == -1 and p.text.startswith(('def', 'async'))
  (crlf,) = [p for p in found if p.path == 'win.py']
  assert (crlf.repo, crlf.line, crlf.text) == ('org/crlf', 1, 'def w():\n    """Windows."""')
  assert counts == dict(files=4, unparsable=2, functions=9, documented=7, too_long=0, kept=7)


def test_prompt_lines_match_the_source():
  (found, _) = prompts.extract_prompts(_records()[:1], participant='acme')
  lines = SOURCE.split('\n')
  for p in found:
    assert lines[p.line - 1].lstrip().startswith(p.text.split('\n')[0])
    assert p.text.split('\n')[-1].strip() in lines[p.end_line - 1]


def test_seeded_cap_is_a_deterministic_subset():
  everything, _ = prompts.extract_prompts(_records(), participant='acme')
  first, counts = prompts.extract_prompts(_records(), participant='acme', max_prompts=3)
  again, _ = prompts.extract_prompts(_records(), participant='acme', max_prompts=3)
  other, _ = prompts.extract_prompts(_records(), participant='acme', max_prompts=3, seed=5)
  assert first == again and len(first) == 3 and counts['kept'] == 3
  assert set(first) <= set(everything) and first != other
  assert first == [p for p in everything if p in first]  # Source order kept.


def _tokenizer():
  tokenizers = pytest.importorskip('tokenizers')
  transformers = pytest.importorskip('transformers')
  model = tokenizers.models.WordLevel({'[UNK]': 0}, unk_token='[UNK]')
  tok = tokenizers.Tokenizer(model)
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok)


def test_tokenizer_cap_skips_and_counts_long_prompts():
  tokenizer = _tokenizer()
  found, _ = prompts.extract_prompts(_records(), participant='acme', tokenizer=tokenizer)
  sizes = {p.name: p.num_tokens for p in found}
  assert sizes['plain'] == len('def plain(a, b):\n    """Adds."""'.split())
  longest = max(sizes.values())
  capped, counts = prompts.extract_prompts(_records(), participant='acme',
                                           tokenizer=tokenizer, max_tokens=longest - 1)
  skipped = {n for n, s in sizes.items() if s == longest}
  assert {p.name for p in capped} == set(sizes) - skipped
  assert counts['too_long'] == len(skipped) and counts['kept'] == len(found) - len(skipped)


def test_records_without_content_are_rejected():
  with pytest.raises(ValueError, match='content'):
    prompts.extract_prompts([{'repo': 'r', 'path': 'p'}], participant='x')


def test_cap_counts_a_quoted_end_of_text_as_the_sampler_encodes_it():
  """A literal '<|endoftext|>' in source is text to the sampler, many tokens, not one."""
  from collab.data import tokenizer as tokenizer_lib
  tokenizer = tokenizer_lib.train_bpe([SOURCE] * 4, vocab_size=300, progress=False)
  source = ('def split_docs(text):\n    """Splits text at <|endoftext|> markers."""\n'
            '    return text.split("<|endoftext|>")\n')
  records = [{'repo': 'r', 'path': 'p.py', 'content': source}]
  (found,), _ = prompts.extract_prompts(records, participant='acme', tokenizer=tokenizer)
  sampled = len(tokenizer_lib.make_encoder(tokenizer)([found.text])[0])
  special = len(tokenizer(found.text, add_special_tokens=False)['input_ids'])
  assert found.num_tokens == sampled > special  # The special-token count would be too low.
  kept, _ = prompts.extract_prompts(records, participant='acme', tokenizer=tokenizer,
                                    max_tokens=sampled)
  cut, counts = prompts.extract_prompts(records, participant='acme', tokenizer=tokenizer,
                                        max_tokens=sampled - 1)
  assert len(kept) == 1 and not cut and counts['too_long'] == 1
