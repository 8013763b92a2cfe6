"""What goes wrong with checkpoints on disk, told apart and cleaned up after.

A restore that fails is either a checkpoint of another state (the config changed: its
own metadata says so) or damaged files (truncated, garbled, missing: the read errors say
so); `tree_difference` and `unreadable_cause` tell which. A save that fails half-way
leaves Orbax's temporary folder, which `remove_tmp_folders` removes.
"""

import contextlib
import errno
import json
import os
import re
import shutil
import sys
import time
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

PyTree = Any


def drop_closed_loop(previous: Callable) -> Callable:
  """An unraisable hook like `previous`, without 'Event loop is closed'.

  When one read or write of a failed Orbax restore or save fails, Orbax closes its event
  loop and the others, finishing in tensorstore's threads, each print one such traceback
  (dozens) as an unraisable error; they say nothing the failure's own error does not.
  """

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == 'Event loop is closed'):
      previous(unraisable)
  return hook


@contextlib.contextmanager
def quiet_closed_loop():
  """drop_closed_loop on sys.unraisablehook while a restore runs."""
  previous = sys.unraisablehook
  sys.unraisablehook = drop_closed_loop(previous)
  try:
    yield
  finally:
    sys.unraisablehook = previous


def leaf_shapes(tree: PyTree) -> dict:
  """{'params.wte': shape} for every array leaf, whatever the containers' types (Orbax
  reads tuples and optax states back as lists and dicts)."""
  def name(key) -> str:
    for attr in ('key', 'idx', 'name'):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)
  return {'.'.join(name(k) for k in path): tuple(getattr(x, 'shape', ()) or ())
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def tree_difference(saved: PyTree, abstract_state: PyTree) -> str:
  """How the checkpoint's own metadata differs from the state ('' if it does not)."""
  have, want = leaf_shapes(saved), leaf_shapes(abstract_state)
  extra, missing = sorted(set(have) - set(want)), sorted(set(want) - set(have))
  shapes = [f'{k} is {have[k]} on disk but {want[k]} here'
            for k in sorted(set(have) & set(want), key=lambda k: (not k.startswith('params'), k))
            if have[k] != want[k]]
  parts = ([f'it lacks {", ".join(missing[:3])}' + (' ...' if len(missing) > 3 else '')]
           if missing else [])
  parts += ([f'it has {", ".join(extra[:3])} that this state lacks'
             + (' ...' if len(extra) > 3 else '')] if extra else [])
  return '; '.join(parts + shapes[:3])


# Errors that say a file is damaged or gone rather than that the trees differ: tensorstore
# status codes for reads, a JSON decoder's complaints, a missing item or file.
_UNREADABLE = re.compile(r'DATA_LOSS|OUT_OF_RANGE|NOT_FOUND|FAILED_PRECONDITION|Error reading|'
                         r'Error decoding|was not found in the checkpoint|corrupt|[Tt]runcated')


def unreadable_cause(error: BaseException) -> str:
  """The first line of the error (or one it came from) that says files are damaged."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if (isinstance(error, (json.JSONDecodeError, FileNotFoundError))
        or getattr(error, 'errno', None) == errno.EIO or _UNREADABLE.search(str(error))):
      return f'{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}'
    error = error.__cause__ or error.__context__
  return ''


def remove_tmp_folders(directory: str, quiet_checks: int = 3, most: int = 50) -> None:
  """Removes unfinished saves' temporary folders, again whenever they come back.

  After a failed write Orbax abandons the others, and tensorstore's threads may still
  finish some, recreating the folder; stop once it stays away `quiet_checks` times.
  """
  quiet = 0
  for _ in range(most):
    found = [n for n in os.listdir(directory) if ocp.path.atomicity.TMP_DIR_SUFFIX in n]
    for name in found:
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    quiet = 0 if found else quiet + 1
    if quiet >= quiet_checks:
      return
    time.sleep(0.1)
