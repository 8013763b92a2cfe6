"""Hugging Face GPT-2 folders: `config.json` + `model.safetensors`, without torch.

transformers' GPT-2 stores attention and MLP weights in its Conv1D layout ([in, out]),
which is ours up to reshapes: c_attn.weight [D, 3D] is our [D, 3, H, K] and
attn.c_proj.weight [D, D] is our [H, K, D]. The output projection is tied to `wte`.
"""

import json
import os
import shutil
from collections.abc import Mapping
from typing import Optional

import flax.linen as nn
import jax
import numpy as np
from safetensors import numpy as safetensors_numpy

from collab import io
from collab.model import ModelConfig, abstract_params

CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
GELU_TANH = ('gelu_new', 'gelu_pytorch_tanh')  # Same function; transformers has both names.
# Causal-mask buffers that older checkpoints carry; they hold no learned weights.
IGNORED_SUFFIXES = ('.attn.bias', '.attn.masked_bias')


class HFFormatError(ValueError):
  """A folder that is not a GPT-2 checkpoint collab can read."""


def _table(config: ModelConfig):
  """(transformers name, our parameter path, transformers shape) for every parameter."""
  D, F = config.d_model, config.d_ff
  rows = [('transformer.wte.weight', ('wte',), (config.vocab_size, D)),
          ('transformer.wpe.weight', ('wpe',), (config.max_len, D))]
  for i in range(config.num_layers):
    hf, ours = f'transformer.h.{i}', f'h_{i}'
    for ln in ('ln_1', 'ln_2'):
      rows += [(f'{hf}.{ln}.weight', (ours, ln, 'scale'), (D,)),
               (f'{hf}.{ln}.bias', (ours, ln, 'bias'), (D,))]
    rows += [(f'{hf}.attn.c_attn.weight', (ours, 'attn', 'c_attn_kernel'), (D, 3 * D)),
             (f'{hf}.attn.c_attn.bias', (ours, 'attn', 'c_attn_bias'), (3 * D,)),
             (f'{hf}.attn.c_proj.weight', (ours, 'attn', 'c_proj_kernel'), (D, D)),
             (f'{hf}.attn.c_proj.bias', (ours, 'attn', 'c_proj_bias'), (D,)),
             (f'{hf}.mlp.c_fc.weight', (ours, 'mlp', 'c_fc_kernel'), (D, F)),
             (f'{hf}.mlp.c_fc.bias', (ours, 'mlp', 'c_fc_bias'), (F,)),
             (f'{hf}.mlp.c_proj.weight', (ours, 'mlp', 'c_proj_kernel'), (F, D)),
             (f'{hf}.mlp.c_proj.bias', (ours, 'mlp', 'c_proj_bias'), (D,))]
  rows += [('transformer.ln_f.weight', ('ln_f', 'scale'), (D,)),
           ('transformer.ln_f.bias', ('ln_f', 'bias'), (D,))]
  return rows


def hf_config(config: ModelConfig, bos_token_id: Optional[int] = None,
              eos_token_id: Optional[int] = None) -> dict:
  """transformers.GPT2Config fields for `config`."""
  out = {
      'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2',
      'vocab_size': config.vocab_size, 'n_positions': config.max_len,
      'n_embd': config.d_model, 'n_layer': config.num_layers, 'n_head': config.num_heads,
      'n_inner': config.d_ff, 'activation_function': 'gelu_new',
      'resid_pdrop': config.dropout, 'embd_pdrop': config.dropout,
      'attn_pdrop': config.attn_dropout, 'layer_norm_epsilon': config.layer_norm_eps,
      'initializer_range': 0.02, 'scale_attn_weights': True,
      'scale_attn_by_inverse_layer_idx': False, 'reorder_and_upcast_attn': False,
      'add_cross_attention': False, 'tie_word_embeddings': True, 'use_cache': True,
      'dtype': 'float32',
  }
  # Written even when None: transformers would otherwise assume GPT-2's 50256.
  out['bos_token_id'] = None if bos_token_id is None else int(bos_token_id)
  out['eos_token_id'] = None if eos_token_id is None else int(eos_token_id)
  return out


def _unwrap(params):
  """Plain numpy leaves from boxed, sharded or {'params': ...}-wrapped parameters."""
  params = nn.meta.unbox(params)
  if set(params) == {'params'}:
    params = params['params']
  return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x), np.float32), params)


def _get(tree, path, what):
  for key in path:
    if not isinstance(tree, Mapping) or key not in tree:
      raise HFFormatError(f'{what} has no parameter {"/".join(path)}; is it a collab GPT2 '
                          'parameter tree for this ModelConfig?')
    tree = tree[key]
  return tree


def export_hf(params, config: ModelConfig, folder: str, *,
              bos_token_id: Optional[int] = None, eos_token_id: Optional[int] = None,
              tokenizer_dir: str = '') -> str:
  """Writes `folder` (replacing it atomically) as a transformers GPT-2 checkpoint.

  Padding rows of the embedding (`config.vocab_multiple`) are not written: they never
  reach a logit, and transformers' vocab_size is the real one. With `tokenizer_dir` (a
  Hugging Face tokenizer folder) its files are copied in too, so the folder alone serves
  AutoTokenizer and GPT2LMHeadModel.from_pretrained.
  """
  params = _unwrap(params)
  shapes = nn.meta.unbox(abstract_params(config))
  tensors = {}
  for hf_name, path, hf_shape in _table(config):
    ours, expected = _get(params, path, 'params'), _get(shapes, path, 'model').shape
    if ours.shape != expected:
      raise HFFormatError(f'params {"/".join(path)} has shape {ours.shape}, but this '
                          f'ModelConfig needs {expected}.')
    if path == ('wte',):
      ours = ours[:config.vocab_size]
    tensors[hf_name] = np.ascontiguousarray(ours.reshape(hf_shape))
  with io.atomic_dir(folder) as tmp:
    io.atomic_write_json(os.path.join(tmp, CONFIG_FILE),
                         hf_config(config, bos_token_id, eos_token_id))
    # transformers refuses safetensors files without format metadata.
    safetensors_numpy.save_file(tensors, os.path.join(tmp, WEIGHTS_FILE),
                                metadata={'format': 'pt'})
    if tokenizer_dir and os.path.isdir(tokenizer_dir):
      for name in sorted(os.listdir(tokenizer_dir)):
        if os.path.isfile(os.path.join(tokenizer_dir, name)) and name != CONFIG_FILE:
          shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(tmp, name))
  return folder


def config_from_hf(hf: dict, folder: str = '', vocab_multiple: int = 1) -> ModelConfig:
  """ModelConfig from a GPT-2 config.json dict; refuses variants our model cannot run."""
  where = f' in {os.path.join(folder, CONFIG_FILE)}' if folder else ''
  if hf.get('model_type') != 'gpt2':
    raise HFFormatError(f"model_type is {hf.get('model_type')!r}{where}; only 'gpt2' "
                        'checkpoints can be imported.')
  activation = hf.get('activation_function', 'gelu_new')
  unsupported = {
      'activation_function': activation not in GELU_TANH,
      'scale_attn_by_inverse_layer_idx': hf.get('scale_attn_by_inverse_layer_idx', False),
      'scale_attn_weights': not hf.get('scale_attn_weights', True),
      'add_cross_attention': hf.get('add_cross_attention', False),
      'tie_word_embeddings': not hf.get('tie_word_embeddings', True),
  }
  bad = [k for k, v in unsupported.items() if v]
  if bad:
    raise HFFormatError(f'unsupported GPT-2 variant{where}: {", ".join(bad)} '
                        f'({ {k: hf.get(k) for k in bad} }); collab runs standard GPT-2 '
                        '(gelu_new, scaled attention, tied embeddings).')
  n_embd = int(hf['n_embd'])
  dropout = float(hf.get('resid_pdrop', 0.1))
  attn_dropout = float(hf.get('attn_pdrop', dropout))
  return ModelConfig(
      vocab_size=int(hf['vocab_size']), num_layers=int(hf['n_layer']),
      num_heads=int(hf['n_head']), d_model=n_embd,
      d_ff=int(hf.get('n_inner') or 4 * n_embd),
      max_len=int(hf.get('n_positions', hf.get('n_ctx', 1024))),
      dropout=dropout, attention_dropout=None if attn_dropout == dropout else attn_dropout,
      layer_norm_eps=float(hf.get('layer_norm_epsilon', 1e-5)),
      vocab_multiple=vocab_multiple)


def _read_tensors(folder: str) -> dict:
  """All tensors of a single-file or sharded safetensors checkpoint."""
  single, index = os.path.join(folder, WEIGHTS_FILE), os.path.join(folder, INDEX_FILE)
  if os.path.exists(single):
    files = [single]
  elif os.path.exists(index):
    files = [os.path.join(folder, f) for f in sorted(set(io.read_json(index)['weight_map']
                                                          .values()))]
  else:
    found = sorted(os.listdir(folder))
    raise FileNotFoundError(
        f'{folder} has no {WEIGHTS_FILE} (or {INDEX_FILE}); found {found}. Only safetensors '
        'checkpoints are read: re-save a PyTorch one with '
        'GPT2LMHeadModel.from_pretrained(...).save_pretrained(folder).')
  tensors = {}
  for f in files:
    tensors.update(safetensors_numpy.load_file(f))
  return tensors


def _canonical_names(tensors: dict) -> dict:
  """Adds the `transformer.` prefix that original GPT-2 checkpoints lack; drops buffers."""
  out = {}
  for name, value in tensors.items():
    if name.endswith(IGNORED_SUFFIXES):  # Not '.c_attn.bias': that needs the dot.
      continue
    if not name.startswith(('transformer.', 'lm_head.')):
      name = 'transformer.' + name
    out[name] = value
  return out


def import_hf(folder: str, vocab_multiple: int = 1):
  """Reads a transformers GPT-2 folder: returns (params as float32 numpy, ModelConfig).

  With `vocab_multiple` > 1 the embedding gets zero padding rows, as a model with that
  ModelConfig.vocab_multiple has (they change no logit).
  """
  config_path = os.path.join(folder, CONFIG_FILE)
  if not os.path.exists(config_path):
    raise FileNotFoundError(f'{config_path} does not exist; import_hf needs a Hugging Face '
                            'GPT-2 folder (config.json + model.safetensors).')
  with open(config_path, encoding='utf-8') as f:
    config = config_from_hf(json.load(f), folder, vocab_multiple)
  tensors = _canonical_names(_read_tensors(folder))
  wte = tensors.get('transformer.wte.weight')
  head = tensors.pop('lm_head.weight', None)
  if head is not None and wte is not None and not np.array_equal(head, wte):
    raise HFFormatError(f'{folder}: lm_head.weight differs from wte.weight; collab ties '
                        'input and output embeddings and cannot import an untied head.')
  table = _table(config)
  missing = [name for name, _, _ in table if name not in tensors]
  unexpected = sorted(set(tensors) - {name for name, _, _ in table})
  if missing or unexpected:
    raise HFFormatError(f'{folder} does not match its config.json: missing {missing[:5]}'
                        f'{" ..." if len(missing) > 5 else ""}, unexpected '
                        f'{unexpected[:5]}{" ..." if len(unexpected) > 5 else ""}.')
  shapes = nn.meta.unbox(abstract_params(config))
  params = {}
  for name, path, hf_shape in table:
    value = tensors[name]
    if tuple(value.shape) != hf_shape:
      raise HFFormatError(f'{folder}: {name} has shape {tuple(value.shape)}, but its '
                          f'config.json implies {hf_shape}.')
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    value = value.astype(np.float32)
    if path == ('wte',):
      value = np.pad(value, ((0, config.padded_vocab - config.vocab_size), (0, 0)))
    node[path[-1]] = value.reshape(_get(shapes, path, 'model').shape)
  return params, config
