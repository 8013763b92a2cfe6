"""DP-FedAvg: clipping and noise of the aggregate by hand, adaptive clipping, accounting."""

import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collab.settings import dp as dp_lib
from collab.settings import federated
from collab.settings import rounds
from collab.settings import server as server_lib
from configs import common

NOISE_KEY = jax.random.key(42)


def _config(dp=True, weighting='uniform', server_optimizer='fedavg', **dp_fields):
  config = common.base_config('tiny')
  config.federated.weighting = weighting
  config.federated.server_optimizer = server_optimizer
  config.federated.server_learning_rate = 1.0 if server_optimizer == 'fedavg' else 0.1
  config.federated.dp.enabled = dp
  for k, v in dp_fields.items():
    setattr(config.federated.dp, k, v)
  return config


def _plan(per_round, num_clients=8):
  return federated.Plan(names=tuple(f'c{i}' for i in range(num_clients)),
                        steps_N=np.ones(num_clients, int), steps_per_round=1, rounds=3,
                        per_round=per_round, weights_N=np.ones(num_clients, np.float32),
                        steps_per_call=1, rows_N=np.ones(num_clients, int), keep_state=False,
                        pad=True)


def _toy_clients(num_real=4, num_pad=2, seed=0):
  """Server params and C client params whose deltas have norms around 0.1 .. 3."""
  rng = np.random.default_rng(seed)
  server = {'w': rng.normal(size=(3, 4)).astype(np.float32),
            'b': rng.normal(size=(4,)).astype(np.float32)}
  scales = np.concatenate([np.geomspace(0.05, 1.5, num_real), np.full(num_pad, 100.0)])
  clients_C = {k: (v[None] - scales.reshape(-1, *[1] * v.ndim) *
                   rng.normal(size=(len(scales),) + v.shape)).astype(np.float32)
               for k, v in server.items()}
  weights_C = np.concatenate([np.ones(num_real), np.zeros(num_pad)]).astype(np.float32)
  return server, clients_C, weights_C


def _round(config, plan, server_params, clients_C, weights_C, block=2, step=0, clip=None):
  """accumulate block by block, then apply, as rounds.Programs run them (unjitted)."""
  optimizer = server_lib.make_server_optimizer(config.federated)
  accumulate, apply, _ = rounds.server_fns(config, plan, None, None, optimizer)
  server = {'step': jnp.asarray(step, jnp.int32), 'params': server_params,
            'opt_state': optimizer.init(server_params)}
  if config.federated.dp.enabled:
    server['clip_norm'] = jnp.asarray(config.federated.dp.clip_norm if clip is None else clip,
                                      jnp.float32)
  acc = server_lib.zeros_accumulator(server_params)
  num = len(weights_C)
  for b in range(0, num, block):
    part = jax.tree_util.tree_map(lambda x: x[b:b + block], clients_C)
    server, acc, _ = accumulate(server, acc, {'params': part}, weights_C[b:b + block],
                                np.arange(b, min(b + block, num)))
  return apply(server, acc, NOISE_KEY)


def _hand_sum(server, clients_C, weights_C, clip):
  """(sum of clipped real deltas, number within the bound), in float64 numpy."""
  deltas = {k: server[k][None].astype(np.float64) - clients_C[k] for k in server}
  norms = np.sqrt(sum(np.sum(d.reshape(len(weights_C), -1) ** 2, 1) for d in deltas.values()))
  scale = weights_C * np.minimum(1.0, clip / norms)
  return ({k: np.tensordot(scale, d, axes=1) for k, d in deltas.items()},
          int(np.sum((norms <= clip) & (weights_C > 0))))


def _round_noise(step, tree, std):
  """The documented derivation: split(fold_in(key, round))[0], split per leaf in order."""
  update_key, _ = jax.random.split(jax.random.fold_in(NOISE_KEY, step))
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(update_key, len(leaves))
  return treedef.unflatten([std * np.asarray(jax.random.normal(k, x.shape), np.float64)
                            for k, x in zip(keys, leaves)])


@pytest.mark.parametrize('step', [0, 3])
def test_aggregate_is_the_clipped_sum_plus_configured_noise_over_m(step):
  clip, z = 0.5, 0.7
  config = _config(clip_norm=clip, noise_multiplier=z)
  server, clients_C, weights_C = _toy_clients()
  new, metrics = _round(config, _plan(per_round=4), server, clients_C, weights_C, step=step)
  total, within = _hand_sum(server, clients_C, weights_C, clip)
  assert 0 < within < 4  # Some clients are clipped, some are not.
  noise = _round_noise(step, total, z * clip)
  for k in server:  # FedAvg: server - 1.0 * (sum + noise) / m, with m = 4 fixed.
    np.testing.assert_allclose(new['params'][k], server[k] - (total[k] + noise[k]) / 4,
                               atol=1e-6)
  assert float(metrics['clip_norm']) == clip and float(new['clip_norm']) == clip
  assert float(metrics['unclipped_fraction']) == within / 4
  again, _ = _round(config, _plan(per_round=4), server, clients_C, weights_C, step=step)
  for k in server:  # Same key and round: the same noise, bit for bit.
    np.testing.assert_array_equal(again['params'][k], new['params'][k])


def test_noise_differs_between_rounds_and_blocking_does_not_change_the_aggregate():
  config = _config(clip_norm=0.5, noise_multiplier=0.7)
  server, clients_C, weights_C = _toy_clients()
  plan = _plan(per_round=4)
  first = _round(config, plan, server, clients_C, weights_C, step=0)[0]['params']
  second = _round(config, plan, server, clients_C, weights_C, step=1)[0]['params']
  assert np.abs(first['w'] - second['w']).max() > 1e-3
  whole = _round(config, plan, server, clients_C, weights_C, step=0, block=6)[0]['params']
  for k in server:
    np.testing.assert_allclose(first[k], whole[k], atol=1e-6)


@pytest.mark.parametrize('count_noise', [0.0, 0.3])
def test_adaptive_clipping_moves_the_bound_geometrically(count_noise):
  clip, lr, quantile = 0.5, 0.2, 0.5
  config = _config(clip_norm=clip, noise_multiplier=1.0, adaptive_clip=True,
                   clip_learning_rate=lr, target_quantile=quantile, clip_count_noise=count_noise)
  server, clients_C, weights_C = _toy_clients()
  new, metrics = _round(config, _plan(per_round=4), server, clients_C, weights_C, step=2)
  _, within = _hand_sum(server, clients_C, weights_C, clip)
  _, count_key = jax.random.split(jax.random.fold_in(NOISE_KEY, 2))
  present = float(np.sum(weights_C))  # Real clients (uniform weights: 1 each).
  b = (within - present / 2 + count_noise * float(jax.random.normal(count_key, ()))) / 4 + 0.5
  np.testing.assert_allclose(float(new['clip_norm']), clip * math.exp(-lr * (b - quantile)),
                             rtol=1e-6)
  np.testing.assert_allclose(float(metrics['unclipped_fraction_noisy']), b, rtol=1e-6)
  assert float(metrics['next_clip_norm']) == float(new['clip_norm'])
  if count_noise == 0:  # Every client within the bound: it shrinks; none within: it grows.
    for bound, share in ((1e3, 1.0), (1e-4, 0.0)):
      moved = _round(config, _plan(4), server, clients_C, weights_C, clip=bound)[0]
      np.testing.assert_allclose(float(moved['clip_norm']),
                                 bound * math.exp(-lr * (share - quantile)), rtol=1e-6)


@pytest.mark.parametrize('server_optimizer', ['fedavg', 'fedadam'])
def test_dp_with_huge_clip_and_no_noise_is_fedavg_with_uniform_weights(server_optimizer):
  server, clients_C, weights_C = _toy_clients()
  plan = _plan(per_round=4)
  private = _round(_config(clip_norm=1e6, noise_multiplier=0.0,
                           server_optimizer=server_optimizer), plan, server, clients_C,
                   weights_C)[0]
  plain = _round(_config(dp=False, server_optimizer=server_optimizer), plan, server, clients_C,
                 weights_C)[0]
  for k in server:
    np.testing.assert_allclose(private['params'][k], plain['params'][k], atol=1e-6)
    assert np.abs(plain['params'][k] - server[k]).max() > 1e-2
  assert 'clip_norm' not in plain


def _direct_epsilon(z, rounds, q, delta):
  event = dp_accounting.GaussianDpEvent(z)
  if q < 1:
    event = dp_accounting.PoissonSampledDpEvent(q, event)
  accountant = dp_accounting.rdp.RdpAccountant()
  accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
  return accountant.get_epsilon(delta)


def test_reported_epsilon_is_dp_accounting_called_directly():
  dp = _config(noise_multiplier=1.1, delta=1e-5).federated.dp
  eps = dp_lib.round_epsilon(dp, rounds=7, clients_per_round=10, clients=100)
  assert eps == _direct_epsilon(1.1, 7, 0.1, 1e-5) and 0 < eps < 100
  assert dp_lib.round_epsilon(dp, 7, 100, 100) == _direct_epsilon(1.1, 7, 1.0, 1e-5) > eps
  assert dp_lib.round_epsilon(dp, 8, 10, 100) > eps  # Privacy is spent round by round.
  dp.adaptive_clip, dp.clip_count_noise = True, 2.0
  z_eff = (1.1**-2 + 4.0**-2) ** -0.5
  assert dp_lib.effective_noise_multiplier(dp) == pytest.approx(z_eff)
  assert dp_lib.round_epsilon(dp, 7, 10, 100) == _direct_epsilon(z_eff, 7, 0.1, 1e-5)
  dp.noise_multiplier = 0.0  # No noise: infinite epsilon, reported as None (JSON has no inf).
  assert dp_lib.epsilon(0.0, 7, 10, 100, 1e-5) == math.inf
  summary = dp_lib.privacy_summary(dp, 7, 10, 100, clip_norm=0.25, unit='repositories')
  assert summary == {'epsilon': None, 'unit': 'repositories',
                     'initial_clip_norm': float(dp.clip_norm),
                     'delta': 1e-5, 'noise_multiplier': 0.0,
                     'clip_norm': 0.25, 'rounds': 7, 'clients_per_round': 10,
                     'clients': 100, 'accountant': 'rdp'}


def test_dp_config_errors_name_the_fields_to_set():
  train = {f'c{i}': np.zeros((16, 32), np.uint16) for i in range(3)}
  with pytest.raises(ValueError, match='config.federated.weighting=uniform'):
    federated.make_plan(_config(weighting='blocks'), train, 32)
  with pytest.raises(ValueError, match='dp.clip_norm'):
    federated.make_plan(_config(clip_norm=0.0), train, 32)
  with pytest.raises(ValueError, match='dp.target_quantile'):
    federated.make_plan(_config(target_quantile=1.5), train, 32)
  federated.make_plan(_config(dp=False, weighting='blocks'), train, 32)  # Off: anything goes.
