"""Mesh, sharded init, batch sharding, and equal trajectories on 1 device, pjit, pmap, 2 hosts."""

import functools
import json
import os
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from collab import parallel, steps
from configs import common
from tests import multihost_worker as worker
from tests.conftest import xla_flags

RULES = common.parallel_config().rules
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(**mesh):
  cfg = common.parallel_config()
  cfg.mesh = ml_collections.ConfigDict(mesh or {'clients': 1, 'data': -1, 'model': 1})
  return cfg


def _rel_diff(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return float(np.max(np.abs(a - b) / np.abs(b)))


def test_make_mesh_sizes_and_order():
  mesh = parallel.make_mesh(_cfg())
  assert mesh.axis_names == ('clients', 'data', 'model')
  assert dict(mesh.shape) == {'clients': 1, 'data': 4, 'model': 1}
  assert dict(parallel.make_mesh(_cfg(data=2, model=2)).shape) == {'data': 2, 'model': 2}
  one = parallel.make_mesh(_cfg(), devices=jax.devices()[:1])
  assert one.devices.size == 1


@pytest.mark.parametrize('mesh, match', [
    ({'data': 3, 'model': 1}, 'needs 3 devices but there are 4'),
    ({'data': -1, 'model': -1}, 'at most one -1'),
    ({'data': -1, 'model': 3}, 'multiple of 3'),
    ({'data': 0, 'model': -1}, 'must be positive'),
])
def test_make_mesh_errors(mesh, match):
  with pytest.raises(parallel.MeshError, match=match):
    parallel.make_mesh(_cfg(**mesh))


@pytest.fixture(scope='module')
def tiny():
  _, model, optimizer = worker.tiny_setup()
  init = functools.partial(steps.init_state, model=model, optimizer=optimizer,
                           seq_len=worker.SEQ_LEN)
  return model, optimizer, init


def test_sharded_init_places_params_by_logical_names(tiny):
  _, _, init = tiny
  mesh = parallel.make_mesh(_cfg(data=2, model=2))
  boxed_init = functools.partial(init, boxed=True)
  rng = jax.random.key(0)
  abstract = parallel.abstract_state(boxed_init, mesh, RULES, rng)
  state = parallel.sharded_init(boxed_init, mesh, RULES, rng)
  params, mu = state['params'], state['opt_state'][1].inner_state[0].mu
  # Rules: vocab -> model, mlp -> model, heads -> model, embed/None replicated.
  assert params['wte'].sharding.spec == P('model', None)
  assert params['h_0']['mlp']['c_fc_kernel'].sharding.spec == P(None, 'model')
  assert params['h_0']['attn']['c_attn_kernel'].sharding.spec == P(None, None, 'model', None)
  assert params['ln_f']['scale'].sharding.spec == P(None)
  assert mu['wte'].sharding.spec == P('model', None)  # Adam moments follow their params.
  assert state['step'].sharding.spec == P()
  assert params['wte'].addressable_shards[0].data.shape == (64, 32)  # Half the vocabulary.
  for leaf, a in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(abstract)):
    assert leaf.sharding == a.sharding and leaf.shape == a.shape
  # Sharding changes where values live, not what they are: the same random bits and the
  # same elementwise transforms, though in per-shard programs whose loops may vectorize
  # otherwise, so to a few ulps rather than to the bit (zeros stay exact: atol=0).
  plain = jax.jit(init)(rng)
  for x, y in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(plain)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=0)


def test_abstract_state_requires_logical_names(tiny):
  mesh = parallel.make_mesh(_cfg())
  with pytest.raises(ValueError, match='boxed=True'):
    parallel.abstract_state(tiny[2], mesh, RULES, jax.random.key(0))


def test_shard_batch_splits_rows_and_rejects_indivisible_batches():
  mesh = parallel.make_mesh(_cfg())
  tokens = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
  batch = parallel.shard_batch(mesh, {'tokens': tokens, 'weights': np.ones(8, np.float32)},
                               RULES)
  assert batch['tokens'].sharding.spec == P('data')
  assert {s.data.shape for s in batch['tokens'].addressable_shards} == {(2, 3)}
  np.testing.assert_array_equal(batch['tokens'], tokens)
  with pytest.raises(parallel.BatchNotDivisibleError, match='6 rows .* 4 data-parallel'):
    parallel.shard_batch(mesh, tokens[:6])
  with pytest.raises(parallel.BatchNotDivisibleError, match='multiple of 4'):
    parallel.split_batch({'tokens': tokens[:6]}, 4)
  assert parallel.split_batch({'tokens': tokens}, 4)['tokens'].shape == (4, 2, 3)


@pytest.fixture(scope='module')
def one_device_run():
  losses, state = worker.trajectory(parallel.make_mesh(_cfg(), devices=jax.devices()[:1]), RULES)
  return losses, jax.tree_util.tree_map(np.asarray, state)


def _pmap_run(tiny):
  model, optimizer, init = tiny
  rng = jax.random.key(worker.SEED)
  state = parallel.replicate(jax.jit(init)(rng))
  step = parallel.pmap_train_step(
      functools.partial(steps.train_step, model=model, optimizer=optimizer))
  tokens, weights = worker.global_batches()
  losses = []
  for i in range(worker.NUM_STEPS):
    batch = parallel.split_batch({'tokens': tokens[i], 'weights': weights[i]}, 4)
    state, metrics = step(state, batch, rng)
    metrics = parallel.unreplicate(metrics)
    losses.append(float(metrics['loss_sum']) / float(metrics['tokens']))
  return losses, parallel.unreplicate(state)


def _assert_states_close(a, b):
  """Parameters and Adam moments after NUM_STEPS AdamW steps of differently sharded
  programs: equal to their rounding, but for the attention key bias."""
  # The key bias (c_attn_bias[1]) shifts all of a query's scores alike, which softmax
  # ignores: its true gradient is 0 and its float gradient is noise whose size and sign
  # depend on the reduction order. Adam's m / sqrt(v) scales that noise up to steps of
  # up to ~lr (4e-6 after 5 steps here; nothing bounds it on another CPU), so the key
  # bias and its moments are left out: they cannot change what the model computes.
  # Every other entry has a real gradient; rounding carried through 5 steps stays within
  # 2% of these bounds on this machine (AVX-512 and AVX2 alike).
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    if jax.tree_util.keystr(path).endswith("['attn']['c_attn_bias']"):  # [q, k, v] x H x K
      x, y = np.delete(x, 1, axis=0), np.delete(y, 1, axis=0)
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5, err_msg=jax.tree_util.keystr(path))


def test_pjit_pmap_and_one_device_trajectories_agree(tiny, one_device_run):
  one_losses, one_state = one_device_run
  pjit_losses, pjit_state = worker.trajectory(parallel.make_mesh(_cfg()), RULES)
  pmap_losses, pmap_state = _pmap_run(tiny)
  assert one_losses[-1] < 0.9 * one_losses[0]  # It trains, so the check has teeth.
  assert _rel_diff(pjit_losses, one_losses) <= 1e-5
  assert _rel_diff(pmap_losses, one_losses) <= 1e-5
  # The whole state (parameters and Adam moments) ends up the same, too.
  _assert_states_close(pjit_state, one_state)
  _assert_states_close(pmap_state, one_state)
  assert int(pmap_state['step']) == int(one_state['step']) == worker.NUM_STEPS


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path, one_device_run):
  port, out = _free_port(), str(tmp_path / 'losses.json')
  env = {**os.environ, 'XLA_FLAGS': xla_flags('--xla_force_host_platform_device_count=2'),
         'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': REPO}
  procs = [subprocess.Popen([sys.executable, os.path.join(REPO, 'tests', 'multihost_worker.py'),
                             str(i), '2', str(port), out], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=150)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail('multi-host workers did not finish within 150 s')
  if any(p.returncode for p in procs):
    log = '\n'.join(logs)
    if 'UNIMPLEMENTED' in log or 'not supported' in log.lower():
      pytest.skip(f'This JAX cannot run multi-process on CPU: {log[-2000:]}')
    pytest.fail(f'multi-host workers failed:\n{log[-4000:]}')
  with open(out, encoding='utf-8') as f:
    result = json.load(f)
  assert result['devices'] == 4 and result['local_devices'] == 2
  assert _rel_diff(result['losses'], one_device_run[0]) <= 1e-5


def test_chunked_loss_under_pjit_with_the_vocabulary_sharded(one_device_run):
  """The chunked LM head + loss over a vocabulary split on 'model' trains like one device."""
  one_losses, one_state = one_device_run
  losses, state = worker.trajectory(parallel.make_mesh(_cfg(data=2, model=2)), RULES,
                                    loss_chunk=5)
  assert state['params']['wte'].sharding.spec == P('model', None)
  np.testing.assert_allclose(losses, one_losses, rtol=1e-5)
  _assert_states_close(jax.device_get(state), one_state)


def test_chunked_loss_keeps_the_batch_split_over_data(tiny):
  """Chunks run along the length, so no device gathers the others' rows of the batch."""
  _, optimizer, _ = tiny
  _, model, _ = worker.tiny_setup(loss_chunk=5)
  mesh = parallel.make_mesh(_cfg(data=4, model=1))
  init = functools.partial(steps.init_state, model=model, optimizer=optimizer,
                           seq_len=worker.SEQ_LEN, boxed=True)
  abstract = parallel.abstract_state(init, mesh, RULES, jax.random.key(0))
  replicated = jax.sharding.NamedSharding(mesh, P())
  step = jax.jit(functools.partial(steps.train_step, model=model, optimizer=optimizer),
                 in_shardings=(parallel.shardings_of(abstract),
                               parallel.batch_sharding(mesh, RULES), replicated),
                 out_shardings=(parallel.shardings_of(abstract), replicated))
  batch = parallel.shard_batch(mesh, {'tokens': np.zeros((8, worker.SEQ_LEN), np.int32)})
  with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(RULES)):  # As jit_train_step.
    hlo = step.lower(abstract, batch, jax.random.key(0)).compile().as_text()
  assert 'all-gather' not in hlo and 'all-reduce' in hlo  # Gradients are still summed.
