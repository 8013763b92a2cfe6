"""The line under every table that says where its results were measured.

It is built from what results.json and summary.json recorded (collab/provenance.py writes
them), never from the machine that regenerates the tables, so the same results give the
same bytes anywhere. A study resumed on another machine names each machine with its runs;
results from before the record existed say "machine not recorded".
"""

from typing import Sequence

NOT_RECORDED = 'machine not recorded'


def describe(machine: dict | None) -> str | None:
  """'CPU (N cores), accelerator, jax X / jaxlib Y, XLA_FLAGS: ...', or None for a record
  without a CPU (none at all, or the platform/processor/cpus of older summaries)."""
  if not machine or not machine.get('cpu'):
    return None
  parts = [f"{machine['cpu']} ({machine.get('cores', '?')} cores)"]
  if machine.get('accelerator'):
    count = machine.get('devices') or 1
    parts.append(f"{count} x {machine['accelerator']} ({machine.get('platform', '?')})")
  parts.append(f"jax {machine.get('jax', '?')} / jaxlib {machine.get('jaxlib', '?')}")
  parts.append(f"XLA_FLAGS: {machine.get('xla_flags') or 'none'}")
  if machine.get('hugepages'):
    parts.append('transparent huge pages')
  return ', '.join(parts)


def machine_caption(runs: Sequence[dict], summary: dict) -> str:
  """One line: the machine(s) the runs recorded, each with its runs when there are several;
  summary.json's when no run recorded one."""
  by_machine = {}  # Description (None: not recorded) -> run names, in first-seen order.
  for r in runs:
    by_machine.setdefault(describe(r.get('machine')), []).append(r['run'])
  if set(by_machine) == {None}:
    by_machine = {describe(summary.get('machine')): []}
  if len(by_machine) == 1:
    (text, _), = by_machine.items()
    return f'Measured on {text}.' if text else NOT_RECORDED.capitalize() + '.'
  return 'Measured on ' + '; '.join(
      f"{text or NOT_RECORDED} (runs {', '.join(names)})"
      for text, names in by_machine.items()) + '.'
