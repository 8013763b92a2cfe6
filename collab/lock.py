"""One process per run or study folder: an advisory lock on WORKDIR/.lock.

A second `launch.train` or `launch.study` on a folder that another process is working
in stops at once with WorkdirBusyError (naming that process) instead of writing the same
checkpoints and results. The lock is `fcntl.flock`: the kernel drops it when its process
exits, however it exits, so there is never a stale lock to clean up. Nested holds by the
same process re-enter instead of refusing. A study locks its folder and each run its own;
the incremental stages that chains share (`stages/`) are not locked on their own, so two
processes must not train chains of one study's stages folder at once.
"""

import contextlib
import fcntl
import functools
import inspect
import os
from typing import Iterator

LOCK_FILE = '.lock'

# Locks this process holds: realpath -> (fd, depth). A second flock on another descriptor
# of the same file would refuse this very process, so nested holds must find the first.
_HELD: dict = {}


class WorkdirBusyError(RuntimeError):
  """Another process holds the folder's lock."""


def _lock_path(workdir: str, process: int) -> str:
  # The processes of one multi-host job share a workdir; each takes its own lock.
  name = LOCK_FILE if process == 0 else f'{LOCK_FILE}.{process}'
  return os.path.join(os.path.realpath(workdir), name)


def _holder(fd: int) -> str:
  """'pid N' as the holder wrote it, or a vaguer word if it has not yet."""
  text = os.pread(fd, 64, 0).decode('ascii', 'replace').strip()
  return f'pid {text}' if text.isdigit() else 'another process'


@contextlib.contextmanager
def hold(workdir: str, process: int = 0) -> Iterator[str]:
  """Holds `workdir`'s lock for the block (creating the folder); yields the lock's path.

  Raises WorkdirBusyError at once if another process holds it.
  """
  path = _lock_path(workdir, process)
  if path in _HELD:
    fd, depth = _HELD[path]
    _HELD[path] = (fd, depth + 1)
    try:
      yield path
    finally:
      _HELD[path] = (fd, depth)
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  # O_CLOEXEC: sandboxed evaluations and other children must not inherit the lock.
  fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = _holder(fd)
    os.close(fd)
    raise WorkdirBusyError(
        f'{os.path.dirname(path)} is in use by {holder} (lock {path}); wait for it to '
        'finish or stop it, or give another --workdir.') from None
  os.ftruncate(fd, 0)
  os.pwrite(fd, f'{os.getpid()}\n'.encode('ascii'), 0)
  _HELD[path] = (fd, 1)
  try:
    yield path
  finally:
    del _HELD[path]
    os.close(fd)  # Releases the flock; the file stays (removing it would race a waiter).


def holding_workdir(fn):
  """Decorates a function with a `workdir` argument to run under that folder's lock."""
  signature = inspect.signature(fn)

  @functools.wraps(fn)
  def locked(*args, **kwargs):
    with hold(signature.bind(*args, **kwargs).arguments['workdir']):
      return fn(*args, **kwargs)
  return locked
