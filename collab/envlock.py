"""The pinned environment: `requirements.lock` against what is installed.

`make` installs exactly the lock (every package, pip included) and then collab itself
without dependencies, so a fresh clone next year installs what this one did. `make test`
runs `python -m launch.check_env` first: it names every locked package that is missing or
at another version. Packages outside the lock (torch for the parity tests, a user's own
tools) are not compared: the lock pins what collab needs, not what else a user keeps.

Refresh the lock on purpose with `make lock` (a fresh venv resolves setup.cfg's ranges
anew); a test checks that every locked version satisfies setup.cfg's ranges.
"""

import importlib.metadata
import re

LOCK_FILE = 'requirements.lock'
_PIN = re.compile(r'^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)\s*(?:#.*)?$')


def canonical(name: str) -> str:
  """PEP 503 name: 'Ml_Collections' -> 'ml-collections'."""
  return re.sub(r'[-_.]+', '-', name).lower()


def parse_lock(text: str, source: str = LOCK_FILE) -> dict:
  """{canonical name: version} from `NAME==VERSION` lines; comments and blanks skipped."""
  pins = {}
  for number, line in enumerate(text.splitlines(), 1):
    line = line.strip()
    if not line or line.startswith('#'):
      continue
    match = _PIN.match(line)
    if not match:
      raise ValueError(f'{source}:{number}: {line!r} is not NAME==VERSION; regenerate the '
                       'lock with `make lock`.')
    pins[canonical(match.group(1))] = match.group(2)
  return pins


def read_lock(path: str = LOCK_FILE) -> dict:
  with open(path, encoding='utf-8') as f:
    return parse_lock(f.read(), path)


def installed() -> dict:
  """{canonical name: version} of every distribution this interpreter sees."""
  found = {}
  for dist in importlib.metadata.distributions():
    name = dist.metadata['Name']
    if name:  # A broken dist-info without metadata has no name: nothing to compare.
      found.setdefault(canonical(name), dist.version)
  return found


def differences(pins: dict, have: dict) -> list:
  """One line per locked package that is missing or at another version, sorted."""
  out = []
  for name, want in sorted(pins.items()):
    got = have.get(name)
    if got is None:
      out.append(f'{name}: locked {want}, not installed')
    elif got != want:
      out.append(f'{name}: locked {want}, installed {got}')
  return out


def unsatisfied(requirements, pins: dict) -> list:
  """setup.cfg requirement strings whose range the locked version does not satisfy."""
  from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top
  out = []
  for text in requirements:
    req = Requirement(text)
    version = pins.get(canonical(req.name))
    if version is None:
      out.append(f'{req}: not in the lock')
    elif not req.specifier.contains(version, prereleases=True):
      out.append(f'{req}: the lock has {version}')
  return out
