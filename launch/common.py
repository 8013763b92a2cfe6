"""What every launcher shares: quiet library logs and bad input as a one-line error."""

import logging as py_logging
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


def run_or_exit(name: str, fn: Callable[[], object]):
  """Calls fn(); a bad-input error becomes 'NAME: error: ...' and exit status 1."""
  quiet_libraries()
  try:
    return fn()
  except (ValueError, FileNotFoundError) as e:
    print(f'{name}: error: {e}', file=sys.stderr)
    sys.exit(1)
