"""Every experiment config loads and builds its model; the paper's traces at GPT-2 scale."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import pytest

from collab import model as model_lib
from collab import steps
from collab.settings import run
from configs import default, many_clients, paper, privacy


@pytest.mark.parametrize('get_config', [default.get_config, many_clients.get_config,
                                        paper.get_config, privacy.get_config])
def test_config_builds_its_model(get_config):
  config = get_config()
  run.check_config(config)
  cfg = model_lib.ModelConfig.from_config(config.model, config.data.tokenizer.vocab_size)
  assert cfg.max_len >= config.data.seq_len


@pytest.mark.parametrize('loss_chunk', [0, 64])
def test_paper_train_step_traces_at_gpt2_scale(loss_chunk):
  """GPT-2 124M at context 1024 and the paper's batch, traced (not run): shapes, padding,
  dtypes and the chunked loss hold at the scale the config is for."""
  config = paper.get_config()
  cfg = dataclasses.replace(
      model_lib.ModelConfig.from_config(config.model, config.data.tokenizer.vocab_size),
      loss_chunk=loss_chunk)
  assert (cfg.vocab_size, cfg.padded_vocab, cfg.max_len, cfg.dtype) == (
      50257, 50304, 1024, 'bfloat16')
  model = model_lib.GPT2(cfg)
  optimizer = steps.make_optimizer(config.train, 1000)
  state = jax.eval_shape(functools.partial(steps.init_state, model=model,
                                           optimizer=optimizer, seq_len=cfg.max_len),
                         jax.random.key(0))
  assert model_lib.count_params(state['params']) == 124_439_808 + 47 * 768
  batch = {'tokens': jax.ShapeDtypeStruct((config.train.batch_size, cfg.max_len), jnp.int32)}
  new_state, metrics = jax.eval_shape(
      functools.partial(steps.train_step, model=model, optimizer=optimizer), state, batch,
      jax.random.key(1))
  assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
  assert metrics['loss_sum'].dtype == jnp.float32
  assert {x.dtype for x in jax.tree_util.tree_leaves(new_state['params'])} == {jnp.dtype('float32')}


@pytest.mark.parametrize('get_config', [default.get_config, paper.get_config,
                                        privacy.get_config])
def test_study_configs_expand_into_their_runs(get_config):
  """A study config names only runs it has (snapshots, clone-audited snapshots, held-out
  sources of its own organizations): launch.study would stop at once otherwise."""
  from collab import study
  config = get_config()
  names = [s.name for s in study.expand(config)]
  assert 'centralized' in names
  if config.study.heldout_sources:
    assert study.heldout_data_config(config, '/nowhere/data') is not None
