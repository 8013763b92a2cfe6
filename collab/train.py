"""One entry for every setting: `train(config, workdir)` runs the configured setting."""

from collab.settings import centralized
from collab.settings import run


def train(config, workdir: str) -> dict:
  """Trains config.setting in `workdir` (resuming what is there); returns its summary."""
  run.check_config(config)
  if config.setting in ('single', 'centralized'):
    return centralized.train(config, workdir)
  if config.setting == 'federated':
    from collab.settings import federated  # Imported on use: settings stay independent.
    return federated.train(config, workdir)
  from collab.settings import incremental
  return incremental.train(config, workdir)
