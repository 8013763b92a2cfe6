"""Per-token log-probabilities of many token sequences under one model, compiled and batched.

Canary exposure (exposure.py) and membership inference (membership.py) both need
log p(x_t | x_<t) for every token of thousands of short sequences. Sequences are grouped
by length into bucket lengths (multiples of LENGTH_BUCKET, capped at the model's context),
right-padded with token 0, and cut into batches of a fixed number of rows (missing rows
all zeros), so one compiled program serves each bucket length. The model is causal, so
right padding never changes the log-probabilities of the real tokens. Batches are split
over the mesh's data axis like evaluation batches (collab.parallel.jit_eval_step).
"""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import auto as tqdm

from collab import parallel
from collab import steps
from collab.evals.generation import sampling
from collab.model import GPT2

LENGTH_BUCKET = 16  # Sequence lengths are rounded up to this: few compilations.


def token_logprobs(params, batch: dict, *, model) -> jnp.ndarray:
  """logprobs_BxT (T = L - 1): log p(tokens[:, t + 1] | tokens[:, :t + 1]), float32."""
  return -steps.token_nll(params, batch['tokens'], model=model)


def token_stats(params, batch: dict, *, model) -> jnp.ndarray:
  """stats_BxTx3: per predicted token, log p(label), and the mean and standard deviation
  of log p(z) for z drawn from the model's next-token distribution (Min-K%++'s mu and
  sigma), float32. Whole [B, L, V] logits: for the short windows membership scores."""
  logits_BxLxV = model.apply({'params': params}, batch['tokens'], deterministic=True)
  logp_BxTxV = jax.nn.log_softmax(logits_BxLxV[:, :-1].astype(jnp.float32), axis=-1)
  labels_BxT = batch['tokens'][:, 1:]
  label_BxT = jnp.take_along_axis(logp_BxTxV, labels_BxT[..., None], axis=-1)[..., 0]
  p_BxTxV = jnp.exp(logp_BxTxV)
  mu_BxT = jnp.sum(p_BxTxV * logp_BxTxV, axis=-1)
  var_BxT = jnp.sum(p_BxTxV * jnp.square(logp_BxTxV - mu_BxT[..., None]), axis=-1)
  return jnp.stack([label_BxT, mu_BxT, jnp.sqrt(var_BxT)], axis=-1)


def bucket_length(n: int, max_len: int) -> int:
  return min(max_len, -(-n // LENGTH_BUCKET) * LENGTH_BUCKET)


def make_scorer(params, model_config, batch_size: int, *, mesh=None, rules=(),
                progress: bool = False, desc: str = 'scoring', fn=token_logprobs) -> Callable:
  """`score(sequences) -> [logprobs_T per sequence]` (T = len - 1) for one model.

  Each sequence is a list of token ids, 2 <= len <= model_config.max_len. `batch_size`
  is rounded up to a multiple of the data-parallel size; params already on `mesh` stay
  where they are. `fn=token_stats` gives [T, 3] per sequence instead (see token_stats).
  """
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
  mesh = sampling.default_mesh() if mesh is None else mesh
  shards = parallel.data_parallel_size(parallel.batch_sharding(mesh, rules))
  rows = -(-batch_size // shards) * shards
  params = sampling.place_params(params, mesh)
  step = parallel.model_eval_step(fn, GPT2(model_config),
                                 parallel.shardings_of(params), mesh, rules)
  max_len = model_config.max_len

  def score(sequences: Sequence[Sequence[int]]) -> list:
    by_length = {}
    for i, seq in enumerate(sequences):
      if not 2 <= len(seq) <= max_len:
        raise ValueError(f'Sequence {i} has {len(seq)} tokens; scoring needs 2 to '
                         f'{max_len} (the model\'s max_len). Truncate it first.')
      by_length.setdefault(bucket_length(len(seq), max_len), []).append(i)
    out = [None] * len(sequences)
    total = sum(-(-len(ix) // rows) for ix in by_length.values())
    with tqdm.tqdm(total=total, unit='batch', desc=desc, disable=not progress) as bar:
      for length, index in sorted(by_length.items()):
        for start in range(0, len(index), rows):
          chunk = index[start:start + rows]
          tokens_BxL = np.zeros((rows, length), np.int32)
          for r, i in enumerate(chunk):
            tokens_BxL[r, :len(sequences[i])] = sequences[i]
          # Every process feeds the same rows, so the first `rows` rows are this batch.
          logprobs_BxT = np.asarray(step(params, parallel.shard_batch(
              mesh, {'tokens': tokens_BxL}, rules)))
          for r, i in enumerate(chunk):
            out[i] = logprobs_BxT[r, :len(sequences[i]) - 1].astype(np.float64)
          bar.update(1)
    return out

  return score
