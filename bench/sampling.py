"""Sampling throughput: collab's compiled KV-cache decoding against transformers' generate.

Both sides run the same weights (collab params exported with collab.hf.export_hf and
loaded by transformers' GPT2LMHeadModel), the same batch of equal-length prompts, greedy
decoding and exactly `new_tokens` new tokens per row (no early stop), on this machine's
CPU, in the same process. Each side runs once untimed (compilation, allocator warm-up),
then `repeats` timed runs; the best is reported. Also reports how many rows produce
identical tokens on both sides, a check that the two run the same model. Beside wall
time, the process's CPU time per batch (all threads) of each side's best run, and beside
the table the machine (CPU model, vector extensions, cores, XLA flags, threads).

  python -m bench.sampling [--sizes=tiny,small] [--batch=8] [--prompt_len=64]
      [--new_tokens=128] [--repeats=10] [--torch_device=cpu] [--record=FILE]
"""

import json
import os
import platform
import tempfile
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import numpy as np

from bench import record
from collab import hf
from collab import model as model_lib
from collab.evals.generation import sampling
from configs import common

_SIZES = flags.DEFINE_list('sizes', ['tiny', 'small'], 'Model sizes (configs/common.py).')
_VOCAB = flags.DEFINE_integer('vocab', 8192, 'Vocabulary size (the default BPE size).')
_BATCH = flags.DEFINE_integer('batch', 8, 'Prompts per batch (both sides).')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 64, 'Tokens per prompt.')
_NEW = flags.DEFINE_integer('new_tokens', 128, 'New tokens per row (min = max).')
_REPEATS = flags.DEFINE_integer('repeats', 10, 'Timed runs per side; the best counts.')
_TORCH_DEVICE = flags.DEFINE_string('torch_device', 'cpu', "transformers' device: cpu or cuda.")
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the weights and prompts.')
_RECORD = record.define_flag()

HEADING = '## Sampling (`bench/sampling.py`)'
# --record rewrites only this subsection: the section's analysis above it is prose.
LATEST_HEADING = '### Latest run of `python -m bench.sampling`'


def peaked_params(config: model_lib.ModelConfig, seed: int):
  """Random weights with a peaked next-token distribution (greedy paths are not ties)."""
  shapes = nn.meta.unbox(model_lib.abstract_params(config))
  leaves = jax.tree_util.tree_flatten_with_path(shapes)[0]
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  arrays = [(1.0 if 'wte' in jax.tree_util.keystr(path) else 0.1)
            * jax.random.normal(k, leaf.shape) for k, (path, leaf) in zip(keys, leaves)]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shapes), arrays)


def timed(fn):
  """(wall seconds, CPU seconds of this process: all threads, both libraries), output."""
  wall, cpu = time.perf_counter(), time.process_time()
  out = fn()
  return (time.perf_counter() - wall, time.process_time() - cpu), out


def ours_fn(params, config, prompts_BxP, new_tokens):
  def fn():
    return sampling.generate(params, config, prompts_BxP.tolist(), key=jax.random.key(0),
                             max_new_tokens=new_tokens, temperature=0.0,
                             batch_size=len(prompts_BxP), progress=False)
  return fn


def transformers_fn(folder, prompts_BxP, new_tokens, device):
  import torch  # Only the benchmark needs torch.
  import transformers
  model = transformers.GPT2LMHeadModel.from_pretrained(folder).to(device).eval()
  input_ids = torch.tensor(prompts_BxP, dtype=torch.long, device=device)

  def fn():
    with torch.inference_mode():
      out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                           do_sample=False, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, pad_token_id=0, use_cache=True)
    return out[:, prompts_BxP.shape[1]:].tolist()  # .tolist() waits for the device.
  return fn


def race(fns: dict, repeats: int) -> dict:
  """One untimed run each, then `repeats` rounds that alternate sides (load hits both).

  Returns {name: (first run's wall s, best wall s, best CPU s, output)}.
  """
  first = {name: timed(fn) for name, fn in fns.items()}
  wall = {name: float('inf') for name in fns}
  cpu = dict(wall)
  for _ in range(repeats):
    for name, fn in fns.items():
      (w, c), _ = timed(fn)
      wall[name], cpu[name] = min(wall[name], w), min(cpu[name], c)
  return {name: (first[name][0][0], wall[name], cpu[name], first[name][1]) for name in fns}


def bench_size(size: str) -> dict:
  layers, heads, d_model, max_len = common.MODEL_SIZES[size]
  config = model_lib.ModelConfig(vocab_size=_VOCAB.value, num_layers=layers,
                                 num_heads=heads, d_model=d_model, d_ff=4 * d_model,
                                 max_len=max_len, dropout=0.0)
  if _PROMPT_LEN.value + _NEW.value > max_len:
    raise ValueError(f'prompt_len + new_tokens = {_PROMPT_LEN.value + _NEW.value} exceeds '
                     f'the {size} model max_len {max_len}; lower them.')
  params = peaked_params(config, _SEED.value)
  rng = np.random.default_rng(_SEED.value)
  prompts_BxP = rng.integers(0, config.vocab_size, (_BATCH.value, _PROMPT_LEN.value))
  with tempfile.TemporaryDirectory() as tmp:
    folder = hf.export_hf(params, config, os.path.join(tmp, 'hf'))
    results = race({'ours': ours_fn(params, config, prompts_BxP, _NEW.value),
                    'theirs': transformers_fn(folder, prompts_BxP, _NEW.value,
                                              _TORCH_DEVICE.value)}, _REPEATS.value)
  (ours_first, ours_s, ours_cpu, ours), (hf_first, hf_s, hf_cpu, theirs) = (
      results['ours'], results['theirs'])
  tokens = _BATCH.value * _NEW.value
  return {
      'size': size, 'params': model_lib.count_params(params), 'batch': _BATCH.value,
      'prompt_len': _PROMPT_LEN.value, 'new_tokens': _NEW.value,
      'collab_tok_s': tokens / ours_s, 'transformers_tok_s': tokens / hf_s,
      'speedup': hf_s / ours_s, 'speedup_cpu_time': hf_cpu / ours_cpu,
      'collab_cpu_s': ours_cpu, 'transformers_cpu_s': hf_cpu,
      'collab_first_run_s': ours_first,
      'transformers_first_run_s': hf_first,
      'identical_rows': sum(a == b for a, b in zip(ours, theirs)),
  }


def markdown(rows) -> str:
  lines = ['| model | params | batch | prompt | new | collab tok/s | transformers tok/s '
           '| collab CPU ms/batch | transformers CPU ms/batch | speedup wall (CPU time) '
           '| collab 1st run (s) | identical rows |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f"| {r['size']} | {r['params'] / 1e6:.1f}M | {r['batch']} | "
                 f"{r['prompt_len']} | {r['new_tokens']} | {r['collab_tok_s']:.0f} | "
                 f"{r['transformers_tok_s']:.0f} | {1e3 * r['collab_cpu_s']:.0f} | "
                 f"{1e3 * r['transformers_cpu_s']:.0f} | {r['speedup']:.1f}x "
                 f"({r['speedup_cpu_time']:.1f}x) | "
                 f"{r['collab_first_run_s']:.1f} | {r['identical_rows']}/{r['batch']} |")
  return '\n'.join(lines)


def main(argv):
  del argv
  import torch
  rows = [bench_size(size) for size in _SIZES.value]
  versions = (f'jax {jax.__version__} on {jax.devices()[0].device_kind}, torch '
              f'{torch.__version__} on {_TORCH_DEVICE.value} ({torch.get_num_threads()} '
              f'threads); best of {_REPEATS.value} alternating rounds per side. '
              f'{record.machine(f"torch {torch.get_num_threads()}")}')
  print(f'# {platform.machine()}, {os.cpu_count()} cores, {versions}')
  print(markdown(rows))
  print(json.dumps(rows))
  if _RECORD.value:
    record.replace_section(_RECORD.value, LATEST_HEADING,
                           f'{record.stamp()} {versions}\n\n{markdown(rows)}',
                           parent=HEADING)


if __name__ == '__main__':
  # No collab.host.use_hugepages(): transformers runs in this process too, and glibc's
  # huge pages slowed PyTorch's train step by ~25% (docs/BENCHMARKS.md).
  app.run(main)
