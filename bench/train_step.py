"""Train-step throughput: collab's jitted train_step against transformers + PyTorch on CPU.

Both sides train the same GPT-2 (collab's initial parameters exported with
collab.hf.export_hf and loaded by transformers' GPT2LMHeadModel, so the weights are
identical) on the same batch, in training mode (dropout on):

  - collab: `steps.train_step` under `jax.jit` with the state donated; AdamW from
    `steps.make_optimizer` (weight decay masked off biases and LayerNorm, global-norm
    clipping, warmup-cosine schedule computed inside the step);
  - PyTorch: `GPT2LMHeadModel(input_ids, labels=input_ids)`, backward,
    `clip_grad_norm_(1.0)`, `torch.optim.AdamW` with the same learning rate, betas, eps
    and weight decay on the same parameters (2-D ones), and the same schedule (LambdaLR).

Each PyTorch side runs in a process of its own (`PeerProcess`), driven step by step from
the bench's: in one process the sides' CPU times mix (the process's clock counts every
thread) and PyTorch's allocations leave glibc's allocator in a state that made collab's
next steps pay 2-3x more kernel time for page faults (docs/BENCHMARKS.md). Each side
first runs `warmup` untimed steps (compilation, allocator), then `rounds` rounds of
`steps` steps that alternate which side goes first, so machine load hits both alike.
Reported: the median step time per side, its CPU time (its own process's, all threads)
per step, and the medians of the per-round ratios by wall and by CPU time. collab runs as
its launchers do: with glibc's transparent huge pages on Linux unless COLLAB_HUGEPAGES=0
(collab/host.py; the recorded runs in docs/BENCHMARKS.md had them); PyTorch always runs as
it does by default, without them (with them its step took ~25% longer here).
Switching sides costs: a side's first steps after the other ran were up to 1.5x slower
on the 2-core machine of docs/BENCHMARKS.md, so rounds are 8 steps long.
Before timing, the deterministic loss of both on the batch is compared (same model, same
numbers). Also the step's model FLOP/s (`model_flops`) as a share of what a plain float32
matrix product reaches on the same machine in the same run (`matmul_flops`), and beside
every table the machine: CPU model, vector extensions, cores, XLA flags, threads.

PyTorch runs as one side per `--threads` count (default: one per core, and 1): on a
shared machine torch's OpenMP threads wait on each other when other jobs hold the cores,
and one thread can be several times faster than all of them, so the peer is compared at
both and the headline is the speed-up over the faster one.

  python -m bench.train_step [--sizes=tiny,small] [--batch=16] [--rounds=3] [--steps=8]
      [--threads=0,1] [--loss_chunk=0] [--record=docs/BENCHMARKS.md]

`--loss_chunk=N` runs collab's step with `model.loss_chunk=N` (a config field that changes
rounding, off by default); bench/profile_step.py shows where the step's time goes.
"""

import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Callable, NamedTuple

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from bench import record
from collab import host
from collab import hf
from collab import model as model_lib
from collab import steps
from configs import common

_SIZES = flags.DEFINE_list('sizes', ['tiny', 'small'], 'Model sizes (configs/common.py).')
_VOCAB = flags.DEFINE_integer('vocab', 8192, 'Vocabulary size (the default BPE size).')
_BATCH = flags.DEFINE_integer('batch', 16, 'Sequences per step (both sides).')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Alternating timed rounds; medians are reported.')
_STEPS = flags.DEFINE_integer('steps', 8, 'Steps per side per round (the first steps after '
                              'the other side ran are slower; long rounds amortize it).')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps per side first.')
_LOSS_CHUNK = flags.DEFINE_integer(
    'loss_chunk', 0, "collab's model.loss_chunk (0: the whole [B, L, V] logits at once, the "
    'default; N: the LM head and cross entropy N positions at a time, recomputed in the '
    'backward pass: a change of rounding, see collab/steps.chunked_nll).')
_THREADS = flags.DEFINE_list('threads', ['0', '1'],
                             'torch thread counts, one PyTorch side each; 0: one per CPU core.')
_RECORD = record.define_flag()
# Set by the bench itself when it starts a PyTorch side in its own process (peer_process).
_PEER = flags.DEFINE_string('peer', '', 'Internal: serve a PyTorch side for this HF folder.')
_PEER_TOKENS = flags.DEFINE_string('peer_tokens', '', 'Internal: the batch, a .npy file.')
_PEER_THREADS = flags.DEFINE_integer('peer_threads', 1, 'Internal: torch threads.')
_REPLY = 'PEER '  # Marks the peer's protocol lines among whatever else it prints.

HEADING = '## Train step (`bench/train_step.py`)'
CPU_HEADING = '### CPU: collab against transformers + PyTorch (`make bench`)'
TOTAL_STEPS = 10_000  # Schedule length; only its shape within the first steps matters.
MATMUL_N = 1024  # Side of the square float32 matrices of the reference product.


def model_config(size: str, vocab: int) -> model_lib.ModelConfig:
  """The size's model at `vocab`, with --loss_chunk."""
  cfg = common.model_config(size)
  return dataclasses.replace(model_lib.ModelConfig.from_config(cfg, vocab),
                             loss_chunk=_LOSS_CHUNK.value)


class CollabSide(NamedTuple):
  run: Callable[[int], None]  # Trains n steps.
  params: dict  # Initial parameters, on the host.
  loss: float  # Deterministic loss of the batch before training.
  hlo: Callable[[], str]  # The compiled step's HLO text.


def collab_side(config, train_cfg, tokens_BxL: np.ndarray) -> CollabSide:
  """collab's jitted train step on the batch, with the state donated."""
  model = model_lib.GPT2(config)
  optimizer = steps.make_optimizer(train_cfg, TOTAL_STEPS)
  state = jax.jit(functools.partial(steps.init_state, model=model, optimizer=optimizer,
                                    seq_len=config.max_len))(jax.random.key(0))
  params = jax.device_get(state['params'])  # A host copy: the state will be donated.
  batch, rng = {'tokens': jnp.asarray(tokens_BxL, jnp.int32)}, jax.random.key(1)
  loss_sum, count = jax.jit(functools.partial(steps.eval_step, model=model))(params, batch)
  step = jax.jit(functools.partial(steps.train_step, model=model, optimizer=optimizer),
                 donate_argnums=(0,))
  box = {'state': state}

  def run(n):
    state = box['state']
    for _ in range(n):
      state, metrics = step(state, batch, rng)
    box['state'] = jax.block_until_ready(state)
    steps.check_finite(metrics, int(state['step']))

  def hlo():
    return step.lower(box['state'], batch, rng).compile().as_text()
  return CollabSide(run, params, float(loss_sum / count), hlo)


def torch_side(folder: str, train_cfg, tokens_BxL: np.ndarray, threads: int):
  """(run(n), deterministic loss of the batch) for transformers + torch.optim.AdamW."""
  import torch  # Only the peer needs torch.
  import transformers
  torch.set_num_threads(threads)
  model = transformers.GPT2LMHeadModel.from_pretrained(folder)
  input_ids = torch.from_numpy(tokens_BxL.astype(np.int64))
  model.eval()
  with torch.no_grad():
    loss0 = float(model(input_ids=input_ids, labels=input_ids).loss)
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  groups = [{'params': [p for p in params if p.dim() >= 2],
             'weight_decay': train_cfg.weight_decay},  # wte, wpe, kernels: as decay_mask.
            {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
  opt = torch.optim.AdamW(groups, lr=train_cfg.learning_rate, betas=(train_cfg.b1, train_cfg.b2),
                          eps=train_cfg.eps)
  # The same warmup-cosine values, tabulated once so the peer pays no JAX call per step.
  factors = np.asarray(jax.vmap(steps.make_schedule(train_cfg, TOTAL_STEPS))(
      jnp.arange(TOTAL_STEPS + 1))) / train_cfg.learning_rate
  sched = torch.optim.lr_scheduler.LambdaLR(
      opt, lambda s: float(factors[min(s, TOTAL_STEPS)]))

  def run(n):
    torch.set_num_threads(threads)  # A process-wide setting: each side sets its own.
    for _ in range(n):
      opt.zero_grad(set_to_none=True)
      loss = model(input_ids=input_ids, labels=input_ids).loss
      loss.backward()
      torch.nn.utils.clip_grad_norm_(params, train_cfg.grad_clip)
      opt.step()
      sched.step()
    if not torch.isfinite(loss):
      raise FloatingPointError(f'PyTorch loss is {float(loss)}.')
  return run, loss0


def model_flops(config, batch: int) -> float:
  """Matrix FLOPs of one training step (forward and backward), PaLM's convention: per token
  6 x matmul parameters (blocks and the tied LM head) + 12 x layers x context x d_model."""
  d, layers, length = config.d_model, config.num_layers, config.max_len
  matmul_params = layers * (4 * d * d + 2 * d * config.d_ff) + config.vocab_size * d
  return batch * length * (6 * matmul_params + 12 * layers * length * d)


def matmul_flops(repeats: int = 10) -> float:
  """FLOP/s of a jitted float32 [N, N] x [N, N] product (best of `repeats`), in process."""
  a = jax.random.normal(jax.random.key(0), (MATMUL_N, MATMUL_N), jnp.float32)
  product = jax.jit(jnp.dot)
  jax.block_until_ready(product(a, a))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(product(a, a))
    best = min(best, time.perf_counter() - start)
  return 2 * MATMUL_N**3 / best


def _timed(fn, n) -> tuple:
  wall, cpu = time.perf_counter(), time.process_time()
  fn(n)
  return time.perf_counter() - wall, time.process_time() - cpu


def race(sides: dict, rounds: int, steps_per_round: int, warmup: int) -> dict:
  """{name: [(wall s per step, CPU s per step) per round]}; `sides[name](n)` trains n steps
  and returns their (wall, CPU) seconds; rounds alternate the order."""
  for timed in sides.values():
    timed(warmup)
  out = {name: [] for name in sides}
  for r in range(rounds):
    for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
      wall, cpu = sides[name](steps_per_round)
      out[name].append((wall / steps_per_round, cpu / steps_per_round))
  return out


def serve_peer(folder: str, tokens_path: str, threads: int) -> None:
  """The peer process: a PyTorch side that trains when told, on stdin, how many steps,
  and answers with its own (wall, CPU) seconds, so neither side's CPU time or memory
  allocator state is counted against the other."""
  run, loss0 = torch_side(folder, common.train_config(), np.load(tokens_path), threads)
  print(_REPLY + json.dumps({'loss': loss0}), flush=True)
  for line in sys.stdin:
    print(_REPLY + json.dumps(_timed(run, int(line))), flush=True)


class PeerProcess:
  """A PyTorch side in its own process (`serve_peer`); call it with n to train n steps."""

  def __init__(self, folder: str, tokens_path: str, threads: int):
    self._proc = subprocess.Popen(
        [sys.executable, '-m', 'bench.train_step', f'--peer={folder}',
         f'--peer_tokens={tokens_path}', f'--peer_threads={threads}'],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=host.without_hugepages(os.environ))  # PyTorch as it runs by default.
    self.loss = self._reply()['loss']

  def _reply(self):
    for line in self._proc.stdout:
      if line.startswith(_REPLY):
        return json.loads(line[len(_REPLY):])
    raise RuntimeError(f'The PyTorch peer exited ({self._proc.wait()}); see its errors above.')

  def __call__(self, n: int) -> tuple:
    self._proc.stdin.write(f'{n}\n')
    self._proc.stdin.flush()
    return tuple(self._reply())

  def close(self) -> None:
    self._proc.stdin.close()
    self._proc.wait()


def thread_counts() -> list:
  """--threads as distinct positive ints (0 is one per CPU core), in the given order."""
  try:
    counts = [int(t) or os.cpu_count() for t in _THREADS.value]
  except ValueError:
    counts = []
  if not counts or min(counts) < 1:
    raise ValueError(f'--threads must list thread counts >= 0, got {_THREADS.value}.')
  return list(dict.fromkeys(counts))


def bench_size(size: str, threads: list) -> list:
  """Builds collab and one PyTorch side per thread count, checks they agree, races them.

  Returns one row per PyTorch side; speed-ups are medians of per-round ratios.
  """
  config = model_config(size, _VOCAB.value)
  train_cfg = common.train_config()
  tokens_BxL = np.random.default_rng(0).integers(
      0, config.vocab_size, (_BATCH.value, config.max_len))
  ours, params, our_loss, _ = collab_side(config, train_cfg, tokens_BxL)
  sides = {'collab': functools.partial(_timed, ours)}
  with tempfile.TemporaryDirectory() as tmp:
    folder = hf.export_hf(params, config, os.path.join(tmp, 'hf'))
    np.save(os.path.join(tmp, 'tokens.npy'), tokens_BxL)
    peers = [PeerProcess(folder, os.path.join(tmp, 'tokens.npy'), n) for n in threads]
    try:
      sides.update(zip(threads, peers))
      times = race(sides, _ROUNDS.value, _STEPS.value, _WARMUP.value)
    finally:
      for peer in peers:
        peer.close()
  their_loss = peers[-1].loss
  reference = matmul_flops()  # Right after the race: the same machine load.
  tokens = _BATCH.value * config.max_len
  collab_s = statistics.median(w for w, _ in times['collab'])
  collab_cpu = statistics.median(c for _, c in times['collab'])
  rows = []
  for n in threads:
    peer_s = statistics.median(w for w, _ in times[n])
    peer_cpu = statistics.median(c for _, c in times[n])
    rows.append({
        'size': size, 'params': model_lib.count_params(params), 'batch': _BATCH.value,
        'context': config.max_len, 'torch_threads': n,
        'loss_collab': our_loss, 'loss_pytorch': their_loss,
        'collab_step_s': collab_s, 'collab_cpu_s': collab_cpu,
        'collab_tok_s': tokens / collab_s, 'pytorch_step_s': peer_s,
        'pytorch_cpu_s': peer_cpu, 'pytorch_tok_s': tokens / peer_s,
        'ratio': statistics.median(t / o for (o, _), (t, _) in zip(times['collab'],
                                                                   times[n])),
        'ratio_cpu': statistics.median(t / o for (_, o), (_, t) in zip(times['collab'],
                                                                       times[n])),
        'model_flops_s': model_flops(config, _BATCH.value) / collab_s,
        'matmul_flops_s': reference,
        'collab_rounds_s': [round(w, 4) for w, _ in times['collab']],
        'pytorch_rounds_s': [round(w, 4) for w, _ in times[n]]})
  return rows


def markdown(rows) -> str:
  lines = ['| model | params | batch x context | torch threads | collab ms/step | PyTorch '
           'ms/step | collab CPU s/step | PyTorch CPU s/step | speed-up wall (CPU time) | '
           'collab GFLOP/s (share of matmul) | loss collab / PyTorch |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(
        f"| {r['size']} | {r['params'] / 1e6:.2f}M | {r['batch']} x {r['context']} | "
        f"{r['torch_threads']} | {1e3 * r['collab_step_s']:,.0f} | "
        f"{1e3 * r['pytorch_step_s']:,.0f} | {r['collab_cpu_s']:.2f} | "
        f"{r['pytorch_cpu_s']:.2f} | {r['ratio']:.2f}x ({r['ratio_cpu']:.2f}x) | "
        f"{r['model_flops_s'] / 1e9:.0f} ({r['model_flops_s'] / r['matmul_flops_s']:.0%} "
        f"of {r['matmul_flops_s'] / 1e9:.0f}) | "
        f"{r['loss_collab']:.5f} / {r['loss_pytorch']:.5f} |")
  return '\n'.join(lines)


def conditions(threads: list) -> str:
  import torch
  import transformers
  return (f'jax {jax.__version__} ({jax.devices()[0].device_kind}), torch {torch.__version__} '
          f'(MKL: {torch.backends.mkl.is_available()}, mkldnn: '
          f'{torch.backends.mkldnn.is_available()}), transformers {transformers.__version__}; '
          f'float32, dropout 0.1, model.loss_chunk {_LOSS_CHUNK.value}, {_ROUNDS.value} '
          f'alternating rounds of {_STEPS.value} steps '
          f'per side after {_WARMUP.value} warm-up steps; medians. Matmul reference: float32 '
          f'{MATMUL_N}^3 under jax.jit, best of 10, right after each race. '
          f'{record.machine("torch " + " and ".join(map(str, threads)) + " (one side each)")}')


def main(argv):
  del argv
  if _PEER.value:
    return serve_peer(_PEER.value, _PEER_TOKENS.value, _PEER_THREADS.value)
  threads = thread_counts()
  rows = []
  for size in _SIZES.value:
    rows.extend(bench_size(size, threads))
    for row in rows[-len(threads):]:
      print(json.dumps(row), flush=True)
  table = markdown(rows)
  print(f'\n{conditions(threads)}\n\n{table}')
  worst = min(r['ratio'] for r in rows)
  worst_cpu = min(r['ratio_cpu'] for r in rows)
  print(f'\nspeed-up over the fastest PyTorch side (smallest of all rows): {worst:.2f}x wall '
        f'(target >= 1.2x), {worst_cpu:.2f}x CPU time (target >= 1.0x)')
  if _RECORD.value:
    text = textwrap.fill(f'{record.stamp()} {conditions(threads)}', 90)
    record.replace_section(_RECORD.value, CPU_HEADING, f'{text}\n\n{table}', parent=HEADING)


if __name__ == '__main__':
  host.use_hugepages()  # As the launchers do (collab/host.py; COLLAB_HUGEPAGES=0: not).
  app.run(main)
