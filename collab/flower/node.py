"""A node of a Flower federation: collab's local update on the organization's own data.

Nothing here imports Flower: the ClientApp (collab/flower/apps.py) turns each message into
one of these calls, and the tests call them in process too.

A node is configured by its SuperNode's node config (`flower-supernode --node-config`):
  org         the participant it trains for (a name of config.data.participants);
  data-path   a built data folder holding that participant's blocks and no other's
              (`python -m launch.flower_local` splits a pooled one; each organization
              builds its own with launch.build_data);
  state-path  where the node keeps what must not leave it between rounds: its
              optimizer state after each round, the agreed config (config.json, written
              by launch.flower_node) and its compilation cache.
Every message starts a fresh ClientApp process; JAX's persistent compilation cache in
state-path keeps a round from compiling again.

A round (`train`) rebuilds the simulation's own programs (collab/settings/rounds.py, the
reference path: one client at a time) from the server's config and the clients' sizes,
so the node computes exactly what the in-process simulation computes for that client:
the same key, the same data order (seed + the client's index), the same schedule
position, the same kept optimizer state.
"""

import glob
import hashlib
import importlib.metadata
import os
import types
from typing import Any, NamedTuple

import flax.serialization
import jax
import numpy as np

from collab import io
from collab import parallel
from collab import steps
from collab.data import blocks as blocks_lib
from collab.settings import centralized
from collab.settings import clients
from collab.settings import dp as dp_lib
from collab.settings import federated
from collab.settings import rounds
from collab.settings import run
from collab.settings import server as server_lib

PyTree = Any
NODE_KEYS = ('org', 'data-path', 'state-path')
KEPT_ROUNDS = 3  # Kept optimizer states per run: a resumed round finds the one before it.


class Node(NamedTuple):
  org: str
  data_dir: str
  state_dir: str


class NodeRefusal(ValueError):
  """This node cannot serve the run (its data, version or config); the reason names it."""


def from_node_config(node_config) -> Node:
  """The Node a SuperNode's --node-config describes; NodeRefusal naming what is missing."""
  missing = [k for k in NODE_KEYS if not str(node_config.get(k, '')).strip()]
  if missing:
    raise NodeRefusal(f'the SuperNode\'s --node-config lacks {missing}; start it with '
                      '--node-config \'org="NAME" data-path="DIR" state-path="DIR"\' '
                      '(python -m launch.flower_node does).')
  return Node(str(node_config['org']), str(node_config['data-path']),
              str(node_config['state-path']))


def collab_version() -> str:
  """The installed collab: its version and a digest of its Python sources, so two
  checkouts of one version at different commits differ."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  digest = hashlib.sha256()
  for path in sorted(glob.glob(os.path.join(root, '**', '*.py'), recursive=True)):
    digest.update(os.path.relpath(path, root).encode() + b'\0')
    with open(path, 'rb') as f:
      digest.update(f.read())
  try:
    version = importlib.metadata.version('collab')
  except importlib.metadata.PackageNotFoundError:
    version = '0+unknown'
  return f'{version}+src.{digest.hexdigest()[:12]}'


def _data_problems(node: Node) -> list:
  """Why this node's data folder cannot be its organization's (empty when it can)."""
  try:
    manifest = blocks_lib.load_manifest(node.data_dir)
  except ValueError as e:
    return [str(e)]
  held = list(manifest['participants'])
  if node.org not in held:
    return [f'its data folder {node.data_dir!r} holds the blocks of {held}, not of '
            f'{node.org!r}: the data belongs to another participant']
  if held != [node.org]:
    return [f'its data folder {node.data_dir!r} holds the blocks of {held}; a node holds '
            f'only its own organization\'s (split a pooled folder with '
            f'collab.flower.local.node_data)']
  return []


def identity(node: Node, server_config: str, server_version: str) -> dict:
  """What the server checks before a run: who this node is and what it holds.

  `problems` lists why it must be refused (data of another participant, another collab
  version, a config other than the one agreed in state-path/config.json); the sizes are
  what the server plans rounds from (numbers of blocks: nothing of the code itself).
  """
  data_problems = _data_problems(node)
  problems = list(data_problems)
  mine = collab_version()
  if mine != server_version:
    problems.append(f'it runs collab {mine}, the server {server_version}; install the '
                    'same collab on every machine')
  config = run.config_from_json(server_config)
  agreed = os.path.join(node.state_dir, run.CONFIG_JSON)
  if os.path.isfile(agreed):
    changed = run.training_differences(config, node.state_dir)
    if changed:
      problems.append(f'the server\'s config differs from the one agreed at {agreed!r}: '
                      f'{run.describe(changed)}')
  out = {'org': node.org, 'version': mine, 'problems': problems}
  if not data_problems:
    manifest = blocks_lib.load_manifest(node.data_dir)
    out.update(train_blocks=len(blocks_lib.load_blocks(node.data_dir, node.org, 'train')),
               seq_len=int(manifest['seq_len']), vocab_size=int(manifest['vocab_size']),
               eot_id=int(manifest['eot_id']))
  return out


def _check(node: Node) -> None:
  problems = _data_problems(node)
  if problems:
    raise NodeRefusal(f'node {node.org!r}: {problems[0]}')


class Setup(NamedTuple):
  plan: federated.Plan
  programs: rounds.Programs
  model: Any
  optimizer: Any
  index: int  # This node's client index (its place in config.data.participants).


def setup(config, node: Node, sizes: dict, manifest: dict) -> Setup:
  """The simulation's reference-path programs for this run, as the node runs them."""
  config = config.copy_and_resolve_references()
  config.federated.vmap = False  # One client per call: the simulation's reference loop.
  model, _ = run.make_model(config, manifest)
  plan = federated.make_plan(config, sizes, int(manifest['seq_len']))
  optimizer = steps.make_optimizer(config.train, plan.rounds * plan.steps_per_round)
  init_key, _, train_key = run.seeds(config.seed)
  programs = rounds.make_programs(config, plan, model, optimizer,
                                  server_lib.make_server_optimizer(config.federated),
                                  init_key, parallel.make_mesh(config.parallel),
                                  noise_key=dp_lib.noise_key(train_key))
  return Setup(plan, programs, model, optimizer, plan.names.index(node.org))


def _state_path(node: Node, run_id: str, before_round: int) -> str:
  return os.path.join(node.state_dir, 'runs', run_id, f'client_before_{before_round:06d}.msgpack')


def load_client_state(node: Node, run_id: str, round_: int, template: PyTree) -> PyTree:
  """The optimizer state this node kept at the end of round - 1 (fresh before round 0)."""
  if round_ == 0:
    return template
  path = _state_path(node, run_id, round_)
  if not os.path.isfile(path):
    raise NodeRefusal(
        f'node {node.org!r} has no optimizer state before round {round_} of run {run_id} '
        f'({path!r} is missing): its state-path was lost or changed. Restart the SuperNode '
        'with its old --node-config state-path, or start the run anew in a new workdir.')
  with open(path, 'rb') as f:
    return flax.serialization.from_bytes(template, f.read())


def save_client_state(node: Node, run_id: str, round_: int, inner: PyTree) -> None:
  """Keeps the state after round `round_` (read before round + 1); older ones go."""
  path = _state_path(node, run_id, round_ + 1)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  io.atomic_write(path, lambda f: f.write(flax.serialization.to_bytes(jax.device_get(inner))),
                  binary=True)
  for old in glob.glob(os.path.join(os.path.dirname(path), 'client_before_*.msgpack')):
    if int(old.rsplit('_', 1)[1].split('.')[0]) <= round_ + 1 - KEPT_ROUNDS:
      os.remove(old)


def train(node: Node, config, params: PyTree, round_: int, sizes: dict,
          position: dict | None, run_id: str, s: Setup | None = None) -> tuple:
  """One round of local training: (params, {'loss_sum', 'tokens'}, data position).

  `s` is this run's setup(...) when the caller keeps it across rounds (the worker).
  """
  _check(node)
  manifest = blocks_lib.load_manifest(node.data_dir)
  s = s or setup(config, node, sizes, manifest)
  blocks = blocks_lib.load_blocks(node.data_dir, node.org, 'train')
  if len(blocks) != sizes[node.org]:
    raise NodeRefusal(f'node {node.org!r} holds {len(blocks)} training blocks, the server '
                      f'planned for {sizes[node.org]}: its data changed during the run.')
  _, data_seed, train_key = run.seeds(config.seed)
  iterator = blocks_lib.BatchIterator(blocks, config.train.batch_size, data_seed + s.index,
                                      position, pad=s.plan.pad)
  stored = {}  # Without kept state the round's optimizer starts fresh (start_client).
  if s.plan.keep_state:
    inner = load_client_state(node, run_id, round_, s.optimizer.init(params))
    stored = jax.tree_util.tree_map(lambda x: np.asarray(x)[None], inner)
  keys_N = jax.random.split(train_key, len(s.plan.names) + 1)[:-1]
  shape = (config.train.batch_size, int(manifest['seq_len']))
  state_C, chunks = federated.train_block(
      s.programs, s.plan, params, stored,
      types.SimpleNamespace(iterators={s.index: iterator}), keys_N,
      np.asarray([s.index], np.int32), round_, shape, stored_ids=[0])
  if s.plan.keep_state:
    kept = clients.from_round_state(state_C['opt_state'], config.federated.prox_mu)
    save_client_state(node, run_id, round_, jax.tree_util.tree_map(lambda x: x[0], kept))
  chunks = jax.device_get(chunks)
  metrics = {'loss_sum': float(sum(np.sum(m['loss_sum']) for m in chunks)),
             'tokens': float(sum(np.sum(m['tokens']) for m in chunks))}
  new_params = jax.tree_util.tree_map(lambda x: np.asarray(x[0]), state_C['params'])
  return new_params, metrics, iterator.position


def evaluate(node: Node, config, params: PyTree) -> dict:
  """This organization's validation result (centralized.evaluate_valid's entry)."""
  _check(node)
  manifest = blocks_lib.load_manifest(node.data_dir)
  model, _ = run.make_model(config, manifest)
  valid = {node.org: blocks_lib.load_blocks(node.data_dir, node.org, 'valid')}
  result = centralized.evaluate_valid(config, model, params, valid)[node.org]
  result.pop('block_losses', None)  # Per-block losses stay on the node.
  return result
