"""Perplexity of validation blocks, per participant and pooled, from exact sums and counts.

Every block is evaluated exactly once: blocks go in order in fixed-size batches and the
last partial batch is filled with weight-0 rows (which `steps.eval_step` ignores), so the
result does not depend on the batch size beyond float rounding. Per-block sums are added
on the host in float64; the pooled figure is the sum of the participants' sums and
counts, not a mean of their perplexities. Each participant's result also lists the mean
loss of every block (`block_losses`, in block order): analysis bootstraps over blocks
for intervals on perplexity differences (analysis/findings.py).
"""

from typing import Mapping, Optional

from absl import logging
import flax.linen as nn
import jax
import numpy as np
from tqdm import auto as tqdm

from collab import parallel
from collab import steps
from collab.evals.generation import sampling

POOLED = 'pooled'


def _local_batches(blocks_NxL: np.ndarray, batch_size: int):
  """This process's rows of each global batch {tokens, weights}; padding rows weigh 0.

  Process p feeds rows [p * b, (p + 1) * b) of every global batch of `batch_size` rows
  (b = batch_size / processes): each block lands in exactly one process's share, and the
  sums do not depend on where the global array puts it.
  """
  local = batch_size // jax.process_count()
  first = jax.process_index() * local
  for start in range(0, len(blocks_NxL), batch_size):
    n = min(batch_size, len(blocks_NxL) - start)
    mine = range(first, min(first + local, n))
    tokens_BxL = np.zeros((local, blocks_NxL.shape[1]), np.int32)
    tokens_BxL[:len(mine)] = blocks_NxL[start + first:start + first + len(mine)]
    weights_B = np.zeros(local, np.float32)
    weights_B[:len(mine)] = 1.0
    yield {'tokens': tokens_BxL, 'weights': weights_B}


def _check_blocks(name: str, blocks) -> None:
  if name == POOLED:
    raise ValueError(f"A participant may not be named {POOLED!r}: the name is reserved for "
                     'the pooled result.')
  if getattr(blocks, 'ndim', 0) != 2 or blocks.shape[1] < 2:
    raise ValueError(f'Validation blocks of {name!r} must be an [N, L] array with L >= 2, '
                     f'got shape {getattr(blocks, "shape", None)}; load them with '
                     'collab.data.blocks.load_blocks(data_dir, participant, "valid").')


def _summary(loss_sum: float, tokens: int, block_losses=None) -> dict:
  ppl = steps.perplexity(loss_sum, tokens) if tokens > 0 else None
  out = {'loss_sum': float(loss_sum), 'tokens': int(tokens), 'perplexity': ppl}
  if block_losses is not None:
    out['block_losses'] = [float(x) for x in block_losses]
  return out


def row_sums(params, batch: dict, *, model: nn.Module) -> tuple:
  """(loss sum of each row, predictions of each row), padding rows (weight 0) at 0."""
  nll_BxT = steps.token_nll(params, batch['tokens'], model=model, deterministic=True)
  weights_B = batch['weights']
  return nll_BxT.sum(axis=1) * weights_B, weights_B * nll_BxT.shape[1]


def evaluate(params, model: nn.Module, blocks_by_participant: Mapping[str, np.ndarray],
             batch_size: int, *, mesh: Optional[jax.sharding.Mesh] = None, rules=(),
             progress: bool = True) -> dict:
  """{'pooled': {...}, participant: {...}} with 'loss_sum', 'tokens', 'perplexity'.

  `tokens` counts predicted tokens (L - 1 per block). A participant without blocks gets
  perplexity None and a warning. Batches are split over the mesh like training batches
  (collab.parallel; default: every device on 'data') and `batch_size` is rounded up to a
  multiple of the data-parallel size; params already on `mesh` stay as placed.
  """
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
  for name, blocks in blocks_by_participant.items():
    _check_blocks(name, blocks)
  mesh = sampling.default_mesh() if mesh is None else mesh
  shards = parallel.data_parallel_size(parallel.batch_sharding(mesh, rules))
  batch_size = -(-batch_size // shards) * shards
  params = sampling.place_params(params, mesh)
  step = parallel.model_eval_step(row_sums, model, parallel.shardings_of(params), mesh, rules)
  total = sum(-(-len(b) // batch_size) for b in blocks_by_participant.values())
  results, pooled_sum, pooled_tokens = {}, 0.0, 0
  with tqdm.tqdm(total=total, unit='batch', desc='perplexity', disable=not progress) as bar:
    for name, blocks in blocks_by_participant.items():
      sums = []  # Device arrays: fetched once per participant, so dispatch runs ahead.
      for local_batch in _local_batches(blocks, batch_size):
        sums.append(step(params, parallel.shard_batch(mesh, local_batch, rules)))
        bar.update(1)
      host = jax.device_get(sums)
      sums_N = np.concatenate([np.zeros(0)] + [np.asarray(s, np.float64) for s, _ in host])
      counts_N = np.concatenate([np.zeros(0)] + [np.asarray(c, np.float64) for _, c in host])
      real_N = counts_N > 0  # Padding rows predict nothing.
      loss_sum = float(np.sum(sums_N[real_N], dtype=np.float64))
      tokens = int(round(float(counts_N.sum())))
      if tokens == 0:
        logging.warning('Participant %r has no validation blocks; its perplexity is None.',
                        name)
      results[name] = _summary(loss_sum, tokens, sums_N[real_N] / counts_N[real_N])
      pooled_sum, pooled_tokens = pooled_sum + loss_sum, pooled_tokens + tokens
  if pooled_tokens == 0:
    raise ValueError('No validation blocks at all: every participant\'s "valid" split is '
                     'empty. Use a larger data.valid_fraction or more data.')
  results[POOLED] = _summary(pooled_sum, pooled_tokens)
  return results
