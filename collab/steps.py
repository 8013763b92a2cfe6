"""Pure training and evaluation steps: optimizer, state, train_step, eval_step.

State is a plain dict `{"step": int32 scalar, "params": ..., "opt_state": ...}`. Every
function here is pure and jit-able; static choices (model, optimizer, axis name) are
bound with `functools.partial` by the caller, which also applies `jax.jit` or
`jax.pmap` (see collab/parallel.py).

Losses are sums and counts, never means: the gradient is that of
`loss_sum / token_count` over the *global* batch, so it is the same on one device,
under pjit and under pmap (where sums and counts are psum'd).
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from collab import model as model_lib

PyTree = Any

# Parameter names (or name suffixes like 'c_attn_bias') that never get weight decay,
# whatever their rank: GPT2's fused attention bias is [3, H, K], and layers stacked by
# nn.scan would make every LayerNorm scale 2-D.
_NO_DECAY_NAMES = ('bias', 'scale')


class NonFiniteLossError(FloatingPointError, ValueError):
  """The training loss became NaN or infinite."""


def make_schedule(train_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then cosine decay to peak * min_lr_ratio.

  `warmup_steps` is capped at `total_steps`; the cosine reaches its floor at step
  `total_steps` and stays there afterwards.
  """
  if total_steps <= 0:
    raise ValueError(f'total_steps must be positive, got {total_steps}; set '
                     'config.train.steps or config.train.epochs so training has steps.')
  if train_cfg.warmup_steps < 0:
    raise ValueError(f'config.train.warmup_steps must be >= 0, got {train_cfg.warmup_steps}.')
  peak = float(train_cfg.learning_rate)
  floor = peak * float(train_cfg.min_lr_ratio)
  warmup = min(int(train_cfg.warmup_steps), int(total_steps))
  decay = max(int(total_steps) - warmup, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * step / max(warmup, 1)
    progress = jnp.clip((step - warmup) / decay, 0.0, 1.0)
    cosine = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    return jnp.where(step < warmup, warm, cosine)

  return schedule


def _path_names(path) -> list:
  # Only dict keys name parameters; nn.Partitioned boxes add a GetAttrKey('value').
  return [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]


def _decays(path, leaf) -> bool:
  names = _path_names(path)
  if names and (names[-1] in _NO_DECAY_NAMES
                or names[-1].endswith(tuple('_' + n for n in _NO_DECAY_NAMES))):
    return False
  if any('norm' in n.lower() or n.lower().startswith('ln') for n in names):
    return False
  return len(getattr(leaf, 'shape', ())) >= 2


def decay_mask(params: PyTree) -> PyTree:
  """True where AdamW decays: kernels and embeddings, never biases or LayerNorm."""
  return jax.tree_util.tree_map_with_path(_decays, params)


def make_optimizer(train_cfg, total_steps: int) -> optax.GradientTransformation:
  """AdamW (or plain SGD) on the warmup-cosine schedule, after global-norm clipping.

  The learning rate is injected as a hyperparameter so each step can report the value
  it used (`current_lr`). `grad_clip == 0` disables clipping. SGD ('sgd') has no
  momentum and no weight decay; it shares the schedule and clipping.
  """
  schedule = make_schedule(train_cfg, total_steps)
  name = train_cfg.optimizer
  if name == 'adamw':
    inner = optax.inject_hyperparams(optax.adamw, static_args=('mask',))(
        learning_rate=schedule, b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
        weight_decay=train_cfg.weight_decay, mask=decay_mask)
  elif name == 'sgd':
    inner = optax.inject_hyperparams(optax.sgd)(learning_rate=schedule)
  else:
    raise ValueError(f"Unknown config.train.optimizer {name!r}; use 'adamw' or 'sgd'.")
  if train_cfg.grad_clip < 0:
    raise ValueError('config.train.grad_clip must be >= 0 (0 disables), '
                     f'got {train_cfg.grad_clip}.')
  if train_cfg.grad_clip == 0:
    return inner
  return optax.chain(optax.clip_by_global_norm(float(train_cfg.grad_clip)), inner)


def current_lr(opt_state: PyTree) -> jax.Array:
  """The learning rate of the last update (or of step 0 before any update)."""
  # The schedule's own state sits under the same key; the value is the array leaf.
  return optax.tree_utils.tree_get(opt_state, 'learning_rate',
                                   filtering=lambda _, value: hasattr(value, 'dtype'))


def init_state(rng: jax.Array, model: nn.Module, optimizer: optax.GradientTransformation,
               seq_len: int, *, boxed: bool = False) -> dict:
  """Fresh parameters and optimizer state at step 0.

  With `boxed=True` the parameters and the optimizer moments stay wrapped in
  `nn.Partitioned` boxes that carry their logical axis names; that is what
  `parallel.sharded_init` reads to place them (it unboxes the result). Otherwise the
  state holds plain arrays.
  """
  tokens_1xL = jnp.zeros((1, seq_len), jnp.int32)
  params = model.init({'params': rng}, tokens_1xL, deterministic=True)['params']
  state = {'step': jnp.zeros((), jnp.int32), 'params': params,
           'opt_state': optimizer.init(params)}
  return state if boxed else nn.unbox(state)


def _row_weights(batch: dict, tokens_BxL: jax.Array) -> jax.Array:
  weights_B = batch.get('weights')
  if weights_B is None:
    return jnp.ones(tokens_BxL.shape[:1], jnp.float32)
  return weights_B.astype(jnp.float32)


def chunked_nll(x_BxLxD: jax.Array, wte_VxD: jax.Array, labels_BxL: jax.Array,
                config: model_lib.ModelConfig) -> jax.Array:
  """Cross entropy of every position, `config.loss_chunk` positions of every row at a
  time: per chunk the tied LM head, log-sum-exp and label logit, recomputed in the
  backward pass (jax.checkpoint), so only [B, chunk, V] logits exist at once. Chunks run
  along the length: the batch axis (sharded over 'data') stays whole in each."""
  B, L, D = x_BxLxD.shape
  C = min(config.loss_chunk, L)  # A chunk past the row would only add padding.
  pad = -L % C
  x_KxBxCxD = jnp.pad(x_BxLxD, ((0, 0), (0, pad), (0, 0))).reshape(
      B, -1, C, D).transpose(1, 0, 2, 3)
  labels_KxBxC = jnp.pad(labels_BxL, ((0, 0), (0, pad))).reshape(B, -1, C).transpose(1, 0, 2)

  @jax.checkpoint
  def chunk(wte, x_BxCxD, labels_BxC):
    logits_BxCxV = model_lib.unembed(x_BxCxD, wte, config, ('batch', 'length', 'vocab'))
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxCxV, labels_BxC)

  nll_KxBxC = jax.lax.map(lambda xs: chunk(wte_VxD, *xs), (x_KxBxCxD, labels_KxBxC))
  return nll_KxBxC.transpose(1, 0, 2).reshape(B, -1)[:, :L]


def token_nll(params: PyTree, tokens_BxL: jax.Array, *, model: nn.Module,
              deterministic: bool = True, dropout_rng: jax.Array | None = None) -> jax.Array:
  """nll_BxT (T = L - 1), float32: -log p(tokens[:, t + 1] | tokens[:, :t + 1])."""
  if tokens_BxL.ndim != 2 or tokens_BxL.shape[1] < 2:
    raise ValueError(f'batch["tokens"] must be [B, L] with L >= 2, got shape {tokens_BxL.shape}.')
  rngs = {} if dropout_rng is None else {'dropout': dropout_rng}
  # Every position gets a label (the last one a dummy, dropped below) so the [B, L, V]
  # logits are consumed whole: slicing off their last position would copy them.
  labels_BxL = jnp.concatenate([tokens_BxL[:, 1:], tokens_BxL[:, :1]], axis=1)
  config = model.config
  if config.loss_chunk:
    x_BxLxD = model.apply({'params': params}, tokens_BxL, deterministic=deterministic,
                          rngs=rngs, hidden=True)
    nll_BxT = chunked_nll(x_BxLxD, params['wte'], labels_BxL, config)[:, :-1]
  else:
    logits_BxLxV = model.apply({'params': params}, tokens_BxL, deterministic=deterministic,
                               rngs=rngs)
    nll_BxT = optax.softmax_cross_entropy_with_integer_labels(
        logits_BxLxV.astype(jnp.float32), labels_BxL)[:, :-1]
  return nll_BxT


def loss_sums(params: PyTree, batch: dict, *, model: nn.Module, deterministic: bool = True,
              dropout_rng: jax.Array | None = None) -> tuple:
  """Next-token cross entropy: (sum over weighted predictions, number of them).

  Positions 0..L-2 predict tokens 1..L-1; every prediction of a row counts with the
  row's weight (0 for padding rows), so padding never moves the loss or its gradient.
  """
  tokens_BxL = batch['tokens']
  nll_BxT = token_nll(params, tokens_BxL, model=model, deterministic=deterministic,
                      dropout_rng=dropout_rng)
  weights_B = _row_weights(batch, tokens_BxL)
  loss_sum = jnp.sum(nll_BxT * weights_B[:, None])
  token_count = jnp.sum(weights_B) * nll_BxT.shape[1]
  return loss_sum, token_count


def train_step(state: dict, batch: dict, rng: jax.Array, *, model: nn.Module,
               optimizer: optax.GradientTransformation,
               axis_name: str | None = None) -> tuple:
  """One optimizer update on a batch; returns (new state, metrics).

  Metrics are global (summed over `axis_name` under pmap): `loss_sum`, `tokens`,
  `grad_norm` (before clipping) and `lr` (used by this update). A NaN/Inf loss is not
  caught here (steps stay pure); the loop calls `check_finite`.
  """
  dropout_rng = jax.random.fold_in(rng, state['step'])
  if axis_name is not None:  # Each device drops out different units.
    dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))

  def local_sum(params):
    return loss_sums(params, batch, model=model, deterministic=False,
                     dropout_rng=dropout_rng)

  (loss_sum, token_count), grad_sums = jax.value_and_grad(local_sum, has_aux=True)(
      state['params'])
  if axis_name is not None:
    loss_sum, token_count, grad_sums = jax.lax.psum((loss_sum, token_count, grad_sums),
                                                    axis_name)
  # The count does not depend on the parameters, so d(sum/count) = d(sum)/count.
  grads = jax.tree_util.tree_map(lambda g: g / jnp.maximum(token_count, 1.0), grad_sums)
  updates, opt_state = optimizer.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  new_state = {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}
  metrics = {'loss_sum': loss_sum, 'tokens': token_count,
             'grad_norm': optax.tree.norm(grads), 'lr': current_lr(opt_state)}
  return new_state, metrics


def eval_step(params: PyTree, batch: dict, *, model: nn.Module) -> tuple:
  """Deterministic (loss_sum, token_count) of a batch; weights as in `loss_sums`."""
  return loss_sums(params, batch, model=model, deterministic=True)


def perplexity(loss_sum, token_count) -> float:
  """exp(loss_sum / token_count): the one place perplexity is computed."""
  if float(token_count) <= 0:
    raise ValueError('perplexity needs a positive token count; the evaluation set is empty.')
  try:
    return math.exp(float(loss_sum) / float(token_count))
  except OverflowError:
    return math.inf


def check_finite(metrics: dict, step: int) -> None:
  """Raises NonFiniteLossError naming the step when its loss is NaN or infinite."""
  loss_sum = float(metrics['loss_sum'])
  if not math.isfinite(loss_sum):
    raise NonFiniteLossError(
        f'Training loss is {loss_sum} at step {int(step)}; lower config.train.learning_rate, '
        'keep config.train.grad_clip > 0, or check the data for bad tokens.')
