"""Federated training on real Flower processes (the `flower` extra): a SuperLink and three
SuperNodes on localhost, insecure. Parity with the in-process simulation for FedAvg and
FedYogi, a node killed mid-run and the run's resume, a refused node.

Skipped only where flwr is not installed; CI (.ci/run) installs the extra and sets
COLLAB_REQUIRE_FLOWER=1, which turns that skip into a failure.
"""

import os
import threading
import time

import jax
import numpy as np
import pytest

if os.environ.get('COLLAB_REQUIRE_FLOWER'):
  import flwr  # noqa: F401  pylint: disable=unused-import
else:
  pytest.importorskip('flwr', reason='the flower extra is not installed (make flower)')

from collab.flower import local  # noqa: E402
from collab.settings import run  # noqa: E402
from tests.conftest import TINY_PARTICIPANTS  # noqa: E402
from tests.test_flower_server import fed_config  # noqa: E402
from tests.test_flower_server import final_params  # noqa: E402
from tests.test_flower_server import simulate  # noqa: E402

ROUNDS = 2


@pytest.fixture(scope='module')
def federation(tiny_data, tmp_path_factory):
  """A SuperLink and one SuperNode per participant, each with only its own data."""
  root = tmp_path_factory.mktemp('federation')
  fed = local.Federation(str(root / 'flower'))
  fed.nodes = {}
  try:
    fed.start_superlink()
    for org in TINY_PARTICIPANTS:
      data = local.node_data(tiny_data, org, str(root / org / 'data'))
      fed.nodes[org] = (data, str(root / org / 'state'))
      fed.start_node(org, *fed.nodes[org])
    yield fed
  finally:
    fed.stop()


def deploy(federation, config, workdir):
  os.makedirs(workdir, exist_ok=True)
  run.write_config(str(workdir), config)
  federation.run(str(workdir), timeout_s=600)


def config_for(data_dir, optimizer='fedavg', rounds=ROUNDS):
  c = fed_config(data_dir, optimizer, rounds)
  c.federated.eval_every = 0  # Validation at the end only: each message is a process.
  c.flower.poll_s = 0.2
  return c


def assert_same_bits(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)


def max_difference(a, b):
  return max(float(np.max(np.abs(x - y)))
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


@pytest.mark.parametrize('optimizer', ['fedavg', 'fedyogi'])
def test_three_supernodes_give_the_simulations_parameters(optimizer, federation, tiny_data,
                                                          tmp_path):
  config = config_for(tiny_data, optimizer)
  deploy(federation, config, tmp_path / 'flower')
  simulate(config, tmp_path / 'loop', tiny_data, vmap=False)
  flower = final_params(tmp_path / 'flower')
  # The reference loop's programs, node by node, aggregated in participant order.
  assert_same_bits(flower, final_params(tmp_path / 'loop'))
  if optimizer == 'fedavg':
    # The vmapped simulation compiles other programs (a client axis), whose float32
    # sums may round otherwise: agreement to float32 rounding of these magnitudes.
    simulate(config, tmp_path / 'vmap', tiny_data, vmap=True)
    assert max_difference(flower, final_params(tmp_path / 'vmap')) < 1e-5
  assert os.path.isfile(tmp_path / 'flower' / 'train.json')
  assert os.path.isfile(tmp_path / 'flower' / 'final' / 'model.safetensors')
  if optimizer == 'fedavg':
    federation.fedavg = tmp_path / 'flower'  # The straight run the kill test compares to.


def test_a_killed_supernode_stops_the_run_by_name_and_the_rerun_resumes_bit_identical(
    federation, tiny_data, tmp_path):
  straight = getattr(federation, 'fedavg', None)
  config = config_for(tiny_data)
  config.flower.rejoin_timeout_s = 5.0
  workdir = tmp_path / 'killed'
  failure = []

  def serve():
    try:
      deploy(federation, config, workdir)
    except local.RunFailed as e:
      failure.append(str(e))
  server = threading.Thread(target=serve)
  server.start()
  data, state = federation.nodes['beta']
  deadline = time.time() + 300
  while (time.time() < deadline and server.is_alive()
         and not (workdir / 'checkpoints' / '1').is_dir()):
    time.sleep(0.1)
  federation.kill('node-beta')  # SIGKILL during round 2: the SuperLink notices in 30-60 s.
  server.join(timeout=300)
  assert failure and "participant 'beta'" in failure[0], failure
  assert not (workdir / 'train.json').exists()
  federation.start_node('beta', data, state)  # Back, with its own state-path.
  deploy(federation, config, workdir)
  assert (workdir / 'train.json').exists()
  if straight is None:
    pytest.skip('runs after the FedAvg parity test, which gives the straight run')
  assert_same_bits(final_params(workdir), final_params(straight))


def test_a_node_holding_another_participants_data_is_refused(federation, tiny_data, tmp_path):
  data, _ = federation.nodes['gamma']
  federation.start_node('alpha', data, str(tmp_path / 'impostor'), name='impostor')
  try:
    with pytest.raises(local.RunFailed, match=r"Refused node \d+ \(participant 'alpha'\): "
                       r".*belongs to another participant"):
      deploy(federation, config_for(tiny_data, rounds=1), tmp_path / 'refused')
  finally:
    federation.kill('impostor')
