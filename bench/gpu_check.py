"""GPU check: model FLOPs utilisation of the full train step for GPT-2 124M in bfloat16.

One short script for a lent GPU (an H100): collab's own `steps.train_step` (AdamW with
weight-decay mask, global-norm clipping at 1.0, warmup-cosine schedule) under `jax.jit`
with the state donated, at context 1024, for a few variants, most telling first:

  - the model as the gpt2 preset trains it: dropout 0.1 everywhere, einsum attention
    ('xla'), vocabulary padded to 50304 (`vocab_multiple` 128);
  - dropout 0.1 on embeddings and residuals but none on attention probabilities, so the
    fused cuDNN attention trains (`attention_dropout=0`, `attention='cudnn'`), with
    dropout masks from jax's 'rbg' PRNG (XLA's RngBitGenerator, cheaper than threefry);
  - the same with the loss in chunks of 64 and of 16 positions of every row (`loss_chunk`:
    1,024 and 256 tokens at batch 16; the LM head recomputed per chunk in the backward
    pass, no [B, L, V] float32 logits);
  - dropout 0 with cuDNN attention: the ceiling without any dropout;
  - the session-1 baseline (vocabulary unpadded, 50257), then the fused variant at twice
    the batch (if time is left).

MFU counts the model's matrix FLOPs only (the PaLM convention): per token
6 * (matmul parameters, LM head included) + 12 * layers * context * d_model, against the
card's dense bfloat16 peak. XLA's own FLOP count of the compiled step is printed beside it.
Prints one JSON object per variant as it finishes (partial results survive a timeout) and
the whole result last; `--out` also writes it.

  python -m bench.gpu_check [--size=gpt2] [--batch=16] [--steps=10] [--budget_s=270]

Imports only collab.model and collab.steps (not configs/, which needs ml_collections):
the lent machine has jax, flax and optax but nothing can be installed there.
"""

import functools
import json
import platform
import sys
import time
import types

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from collab import model as model_lib
from collab import steps

# name -> (layers, heads, d_model, context, vocabulary); mirrors configs/common.MODEL_SIZES
# (GPT-2 vocabulary for gpt2, the default BPE size for tiny, which is for a CPU smoke run).
SIZES = {'gpt2': (12, 12, 768, 1024, 50257), 'tiny': (2, 4, 128, 256, 8192)}
# Dense bfloat16 tensor-core peaks (no sparsity), FLOP/s, by substring of device_kind.
PEAK_BF16 = {'H100': 989.4e12, 'H200': 989.4e12, 'A100': 312e12}
# name -> (ModelConfig overrides, PRNG of the dropout key, batch multiplier). threefry is
# jax's default; 'rbg' draws dropout masks with XLA's RngBitGenerator, cheaper on GPUs.
PADDED = {'vocab_multiple': 128}
FUSED = {**PADDED, 'attention_dropout': 0.0, 'attention': 'cudnn'}
VARIANTS = (
    ('as configured: dropout 0.1, xla attention, vocab 50304', PADDED, 'threefry2x32', 1),
    ('dropout 0.1 (attention 0), cudnn attention, vocab 50304, rbg', FUSED, 'rbg', 1),
    ('... + loss in chunks of 64 positions', {**FUSED, 'loss_chunk': 64}, 'rbg', 1),
    ('... + loss in chunks of 16 positions', {**FUSED, 'loss_chunk': 16}, 'rbg', 1),
    ('dropout 0, cudnn attention, vocab 50304',
     {**PADDED, 'dropout': 0.0, 'attention': 'cudnn'}, 'threefry2x32', 1),
    ('dropout 0.1, xla attention, vocab 50257 (session 1)', {}, 'threefry2x32', 1),
    ('dropout 0.1 (attention 0), cudnn attention, vocab 50304, rbg, 2x batch', FUSED, 'rbg',
     2),
)

_SIZE = flags.DEFINE_enum('size', 'gpt2', sorted(SIZES), 'Model size.')
_BATCH = flags.DEFINE_integer('batch', 16, 'Sequences per step.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per variant (after 2 warm-up steps).')
_BUDGET = flags.DEFINE_float('budget_s', 270.0,
                             'Start no further variant once this many seconds have passed.')
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float32'], 'Compute dtype.')
_OUT = flags.DEFINE_string('out', '', 'Also write the JSON result here.')


def train_cfg():
  """configs/common.train_config's optimizer fields (PROTOCOL values), without ml_collections."""
  return types.SimpleNamespace(optimizer='adamw', learning_rate=5e-4, warmup_steps=10,
                               min_lr_ratio=0.0, weight_decay=0.1, b1=0.9, b2=0.999,
                               eps=1e-8, grad_clip=1.0)


def flops_per_token(config: model_lib.ModelConfig) -> float:
  """Training FLOPs per token: 6 x matmul parameters + 12 x layers x context x width.

  The real vocabulary counts, not the padded one: padding is work, not model FLOPs.
  """
  D, F, L = config.d_model, config.d_ff, config.num_layers
  matmul_params = L * (3 * D * D + D * D + 2 * D * F) + config.vocab_size * D
  return 6.0 * matmul_params + 12.0 * L * config.max_len * D


def peak_flops(device) -> float | None:
  for name, peak in PEAK_BF16.items():
    if name in device.device_kind:
      return peak
  return None


def measure(config: model_lib.ModelConfig, batch_size: int, num_steps: int,
            rng_impl: str) -> dict:
  """Compile, warm up and time `num_steps` train steps; returns the figures."""
  model = model_lib.GPT2(config)
  optimizer = steps.make_optimizer(train_cfg(), total_steps=1000)
  init = jax.jit(functools.partial(steps.init_state, model=model, optimizer=optimizer,
                                   seq_len=config.max_len))
  state = init(jax.random.key(0))
  tokens_BxL = jax.random.randint(jax.random.key(1), (batch_size, config.max_len), 0,
                                  config.vocab_size, jnp.int32)
  batch, rng = {'tokens': tokens_BxL}, jax.random.key(2, impl=rng_impl)
  step = jax.jit(functools.partial(steps.train_step, model=model, optimizer=optimizer),
                 donate_argnums=(0,))
  start = time.perf_counter()
  compiled = step.lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  for _ in range(2):
    state, metrics = compiled(state, batch, rng)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(num_steps):
    state, metrics = compiled(state, batch, rng)
  jax.block_until_ready((state, metrics))
  step_s = (time.perf_counter() - start) / num_steps
  loss = float(metrics['loss_sum']) / float(metrics['tokens'])
  tokens = batch_size * config.max_len
  model_flops = flops_per_token(config) * tokens
  peak = peak_flops(jax.devices()[0])
  return {'batch': batch_size, 'compile_s': round(compile_s, 1), 'step_ms': round(1e3 * step_s, 2),
          'tokens_per_s': round(tokens / step_s), 'model_tflop_per_step': model_flops / 1e12,
          'xla_tflop_per_step': float(cost.get('flops', 0.0)) / 1e12 if cost else None,
          'achieved_tflop_s': round(model_flops / step_s / 1e12, 1),
          'mfu': None if peak is None else round(model_flops / step_s / peak, 4),
          'loss': round(loss, 3), 'finite': bool(np.isfinite(loss))}


def main(argv):
  del argv
  device = jax.devices()[0]
  layers, heads, d_model, context, vocab = SIZES[_SIZE.value]
  result = {'device': device.device_kind, 'platform': device.platform,
            'jax': jax.__version__, 'python': platform.python_version(),
            'size': _SIZE.value, 'batch': _BATCH.value, 'context': context,
            'dtype': _DTYPE.value, 'peak_tflop_s': (peak_flops(device) or 0) / 1e12,
            'variants': {}}
  print(json.dumps({k: v for k, v in result.items() if k != 'variants'}), flush=True)
  start = time.perf_counter()
  for name, overrides, rng_impl, batch_times in VARIANTS:
    config = model_lib.ModelConfig(
        vocab_size=vocab, num_layers=layers, num_heads=heads, d_model=d_model,
        d_ff=4 * d_model, max_len=context, dtype=_DTYPE.value, **overrides)
    if time.perf_counter() - start > _BUDGET.value:
      result['variants'][name] = {'skipped': f'over the {_BUDGET.value:.0f} s budget'}
    elif config.attention == 'cudnn' and device.platform != 'gpu':
      result['variants'][name] = {'skipped': 'cudnn attention needs an NVIDIA GPU'}
    else:
      try:
        result['variants'][name] = measure(config, batch_times * _BATCH.value, _STEPS.value,
                                           rng_impl)
      except Exception as e:  # pylint: disable=broad-except
        # One failing variant (say, cuDNN missing) must not lose the others' figures.
        result['variants'][name] = {'error': f'{type(e).__name__}: {str(e)[:500]}'}
    print(json.dumps({name: result['variants'][name]}), flush=True)
  print(json.dumps(result, indent=1))
  if _OUT.value:
    with open(_OUT.value, 'w', encoding='utf-8') as f:
      json.dump(result, f, indent=1)
  failed = [n for n, v in result['variants'].items() if 'error' in v]
  if failed:
    sys.exit(f'variants failed: {failed}')


if __name__ == '__main__':
  app.run(main)
