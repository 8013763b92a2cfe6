"""Files a run leaves behind, written atomically: JSON, metrics.jsonl, TensorBoard.

A write that runs out of disk space (or quota, or the file size limit) ends as one
`DiskFullError` naming the path, the free space and the size wanted, with nothing
half-written left behind; launchers print it as one line.
"""

import contextlib
import errno
import json
import os
import re
import shutil
import sys
import tempfile
from typing import Any, Callable, Iterator

import numpy as np


def _default(obj: Any):
  """JSON for numpy/JAX scalars and arrays."""
  if isinstance(obj, (np.integer,)):
    return int(obj)
  if isinstance(obj, (np.floating,)):
    return float(obj)
  if hasattr(obj, 'tolist'):
    return obj.tolist()
  raise TypeError(f'Object of type {type(obj).__name__} is not JSON serializable')


def dumps(obj: Any) -> str:
  """Canonical JSON: sorted keys, so the same results give the same bytes."""
  return json.dumps(obj, indent=2, sort_keys=True, default=_default) + '\n'


# What a full disk looks like: an errno from Python, or the text of a C++ library's error
# (tensorstore says RESOURCE_EXHAUSTED or passes strerror's words on).
_WHY = {errno.ENOSPC: 'space', errno.EDQUOT: 'quota', errno.EFBIG: 'size limit'}
_WHY_TEXT = re.compile(r'(No space left on device|RESOURCE_EXHAUSTED:.*[Ww]rit)|'
                       r'(Disk quota exceeded)|(File too large)')
_ADVICE = {
    'space': ('no space left on the disk to write', 'free some space (or give a folder on '
              'another disk)'),
    'quota': ('the disk quota is used up: cannot write', 'free some of the quota (or give a '
              'folder on another disk)'),
    'size limit': ('the file size limit (ulimit -f) stopped a write to', 'raise that limit'),
}


class DiskFullError(OSError):
  """A write ran out of disk space; `path`, `need` (bytes, 0 if unknown), `free` and
  `why` ('space', 'quota' or 'size limit')."""

  def __init__(self, message: str, path: str, need: int = 0, free: int | None = None,
               why: str = 'space'):
    super().__init__(message)
    self.path, self.need, self.free, self.why = path, need, free, why
    self.errno = {w: e for e, w in _WHY.items()}[why]


def free_bytes(path: str) -> int | None:
  """Free bytes on the filesystem that holds `path` (or would hold it), None if unknown."""
  path = os.path.abspath(path)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  try:
    return shutil.disk_usage(path).free
  except OSError:
    return None


def _size(n: int | None) -> str:
  return 'unknown' if n is None else f'{n / 2**20:.1f} MiB'


def disk_full_why(error: BaseException | str | None) -> str:
  """'space', 'quota' or 'size limit' if `error` (an exception, one it was raised from or
  while handling, or a message) is a full disk; else ''."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, DiskFullError):
      return error.why
    why = _WHY.get(getattr(error, 'errno', None))
    found = _WHY_TEXT.search(str(error))
    if why or found:
      return why or ('space', 'quota', 'size limit')[found.lastindex - 1]
    error = None if isinstance(error, str) else (error.__cause__ or error.__context__)
  return ''


def disk_full_error(path: str, need: int = 0, why: str = 'space',
                    written: int = 0) -> DiskFullError:
  """The one-line error for `path`: what is free there and what the write wanted (or,
  where that is unknown, how much it had `written` when it failed, since removed)."""
  free = free_bytes(path)
  wanted = (f', {_size(need)} needed' if need else
            f', not enough: the {_size(written)} it had written are removed' if written
            else '')
  why = why or 'space'
  what, advice = _ADVICE[why]
  return DiskFullError(f'{what} {path} ({_size(free)} free{wanted}); {advice}, then run the '
                       'same command again (a run resumes from its last checkpoint).',
                       path, need, free, why)


@contextlib.contextmanager
def disk_full_as_error(path: str, need: int = 0) -> Iterator[None]:
  """Turns a full-disk error inside the block into DiskFullError for `path`."""
  try:
    yield
  except DiskFullError:
    raise
  except Exception as e:
    why = disk_full_why(e)
    if not why:
      raise
    raise disk_full_error(path, need, why) from e


def check_free(path: str, need: int) -> None:
  """Raises DiskFullError before a write of `need` bytes that cannot fit at `path`."""
  free = free_bytes(path)
  if free is not None and free < need:
    raise disk_full_error(path, need)


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def atomic_write(path: str, write: Callable[[Any], None], binary: bool = False,
                 size: int = 0) -> None:
  """Calls `write(file)` on a temporary file in the same folder, then renames it to `path`.

  On a full disk the temporary file is removed and DiskFullError names `path` (and
  `size`, the bytes to write, where the caller knows them).
  """
  folder = os.path.dirname(os.path.abspath(path))
  with disk_full_as_error(path, size):
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.')
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; results need not be.
    try:
      with os.fdopen(fd, 'wb' if binary else 'w',
                     **({} if binary else {'encoding': 'utf-8'})) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
    except BaseException:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
      raise


def atomic_write_text(path: str, text: str) -> None:
  atomic_write(path, lambda f: f.write(text), size=len(text.encode('utf-8')))


def atomic_write_json(path: str, obj: Any) -> None:
  atomic_write_text(path, dumps(obj))


def read_json(path: str) -> Any:
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def write_jsonl(path: str, rows) -> None:
  """Writes a whole JSON-lines file atomically."""
  atomic_write_text(path, ''.join(json.dumps(r, sort_keys=True, default=_default) + '\n'
                                  for r in rows))


def read_jsonl(path: str) -> list:
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


@contextlib.contextmanager
def atomic_dir(path: str) -> Iterator[str]:
  """Yields a temporary sibling folder that is renamed to `path` only on success."""
  parent = os.path.dirname(os.path.abspath(path))
  with disk_full_as_error(path):
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix='.' + os.path.basename(path) + '.tmp.')
  os.chmod(tmp, 0o777 & ~_umask())
  try:
    yield tmp
    if os.path.exists(path):
      shutil.rmtree(path)
    os.replace(tmp, path)
  except BaseException as e:
    why = disk_full_why(e) if isinstance(e, Exception) else ''
    written = folder_bytes(tmp) if why else 0
    shutil.rmtree(tmp, ignore_errors=True)
    if why:
      raise disk_full_error(path, why=why, written=written) from e
    raise


def folder_bytes(folder: str) -> int:
  """Bytes of the files under `folder`."""
  return sum(os.path.getsize(os.path.join(root, f))
             for root, _, files in os.walk(folder) for f in files
             if os.path.isfile(os.path.join(root, f)))


def _append(path: str, data: bytes) -> None:
  """Appends all of `data` or nothing: a write cut short (a full disk) is cut off again,
  so the file stays whole lines that a resumed run can read."""
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
  try:
    start = os.fstat(fd).st_size
    try:
      view = memoryview(data)
      while view:
        view = view[os.write(fd, view):]
    except OSError:
      os.ftruncate(fd, start)
      raise
  finally:
    os.close(fd)


def _summary_writer():
  """tensorboardX's SummaryWriter, imported (lazily: only runs that log pay) without torch.

  tensorboardX imports torch when it is installed, only to accept torch tensors; collab
  logs Python floats, and the import costs 2-8 s in every training process (tests and
  `make bench` install torch beside collab).
  """
  if 'torch' in sys.modules or 'tensorboardX' in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter
  sys.modules['torch'] = None  # `import torch` raises ImportError while this stands.
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules['torch']
  return SummaryWriter


class MetricsWriter:
  """Appends one JSON object per logged step to metrics.jsonl, and to TensorBoard.

  Appending (not rewriting) is safe across resumes: a resumed run first truncates
  lines past its restored step with `truncate_after`.
  """

  def __init__(self, workdir: str, tensorboard: bool = True):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if tensorboard:
      self._tb = _summary_writer()(os.path.join(workdir, 'tensorboard'))

  def truncate_after(self, step: int, key: str = 'step') -> None:
    """Drops lines logged after `step` (they belong to work the resume will redo)."""
    if not os.path.exists(self.path):
      return
    rows = [r for r in read_jsonl(self.path) if r.get(key, -1) <= step]
    write_jsonl(self.path, rows)

  def write(self, step: int, metrics: dict, key: str = 'step') -> None:
    row = {key: int(step), **{k: _default(v) if hasattr(v, 'tolist') else v
                              for k, v in metrics.items()}}
    line = (json.dumps(row, sort_keys=True, default=_default) + '\n').encode('utf-8')
    with disk_full_as_error(self.path, len(line)):
      _append(self.path, line)
    if self._tb is not None:
      for k, v in row.items():
        if k != key and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
