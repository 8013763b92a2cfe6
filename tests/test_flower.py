"""Federated training on real Flower processes (the `flower` extra): a SuperLink and three
SuperNodes on localhost, insecure. Parity with the in-process simulation for FedAvg and
FedYogi, a SuperNode killed mid-round that comes back, a refused node.

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


@pytest.fixture(scope='module')
def deployments(federation, tiny_data, tmp_path_factory):
  """FedAvg and FedYogi deployed at once on the federation: {optimizer: run folder}."""
  root = tmp_path_factory.mktemp('deployments')
  runs, errors = {o: root / o for o in ('fedavg', 'fedyogi')}, []

  def deploy_one(optimizer):
    try:
      deploy(federation, config_for(tiny_data, optimizer), runs[optimizer])
    except Exception as e:  # pylint: disable=broad-except
      errors.append(f'{optimizer}: {e}')
  threads = [threading.Thread(target=deploy_one, args=(o,)) for o in runs]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors
  return runs


@pytest.mark.parametrize('optimizer', ['fedavg', 'fedyogi'])
def test_three_supernodes_give_the_simulations_parameters(optimizer, deployments, tiny_data,
                                                          tmp_path):
  flower = deployments[optimizer]
  simulate(config_for(tiny_data, optimizer), tmp_path / 'loop', tiny_data, vmap=False)
  # The reference loop's programs, node by node, aggregated in participant order. (The
  # vmapped simulation agrees with the loop to float32 rounding: test_federated.)
  assert_same_bits(final_params(flower), final_params(tmp_path / 'loop'))
  assert os.path.isfile(flower / 'train.json')
  assert os.path.isfile(flower / 'final' / 'model.safetensors')


def test_a_supernode_killed_mid_round_comes_back_and_the_run_ends_with_the_same_bits(
    federation, deployments, tiny_data, tmp_path):
  """SIGKILL to beta's SuperNode (and its worker) while round 2 trains; its SuperNode
  restarts with the same state-path and the server sends it round 2 again. (A node that
  does not come back stops the run by name, and the rerun resumes bit-identically:
  tests/test_flower_server.py, since Flower notices a killed SuperNode only after two
  missed 30 s heartbeats.)"""
  config = config_for(tiny_data)
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
  federation.kill('node-beta')
  federation.start_node('beta', data, state)  # A new node id, the same participant.
  server.join(timeout=300)
  assert not failure, failure
  assert (workdir / 'train.json').exists()
  log = open(workdir / 'server.log', errors='replace').read()
  assert "Participant 'beta' is back as node" in log
  assert_same_bits(final_params(workdir), final_params(deployments['fedavg']))


def test_a_node_holding_another_participants_data_is_refused(federation, tiny_data, tmp_path):
  data, _ = federation.nodes['gamma']
  federation.start_node('alpha', data, str(tmp_path / 'impostor'), name='impostor')
  try:
    with pytest.raises(local.RunFailed, match=r"Refused node \d+ \(participant 'alpha'\): "
                       r".*belongs to another participant"):
      deploy(federation, config_for(tiny_data, rounds=1), tmp_path / 'refused')
  finally:
    federation.kill('impostor')
