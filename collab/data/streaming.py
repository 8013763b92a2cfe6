"""The build's passes over the sources, in bounded memory: the corpus is never held.

  catalog       pass 1: filters 1-4 on the stream; per surviving file only metadata
                stays (clean.describe: repository, path, copies, bytes, a content-fixed
                rank, the release's ratio), a few hundred bytes, plus a dedup key per
                distinct file.
  tokenize      pass 2: each survivor's filters 5-8 verdict; the kept files' token ids
                go to a `Spill` (a temporary file), read back one file at a time when
                blocks are packed (blocks.write_packed).
  stored_files  the kept files in stored order, for TFDS (and the card's sha256).
The BPE's training files are read the same way (build._tokenizer_corpus). Every later
pass reads the participant's sources again (`reread`), taking the files it needs by
their read index: sources give the same records in the same order every time, and each
re-read file must match its metadata (bytes and rank), so a source that changed during
the build is a clear error, never silently different data.
"""

import collections
import hashlib
import itertools
import os
import sys
from typing import Iterable, Iterator

import numpy as np
import tqdm

from collab.data import clean
from collab.data import sources as sources_lib
from collab.data import tfds_builder


class SourceChangedError(RuntimeError):
  """A source read differently the second time (its files changed during the build)."""


def reread(name: str, specs, max_file_bytes: int, metas: Iterable[dict],
           seed: int) -> Iterator[tuple[dict, dict]]:
  """(meta, record) for each of `metas` (clean.describe's, with read index `i`, in
  increasing order), reading the sources again and stopping after the last one."""
  metas = iter(metas)
  want = next(metas, None)
  if want is None:
    return
  records = sources_lib.iter_participant(name, specs, max_file_bytes,
                                         sources_lib.new_skipped())
  for i, r in enumerate(records):
    if i < want['i']:
      continue
    if (i > want['i'] or clean.nbytes(r['content']) != want['nbytes']
        or clean.cap_rank(seed, r['content']) != want['rank']):
      break
    yield want, r
    want = next(metas, None)
    if want is None:
      return
  raise SourceChangedError(
      f"Participant {name!r}: file {want['repo']}/{want['path']} of {want['source']} is no "
      'longer what the build read first; a source changed during the build. Build again '
      'once the sources are settled.')


class Spilled:
  """Where one file's token ids lie in a Spill; len() is their number."""

  __slots__ = ('offset', 'length')

  def __init__(self, offset: int, length: int):
    self.offset, self.length = offset, length

  def __len__(self) -> int:
    return self.length


class Spill:
  """Token ids appended to a temporary file (one dtype), read back per file."""

  def __init__(self, path: str, dtype: str):
    self.path, self.dtype = path, np.dtype(dtype)
    self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    self._end = 0

  def add(self, ids: np.ndarray) -> Spilled:
    data = np.asarray(ids).astype(self.dtype, copy=False).tobytes()
    os.pwrite(self._fd, data, self._end * self.dtype.itemsize)
    spilled = Spilled(self._end, len(ids))
    self._end += len(ids)
    return spilled

  def read(self, ids) -> np.ndarray:
    """A Spilled file's ids; arrays (e.g. canaries' ids) pass through."""
    if not isinstance(ids, Spilled):
      return np.asarray(ids)
    data = os.pread(self._fd, ids.length * self.dtype.itemsize, ids.offset * self.dtype.itemsize)
    return np.frombuffer(data, self.dtype)

  def close(self) -> None:
    os.close(self._fd)
    os.remove(self.path)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _tallied(records, flags, tally: dict):
  """`records` passed through, numbered (`i`: the read index later passes find them by),
  with what the card counts of every file read added to `tally` (see _new_tally)."""
  for i, r in enumerate(records):
    r['i'] = i
    tally['files'] += 1
    tally['bytes'] += clean.nbytes(r['content'])
    tally['identity'][r.get('identity', 'path')] += 1
    for f in flags:
      flagged = clean.release_flagged(r, f)
      if flagged is None:
        tally['lacking'].setdefault(f, r['source'])
      else:
        tally['flagged'][f] += flagged
    yield r


def _new_tally() -> dict:
  return {'files': 0, 'bytes': 0, 'identity': collections.Counter(),
          'flagged': collections.Counter(), 'lacking': {}}


def _describe(record: dict, valid: set, seed: int) -> dict:
  """What later passes need of a file that passed filters 1-4 (no content, flags or
  license: the re-read gives those back), with its side for data.split='given'."""
  meta = clean.describe({k: v for k, v in record.items() if k not in ('flags', 'license')},
                        seed)
  meta['repo'] = sys.intern(meta['repo'])  # Many files share one repository name.
  meta['side'] = 'valid' if record['source'] in valid else 'train'
  return meta


def catalog(name: str, specs, cfg: dict, across, progress: bool, flags=(), valid=()):
  """Pass 1 over a participant's sources: filters 1-4 on the stream, keeping metadata of
  the survivors only. Returns (survivors, filter counts, tally, skipped); the tally counts
  every file read, and which `flags` (TRUSTABLE_FLAGS) the release flags (see _tallied)."""
  skipped, tally = sources_lib.new_skipped(), _new_tally()
  records = _tallied(sources_lib.iter_participant(name, specs, cfg['max_file_bytes'], skipped),
                     flags, tally)
  valid = set(valid)
  kept, counts = clean.pre_filter(records, across, progress, f'{name}: reading',
                                  lambda r: _describe(r, valid, cfg['seed']))
  return kept, counts, tally, skipped


def _batches(items, size: int):
  it = iter(items)
  while batch := list(itertools.islice(it, size)):
    yield batch


def tokenize(cfg: dict, p: dict, by_side: dict, encode, spill, trusted, progress: bool,
             chunk: int = 128) -> None:
  """Pass 2: the verdict of filters 5-8 on every file filters 1-4 left (its `reason`); a
  file they keep gets its token ids spilled (`ids`) and its `lines` counted."""
  metas = sorted((r for rs in by_side.values() for r in rs), key=lambda r: r['i'])
  files = reread(p['name'], p['sources'], cfg['max_file_bytes'], metas, cfg['seed'])
  bar = tqdm.tqdm(total=len(metas), desc=f"{p['name']}: tokenizing", unit=' files',
                  disable=not progress)
  for batch in _batches(files, chunk):
    for (meta, r), ids in zip(batch, encode([r['content'] for _, r in batch])):
      meta['reason'] = clean.post_filter_reason(r['content'], len(ids), cfg['seed'],
                                                trusted, meta.get('ratio'))
      if meta['reason'] is None:
        meta['ids'], meta['lines'] = spill.add(ids), len(r['content'].splitlines())
    bar.update(len(batch))
  bar.close()


def stored_files(cfg: dict, p: dict, records: list[dict], entry: dict):
  """The split's files for TFDS, a function streaming them in stored order (contents read
  again; canaries as inserted), which sets entry['sha256'] over (repo, path, content)."""

  def files():
    h = hashlib.sha256()
    real = reread(p['name'], p['sources'], cfg['max_file_bytes'],
                  (r for r in records if 'content' not in r), cfg['seed'])
    for r in records:
      if 'content' not in r:
        read = next(real)[1]
        r = {**r, 'content': read['content'], 'license': read['license']}
      h.update('\0'.join((r['repo'], r['path'], r['content'])).encode('utf-8') + b'\0')
      yield {k: r[k] for k in tfds_builder.FIELDS}
    entry['sha256'] = h.hexdigest()

  return files
