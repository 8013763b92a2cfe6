"""The evaluators, in the order they run and their tables print (collab/evals/interface.py).

collab/evaluate.py walks this tuple for every model of a run and analysis/tables.py asks
each entry for its rows: a new evaluator is a module, its config fields and one entry here.
"""

from collab.evals import fit
from collab.evals.execution import passk
from collab.evals.memorization import clone_audit
from collab.evals.memorization import extractability
from collab.evals.memorization import ranking
from collab.evals.privacy import exposure
from collab.evals.privacy import membership

ALL = (
    fit.EVALUATOR,  # Training loss per participant: the x axis of memorization vs fit.
    passk.EVALUATOR,
    extractability.EVALUATOR,  # Greedy k-extractability of every training block.
    clone_audit.EVALUATOR,  # The paper's measure: sampled >= 6-line clones.
    ranking.EVALUATOR,  # Ranks the clone audit's unprompted samples (after it).
    exposure.EVALUATOR,  # Canaries, when the data has them.
    membership.EVALUATOR,
)


def by_name(names) -> tuple:
  """The evaluators named in `names` (config.eval.snapshot_evals), in ALL's order."""
  unknown = sorted(set(names) - {e.name for e in ALL})
  if unknown:
    raise ValueError(f'Unknown evaluators {unknown}; known: {[e.name for e in ALL]}.')
  return tuple(e for e in ALL if e.name in set(names))
