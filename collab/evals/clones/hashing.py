"""Normalized source lines and their 64-bit hashes: what clone windows are made of.

`normalize` gives the type-1 or type-2 text of a source (see `clones`' module docstring);
`line_hashes` hashes its kept lines (blank, comment-only, punctuation-only and
`TRIVIAL_LINES` are not kept), `window_hashes` combines every W consecutive kept lines,
and `fingerprint` names a run of windows. All numpy, per byte, line and window.
"""

import hashlib
import keyword
import re

import numpy as np


# Lines dropped as trivial: they carry no code of their own and would let clone runs
# bridge unrelated code. Punctuation-only lines (only `()[]{},:;`, e.g. `)`, `]),`, `):`)
# are dropped too. Compared after normalization, so `else :` is trivial as well.
TRIVIAL_LINES = ('pass', 'else:', 'try:', 'finally:', 'return', 'break', 'continue',
                 '...', '"""', "'''")

_U64 = np.uint64
_P = _U64(0x9E3779B97F4A7C15)  # Odd multiplier of the polynomial window hash.

# Type-2 lexer. Strings never cross a newline (an unterminated one ends at the line's
# end), so the abstraction keeps every line where it was. A string's prefix (f, rb, ...)
# is abstracted like an identifier. Numbers are abstracted in the identifier pass.
_STRING = re.compile(
    r'"""[^\n]*?(?:"""|$)|\'\'\'[^\n]*?(?:\'\'\'|$)'
    r'|"(?:[^"\\\n]|\\.)*(?:"|\\?$)|\'(?:[^\'\\\n]|\\.)*(?:\'|\\?$)', re.M)
_COMMENT = re.compile(r'#[^\n]*')
_WORD = re.compile(r'\b(?:([^\W\d]\w*)|\d[\w.]*)')  # Identifier or keyword | number.
_KEYWORDS = frozenset(keyword.kwlist)


def _abstract_word(match) -> str:
  word = match[1]
  return '0' if word is None else word if word in _KEYWORDS else 'x'


_PUNCT = np.zeros(256, bool)
_PUNCT[list(b'()[]{},:;')] = True


def normalize(text: str, clone_type: int = 1) -> str:
  """Text with every line normalized (same number of lines); see `clones`' docstring."""
  if clone_type not in (1, 2):
    raise ValueError(f'clone_type must be 1 or 2, got {clone_type!r}.')
  if '\r' in text:
    text = text.replace('\r\n', '\n').replace('\r', '\n')
  if clone_type == 2:
    text = _STRING.sub('""', text)  # Strings first: they may hold `#` and words.
    text = _WORD.sub(_abstract_word, _COMMENT.sub('', text))
  return text


def _mix64(x: np.ndarray) -> np.ndarray:
  """splitmix64 finalizer, elementwise on uint64 (wraps by design)."""
  x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
  return x ^ (x >> _U64(31))


_KEYS = _mix64(np.arange(1, 1025, dtype=_U64) * _P) | _U64(1)


def _hash_lines(normalized: str):
  """Per line: (hash_L uint64, counts_L bool)."""
  b = np.frombuffer(normalized.encode('utf-8', 'surrogatepass'), np.uint8)
  keep = b > 32  # Whitespace (and the other ASCII control bytes) never reach the hash.
  kept = np.compress(keep, b)
  # Line l's kept bytes are kept[start_L[l]:end_L[l]]; int32 cumsums are much faster.
  kept_before = np.concatenate([[0], np.cumsum(keep, dtype=np.int32)])
  end_L = kept_before[np.append(np.flatnonzero(b == 10), b.size)].astype(np.int64)
  start_L = np.concatenate([[0], end_L[:-1]])
  count_L = end_L - start_L
  pos = np.arange(kept.size, dtype=np.int32) - np.repeat(start_L.astype(np.int32), count_L)
  # Multilinear hash: sum of byte * key[position] over odd pseudo-random 64-bit keys; with
  # random keys two lines collide with probability <= 2^-56. Positions wrap at 1024.
  keyed = np.take(_KEYS, pos & (_KEYS.size - 1)) * kept.astype(_U64)
  csum = np.concatenate([np.zeros(1, _U64), np.cumsum(keyed, dtype=_U64)])
  hash_L = _mix64((csum[end_L] - csum[start_L]) ^ (count_L.astype(_U64) * _P))
  punct = np.concatenate([[0], np.cumsum(np.take(_PUNCT, kept), dtype=np.int32)])
  code_L = punct[end_L] - punct[start_L] < count_L  # Some byte besides ()[]{},:;
  first_L = np.append(kept, 0)[start_L]
  counts_L = code_L & (first_L != ord('#'))
  return hash_L, counts_L


_TRIVIAL_HASHES = {t: np.unique(_hash_lines(normalize('\n'.join(TRIVIAL_LINES), t))[0])
                   for t in (1, 2)}


def _line_table(text: str, clone_type: int):
  """Per line of `text`: (hash_L, counts_L), trivial lines not counted."""
  hash_L, counts_L = _hash_lines(normalize(text, clone_type))
  return hash_L, counts_L & ~np.isin(hash_L, _TRIVIAL_HASHES[clone_type])


def line_hashes(text: str, clone_type: int = 1):
  """Kept lines of `text`: (hash_K uint64, line_K int32 1-based original line numbers)."""
  hash_L, counts_L = _line_table(text, clone_type)
  line_K = np.flatnonzero(counts_L)
  return hash_L[line_K], (line_K + 1).astype(np.int32)


def window_hashes(hash_K: np.ndarray, segment_K: np.ndarray, min_lines: int):
  """(hash_N uint64, start_N first kept line) of every window inside one segment."""
  n = hash_K.size - min_lines + 1
  if n <= 0:
    return np.zeros(0, _U64), np.zeros(0, np.int64)
  acc = np.zeros(n, _U64)
  for j in range(min_lines):  # A loop over W, not over windows.
    acc = acc * _P + hash_K[j:j + n]
  start_N = np.flatnonzero(segment_K[:n] == segment_K[min_lines - 1:])
  return _mix64(acc[start_N]), start_N


def fingerprint(window_hashes_N) -> str:
  """Fingerprint of a run of windows (so of its normalized lines), as 16 hex digits."""
  data = np.asarray(window_hashes_N, _U64).tobytes()
  return hashlib.blake2b(data, digest_size=8).hexdigest()


def batch_lines(texts, clone_type: int):
  """Lines of several texts at once: (hash_L, counts_L, text_L, line_L 1-based in its text)."""
  texts = [t.replace('\r\n', '\n').replace('\r', '\n') if '\r' in t else t for t in texts]
  hash_L, counts_L = _line_table('\n'.join(texts), clone_type)
  per_text = np.array([t.count('\n') + 1 for t in texts], np.int64)
  text_L = np.repeat(np.arange(len(texts)), per_text)
  line_L = np.arange(text_L.size) - np.repeat(np.cumsum(per_text) - per_text, per_text) + 1
  return hash_L, counts_L, text_L, line_L
