"""Hugging Face GPT-2 interop: round trip, transformers' names and shapes, same logits."""

import dataclasses
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import transformers
from safetensors import numpy as safetensors_numpy

from collab import hf
from collab import model as M

CFG = M.ModelConfig(vocab_size=200, num_layers=2, num_heads=4, d_model=64, d_ff=192,
                    max_len=32, dropout=0.0)
NO_TORCH = ('torch is not installed; `pip install torch==2.13.0` installs a CPU build from '
            "this machine's disk")


@functools.lru_cache
def _params():
  @jax.jit  # One program: leaf by leaf, eager dispatch compiles one per shape.
  def init(key, noise_key):
    tokens_1x4 = jnp.zeros((1, 4), jnp.int32)
    # Random biases and LayerNorm parameters, so a transposed or dropped one shows up.
    params = nn.meta.unbox(M.GPT2(CFG).init(key, tokens_1x4)['params'])
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(noise_key, len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  return init(jax.random.key(0), jax.random.key(1))


def _tokens(shape, vocab=CFG.vocab_size):
  return np.asarray(jax.random.randint(jax.random.key(2), shape, 0, vocab, jnp.int32))


def _logits(params, config, tokens_BxL):
  return np.asarray(jax.jit(M.GPT2(config).apply)({'params': params}, tokens_BxL))


def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    pytest.skip(NO_TORCH)
  return torch


def _assert_same_tree(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_export_then_import_gives_identical_parameters(tmp_path):
  folder = hf.export_hf(_params(), CFG, str(tmp_path / 'gpt2'), eos_token_id=0)
  params, config = hf.import_hf(folder)
  assert config == CFG
  _assert_same_tree(params, _params())
  assert not [p for p in os.listdir(tmp_path) if p.startswith('.')]  # No temporary left.


def test_exported_folder_has_transformers_names_and_shapes(tmp_path):
  folder = hf.export_hf(_params(), CFG, str(tmp_path / 'gpt2'), bos_token_id=0,
                        eos_token_id=0)
  hf_cfg = transformers.GPT2Config.from_pretrained(folder)
  assert (hf_cfg.vocab_size, hf_cfg.n_positions, hf_cfg.n_embd, hf_cfg.n_layer,
          hf_cfg.n_head, hf_cfg.n_inner) == (200, 32, 64, 2, 4, 192)
  assert hf_cfg.activation_function == 'gelu_new' and hf_cfg.layer_norm_epsilon == 1e-5
  assert hf_cfg.tie_word_embeddings and hf_cfg.eos_token_id == 0
  assert json.load(open(os.path.join(folder, 'config.json')))['architectures'] == [
      'GPT2LMHeadModel']
  # transformers' GPT2LMHeadModel state dict, written out from its modeling code.
  d, inner = hf_cfg.n_embd, hf_cfg.n_inner
  expected = {'transformer.wte.weight': (hf_cfg.vocab_size, d),
              'transformer.wpe.weight': (hf_cfg.n_positions, d),
              'transformer.ln_f.weight': (d,), 'transformer.ln_f.bias': (d,)}
  for i in range(hf_cfg.n_layer):
    h = f'transformer.h.{i}.'
    expected.update({
        h + 'ln_1.weight': (d,), h + 'ln_1.bias': (d,), h + 'ln_2.weight': (d,),
        h + 'ln_2.bias': (d,), h + 'attn.c_attn.weight': (d, 3 * d),
        h + 'attn.c_attn.bias': (3 * d,), h + 'attn.c_proj.weight': (d, d),
        h + 'attn.c_proj.bias': (d,), h + 'mlp.c_fc.weight': (d, inner),
        h + 'mlp.c_fc.bias': (inner,), h + 'mlp.c_proj.weight': (inner, d),
        h + 'mlp.c_proj.bias': (d,)})
  with safetensors.safe_open(os.path.join(folder, 'model.safetensors'), 'numpy') as f:
    assert f.metadata() == {'format': 'pt'}
    found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert {f.get_slice(k).get_dtype() for k in f.keys()} == {'F32'}
  assert found == expected


def _numpy_gpt2(t, config, tokens_BxL):
  """transformers' GPT-2 forward on its own tensors: Conv1D is x @ W + b, qkv split."""
  def ln(x, name):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + config.layer_norm_epsilon) * t[name + '.weight'] + t[
        name + '.bias']
  def conv1d(x, name):
    return x @ t[name + '.weight'] + t[name + '.bias']
  B, L = tokens_BxL.shape
  H, K = config.n_head, config.n_embd // config.n_head
  x = t['transformer.wte.weight'][tokens_BxL] + t['transformer.wpe.weight'][:L]
  for i in range(config.n_layer):
    h = f'transformer.h.{i}.'
    q, k, v = np.split(conv1d(ln(x, h + 'ln_1'), h + 'attn.c_attn'), 3, axis=-1)
    q, k, v = (a.reshape(B, L, H, K).transpose(0, 2, 1, 3) for a in (q, k, v))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(K)
    scores = np.where(np.tril(np.ones((L, L), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attn = (probs @ v).transpose(0, 2, 1, 3).reshape(B, L, H * K)
    x = x + conv1d(attn, h + 'attn.c_proj')
    y = conv1d(ln(x, h + 'ln_2'), h + 'mlp.c_fc')
    y = 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y**3)))  # gelu_new
    x = x + conv1d(y, h + 'mlp.c_proj')
  return ln(x, 'transformer.ln_f') @ t['transformer.wte.weight'].T


def test_exported_tensors_mean_what_transformers_reads_them_as(tmp_path):
  """Without torch: transformers' GPT-2 math, in numpy, on the exported tensors."""
  folder = hf.export_hf(_params(), CFG, str(tmp_path / 'gpt2'))
  tensors = {k: v.astype(np.float64)
             for k, v in safetensors_numpy.load_file(f'{folder}/model.safetensors').items()}
  tokens_BxL = _tokens((2, 12))
  expected = _numpy_gpt2(tensors, transformers.GPT2Config.from_pretrained(folder), tokens_BxL)
  np.testing.assert_allclose(_logits(_params(), CFG, tokens_BxL), expected, atol=1e-4, rtol=0)


def test_import_accepts_unprefixed_names_and_mask_buffers(tmp_path):
  """Original GPT-2 checkpoints name tensors `h.0...` and carry `attn.bias` masks."""
  folder = hf.export_hf(_params(), CFG, str(tmp_path / 'gpt2'))
  path = os.path.join(folder, 'model.safetensors')
  tensors = safetensors_numpy.load_file(path)
  old = {k.removeprefix('transformer.'): v for k, v in tensors.items()}
  old['h.0.attn.bias'] = np.tril(np.ones((1, 1, 32, 32), np.float32))
  old['lm_head.weight'] = tensors['transformer.wte.weight']
  safetensors_numpy.save_file(old, path, metadata={'format': 'pt'})
  params, _ = hf.import_hf(folder)
  _assert_same_tree(params, _params())


def test_export_refuses_parameters_of_another_config(tmp_path):
  other = dataclasses.replace(CFG, d_ff=256)
  with pytest.raises(hf.HFFormatError, match=r'mlp/c_fc_kernel has shape \(64, 192\)'):
    hf.export_hf(_params(), other, str(tmp_path / 'gpt2'))
  assert not os.path.exists(tmp_path / 'gpt2')


def test_import_reports_bad_folders(tmp_path):
  with pytest.raises(FileNotFoundError, match='config.json'):
    hf.import_hf(str(tmp_path / 'nothing'))
  folder = hf.export_hf(_params(), CFG, str(tmp_path / 'gpt2'))
  config_path = os.path.join(folder, 'config.json')
  good = json.load(open(config_path))
  json.dump({**good, 'model_type': 'llama'}, open(config_path, 'w'))
  with pytest.raises(hf.HFFormatError, match="only 'gpt2'"):
    hf.import_hf(folder)
  json.dump({**good, 'activation_function': 'relu'}, open(config_path, 'w'))
  with pytest.raises(hf.HFFormatError, match='activation_function'):
    hf.import_hf(folder)
  json.dump({**good, 'n_layer': 3}, open(config_path, 'w'))
  with pytest.raises(hf.HFFormatError, match=r'missing \[.transformer\.h\.2\.'):
    hf.import_hf(folder)
  json.dump({**good, 'n_positions': 64}, open(config_path, 'w'))
  with pytest.raises(hf.HFFormatError, match='wpe.weight has shape'):
    hf.import_hf(folder)
  json.dump(good, open(config_path, 'w'))
  path = os.path.join(folder, 'model.safetensors')
  tensors = safetensors_numpy.load_file(path)
  tensors['lm_head.weight'] = tensors['transformer.wte.weight'] + 1
  safetensors_numpy.save_file(tensors, path, metadata={'format': 'pt'})
  with pytest.raises(hf.HFFormatError, match='untied'):
    hf.import_hf(folder)
  os.remove(path)
  with pytest.raises(FileNotFoundError, match='model.safetensors'):
    hf.import_hf(folder)


def test_logits_equal_transformers_on_exported_folder(tmp_path):
  torch = _torch()
  folder = hf.export_hf(_params(), CFG, str(tmp_path / 'gpt2'))
  peer = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
  tokens_BxL = _tokens((2, 32))
  with torch.no_grad():
    expected = peer(torch.tensor(tokens_BxL, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(_logits(_params(), CFG, tokens_BxL), expected, atol=1e-4,
                             rtol=0)


def test_imports_a_folder_saved_by_transformers(tmp_path):
  torch = _torch()
  torch.manual_seed(0)
  hf_cfg = transformers.GPT2Config(vocab_size=150, n_positions=24, n_embd=32, n_layer=2,
                                   n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  peer = transformers.GPT2LMHeadModel(hf_cfg).eval()
  with torch.no_grad():  # Non-trivial LayerNorm and biases, unlike a fresh init.
    for p in peer.parameters():
      p.add_(0.05 * torch.randn_like(p))
  peer.save_pretrained(str(tmp_path / 'peer'))
  params, config = hf.import_hf(str(tmp_path / 'peer'))
  assert (config.vocab_size, config.max_len, config.d_model, config.d_ff) == (150, 24, 32, 128)
  tokens_BxL = _tokens((2, 24), vocab=150)
  with torch.no_grad():
    expected = peer(torch.tensor(tokens_BxL, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(_logits(params, config, tokens_BxL), expected, atol=1e-4, rtol=0)


def test_padding_rows_are_not_exported_and_imports_pad_them(tmp_path):
  padded_cfg = dataclasses.replace(CFG, vocab_multiple=64)  # 200 -> 256 rows.
  padding = jax.random.normal(jax.random.key(3), (56, CFG.d_model))
  padded = {**_params(), 'wte': jnp.concatenate([_params()['wte'], padding])}
  a = hf.export_hf(padded, padded_cfg, str(tmp_path / 'padded'))
  b = hf.export_hf(_params(), CFG, str(tmp_path / 'plain'))
  for name in ('config.json', 'model.safetensors'):
    with open(os.path.join(a, name), 'rb') as fa, open(os.path.join(b, name), 'rb') as fb:
      assert fa.read() == fb.read(), name
  params, config = hf.import_hf(a, vocab_multiple=64)
  assert config == padded_cfg and params['wte'].shape == (256, CFG.d_model)
  np.testing.assert_array_equal(params['wte'][200:], 0.0)
  tokens_BxL = _tokens((2, 16))
  # Equal up to the matmul's blocking, which depends on the padded width.
  np.testing.assert_allclose(_logits(params, config, tokens_BxL),
                             _logits(_params(), CFG, tokens_BxL), atol=1e-5, rtol=0)


def test_attention_dropout_round_trips_as_attn_pdrop(tmp_path):
  cfg = dataclasses.replace(CFG, dropout=0.1, attention_dropout=0.0)
  folder = hf.export_hf(_params(), cfg, str(tmp_path / 'gpt2'))
  with open(os.path.join(folder, 'config.json'), encoding='utf-8') as f:
    written = json.load(f)
  assert (written['attn_pdrop'], written['resid_pdrop'], written['embd_pdrop']) == (0.0, 0.1, 0.1)
  assert hf.import_hf(folder)[1] == cfg
  same = dataclasses.replace(CFG, dropout=0.1)
  assert hf.import_hf(hf.export_hf(_params(), same, str(tmp_path / 'b')))[1] == same


def test_init_from_a_hugging_face_folder_fits_a_padded_model(tmp_path):
  from collab import checkpoint  # pylint: disable=g-import-not-at-top
  from collab.settings import run  # pylint: disable=g-import-not-at-top
  folder = hf.export_hf(_params(), CFG, str(tmp_path / 'gpt2'))
  padded_cfg = dataclasses.replace(CFG, vocab_multiple=128)
  abstract = nn.meta.unbox(M.abstract_params(padded_cfg))
  params = checkpoint.place_params(run.params_importer(padded_cfg)(folder), abstract, folder)
  assert params['wte'].shape == (256, CFG.d_model)
  with pytest.raises(checkpoint.ParamsMismatchError, match='wte'):
    checkpoint.place_params(run.params_importer(CFG)(folder), abstract, folder)


def test_init_from_refuses_another_vocabulary_padded_to_the_same_rows(tmp_path):
  from collab import checkpoint  # pylint: disable=g-import-not-at-top
  from collab.settings import run  # pylint: disable=g-import-not-at-top
  folder = hf.export_hf(_params(), CFG, str(tmp_path / 'gpt2'))  # 200 -> 256 rows at 64.
  for vocab in (250, 193):
    model_cfg = dataclasses.replace(CFG, vocab_size=vocab, vocab_multiple=64)
    with pytest.raises(checkpoint.ParamsMismatchError,
                       match=f'vocab_size 200 \\(model: {vocab}\\)'):
      run.params_importer(model_cfg)(folder)
