"""The model one would ship: WORKDIR/best, the lowest pooled validation loss so far.

Every setting calls `keep_best` after each validation (the periodic ones, the snapshots'
and the final one), before train.json is written; an incremental chain copies its best
stage's folder (collab.settings.incremental). best/ is a Hugging Face GPT-2 folder like
final/, with point.json: where the run was (step or round, fraction, epochs) and that
validation. `replace_best` swaps folders so a kill at any moment leaves a whole best/.
"""

import os
import shutil
from typing import Any, Callable

import jax

from collab import hf
from collab import io

PyTree = Any


BEST_DIR = 'best'  # The model one would ship: the lowest pooled validation loss so far.
POINT_JSON = 'point.json'  # In BEST_DIR: where the run was then, and that validation.


def pooled_loss(valid: dict) -> float:
  """Validation loss per token over every participant (log of the pooled perplexity)."""
  return valid['pooled']['loss_sum'] / valid['pooled']['tokens']


def best_point(workdir: str) -> dict | None:
  """WORKDIR/best/point.json; None before the first validation (and in older runs)."""
  _recover_best(workdir)
  path = os.path.join(workdir, BEST_DIR, POINT_JSON)
  return io.read_json(path) if os.path.isfile(path) else None


def keep_best(workdir: str, params: PyTree, model_config, eot_id: int,
              info: dict, tokenizer_dir: str = '') -> dict:
  """Exports `params` to WORKDIR/best if their pooled validation loss (of info['valid'])
  is strictly below the recorded best's; returns the best point after this validation.

  `info` says where the run is: 'step' and 'steps' (or 'round' and 'rounds'),
  'fraction', 'epochs' and 'valid'. Called after every validation. Strict < keeps the
  earlier of equal points; a resumed run replays the validations after its checkpoint
  with the same losses and compares them with the best/ on disk (which holds the best
  from before the checkpoint), so it ends with an uninterrupted run's best.
  """
  point = {**info, 'pooled_loss': pooled_loss(info['valid'])}
  recorded = best_point(workdir)
  if recorded is not None and not point['pooled_loss'] < recorded['pooled_loss']:
    return recorded

  def write(folder):
    hf.export_hf(jax.device_get(params), model_config, folder, bos_token_id=eot_id,
                 eos_token_id=eot_id, tokenizer_dir=tokenizer_dir)
    io.atomic_write_json(os.path.join(folder, POINT_JSON), point)
  replace_best(workdir, write)
  return point


def best_summary(point: dict) -> dict:
  """train.json's 'best': the best point without its per-participant results."""
  keys = ('stage', 'participant', 'step', 'round', 'fraction', 'epochs', 'pooled_loss')
  return {**{k: point[k] for k in keys if k in point},
          'perplexity': point['valid']['pooled']['perplexity']}


def _best_paths(workdir: str) -> tuple:
  """(best/, a whole new best/ not yet in place, the old one being replaced)."""
  return tuple(os.path.join(workdir, n) for n in (BEST_DIR, '.best.new', '.best.old'))


def replace_best(workdir: str, write: Callable[[str], None]) -> None:
  """Replaces WORKDIR/best with the folder `write(folder)` fills, so that a kill at any
  moment leaves a whole best/, old or new, for a resumed run to compare against:
  io.atomic_dir alone removes the old folder before it renames the new one in."""
  best, new, old = _best_paths(workdir)
  _recover_best(workdir)
  with io.atomic_dir(new) as tmp:
    write(tmp)
  if os.path.isdir(best):
    os.replace(best, old)
  os.replace(new, best)
  shutil.rmtree(old, ignore_errors=True)


def _recover_best(workdir: str) -> None:
  """Finishes a replace_best cut short: with best/ gone, the whole new folder (atomic_dir
  names it only once written), else the old one, is put back; leftovers go."""
  best, new, old = _best_paths(workdir)
  if not os.path.isdir(best):
    for folder in (new, old):
      if os.path.isdir(folder):
        os.replace(folder, best)
        break
  for folder in (new, old):
    shutil.rmtree(folder, ignore_errors=True)
