"""What every launcher shares: quiet library logs and bad input as a one-line error.

Bad input ends a launcher with one line, `launch.NAME: error: WHAT; what to do`, and exit
status 1. Two places catch it: `parse_flags` (absl flags and the --config file, which
ml_collections loads while flags are parsed) and `run_or_exit` (the library's bad-input
errors). Both catch specific types only: anything else is a bug and keeps its traceback.
"""

import logging as py_logging
import os
import re
import sys
import sysconfig
import traceback
import types
from typing import Callable, NoReturn, Optional

from absl import flags

from collab import host

# Libraries whose INFO lines drown the progress bars (Orbax logs every array it saves).
_NOISY = ('/orbax/', '/tensorflow_datasets/', '/etils/')
# What loading --config raises for bad input: a missing or unreadable file (OSError,
# which ml_collections defers to the config's first use), a syntax error, no get_config,
# or an override of a field or list item the config lacks (AttributeError, LookupError).
_CONFIG_ERRORS = (OSError, SyntaxError, AttributeError, LookupError)
_FOLDER_FLAGS = ('workdir', 'data_dir')
_OVERRIDE_RE = re.compile(r'^--?(no)?config\.')


# Library warnings about what collab does on purpose: Orbax warns whenever a manager is
# opened read-only, which is how an incremental stage reads the stage before it.
_EXPECTED = ('Given directory is read only',)


class _DropLibraryInfo(py_logging.Filter):
  def filter(self, record: py_logging.LogRecord) -> bool:
    if not any(n in record.pathname for n in _NOISY):
      return True
    return record.levelno >= py_logging.WARNING and not any(
        str(record.msg).startswith(e) for e in _EXPECTED)


class _DropDiskFullNoise(py_logging.Filter):
  """Drops libraries' own reports of a full disk (Orbax logs each failed background write
  with its traceback, asyncio each unread task): collab.io.DiskFullError says it in one line."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    from collab import io  # Lazy: launchers import collab after their flags.
    if not any(n in record.pathname for n in _NOISY + ('/asyncio/',)):
      return True
    return not (io.disk_full_why(record.getMessage())
                or (record.exc_info and io.disk_full_why(record.exc_info[1])))


def quiet_libraries() -> None:
  """Keeps WARNING and above from libraries, and everything from collab; a full disk and
  a failed Orbax read or write are reported once, by collab."""
  py_logging.getLogger('absl').addFilter(_DropLibraryInfo())
  for name in ('absl', 'asyncio'):
    py_logging.getLogger(name).addFilter(_DropDiskFullNoise())
  from collab import checkpoint_faults  # Lazy, like collab.io above.
  sys.unraisablehook = checkpoint_faults.drop_closed_loop(sys.unraisablehook)


def compilation_cache() -> None:
  """Persistent XLA cache: runs that compile the same programs (a study's stages) reuse them.

  $JAX_COMPILATION_CACHE_DIR wins; otherwise ~/.cache/collab/jax.
  """
  import jax  # Imported here: launchers may need to start jax.distributed first.
  folder = os.environ.get('JAX_COMPILATION_CACHE_DIR') or os.path.join(
      os.path.expanduser('~'), '.cache', 'collab', 'jax')
  jax.config.update('jax_compilation_cache_dir', folder)
  # Every program, however quick to compile: a study's runs each jit their own init,
  # validation and sampling programs, and the same small ones (~0.2-0.5 s each) were
  # compiled again in each of its ~17 runs and stages (cold study 273 s against 288 s
  # with jax's 0.5 s threshold). $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS wins.
  if 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS' not in os.environ:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)


def fail(name: str, message: str) -> NoReturn:
  """Prints 'NAME: error: MESSAGE' on one line (newlines in it joined) and exits 1."""
  line = ' '.join(part.strip() for part in str(message).splitlines() if part.strip())
  print(f'{name}: error: {line}', file=sys.stderr)
  sys.exit(1)


def _config_arg(argv: list) -> str:
  """'--config=PATH[:ARG]' as given on the command line."""
  for i, arg in enumerate(argv):
    if re.match(r'^--?config=', arg):
      return '--config=' + arg.split('=', 1)[1]
    if re.match(r'^--?config$', arg) and i + 1 < len(argv):
      return '--config=' + argv[i + 1]
  return '--config'


def _where(error: BaseException) -> str:
  """' (FILE:LINE)' of the innermost frame in the config's own code, or ''."""
  paths = sysconfig.get_paths()
  libraries = tuple({paths['stdlib'], paths['purelib'], paths['platlib'],
                     os.path.dirname(os.path.abspath(__file__))})
  frames = [f for f in traceback.extract_tb(error.__traceback__)
            if not (f.filename.startswith('<')
                    or os.path.abspath(f.filename).startswith(libraries))]
  return f' ({frames[-1].filename}:{frames[-1].lineno})' if frames else ''


def _chain(error: BaseException) -> list:
  """The error and the ones it was raised while handling, outermost first."""
  found = [error]
  while found[-1].__context__ is not None:
    found.append(found[-1].__context__)
  return found


def _override_message(argv: list, config: str, error: BaseException) -> str:
  """An override of a field (or list item) the config lacks, naming that override."""
  overrides = [a for a in argv if _OVERRIDE_RE.match(a)]
  innermost, why = _chain(error)[-1], str(error)
  if isinstance(innermost, KeyError) and innermost.args:
    key = str(innermost.args[0])
    overrides = [o for o in overrides if key in re.split(r'[.=\[\]]', o)] or overrides
    # ml_collections puts a 'Did you mean "x" instead of "y"?' line in a KeyError's text.
    hints = [line for e in _chain(error) if e.args for line in str(e.args[0]).splitlines()
             if line.startswith('Did you mean')]
    why = f'the config has no field {key!r}' + (f' ({hints[0]})' if hints else '')
  return (f'cannot apply {" ".join(overrides)} to {config}: {why}; override only fields '
          'that the config defines.')


def config_error_message(argv: list, error: BaseException) -> str:
  """One line saying why --config (or an override of it) did not load, and what to do."""
  config = _config_arg(argv)
  if isinstance(error, SyntaxError):
    return (f'cannot load {config}: {error.msg} at {error.filename}:{error.lineno}; fix the '
            'file.')
  if isinstance(error, OSError):
    cause = error.__cause__ or error  # ml_collections' deferred error wraps the first one.
    # Its text lists the paths tried; the last line is why the file did not open.
    why = ([part.strip() for part in str(cause).splitlines() if part.strip()]
           or [type(cause).__name__])[-1]
    return (f'cannot load {config}: {why}{_where(cause)}; give the path of a config file, '
            'e.g. --config=configs/default.py.')
  if (isinstance(error, AttributeError) and error.name == 'get_config'
      and isinstance(getattr(error, 'obj', None), types.ModuleType)):
    return (f'cannot load {config}: the file defines no get_config(); a config file '
            'defines get_config(arg=None) that returns a ConfigDict (see configs/).')
  where = _where(error)
  if not where and any(_OVERRIDE_RE.match(a) for a in argv):
    return _override_message(argv, config, error)
  return f'cannot load {config}: {type(error).__name__}: {error}{where}; fix the file.'


def _flags_error_message(argv: list, error: flags.Error) -> str:
  """absl's message; a config file's own ValueError (absl embeds its traceback) unwrapped."""
  if '\n' not in str(error) or error.__context__ is None:
    return str(error)
  inner = _chain(error)[-1]
  if isinstance(inner, ValueError):  # Raised on purpose by get_config, e.g. a bad arg.
    return f'cannot load {_config_arg(argv)}: {inner}'
  return f'cannot load {_config_arg(argv)}: {type(inner).__name__}: {inner}{_where(inner)}'


def _file_in_the_way(path: str) -> Optional[str]:
  """The existing non-folder at or above `path` that keeps it from being a folder."""
  path = os.path.abspath(path)
  while not os.path.exists(path):
    parent = os.path.dirname(path)
    if parent == path:
      return None
    path = parent
  return None if os.path.isdir(path) else path


def _returned_none(argv: list) -> str:
  """The error when --config was given but its get_config() returned None, else ''.

  absl would call that config missing (a required flag) or a launcher would.
  """
  if 'config' in flags.FLAGS and flags.FLAGS['config'].present and (
      flags.FLAGS['config'].value is None):
    return (f'cannot load {_config_arg(argv)}: its get_config() returned None; it must '
            'return a ConfigDict.')
  return ''


def _check_parsed(name: str, argv: list) -> None:
  """Loads a deferred --config now, and refuses folder flags that name files."""
  returned_none = _returned_none(argv)
  if returned_none:
    fail(name, returned_none)
  if 'config' in flags.FLAGS and flags.FLAGS['config'].present:
    # ml_collections defers a missing file's OSError to the config's first use: this one.
    getattr(flags.FLAGS['config'].value, 'lock', None)
  for folder_flag in _FOLDER_FLAGS:
    path = flags.FLAGS[folder_flag].value if folder_flag in flags.FLAGS else None
    blocker = path and _file_in_the_way(path)
    if blocker:
      fail(name, f'--{folder_flag}={path} cannot be a folder: {blocker} is a file; give a '
                 'new or existing folder.')


def parse_flags(name: str) -> Callable[[list], list]:
  """An absl `flags_parser` for app.run: bad flags or --config end as one error line.

  On Linux it first asks for transparent huge pages (collab/host.py; COLLAB_HUGEPAGES=0: not)."""

  def parse(argv: list) -> list:
    host.use_hugepages()  # Before any work: it starts the launcher over, once, if needed.
    try:
      rest = flags.FLAGS(argv)
      _check_parsed(name, argv)
      return rest
    except flags.Error as e:
      fail(name, _returned_none(argv) or _flags_error_message(argv, e))
    except _CONFIG_ERRORS as e:
      fail(name, config_error_message(argv, e))

  return parse


def run_or_exit(name: str, fn: Callable[[], object]):
  """Calls fn(); a bad-input error becomes 'NAME: error: ...' and exit status 1, and so do
  a full disk (collab.io.DiskFullError) and a workdir another process is using."""
  from collab import io  # Lazy: launchers import collab after their flags.
  from collab import lock
  from collab.evals.execution import sandbox
  quiet_libraries()
  compilation_cache()
  try:
    return fn()
  except (ValueError, FileNotFoundError, sandbox.SandboxUnavailableError, io.DiskFullError,
          lock.WorkdirBusyError) as e:
    fail(name, e)
  except (FileExistsError, NotADirectoryError) as e:
    fail(name, f'{e}; a folder of this run (--workdir, --data_dir, config.data.data_dir) '
               'is a file: give a new or existing folder.')
