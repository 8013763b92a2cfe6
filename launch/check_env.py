"""Checks the installed packages against requirements.lock; `make test` runs it first.

  python -m launch.check_env [--lock=requirements.lock]

Exit 0 when every locked package is installed at its locked version and `pip check`
finds no broken requirement; else one line per difference and exit 1.
"""

import subprocess
import sys

from absl import app
from absl import flags

from collab import envlock

_LOCK = flags.DEFINE_string('lock', envlock.LOCK_FILE, 'The lock file to compare with.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    pins = envlock.read_lock(_LOCK.value)
  except (OSError, ValueError) as e:
    sys.exit(f'launch.check_env: error: {e}')
  problems = envlock.differences(pins, envlock.installed())
  check = subprocess.run([sys.executable, '-m', 'pip', 'check'], capture_output=True,
                         text=True, check=False)
  if check.returncode:
    problems += [f'pip check: {line}' for line in check.stdout.splitlines() if line.strip()]
  if problems:
    print(f'launch.check_env: error: the environment differs from {_LOCK.value}:',
          file=sys.stderr)
    for line in problems:
      print(f'  {line}', file=sys.stderr)
    sys.exit('launch.check_env: reinstall with `make clean-venv test`, or refresh the lock '
             'on purpose with `make lock`.')
  print(f'launch.check_env: {len(pins)} packages as locked in {_LOCK.value}; pip check clean.')


if __name__ == '__main__':
  app.run(main)
