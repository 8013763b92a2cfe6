"""What every launcher shares: quiet library logs and bad input as a one-line error."""

import logging as py_logging
import os
import sys
from typing import Callable

# Libraries whose INFO lines drown the progress bars (Orbax logs every array it saves).
_NOISY = ('/orbax/', '/tensorflow_datasets/', '/etils/')


class _DropLibraryInfo(py_logging.Filter):
  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or not any(
        n in record.pathname for n in _NOISY)


def quiet_libraries() -> None:
  """Keeps WARNING and above from libraries, and everything from collab."""
  py_logging.getLogger('absl').addFilter(_DropLibraryInfo())


def compilation_cache() -> None:
  """Persistent XLA cache: runs that compile the same programs (a study's stages) reuse them.

  $JAX_COMPILATION_CACHE_DIR wins; otherwise ~/.cache/collab/jax.
  """
  import jax  # Imported here: launchers may need to start jax.distributed first.
  folder = os.environ.get('JAX_COMPILATION_CACHE_DIR') or os.path.join(
      os.path.expanduser('~'), '.cache', 'collab', 'jax')
  jax.config.update('jax_compilation_cache_dir', folder)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


def run_or_exit(name: str, fn: Callable[[], object]):
  """Calls fn(); a bad-input error becomes 'NAME: error: ...' and exit status 1."""
  quiet_libraries()
  compilation_cache()
  try:
    return fn()
  except (ValueError, FileNotFoundError) as e:
    print(f'{name}: error: {e}', file=sys.stderr)
    sys.exit(1)
