"""Compiled batched sampling with a KV cache: greedy, temperature, top-k, top-p, penalty.

How a batch is decoded, and why:
- Prompts are sorted by length and batched; each batch is right-padded and prefilled in
  one call (positions 0..S-1 for every row). Row b then decodes from its own length:
  step t feeds its previous token at position len_b - 1 + t (step 0 re-feeds the last
  prompt token, so the prefill never computes vocabulary logits) and samples token t.
  Slots a row's padding wrote are overwritten before any query can see them.
- Decoding is a `lax.while_loop` that exits once every row is done (end-of-text or its
  token budget), run in chunks of `chunk_size` steps. Between chunks the host decodes
  the new text and marks rows that produced a stop string as done (stop strings are
  text, not tokens), records finished rows, and, once at most half the rows are still
  going, gathers them into a smaller batch: done rows stop costing work at chunk
  granularity, and a batch stops as soon as all its rows are done.
- The cache holds only the slots the next chunk can reach, and grows by `_BUCKET`
  slots between chunks: every step's attention reads every slot, so a cache sized for
  the last step would slow every earlier one (a decode compilation per cache length).
- Per-step cost is what matters at a few rows: the tied output projection is read as a
  [D, V] matrix (transposed once per call), greedy is a plain argmax, and on CPU the
  loop uses XLA's own matrix kernels (`decode_loop._CPU_DECODE_OPTIONS`).
- Randomness: the request's row r (prompt i, or prompt i's sample j in `generate_text`)
  draws step t from fold_in(fold_in(key, r), t), so the same key gives the same samples
  whatever the batch size, the device count or the order rows are batched in.
- Context: a row generates min(max_new_tokens, max_len - prompt length) tokens. A prompt
  longer than max_len - 1 tokens keeps its last max_len - 1 tokens (left truncation,
  logged with a count) so at least one token can be generated.
- Devices: rows are split over the mesh like a training batch and params replicated
  (data parallel); the host loop reads rows back, so one call runs in one process.

This module is the host side and the public API; the compiled prefill and decoding loop
are in `decode_loop.py`.
"""

import time
from typing import Any, NamedTuple, Optional, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import auto as tqdm

from collab import parallel
from collab.evals.generation import decode_loop
from collab.evals.generation import decode_text
from collab.evals.generation import processors

cut_at_stop = decode_text.cut_at_stop  # Part of this module's API (memorization uses it).
_BUCKET = 32  # Prompt and cache lengths are rounded up to this, to reuse compilations.


# --- The host side: prompts, batches, stop strings, compaction, progress.

def default_mesh() -> jax.sharding.Mesh:
  """Every device on the 'data' axis (collab.parallel's mesh): sampling is data parallel."""
  return parallel.make_mesh(ml_collections.ConfigDict({'mesh': {'data': -1}}))


def shard_rows(mesh, tree, rules=()):
  """Splits every leaf's rows over the mesh like a training batch; scalars replicated."""
  rows = parallel.batch_sharding(mesh, rules)
  whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shardings = jax.tree_util.tree_map(lambda x: rows if np.ndim(x) else whole, tree)
  return jax.device_put(tree, shardings)  # One call: each transfer has a fixed cost.


def place_params(params, mesh):
  """Unboxed params on `mesh`: kept where placed there (or equivalently), else replicated."""
  params = nn.meta.unbox(params)
  leaves = jax.tree_util.tree_leaves(params)
  if all(isinstance(getattr(x, 'sharding', None), jax.sharding.NamedSharding)
         and x.sharding.mesh == mesh for x in leaves):
    return params
  whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  if all(isinstance(x, jax.Array) and x.sharding.is_equivalent_to(whole, x.ndim)
         for x in leaves):
    return params
  return jax.device_put(params, whole)


def _bucket(n: int, cap: int) -> int:
  return min(cap, -(-n // _BUCKET) * _BUCKET)


def fit_prompts(prompts_tokens, max_len: int, vocab_size: int) -> list:
  """Checks prompts; keeps the last max_len - 1 tokens of longer ones (logged)."""
  fitted, truncated = [], 0
  for i, prompt in enumerate(prompts_tokens):
    p = np.asarray(prompt, np.int64).reshape(-1)
    if p.size == 0:
      raise ValueError(f'prompt {i} is empty; a row needs at least one token to condition '
                       'on (start prompts with the end-of-text token).')
    if p.min() < 0 or p.max() >= vocab_size:
      raise ValueError(f'prompt {i} has token ids outside [0, {vocab_size}): was it encoded '
                       "with this model's tokenizer?")
    if p.size > max_len - 1:
      p, truncated = p[p.size - (max_len - 1):], truncated + 1
    fitted.append(p.astype(np.int32))
  if truncated:
    logging.warning('Left-truncated %d of %d prompts to the last %d tokens (model max_len '
                    '%d leaves room for at least one new token).', truncated,
                    len(fitted), max_len - 1, max_len)
  return fitted


class _Options(NamedTuple):
  """The choices of one `generate` call."""
  model_config: Any
  sp: processors.SamplingParams
  max_new_tokens: int
  eot_id: Optional[int]
  stop_strings: tuple
  tokenizer: Any
  chunk_size: int
  compact: bool
  mesh: jax.sharding.Mesh
  rules: tuple


def _next_chunk(step: int, longest: int, opts: _Options):
  """(cache_len, until): the cache for the chunk of steps [step, until).

  Step t feeds positions up to longest - 1 + t, so a cache of T slots serves steps
  t <= T - longest. The cache grows by buckets and holds at least a bucket of steps;
  a chunk also ends after chunk_size steps, when the host checks stop strings.
  """
  cache_len = _bucket(longest + step + _BUCKET - 1, opts.model_config.max_len)
  until = min(step + opts.chunk_size, opts.max_new_tokens, cache_len - longest + 1)
  return cache_len, until


def _start_batch(params, prompts, rows, key, width, cache_len, opts: _Options):
  """Prefills one batch of rows (padded to `width` slots); returns (state, decode fn)."""
  max_len = opts.model_config.max_len
  lens = [len(prompts[r]) for r in rows]
  S = _bucket(max(lens), max_len)
  prompts_BxS = np.zeros((width, S), np.int32)
  lengths_B, budget_B = np.ones(width, np.int32), np.ones(width, np.int32)
  done_B, ids_B = np.ones(width, bool), np.zeros(width, np.int32)
  for slot, r in enumerate(rows):
    prompts_BxS[slot, :lens[slot]] = prompts[r]
    lengths_B[slot] = lens[slot]
    budget_B[slot] = min(opts.max_new_tokens, max_len - lens[slot])
    done_B[slot], ids_B[slot] = False, r
  pre, dec = decode_loop.compiled(opts.model_config, opts.sp, opts.eot_id,
                                  opts.max_new_tokens, opts.rules,
                                  opts.mesh.devices.flat[0].platform)
  # The key is replicated whatever its shape (a raw uint32[2] key is no row array).
  rows_sh = parallel.batch_sharding(opts.mesh, opts.rules)
  whole = jax.sharding.NamedSharding(opts.mesh, jax.sharding.PartitionSpec())
  args = jax.device_put((prompts_BxS, lengths_B, budget_B, ids_B, done_B, key),
                        (rows_sh,) * 5 + (whole,))
  return pre(params, *args, cache_len=cache_len), dec


def _shrunk_width(num_active: int, width: int, devices: int) -> int:
  """The smallest halving of `width` that holds the active rows and splits over devices."""
  while width // 2 >= max(num_active, 1) and (width // 2) % devices == 0:
    width //= 2
  return width


def _run_batch(params, unembed_DxV, prompts, rows, key, width, opts: _Options, on_row):
  """Decodes one batch in chunks until every row is done; calls on_row(row, tokens).

  The cache grows between chunks to what the next chunk needs: attention reads every
  slot at every step, so a cache sized for the last step would slow all earlier ones.
  """
  lens_B = np.zeros(width, np.int64)
  lens_B[:len(rows)] = [len(prompts[r]) for r in rows]
  step = 0
  state, dec = _start_batch(params, prompts, rows, key, width,
                            _next_chunk(step, lens_B.max(), opts)[0], opts)
  shards = parallel.data_parallel_size(parallel.batch_sharding(opts.mesh, opts.rules))
  slot_rows = np.full(width, -1)
  slot_rows[:len(rows)] = rows
  pending_B = slot_rows >= 0  # Not yet handed to on_row.
  done_B = ~pending_B
  checked_B = np.zeros(width, np.int64)
  while pending_B.any():
    was_active_B = ~done_B
    # Done rows' positions are clamped into the cache: only active rows need room.
    cache_len, until = _next_chunk(step, lens_B[was_active_B].max(), opts)
    if cache_len > state.cache[0]['k'].shape[2]:
      state = decode_loop.grow_cache(state, cache_len)
    state = dec(params, unembed_DxV, state, jnp.int32(until))
    tokens_BxN, done_B = np.asarray(state.tokens_BxN), np.array(state.done_B)
    cuts = decode_text.find_stops(
        tokens_BxN, was_active_B, checked_B, tokenizer=opts.tokenizer,
        stop_strings=opts.stop_strings, eot_id=opts.eot_id) if opts.stop_strings else {}
    if cuts:
      done_B[list(cuts)] = True
      state = state._replace(done_B=shard_rows(opts.mesh, done_B, opts.rules))
    for slot in np.flatnonzero(done_B & pending_B):
      on_row(slot_rows[slot], decode_text.finish_row(tokens_BxN[slot], opts.eot_id,
                                                     cuts.get(slot)))
      pending_B[slot] = False
    num_active = int((~done_B).sum())
    new_width = _shrunk_width(num_active, len(done_B), shards)
    if opts.compact and pending_B.any() and new_width < len(done_B):
      keep = np.concatenate([np.flatnonzero(~done_B), np.flatnonzero(done_B)])[:new_width]
      state = shard_rows(opts.mesh, decode_loop.take_rows(state, jnp.asarray(keep)),
                         opts.rules)
      slot_rows, pending_B, checked_B = slot_rows[keep], pending_B[keep], checked_B[keep]
      done_B, lens_B = done_B[keep], lens_B[keep]
    step = until  # Rows move in lockstep; the loop stops early only once all are done.


def generate(params, model_config, prompts_tokens: Sequence[Sequence[int]], *, key,
             max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, repetition_penalty: float = 1.0,
             eot_id: Optional[int] = None, stop_strings: Sequence[str] = (),
             tokenizer=None, batch_size: int = 32, chunk_size: int = 32,
             compact: bool = True, mesh: Optional[jax.sharding.Mesh] = None,
             rules: Sequence = (), progress: bool = True) -> list:
  """New tokens for each prompt, cut before end-of-text or after a stop string.

  Row i of the result continues prompts_tokens[i] and is drawn with fold_in(key, i), so
  it does not depend on `batch_size`, `chunk_size`, `compact` or the mesh. A row cut at
  a stop string keeps the token that completed it (the text API cuts the text itself).
  `stop_strings` need `tokenizer` (anything with `decode(ids)`). Rows are split over the
  mesh like a training batch (`collab.parallel.batch_sharding(mesh, rules)`; default:
  every device on 'data'); params already on `mesh` stay as placed, others are replicated.
  """
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens must be >= 1, got {max_new_tokens}.')
  if stop_strings and tokenizer is None:
    raise ValueError('stop_strings need a tokenizer to decode the generated text.')
  if batch_size < 1 or chunk_size < 1:
    raise ValueError(f'batch_size and chunk_size must be >= 1, got {batch_size}, '
                     f'{chunk_size}.')
  mesh = default_mesh() if mesh is None else mesh
  if any(d.process_index != jax.process_index() for d in mesh.devices.flat):
    raise ValueError('generate reads every row back on this host, so its mesh must hold '
                     'local devices only: in a multi-host job, call it on each host with '
                     'its share of the prompts and make_mesh(cfg, jax.local_devices()).')
  sp = processors.SamplingParams(float(temperature), int(top_k), float(top_p),
                                 float(repetition_penalty))
  opts = _Options(model_config, sp,
                  int(max_new_tokens), None if eot_id is None else int(eot_id),
                  tuple(stop_strings), tokenizer, int(chunk_size), bool(compact), mesh,
                  tuple(tuple(r) for r in rules))
  prompts = fit_prompts(prompts_tokens, model_config.max_len, model_config.vocab_size)
  shards = parallel.data_parallel_size(parallel.batch_sharding(mesh, opts.rules))
  width = -(-min(batch_size, max(len(prompts), 1)) // shards) * shards
  params = place_params(params, mesh)
  unembed_DxV = decode_loop.transpose(params['wte'])  # Once per call, not per step.
  # Similar lengths share a batch: less padding in the prefill and a shorter cache.
  order = sorted(range(len(prompts)), key=lambda r: len(prompts[r]))
  results = [None] * len(prompts)
  start, new_tokens = time.perf_counter(), 0
  with tqdm.tqdm(total=len(prompts), unit='seq', desc='sampling',
                 disable=not progress) as bar:
    def on_row(row, tokens):
      nonlocal new_tokens
      results[row], new_tokens = tokens, new_tokens + len(tokens)
      bar.update(1)
      bar.set_postfix(tok_s=f'{new_tokens / (time.perf_counter() - start):.0f}')
    # Tracing inside the mesh and rules contexts lets the model's constraints apply.
    with jax.set_mesh(mesh), nn.logical_axis_rules(opts.rules):
      for first in range(0, len(prompts), width):
        _run_batch(params, unembed_DxV, prompts, order[first:first + width], key, width,
                   opts, on_row)
  logging.info('Sampled %d sequences, %d new tokens in %.1fs.', len(prompts), new_tokens,
               time.perf_counter() - start)
  return results


def generate_text(params, model_config, tokenizer, prompts: Sequence[str],
                  num_samples: int = 1, *, key, max_new_tokens: int,
                  stop_strings: Sequence[str] = (), eot_id: Optional[int] = None,
                  **kwargs) -> list:
  """num_samples completions per prompt, each cut at its earliest stop string.

  Sample j of prompt i is request row i * num_samples + j (see `generate`). Prompts are
  encoded as they are (write '<|endoftext|>' in them to condition on it); `eot_id`
  defaults to the tokenizer's end-of-text id. kwargs go to `generate`.
  """
  if num_samples < 1:
    raise ValueError(f'num_samples must be >= 1, got {num_samples}.')
  encoded = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
  rows = [ids for ids in encoded for _ in range(num_samples)]
  if eot_id is None:  # collab's tokenizers make "<|endoftext|>" their eos token.
    eot_id = getattr(tokenizer, 'eos_token_id', None)
  new = generate(params, model_config, rows, key=key, max_new_tokens=max_new_tokens,
                 eot_id=eot_id, stop_strings=stop_strings, tokenizer=tokenizer, **kwargs)
  texts = [cut_at_stop(decode_text.decode(tokenizer, ids), stop_strings) for ids in new]
  return [texts[i * num_samples:(i + 1) * num_samples] for i in range(len(prompts))]
