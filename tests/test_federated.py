"""Federated training: server optimizers, client rounds (vmap = loop = sharded), resume."""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from collab import checkpoint
from collab import parallel
from collab import steps
from collab.data import blocks as blocks_lib
from collab.settings import clients
from collab.settings import federated
from collab.settings import rounds
from collab.settings import run
from collab.settings import server as server_lib
from configs import common
from tests.conftest import tiny_run_config, xla_flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, L, B = 300, 32, 8  # The tiny config's vocabulary, block length and batch.


@pytest.fixture(scope='module', autouse=True)
def compile_cache(tmp_path_factory):
  """XLA executables cached on disk while this module runs (and for its subprocesses).

  Many runs here build the same tiny programs; compiling dominates their time on CPU.
  A cached executable is the compiled one, so results are unchanged.
  """
  from jax.experimental.compilation_cache import compilation_cache
  folder = str(tmp_path_factory.getbasetemp() / 'xla_cache')
  names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs')
  old = [getattr(jax.config, n) for n in names]
  for name, value in zip(names, (folder, 0.0)):
    jax.config.update(name, value)
  compilation_cache.reset_cache()
  yield folder
  for name, value in zip(names, old):
    jax.config.update(name, value)
  compilation_cache.reset_cache()


def _cfg(**federated_overrides):
  config = tiny_run_config('unused')
  config.model.num_layers = 1  # Compiling dominates these tests; one block is enough.
  config.federated.local_epochs = 1.0
  # The attention key bias has a zero gradient in exact arithmetic (softmax ignores a
  # shift shared by a row); Adam's eps=1e-8 would turn its float noise, which differs
  # between equally valid summation orders, into full-size steps.
  config.train.eps = 1e-4
  for k, v in federated_overrides.items():
    setattr(config.federated, k, v)
  return config


def _blocks(sizes=(24, 40, 56), seed=0):
  """Unequal clients: 3, 5 and 7 batches of 8 blocks; tokens from a few ids, learnable."""
  rng = np.random.default_rng(seed)
  return {f'c{i}': rng.integers(0, 20, (n, L)).astype(np.uint16) for i, n in enumerate(sizes)}


def _mesh(config, devices=1):
  return parallel.make_mesh(config.parallel, jax.devices()[:devices])


def _rounds(config, train, mesh, num_rounds=2, init=None):
  """`num_rounds` rounds as federated.fit runs them: (initial state, final state, metrics).

  `init` (host arrays) replaces the fresh initial state, saving its compilation.
  """
  plan = federated.make_plan(config, train, L)
  model, _ = run.make_model(config, {'vocab_size': V})
  optimizer = steps.make_optimizer(config.train, plan.rounds * plan.steps_per_round)
  init_key, data_seed, train_key = run.seeds(config.seed)
  programs = rounds.make_programs(
      config, plan, model, optimizer, server_lib.make_server_optimizer(config.federated),
      init_key, mesh)
  state = (programs.init() if init is None else
           jax.device_put(init, parallel.shardings_of(programs.abstract_state)))
  initial = jax.device_get(state)
  data = blocks_lib.MultiIterator([train[n] for n in plan.names], B, data_seed, pad=plan.pad)
  keys = jax.random.split(train_key, len(plan.names) + 1)
  metrics = []
  for r in range(num_rounds):
    ids = federated.sample_clients(keys[-1], r, len(plan.names), plan.per_round)
    state, m = federated.run_round(programs, plan, state, data, keys[:-1], ids, r, (B, L))
    metrics.append(m)
  return initial, jax.device_get(state), metrics


def _assert_close(a, b, atol):
  """Leaf by leaf within atol. Between differently shaped programs (vmap vs loop, client
  blocks, chunks, shardings) 1e-6: rounding of the products, carried through Adam whose
  eps=1e-4 (_cfg) amplifies a gradient's rounding at most lr/eps = 30-fold per step
  (used: <2%, AVX-512 and AVX2); a LayerNorm scale near 1 has a 1.2e-7 ulp, so a tighter
  atol would ask for the same bits. atol=0 only between runs of the same programs."""
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                               rtol=0, atol=atol)


# --- Server: aggregation and optimizers (no model) ---------------------------------------

def _toy(seed, c=None):
  rng = np.random.default_rng(seed)
  shape = lambda *s: s if c is None else (c,) + s
  return {'w': rng.normal(size=shape(3, 4)).astype(np.float32),
          'b': rng.normal(size=shape(4)).astype(np.float32)}


def _server(fed_cfg, params):
  opt = server_lib.make_server_optimizer(fed_cfg)
  return opt, {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': opt.init(params)}


def test_fedavg_lands_on_the_hand_computed_weighted_mean_and_ignores_padding():
  fed = common.federated_config()
  server_params, clients_C = _toy(0), _toy(1, c=3)
  opt, state = _server(fed, server_params)
  new, metrics = server_lib.server_update(state, clients_C, jnp.array([3.0, 1.0, 0.0]),
                                          server_optimizer=opt)
  for k in server_params:  # Client 2 is padding: weight 0, whatever its parameters.
    want = (3 * clients_C[k][0].astype(np.float64) + clients_C[k][1]) / 4
    np.testing.assert_allclose(new['params'][k], want, atol=1e-6)
  deltas = [np.sqrt(sum(np.sum((server_params[k] - clients_C[k][c]) ** 2.0) for k in clients_C))
            for c in range(3)]
  np.testing.assert_allclose(metrics['delta_norm'], deltas, rtol=1e-5)
  moved = np.sqrt(sum(np.sum((new['params'][k] - server_params[k]) ** 2.0) for k in clients_C))
  np.testing.assert_allclose(metrics['update_norm'], moved, rtol=1e-5)
  two = server_lib.server_update(state, jax.tree_util.tree_map(lambda x: x[:2], clients_C),
                                 jnp.array([3.0, 1.0]), server_optimizer=opt)[0]
  _assert_close(new['params'], two['params'], atol=0)
  assert int(new['step']) == 1


@pytest.mark.parametrize('name, reference', [
    ('fedadam', lambda f: optax.adam(f.server_learning_rate, f.server_b1, f.server_b2,
                                     f.server_eps)),
    ('fedyogi', lambda f: optax.yogi(f.server_learning_rate, f.server_b1, f.server_b2,
                                     f.server_eps)),
    ('fedavgm', lambda f: optax.sgd(f.server_learning_rate, momentum=f.server_momentum)),
])
def test_server_optimizers_are_optax_on_the_mean_delta(name, reference):
  fed = common.federated_config()
  fed.server_optimizer, fed.server_learning_rate = name, 0.05
  params = _toy(0)
  opt, state = _server(fed, params)
  ref = reference(fed)
  ref_params, ref_state = params, ref.init(params)
  weights = jnp.array([1.0, 2.0])
  for r in range(3):  # Several rounds: the optimizer state must carry over.
    clients_C = _toy(10 + r, c=2)
    state, _ = server_lib.server_update(state, clients_C, weights, server_optimizer=opt)
    mean = jax.tree_util.tree_map(lambda c: (c[0] + 2 * c[1]) / 3, clients_C)
    grads = jax.tree_util.tree_map(lambda s, m: s - m, ref_params, mean)
    updates, ref_state = ref.update(grads, ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, updates)
    _assert_close(state['params'], ref_params, atol=1e-6)
  assert not np.allclose(state['params']['w'], params['w'])


def test_fedadagrad_first_step_follows_reddi_et_al():
  fed = common.federated_config()
  fed.server_optimizer, fed.server_learning_rate, fed.server_eps = 'fedadagrad', 0.1, 1e-3
  params, clients_C = _toy(0), _toy(1, c=2)
  opt, state = _server(fed, params)
  new, _ = server_lib.server_update(state, clients_C, jnp.array([1.0, 1.0]),
                                    server_optimizer=opt)
  for k in params:  # v = tau^2 + g^2, x <- x - lr * g / sqrt(v), g = x - mean of clients.
    g = params[k].astype(np.float64) - clients_C[k].astype(np.float64).mean(0)
    np.testing.assert_allclose(new['params'][k], params[k] - 0.1 * g / np.sqrt(1e-6 + g**2),
                               atol=1e-6)


def test_server_optimizer_errors():
  fed = common.federated_config()
  fed.server_optimizer = 'fedsgd'
  with pytest.raises(ValueError, match='server_optimizer'):
    server_lib.make_server_optimizer(fed)
  fed.server_optimizer, fed.server_learning_rate = 'fedadagrad', 0.0
  with pytest.raises(ValueError, match='server_learning_rate'):
    server_lib.make_server_optimizer(fed)


# --- Clients: FedProx, schedule position, sampling, plan (no model) ----------------------

def test_prox_term_adds_mu_times_the_distance_and_mu_zero_is_the_plain_optimizer():
  train_cfg = common.train_config()
  train_cfg.optimizer, train_cfg.warmup_steps, train_cfg.grad_clip = 'sgd', 0, 0.0
  opt = steps.make_optimizer(train_cfg, 10)
  assert clients.round_optimizer(opt, 0.0) is opt  # FedProx(0) is FedAvg, bit for bit.
  anchor, params, grads = _toy(0), _toy(1), _toy(2)
  prox = clients.round_optimizer(opt, 0.5)
  state = clients.to_round_state(opt.init(anchor), anchor, 0.5)
  updates, state = prox.update(grads, state, params)
  want = jax.tree_util.tree_map(lambda g, w, w0: -5e-4 * (g + 0.5 * (w - w0)), grads, params,
                                anchor)
  _assert_close(updates, want, atol=1e-9)
  assert clients.from_round_state(state, 0.5) is state[1]
  with pytest.raises(ValueError, match='prox_mu'):
    clients.round_optimizer(opt, -1.0)


@pytest.mark.parametrize('keep_state', [True, False])
def test_every_round_starts_at_its_place_on_the_schedule(keep_state):
  train_cfg = common.train_config()
  train_cfg.warmup_steps, train_cfg.learning_rate = 4, 1.0
  opt = steps.make_optimizer(train_cfg, 20)
  params = _toy(0)
  stored = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), opt.init(params))
  schedule = steps.make_schedule(train_cfg, 20)
  for round_ in (0, 1, 3):
    state = clients.start_client(params, stored, 1, round_, optimizer=opt, steps_per_round=5,
                                 keep_state=keep_state, prox_mu=0.0)
    assert int(state['step']) == 5 * round_
    _, opt_state = opt.update(_toy(1), state['opt_state'], params)
    np.testing.assert_allclose(steps.current_lr(opt_state), schedule(5 * round_), rtol=1e-6)


def test_same_seed_same_sampled_clients():
  key = jax.random.key(7)
  draws = [federated.sample_clients(key, r, 10, 3) for r in range(6)]
  assert all(len(set(d)) == 3 and list(d) == sorted(d) for d in draws)
  assert [list(d) for d in draws] == [list(federated.sample_clients(jax.random.key(7), r, 10, 3))
                                      for r in range(6)]
  assert len({tuple(d) for d in draws}) > 1  # Rounds draw differently.
  other = [list(federated.sample_clients(jax.random.key(8), r, 10, 3)) for r in range(6)]
  assert other != [list(d) for d in draws]  # Another seed, other clients.
  np.testing.assert_array_equal(federated.sample_clients(key, 0, 4, 4), np.arange(4))


def test_plan_local_steps_weights_budget_and_errors():
  train = _blocks()
  plan = federated.make_plan(_cfg(), train, L)
  assert plan.steps_N.tolist() == [3, 5, 7] and plan.steps_per_round == 7
  np.testing.assert_array_equal(plan.weights_N, [24, 40, 56])
  assert federated.make_plan(_cfg(local_epochs=1.5), train, L).steps_N.tolist() == [5, 8, 11]
  assert federated.make_plan(_cfg(local_steps=4), train, L).steps_N.tolist() == [4, 4, 4]
  np.testing.assert_array_equal(federated.make_plan(_cfg(weighting='uniform'), train, L)
                                .weights_N, [1, 1, 1])
  config = _cfg(rounds=5, clients_per_round=2)
  config.train.budget_tokens = 5 * 2 * 6 * B * (L - 1) + 17  # 6 local steps fit, 7 do not.
  assert federated.make_plan(config, train, L).steps_N.tolist() == [6, 6, 6]
  for overrides, match in [({'clients_per_round': 4}, 'clients_per_round'),
                           ({'weighting': 'tokens'}, 'weighting'),
                           ({'rounds': 0}, 'rounds')]:
    with pytest.raises(ValueError, match=match):
      federated.make_plan(_cfg(**overrides), train, L)
  with pytest.raises(ValueError, match='batch_size'):
    federated.make_plan(_cfg(), {'a': train['c0'][:5]}, L)


# --- Rounds on a tiny GPT-2 --------------------------------------------------------------

@pytest.fixture(scope='module')
def vmapped_run():
  """Two rounds, unequal clients, AdamW state kept per client, FedProx: the vmapped path."""
  config = _cfg(prox_mu=0.01)
  return _rounds(config, _blocks(), _mesh(config))


def test_one_client_one_sgd_step_equals_a_centralized_sgd_step(vmapped_run):
  config = _cfg(local_steps=1, rounds=1, keep_client_state=False)
  config.train.optimizer, config.train.warmup_steps = 'sgd', 0
  train = {'c0': _blocks()['c0']}
  server = {k: vmapped_run[0][k] for k in ('step', 'params', 'opt_state')}  # FedAvg's.
  init, state, _ = _rounds(config, train, _mesh(config), num_rounds=1, init=server)
  model, _ = run.make_model(config, {'vocab_size': V})
  optimizer = steps.make_optimizer(config.train, 1)
  _, data_seed, train_key = run.seeds(config.seed)
  params = init['params']  # steps.init_state's parameters, as a centralized run's.
  central = {'step': jnp.zeros((), jnp.int32), 'params': params,
             'opt_state': optimizer.init(params)}
  tokens_BxL = next(blocks_lib.BatchIterator(train['c0'], B, data_seed))
  central, _ = jax.jit(functools.partial(steps.train_step, model=model, optimizer=optimizer))(
      central, {'tokens': tokens_BxL}, jax.random.split(train_key, 2)[0])
  _assert_close(state['params'], central['params'], atol=1e-6)
  assert max(float(np.abs(a - b).max()) for a, b in zip(
      jax.tree_util.tree_leaves(state['params']), jax.tree_util.tree_leaves(params))) > 1e-4


def test_vmapped_round_equals_the_reference_loop(vmapped_run):
  init, state, metrics = vmapped_run
  config = _cfg(prox_mu=0.01, vmap=False)
  _, loop_state, loop_metrics = _rounds(config, _blocks(), _mesh(config), init=init)
  _assert_close(state, loop_state, atol=1e-6)  # Params, server and client optimizer states.
  for m, lm in zip(metrics, loop_metrics):
    # A client's loss sums K steps x B x (L - 1) float32 terms, in another order here and
    # from parameters that differ by rounding: 1.4e-7 relative seen (14% of the former
    # rtol=1e-6), room for other CPUs; a wrong batch or step count moves it by percents.
    np.testing.assert_allclose(m['loss_sum'], lm['loss_sum'], rtol=1e-5)
    np.testing.assert_array_equal(m['tokens'], [k * B * (L - 1) for k in (3, 5, 7)])
    assert np.all(m['delta_norm'] > 0)
  # The kept client states advanced by each client's own number of steps.
  adam_counts = [np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(
      state['clients']) if jax.tree_util.keystr(p).endswith('inner_state[0].count')]
  np.testing.assert_array_equal(adam_counts, [[6, 10, 14]])


def test_padding_clients_blocks_and_chunks_change_nothing(vmapped_run):
  # Blocks of 2 clients (the second holds 1 of padding), 4 local steps per call (the
  # clients' 3, 5 and 7 steps end in padding steps).
  config = _cfg(prox_mu=0.01, client_block=2, steps_per_call=4)
  init, state, metrics = vmapped_run
  _, padded, padded_metrics = _rounds(config, _blocks(), _mesh(config), init=init)
  # Other block and chunk shapes are other programs: equal to rounding, as above (atol=1e-7
  # and rtol=1e-7 asked for about the same bits; the loss sums already differ by 3e-8).
  _assert_close(padded, state, atol=1e-6)
  np.testing.assert_allclose(padded_metrics[-1]['loss_sum'], metrics[-1]['loss_sum'], rtol=1e-5)


def test_client_axis_sharded_over_devices_equals_unsharded(vmapped_run):
  config = _cfg(prox_mu=0.01)
  config.parallel.mesh.clients, config.parallel.mesh.data = 2, 2  # With 2-way data parallel.
  init, state, _ = vmapped_run
  _, sharded, _ = _rounds(config, _blocks(), _mesh(config, devices=4), init=init)
  _assert_close(sharded, state, atol=1e-6)


def test_blocked_round_equals_one_block_with_padding_in_the_last(vmapped_run):
  # 5 clients of 3, 5, 7, 3 and 5 batches with kept FedProx/AdamW states: blocks of 2
  # (the last holds one padding client) against one block of 5. Chunks of 4 local steps
  # and FedProx as in the test above, so the blocks of 2 reuse its compiled programs.
  train = _blocks(sizes=(24, 40, 56, 24, 40), seed=1)
  server = {k: vmapped_run[0][k] for k in ('step', 'params', 'opt_state')}
  states, metrics = {}, {}
  for block in (5, 2):
    config = _cfg(prox_mu=0.01, client_block=block, steps_per_call=4)
    plan = federated.make_plan(config, train, L)
    init = {**server, 'clients': jax.tree_util.tree_map(
        lambda x: np.broadcast_to(x, (5,) + x.shape),
        steps.make_optimizer(config.train, plan.rounds * plan.steps_per_round).init(
            server['params']))}
    _, states[block], metrics[block] = _rounds(config, train, _mesh(config), num_rounds=1,
                                               init=init)
  _assert_close(states[2], states[5], atol=1e-6)  # Params, server and client optimizer states.
  (a,), (b,) = metrics[2], metrics[5]
  np.testing.assert_allclose(a['loss_sum'], b['loss_sum'], rtol=1e-6)
  np.testing.assert_allclose(a['delta_norm'], b['delta_norm'], rtol=1e-5)
  np.testing.assert_allclose(a['update_norm'], b['update_norm'], rtol=1e-5)
  assert len(a['delta_norm']) == 5 and np.all(a['delta_norm'] > 0)
  adam_counts = [np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(
      states[2]['clients']) if jax.tree_util.keystr(p).endswith('inner_state[0].count')]
  np.testing.assert_array_equal(adam_counts, [[3, 5, 7, 3, 5]])  # Every block's states stored.


def test_a_client_smaller_than_a_batch_trains_on_its_blocks_alone(vmapped_run):
  # Finer clients may hold fewer blocks than a batch: padded rows weigh 0, so one SGD step
  # equals a centralized step on a batch of just the client's 3 blocks. Kept client
  # optimizer states are off for finer clients.
  config = _cfg(local_steps=1, rounds=1, clients='synthetic')
  config.train.optimizer, config.train.warmup_steps = 'sgd', 0
  train = {'c0': _blocks(sizes=(3,))['c0']}
  with pytest.raises(ValueError, match='fewer training blocks'):
    federated.make_plan(_cfg(), train, L)  # Participants must fill a batch.
  server = {k: vmapped_run[0][k] for k in ('step', 'params', 'opt_state')}
  init, state, metrics = _rounds(config, train, _mesh(config), num_rounds=1, init=server)
  assert 'clients' not in state
  model, _ = run.make_model(config, {'vocab_size': V})
  optimizer = steps.make_optimizer(config.train, 1)
  _, data_seed, train_key = run.seeds(config.seed)
  params = init['params']
  central = {'step': jnp.zeros((), jnp.int32), 'params': params,
             'opt_state': optimizer.init(params)}
  tokens_BxL = next(blocks_lib.BatchIterator(train['c0'], B, data_seed, pad=True))[:3]
  central, _ = jax.jit(functools.partial(steps.train_step, model=model, optimizer=optimizer))(
      central, {'tokens': tokens_BxL}, jax.random.split(train_key, 2)[0])
  _assert_close(state['params'], central['params'], atol=1e-6)
  np.testing.assert_array_equal(metrics[0]['tokens'], [3 * (L - 1)])


def _fit_finer_clients(config, workdir, train, owner):
  model, _ = run.make_model(config, {'vocab_size': V})
  valid = {'alpha': _blocks(sizes=(16,), seed=5)['c0'], 'beta': _blocks(sizes=(16,), seed=6)['c0']}
  return federated.fit(config, str(workdir), model, train, valid, owner=owner)


def test_fit_with_finer_clients_dp_and_round_metrics(tmp_path, monkeypatch):
  from collab.settings import round_metrics
  monkeypatch.setattr(round_metrics, 'PER_CLIENT_MAX', 2)  # 5 clients count as many here.
  # FedProx and chunks of 4 local steps, so the blocks of 2 reuse compiled programs.
  config = _cfg(clients='synthetic', clients_per_round=3, client_block=2, rounds=2,
                local_steps=4, steps_per_call=4, prox_mu=0.01, weighting='uniform')
  dp = config.federated.dp
  dp.enabled, dp.noise_multiplier, dp.clip_norm, dp.adaptive_clip = True, 0.8, 0.5, True
  dp.clip_count_noise, dp.delta = 1.0, 1e-4
  config.train.warmup_steps = 0  # Clients move in the first round too.
  train = _blocks(sizes=(4, 8, 12, 16, 24), seed=2)  # c0 is smaller than a batch.
  owner = {'c0': 'alpha', 'c1': 'beta', 'c2': 'alpha', 'c3': 'beta', 'c4': 'alpha'}
  summary = _fit_finer_clients(config, tmp_path / 'a', train, owner)
  rows = [r for r in _rows(tmp_path / 'a') if 'train/loss' in r]
  assert [r['round'] for r in rows] == [1, 2]
  z_eff = (0.8**-2 + 2.0**-2) ** -0.5
  for r in rows:
    assert r['clients/sampled'] == 3 and r['train/tokens'] > 0
    assert r['clients/loss_p10'] <= r['clients/loss_p50'] <= r['clients/loss_p90'] <= (
        r['clients/loss_max'])
    assert 0 < r['clients/delta_norm_p50'] <= r['clients/delta_norm_max']
    assert 'clients' not in r and not any(k.startswith('client/') for k in r)
    direct = dp_accounting.rdp.RdpAccountant()
    direct.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(3 / 5, dp_accounting.GaussianDpEvent(z_eff)),
        r['round']))
    assert r['privacy/epsilon'] == direct.get_epsilon(1e-4)
  assert rows[1]['privacy/clip_norm'] == pytest.approx(rows[0]['privacy/next_clip_norm'])
  privacy = summary['privacy']
  assert privacy == {'epsilon': rows[1]['privacy/epsilon'], 'delta': 1e-4,
                     'unit': config.federated.clients,
                     'initial_clip_norm': config.federated.dp.clip_norm,
                     'noise_multiplier': 0.8,
                     'clip_norm': pytest.approx(rows[1]['privacy/next_clip_norm']),
                     'rounds': 2, 'clients_per_round': 3, 'clients': 5, 'accountant': 'rdp'}
  # Tokens: per participant, summed over its clients; per client in clients.json.
  _, _, train_key = run.seeds(config.seed)
  sample_key = jax.random.split(train_key, 6)[-1]
  sampled = [i for r in range(2) for i in federated.sample_clients(sample_key, r, 5, 3)]
  per_client = {f'c{i}': sampled.count(i) * 4 * min(len(train[f'c{i}']), B) * (L - 1)
                for i in range(5)}
  table = json.load(open(tmp_path / 'a' / 'clients.json'))['clients']
  assert {n: c['tokens_seen'] for n, c in table.items()} == per_client
  assert table['c0'] == {'participant': 'alpha', 'blocks': 4, 'local_steps': 4,
                         'tokens_seen': per_client['c0']}
  assert summary['tokens_seen_per_participant'] == {
      p: sum(t for n, t in per_client.items() if owner[n] == p) for p in ('alpha', 'beta')}
  assert summary['participants'] == ['alpha', 'beta'] and 'local_steps' not in summary
  step, state = _final_state(tmp_path / 'a')
  assert set(state) == {'step', 'params', 'opt_state', 'clip_norm'}  # No kept client states.
  assert float(state['clip_norm']) == pytest.approx(privacy['clip_norm'])
  # Resuming from round 1 draws the same samples, batches and DP noise: the same bits.
  shutil.copytree(tmp_path / 'a', tmp_path / 'b')
  shutil.rmtree(tmp_path / 'b' / 'checkpoints' / '2')
  os.remove(tmp_path / 'b' / 'train.json')
  resumed = _fit_finer_clients(config, tmp_path / 'b', train, owner)
  assert resumed['source'] != summary['source']
  _assert_close(_final_state(tmp_path / 'b')[1], state, atol=0)
  assert resumed['privacy'] == privacy


# --- Whole runs from the command line: SIGKILL and resume --------------------------------

ROUNDS = 6


def _launch(workdir, data_dir, cache, *extra):
  # One device and XLA's cheapest compilation: these runs test resumption, not sharding
  # or speed, and all three compile alike.
  env = {**os.environ, 'JAX_COMPILATION_CACHE_DIR': cache,
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
         'XLA_FLAGS': xla_flags('--xla_force_host_platform_device_count=1',
                                '--xla_backend_optimization_level=0',
                                '--xla_llvm_disable_expensive_passes')}
  return subprocess.Popen(
      [sys.executable, '-m', 'launch.train', '--config=configs/default.py',
       f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
       '--config.setting=federated', f'--config.federated.rounds={ROUNDS}',
       '--config.federated.local_steps=2', '--config.federated.clients_per_round=2',
       '--config.train.batch_size=8', '--config.train.warmup_steps=2',
       '--config.train.eval_batch_size=16', '--config.federated.eval_every=4',
       '--config.model.num_layers=2',
       '--config.model.d_model=32', '--config.model.num_heads=2', '--config.model.d_ff=64',
       '--config.model.max_len=32', '--config.model.dropout=0.1', '--config.data.seq_len=32',
       '--config.data.participants[0].name=alpha', '--config.data.participants[1].name=beta',
       '--config.data.participants[2].name=gamma', *extra],
      cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _final_state(workdir):
  manager = checkpoint.make_manager(workdir, 2, 1, async_save=False)
  restored = manager.restore(manager.latest_step())
  manager.close()
  return manager.latest_step(), jax.tree_util.tree_map(np.asarray, restored['state'])


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_sigkill_then_resume_is_bit_identical_with_client_states(tiny_data, tmp_path,
                                                                  compile_cache):
  straight = _launch(tmp_path / 'straight', tiny_data, compile_cache)
  assert straight.wait(timeout=300) == 0, straight.stdout.read()
  killed = _launch(tmp_path / 'killed', tiny_data, compile_cache)
  ckpts = tmp_path / 'killed' / 'checkpoints'
  deadline = time.time() + 240
  while time.time() < deadline and not (ckpts.is_dir() and any(
      p.name.isdigit() and int(p.name) >= 2 for p in ckpts.iterdir())):
    time.sleep(0.02)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  assert not (tmp_path / 'killed' / 'train.json').exists(), 'killed too late to test resume'
  resumed = _launch(tmp_path / 'killed', tiny_data, compile_cache)
  out = resumed.communicate(timeout=300)[0]
  assert resumed.returncode == 0, out
  (step_a, a), (step_b, b) = _final_state(tmp_path / 'straight'), _final_state(tmp_path / 'killed')
  assert step_a == step_b == ROUNDS and set(a) == {'step', 'params', 'opt_state', 'clients'}
  _assert_close(a, b, atol=0)  # Server params, server and client optimizer states.
  rows_a, rows_b = _rows(tmp_path / 'straight'), _rows(tmp_path / 'killed')
  sampled = [r['clients'] for r in rows_a if 'clients' in r]
  assert sampled == [r['clients'] for r in rows_b if 'clients' in r]  # Same seed, same clients.
  assert len(sampled) == ROUNDS and all(len(s) == 2 for s in sampled)
  summary = json.load(open(tmp_path / 'straight' / 'train.json'))
  per_client = {n: sum(n in s for s in sampled) * 2 * B * (L - 1) for n in ('alpha', 'beta',
                                                                           'gamma')}
  assert summary['tokens_seen_per_participant'] == per_client
  assert set(summary['valid']) == {'alpha', 'beta', 'gamma', 'pooled'}
  assert rows_a[-1]['round'] == ROUNDS and 'valid/pooled/perplexity' in rows_a[-1]
  assert [r['round'] for r in rows_a if 'valid/alpha/perplexity' in r] == [4, ROUNDS]
