"""The compiled part of sampling: prefill a KV cache, then a while_loop of decode steps.

`compiled` jits `prefill` and `decode` once per model and sampling setting; `grow_cache`
and `take_rows` resize a `DecodeState` between chunks. `sampling` holds the host side
(batches, stop strings, compaction) and the public API; its docstring says why.
"""

import functools
from typing import Any, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp

from collab import model as model_lib
from collab.evals.generation import decode_text
from collab.evals.generation import processors


class DecodeState(NamedTuple):
  """Everything the loop carries; every leaf but `step` has the batch as axis 0."""
  cache: Any  # collab.model cache, [B, H, T, K] per layer.
  last_B: jax.Array  # Token fed at the next step.
  lengths_B: jax.Array  # Prompt lengths.
  budget_B: jax.Array  # Tokens this row may generate.
  keys_B: jax.Array  # Per-row keys (fold_in of the request's key and row id).
  done_B: jax.Array
  seen_BxV: jax.Array  # Tokens already present (prompt + generated), for the penalty.
  tokens_BxN: jax.Array  # Generated tokens; PAD where the row was already done.
  step: jax.Array  # Scalar: tokens generated so far (rows move in lockstep).


def prefill(params, prompts_BxS, lengths_B, budget_B, ids_B, done_B, key, *, model,
            cache_len, max_new_tokens, track_seen):
  """Writes every prompt's keys and values in one call; returns the loop's first state.

  Row b draws from fold_in(key, ids_B[b]) (its row in the request).
  """
  B, S = prompts_BxS.shape
  keys_B = jax.vmap(jax.random.fold_in, (None, 0))(key, ids_B)
  cache = model_lib.init_cache(model.config, B, cache_len)
  # Only the cache is used: XLA drops the vocabulary projection of the prefill.
  _, cache = model.apply({'params': params}, prompts_BxS, cache=cache)
  valid_BxS = jnp.arange(S)[None, :] < lengths_B[:, None]
  V = model.config.vocab_size if track_seen else 1
  ids_BxS = jnp.where(valid_BxS, prompts_BxS, V) if track_seen else jnp.zeros_like(
      prompts_BxS)
  seen_BxV = jnp.zeros((B, V), bool).at[jnp.arange(B)[:, None], ids_BxS].set(
      True, mode='drop')
  last_B = jnp.take_along_axis(prompts_BxS, (lengths_B - 1)[:, None], axis=1)[:, 0]
  return DecodeState(
      cache=cache, last_B=last_B, lengths_B=lengths_B, budget_B=budget_B, keys_B=keys_B,
      done_B=done_B, seen_BxV=seen_BxV,
      tokens_BxN=jnp.full((B, max_new_tokens), decode_text.PAD, jnp.int32),
      step=jnp.int32(0))


def _decode_step(params, unembed_DxV, s: DecodeState, *, model, sp, eot_id):
  """Feeds each row's last token at its own position and samples the next one."""
  B, T = s.last_B.shape[0], s.cache[0]['k'].shape[2]
  # Done rows keep running (fixed shapes); clamping keeps their writes inside the cache.
  pos_B = jnp.minimum(s.lengths_B - 1 + s.step, T - 1)
  logits_Bx1xV, cache = model.apply({'params': params}, s.last_B[:, None],
                                    positions_BxL=pos_B[:, None], cache=s.cache,
                                    unembed_DxV=unembed_DxV)
  step_keys_B = (None if sp.temperature == 0.0 else
                 jax.vmap(jax.random.fold_in, (0, None))(s.keys_B, s.step))
  tok_B = processors.sample_tokens(logits_Bx1xV[:, 0], s.seen_BxV, step_keys_B, sp)
  active_B = ~s.done_B
  tok_B = jnp.where(active_B, tok_B, decode_text.PAD)
  seen_BxV = s.seen_BxV
  if sp.repetition_penalty != 1.0:
    seen_BxV = seen_BxV.at[jnp.arange(B), tok_B].set(True, mode='drop')
  done_B = s.done_B | (s.step + 1 >= s.budget_B)
  if eot_id is not None:
    done_B = done_B | (tok_B == eot_id)
  return s._replace(cache=cache, last_B=jnp.where(active_B, tok_B, s.last_B),
                    done_B=done_B, seen_BxV=seen_BxV, step=s.step + 1,
                    tokens_BxN=jax.lax.dynamic_update_slice(
                        s.tokens_BxN, tok_B[:, None], (0, s.step)))


def decode(params, unembed_DxV, state: DecodeState, until, *, model, sp, eot_id):
  """Steps until `state.step == until` or every row is done.

  `unembed_DxV` is params['wte'].T (see GPT2). The cache must hold every active row's
  position up to step `until` - 1.
  """
  step = functools.partial(_decode_step, params, unembed_DxV, model=model, sp=sp,
                           eot_id=eot_id)
  return jax.lax.while_loop(lambda s: (s.step < until) & ~jnp.all(s.done_B), step, state)


# XLA:CPU hands matrix products to its YNNPACK library by default. At the few rows of a
# decoding step XLA's own (Eigen) kernels are faster (-17% time per token for the
# `small` model, 2 cores); YNNPACK stays on for reductions (softmax, argmax), where it
# is faster. An option this XLA does not know turns this off (see `_decode_options`).
_CPU_DECODE_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_REDUCE'}


@functools.lru_cache(maxsize=None)
def _decode_options(platform: str) -> dict:
  """Compiler options for the decoding loop on `platform`, if this XLA accepts them."""
  if platform != 'cpu':
    return {}
  try:
    jax.jit(lambda x: x + 1, compiler_options=_CPU_DECODE_OPTIONS).lower(
        jax.ShapeDtypeStruct((), jnp.float32)).compile()
  except jax.errors.JaxRuntimeError:  # An XLA without this option or value.
    logging.info('XLA rejected %s; decoding with its default options.',
                 _CPU_DECODE_OPTIONS)
    return {}
  return _CPU_DECODE_OPTIONS


@functools.lru_cache(maxsize=None)
def compiled(model_config, sp, eot_id, max_new_tokens, rules=(), platform='cpu'):
  """jit'd prefill (cache_len static) and decode for one setting; jit caches shapes.

  `rules` is only a cache key: flax's logical-axis rules shape the trace but are not
  part of jit's own cache key.
  """
  model = model_lib.GPT2(model_config)
  pre = jax.jit(functools.partial(prefill, model=model, max_new_tokens=max_new_tokens,
                                  track_seen=sp.repetition_penalty != 1.0),
                static_argnames='cache_len')
  dec = jax.jit(functools.partial(decode, model=model, sp=sp, eot_id=eot_id),
                donate_argnums=2, compiler_options=_decode_options(platform) or None)
  return pre, dec


@functools.partial(jax.jit, static_argnames='cache_len')
def grow_cache(state: DecodeState, cache_len: int) -> DecodeState:
  """The state with every cache leaf padded to `cache_len` slots (new slots unwritten)."""
  def pad(x_BxHxTxK):
    return jnp.pad(x_BxHxTxK, ((0, 0), (0, 0), (0, cache_len - x_BxHxTxK.shape[2]), (0, 0)))
  return state._replace(cache=jax.tree_util.tree_map(pad, state.cache))


transpose = jax.jit(jnp.transpose)


@jax.jit
def take_rows(state: DecodeState, rows_B):
  """Gathers the rows of a state (to shrink a batch whose other rows are done)."""
  step = state.step
  state = jax.tree_util.tree_map(lambda x: x[rows_B], state._replace(step=None))
  return state._replace(step=step)
