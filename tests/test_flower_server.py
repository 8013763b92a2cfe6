"""The Flower server's rounds over nodes, in process (no Flower): parity with the
simulation, refusals, lost nodes. tests/test_flower.py runs the same over real Flower
processes."""

import itertools
import os

import jax
import numpy as np
import pytest

from collab import checkpoint
from collab.flower import local
from collab.flower import node as node_lib
from collab.flower import server as server_lib
from collab.flower import worker
from collab.settings import federated
from collab.settings import run
from tests.conftest import TINY_PARTICIPANTS
from tests.conftest import tiny_run_config


def fed_config(data_dir, server_optimizer='fedavg', rounds=2):
  c = tiny_run_config(data_dir)
  c.setting = 'federated'
  c.federated.rounds, c.federated.local_steps = rounds, 2
  c.federated.server_optimizer = server_optimizer
  if server_optimizer == 'fedyogi':
    c.federated.server_learning_rate = 0.01
  c.federated.eval_every = 1
  c.flower.poll_s, c.flower.rejoin_timeout_s = 0.0, 0.0
  return c


class FakeLink:
  """Nodes as in-process calls; `dead` nodes answer nothing and leave the list."""

  def __init__(self, nodes: dict):
    self.nodes_by_id = dict(nodes)
    self.dead = set()
    self.replies = {}
    self.ids = itertools.count()
    self.sent = []  # (node id, kind)

  def nodes(self):
    return [n for n in self.nodes_by_id if n not in self.dead]

  def send(self, node_id, kind, meta, arrays):
    mid = f'm{next(self.ids)}'
    self.sent.append((node_id, kind))
    node = self.nodes_by_id[node_id]
    if node_id in self.dead:
      self.replies[mid] = server_lib.Reply(None, None, 'Node Unavailable', lost=True)
    elif kind == 'identify':
      self.replies[mid] = server_lib.Reply(
          node_lib.identity(node, meta['config'], meta['version']), None)
    elif kind == 'train':
      config = run.config_from_json(meta['config'])
      # The node's programs, kept across rounds as its worker keeps them.
      setup = worker.setup_for(node, config, meta['sizes'])
      params, metrics, position = node_lib.train(node, config, server_lib.unflatten(arrays),
                                                 meta['round'], meta['sizes'],
                                                 meta['position'], meta['run_id'], setup)
      self.replies[mid] = server_lib.Reply({**metrics, 'position': position},
                                           server_lib.flatten(params))
    else:
      config = run.config_from_json(meta['config'])
      self.replies[mid] = server_lib.Reply(
          {'result': node_lib.evaluate(node, config, server_lib.unflatten(arrays))}, None)
    return mid

  def poll(self, ids):
    return {m: self.replies[m] for m in ids if m in self.replies}


@pytest.fixture(scope='module')
def nodes(tiny_data, tmp_path_factory):
  root = tmp_path_factory.mktemp('nodes')
  return {i + 1: node_lib.Node(org, local.node_data(tiny_data, org, str(root / org / 'data')),
                               str(root / org / 'state'))
          for i, org in enumerate(TINY_PARTICIPANTS)}


def final_params(workdir):
  manager = checkpoint.make_manager(str(workdir), 2, 1, async_save=False)
  state = manager.restore(manager.latest_step())['state']
  manager.close()
  return jax.tree_util.tree_map(np.asarray, state['params'])


def simulate(config, workdir, data_dir, vmap):
  config = config.copy_and_resolve_references()
  config.federated.vmap = vmap
  data = run.load_data(config, str(workdir), TINY_PARTICIPANTS)
  model, _ = run.make_model(config, data.manifest)
  return federated.fit(config, str(workdir), model, data.train, data.valid,
                       eot_id=data.manifest['eot_id'])


def dp_fedprox(config):
  """DP-FedAvg with adaptive clipping and FedProx's term: every server and client option."""
  config.federated.weighting, config.federated.prox_mu = 'uniform', 0.01
  dp = config.federated.dp
  dp.enabled, dp.clip_norm, dp.noise_multiplier, dp.adaptive_clip = True, 0.5, 0.3, True
  return config


def assert_same_bits(a_dir, b_dir):
  a, b = final_params(a_dir), final_params(b_dir)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope='module')
def straight(nodes, tiny_data, tmp_path_factory):
  """A FedAvg run of 2 rounds over the nodes: (its folder, its summary)."""
  workdir = tmp_path_factory.mktemp('straight') / 'run'
  return workdir, server_lib.serve(fed_config(tiny_data), str(workdir), FakeLink(nodes))


# FedYogi over real SuperNodes is tests/test_flower.py's.
@pytest.mark.parametrize('variant', ['fedavg', 'dp_fedprox'])
def test_nodes_give_the_simulations_bits(variant, nodes, straight, tiny_data, tmp_path):
  config = fed_config(tiny_data)
  workdir, served = straight
  if variant == 'dp_fedprox':
    config, workdir = dp_fedprox(config), tmp_path / 'flower'
    served = server_lib.serve(config, str(workdir), FakeLink(nodes))
  loop = simulate(config, tmp_path / 'loop', tiny_data, vmap=False)
  assert_same_bits(workdir, tmp_path / 'loop')  # The reference loop, program for program.
  # Pooled from the nodes' sums: the same floats; per-block losses stay on the nodes.
  for r in loop['valid'].values():
    r.pop('block_losses', None)
  assert served['valid'] == loop['valid']
  assert served['tokens_seen_per_participant'] == loop['tokens_seen_per_participant']
  assert served.get('privacy') == loop.get('privacy')  # The accountant's epsilon, the bound.
  # Client optimizer states stay on the nodes: the server's checkpoint has none.
  assert 'clients' not in checkpoint.make_manager(str(workdir), 2, 1).restore(2)['state']


def test_refusals_name_the_node(nodes, tiny_data, tmp_path):
  config = fed_config(tiny_data)
  alpha, beta, gamma = (nodes[i] for i in (1, 2, 3))
  cases = {
      'belongs to another participant': {1: alpha, 2: beta._replace(data_dir=gamma.data_dir),
                                         3: gamma},
      "already serves 'alpha'": {1: alpha, 2: alpha, 3: beta, 4: gamma},
  }
  for why, roster in cases.items():
    with pytest.raises(server_lib.RefusedNodeError, match=why):
      server_lib.serve(config, str(tmp_path / why.replace(' ', '_')), FakeLink(roster))
  with pytest.raises(server_lib.RefusedNodeError, match='runs collab'):
    server_lib.serve(config, str(tmp_path / 'version'), FakeLink(nodes),
                     version=lambda: '0.0.0+src.other')
  # A node whose agreed config differs from the server's.
  agreed = gamma._replace(state_dir=str(tmp_path / 'agreed'))
  other = fed_config(tiny_data)
  other.train.learning_rate = 1.0
  run.write_config(agreed.state_dir, other)
  with pytest.raises(server_lib.RefusedNodeError, match=r'node 3 .*train.learning_rate'):
    server_lib.serve(config, str(tmp_path / 'config'), FakeLink({1: alpha, 2: beta, 3: agreed}))


def test_a_lost_node_stops_the_round_by_name_then_the_run_resumes_bit_identical(
    nodes, straight, tiny_data, tmp_path):
  config = fed_config(tiny_data)
  link = FakeLink(nodes)
  original = link.send

  def send(node_id, kind, meta, arrays):
    if kind == 'train' and meta['round'] == 1 and node_id == 2:
      link.dead.add(2)  # Killed while training round 2.
    return original(node_id, kind, meta, arrays)
  link.send = send
  with pytest.raises(server_lib.NodeLostError, match=r"Node 2 of participant 'beta'.*round 2"):
    server_lib.serve(config, str(tmp_path / 'killed'), link)
  # Its SuperNode comes back (a new node id, the same state-path); the run resumes.
  resumed = FakeLink({1: nodes[1], 5: nodes[2], 3: nodes[3]})
  summary = server_lib.serve(config, str(tmp_path / 'killed'), resumed)
  assert summary['source'] == 'resume'
  assert [kind for _, kind in resumed.sent].count('train') == 3  # Round 2 only.
  assert_same_bits(straight[0], tmp_path / 'killed')
  assert os.path.isfile(tmp_path / 'killed' / 'final' / 'config.json')


def test_a_node_that_comes_back_within_the_round_gets_its_request_again(
    nodes, straight, tiny_data, tmp_path):
  config = fed_config(tiny_data)
  config.flower.rejoin_timeout_s = 60.0
  link = FakeLink(nodes)
  original = link.send

  def send(node_id, kind, meta, arrays):
    if kind == 'train' and meta['round'] == 1 and node_id == 2:
      link.dead.add(2)  # Killed in round 2; its SuperNode restarts as node 7.
      link.nodes_by_id[7] = nodes[2]
    return original(node_id, kind, meta, arrays)
  link.send = send
  server_lib.serve(config, str(tmp_path / 'back'), link)
  assert (7, 'train') in link.sent
  assert_same_bits(straight[0], tmp_path / 'back')
