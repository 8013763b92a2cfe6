"""Where a result was measured: the machine record results.json and summary.json carry.

Timings (train_seconds, evaluate_seconds, wall_seconds) mean little without the processor,
the cores, the jax build and the XLA flags they were taken under, and a study resumed on
another machine mixes several. So every results.json and summary.json records the machine
it was computed on, and analysis/ prints it under each table from the files alone (never
from the machine that regenerates the tables). bench/ uses the same helpers.
"""

import os
import platform
from typing import Mapping, Optional

from collab import host

CPUINFO = '/proc/cpuinfo'


def cpu_model(cpuinfo: str = CPUINFO) -> str:
  """The processor's name from /proc/cpuinfo (Linux), else platform's guess."""
  try:
    with open(cpuinfo, encoding='utf-8') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def usable_cores() -> int:
  """Cores this process may run on (its affinity mask), else os.cpu_count()."""
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    return os.cpu_count() or 1


def hugepages_in_force(environ: Mapping[str, str]) -> bool:
  """Whether glibc was started with huge pages (collab.host re-executes a launcher with
  them on Linux unless COLLAB_HUGEPAGES=0; the switch alone, without that restart,
  changes nothing)."""
  return host.SETTING in environ.get('GLIBC_TUNABLES', '').split(':')


def machine(environ: Optional[Mapping[str, str]] = None) -> dict:
  """The machine this process computes on, as plain JSON values.

  `accelerator` is None on CPU-only jax; `cores` counts the machine's, `usable_cores`
  those this process may use (containers and taskset give fewer).
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel
  environ = os.environ if environ is None else environ
  device = jax.devices()[0]
  return {
      'cpu': cpu_model(),
      'cores': os.cpu_count(),
      'usable_cores': usable_cores(),
      'accelerator': None if device.platform == 'cpu' else device.device_kind,
      'platform': device.platform,
      'devices': jax.device_count(),
      'jax': jax.__version__,
      'jaxlib': jaxlib.__version__,
      'xla_flags': environ.get('XLA_FLAGS', ''),
      'hugepages': hugepages_in_force(environ),
      'system': f'{platform.system()} {platform.machine()}',
      'python': platform.python_version(),
  }
