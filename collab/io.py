"""Files a run leaves behind, written atomically: JSON, metrics.jsonl, TensorBoard."""

import contextlib
import json
import os
import shutil
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


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def atomic_write(path: str, write: Callable[[Any], None], binary: bool = False) -> None:
  """Calls `write(file)` on a temporary file in the same folder, then renames it to `path`."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.')
  os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; results need not be.
  try:
    with os.fdopen(fd, 'wb' if binary else 'w', **({} if binary else {'encoding': 'utf-8'})) as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def atomic_write_text(path: str, text: str) -> None:
  atomic_write(path, lambda f: f.write(text))


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
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix='.' + os.path.basename(path) + '.tmp.')
  os.chmod(tmp, 0o777 & ~_umask())
  try:
    yield tmp
    if os.path.exists(path):
      shutil.rmtree(path)
    os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


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
      from tensorboardX import SummaryWriter  # Lazy: only runs that log pay for it.
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def truncate_after(self, step: int, key: str = 'step') -> None:
    """Drops lines logged after `step` (they belong to work the resume will redo)."""
    if not os.path.exists(self.path):
      return
    rows = [r for r in read_jsonl(self.path) if r.get(key, -1) <= step]
    write_jsonl(self.path, rows)

  def write(self, step: int, metrics: dict, key: str = 'step') -> None:
    row = {key: int(step), **{k: _default(v) if hasattr(v, 'tolist') else v
                              for k, v in metrics.items()}}
    with open(self.path, 'a', encoding='utf-8') as f:
      f.write(json.dumps(row, sort_keys=True, default=_default) + '\n')
    if self._tb is not None:
      for k, v in row.items():
        if k != key and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
