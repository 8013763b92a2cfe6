r"""Prints (or runs) one command per point of a config file's `sweep(add)`.

  python -m launch.sweep --config=configs/paper.py --workdir=runs/sweep [--run] \
      [--launcher=launch.train]

Each point is a set of config overrides; its workdir is WORKDIR/<key=value,...>. With
--run the commands run one after another here (a finished point is a quick no-op).
"""

import importlib.util
import os
import shlex
import subprocess
import sys

from absl import app
from absl import flags

from launch import common

_CONFIG = flags.DEFINE_string('config', None, 'Config file (path[:arg]) that defines sweep(add).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Parent folder of the sweep points.')
_LAUNCHER = flags.DEFINE_string('launcher', 'launch.train', 'Module run per point.')
_RUN = flags.DEFINE_bool('run', False, 'Run the commands here instead of printing them.')
flags.mark_flags_as_required(['config', 'workdir'])


def points(config_path: str) -> list:
  """The override dicts that the config file's sweep(add) adds, in order."""
  path = config_path.split(':', 1)[0]
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no config file at {path!r}; give the path of a config file '
                            'that defines sweep(add), e.g. configs/paper.py.')
  spec = importlib.util.spec_from_file_location('sweep_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'sweep'):
    raise ValueError(f'{path} defines no sweep(add); add one or pick another config.')
  found = []
  module.sweep(lambda **overrides: found.append(overrides))
  return found


def command(config: str, workdir: str, launcher: str, overrides: dict) -> list:
  name = ','.join(f'{k.split(".")[-1]}={v}' for k, v in overrides.items()) or 'base'
  return ([sys.executable, '-m', launcher, f'--config={config}', f'--workdir={workdir}/{name}']
          + [f'--config.{k}={v}' for k, v in overrides.items()])


def main(argv):
  del argv
  try:
    cmds = [command(_CONFIG.value, _WORKDIR.value, _LAUNCHER.value, o)
            for o in points(_CONFIG.value)]
  except (ValueError, OSError, SyntaxError) as e:  # No such file, a folder, bad Python.
    common.fail('launch.sweep', f'cannot load --config={_CONFIG.value}: {e}')
  for cmd in cmds:
    print(shlex.join(cmd))
    if _RUN.value and subprocess.run(cmd, check=False).returncode:
      common.fail('launch.sweep', f'a point failed: {shlex.join(cmd)}')


if __name__ == '__main__':
  app.run(main, flags_parser=common.parse_flags('launch.sweep'))
