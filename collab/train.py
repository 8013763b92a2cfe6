"""One entry for every setting: `train(config, workdir)` runs the configured setting."""

import jax

from collab import io
from collab import lock
from collab.settings import centralized
from collab.settings import run


def train(config, workdir: str) -> dict:
  """Trains config.setting in `workdir` (resuming what is there); returns its summary.

  Holds the workdir's lock (collab/lock.py) throughout: a second process on the same
  workdir stops at once with lock.WorkdirBusyError. A write that finds the disk full
  (checkpoints, exports, logs) ends as io.DiskFullError.
  """
  run.check_config(config)
  # The lock file is a write too: a full disk there is one line as well.
  with io.disk_full_as_error(workdir), lock.hold(workdir, jax.process_index()):
    return _train(config, workdir)


def _train(config, workdir: str) -> dict:
  if config.setting in ('single', 'centralized'):
    return centralized.train(config, workdir)
  if config.setting == 'federated':
    from collab.settings import federated  # Imported on use: settings stay independent.
    return federated.train(config, workdir)
  from collab.settings import incremental
  return incremental.train(config, workdir)
