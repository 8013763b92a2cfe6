"""The server of a Flower federation: collab's rounds over nodes that hold the data.

Nothing here imports Flower: it talks to the nodes through a `Link` (send a message to a
node, poll for replies, list the nodes online), which collab/flower/apps.py implements
over Flower's Grid and the tests implement in process.

`serve` runs `federated.fit_with` (the simulation's own round loop, checkpoints, metrics,
best/, final/ and train.json) with a Federation whose clients are nodes:
  1. join: every node online is asked who it is (`identity`); a node whose data belongs
     to another participant, whose collab version or agreed config differs, or that
     claims a participant another node already serves is refused with an error naming
     it. The run starts once every participant has a node.
  2. each round sends the server parameters (and each client's data position) to the
     sampled participants' nodes, waits for their trained parameters, and adds them to
     the round's accumulator one by one *in participant order*, whatever order they
     arrive in, then applies the server optimizer (FedAvg, FedAvgM, FedAdam, FedYogi,
     FedAdagrad; DP clipping and noise): the simulation's reference loop, program for
     program.
  3. validation asks every node for its own validation sums and pools them.
A node that stops answering (killed, or its machine gone) is waited for at most
config.flower.rejoin_timeout_s: if its SuperNode comes back (a new node id, the same
participant) the round's message is sent to it again; else the run stops with an error
naming it, and running the server again resumes from the last completed round.
"""

import json
import os
import time
import uuid
from typing import Any, Callable, NamedTuple, Protocol

from absl import logging
import flax.traverse_util
import jax
import numpy as np

from collab import io
from collab.evals import perplexity
from collab.flower import node as node_lib
from collab.settings import federated
from collab.settings import run

PyTree = Any
RUN_JSON = 'flower_run.json'  # WORKDIR: the run's id, which scopes the nodes' kept state.
STATUS_JSON = 'flower_status.json'  # WORKDIR: how the last ServerApp ended.
ROUNDS_JSONL = 'flower_rounds.jsonl'  # WORKDIR: each round's time and bytes moved.


class Reply(NamedTuple):
  meta: dict | None  # JSON-able content; None with an error.
  arrays: dict | None  # name -> numpy array
  error: str | None = None
  lost: bool = False  # The node went away (as opposed to failing the task).


class Link(Protocol):
  """What the server needs of a transport."""

  def nodes(self) -> list:  # Node ids online now.
    ...

  def send(self, node_id: int, kind: str, meta: dict, arrays: dict | None) -> str:
    ...  # A message id.

  def poll(self, message_ids: list) -> dict:  # message id -> Reply, for those arrived.
    ...


class RefusedNodeError(ValueError):
  """A node that cannot take part; the message names it and why."""


class NodeLostError(RuntimeError):
  """A node stopped answering and did not come back in time."""


def flatten(tree: PyTree) -> dict:
  """{'a/b/c': numpy array} of a nested dict of arrays (names keep their order)."""
  return {'/'.join(k): np.asarray(v) for k, v in
          flax.traverse_util.flatten_dict(jax.device_get(tree)).items()}


def unflatten(arrays: dict) -> PyTree:
  return flax.traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in arrays.items()})


def run_id(workdir: str) -> str:
  """This run's id: made once, kept in WORKDIR, so a resumed run finds the nodes' state."""
  path = os.path.join(workdir, RUN_JSON)
  if not os.path.isfile(path):
    io.atomic_write_json(path, {'run_id': uuid.uuid4().hex[:16]})
  return io.read_json(path)['run_id']


class Roster:
  """Which node serves which participant, and the facts each reported."""

  def __init__(self, config, version: str):
    self.config_json = config.to_json_best_effort()
    self.version = version
    self.wanted = run.participant_names(config)
    self.node = {}  # participant -> node id
    self.facts = {}  # participant -> its identity reply

  def question(self) -> dict:
    return {'config': self.config_json, 'version': self.version}

  def admit(self, node_id: int, facts: dict, alive=(), replace: bool = False) -> str:
    """Records a node's identity; RefusedNodeError naming it when it cannot serve.

    Two nodes online for one participant are refused, unless `replace` (during a run: a
    SuperNode that restarted gets a new id while its old one still looks alive).
    """
    org = facts.get('org')
    who = f'node {node_id} (participant {org!r})'
    if facts.get('problems'):
      raise RefusedNodeError(f'Refused {who}: {"; ".join(facts["problems"])}.')
    if org not in self.wanted:
      raise RefusedNodeError(f'Refused {who}: the run trains {self.wanted}; give the '
                             'SuperNode one of these as org.')
    if not replace and self.node.get(org) not in (None, node_id) and self.node[org] in alive:
      raise RefusedNodeError(f'Refused {who}: node {self.node[org]} already serves {org!r}; '
                             'each participant runs one SuperNode.')
    for key in ('seq_len', 'vocab_size', 'eot_id'):
      others = {o: f[key] for o, f in self.facts.items() if o != org}
      if others and facts[key] not in others.values():
        raise RefusedNodeError(f'Refused {who}: its data has {key} {facts[key]}, the other '
                               f'nodes\' {others}: build every node\'s data with the same '
                               'tokenizer and seq_len.')
    self.node[org], self.facts[org] = node_id, facts
    return org


def _ask_new(link: Link, roster: Roster, asked: dict) -> set:
  """Sends the identity question to every node online not asked yet; the nodes online."""
  alive = set(link.nodes())
  for nid in sorted(alive - set(asked) - set(roster.node.values())):
    asked[nid] = link.send(nid, 'identify', roster.question(), None)
  return alive


def join(link: Link, roster: Roster, timeout_s: float, poll_s: float) -> None:
  """Waits until every participant has an admitted node (at most timeout_s)."""
  asked, deadline = {}, time.time() + timeout_s
  while set(roster.node) != set(roster.wanted):
    alive = _ask_new(link, roster, asked)
    replies = link.poll([m for m in asked.values() if m])
    for nid, mid in list(asked.items()):
      if mid in replies and replies[mid].error is None:
        org = roster.admit(nid, replies[mid].meta, alive)
        logging.info('Node %d serves %r (%d training blocks).', nid, org,
                     roster.facts[org]['train_blocks'])
        asked[nid] = None
    if time.time() > deadline:
      missing = sorted(set(roster.wanted) - set(roster.node))
      raise NodeLostError(
          f'No node joined for {missing} within {timeout_s:.0f} s '
          f'(config.flower.join_timeout_s); {len(asked)} node(s) online answered for '
          f'{sorted(roster.node)}. Start a SuperNode for each with its org in --node-config.')
    time.sleep(poll_s)


def gather(link: Link, roster: Roster, kind: str, requests: dict, what: str,
           flower_cfg) -> dict:
  """Sends each participant's (meta, arrays) to its node; their replies by participant.

  A node that goes away is waited for `rejoin_timeout_s`: a new node admitted for the
  same participant gets the request again; else NodeLostError names it.
  """
  sent = {org: link.send(roster.node[org], kind, *requests[org]) for org in requests}
  done, lost, asked = {}, {}, {}
  started = time.time()
  while len(done) < len(requests):
    replies = link.poll([m for o, m in sent.items() if o not in done] +
                        [m for m in asked.values() if m])
    now = time.time()
    for org, mid in sent.items():
      reply = replies.get(mid)
      if org in done or reply is None:
        continue
      if reply.error is None:
        done[org] = reply
      elif reply.lost:
        lost.setdefault(org, now)
      else:
        raise RuntimeError(f'Node {roster.node[org]} ({org!r}) failed {what}: {reply.error}')
    alive = _ask_new(link, roster, asked)
    for org in requests:
      if org not in done and roster.node[org] not in alive:
        lost.setdefault(org, now)
    for nid, mid in list(asked.items()):
      if not mid or mid not in replies or replies[mid].error is not None:
        continue
      asked[nid] = None
      org = replies[mid].meta.get('org')
      if org in requests and org not in done:  # Its SuperNode restarted: ask it again.
        old = roster.node[org]
        roster.admit(nid, replies[mid].meta, alive, replace=True)
        sent[org] = link.send(nid, kind, *requests[org])
        lost.pop(org, None)
        logging.warning('Participant %r is back as node %d (was %d); %s sent again.', org,
                        nid, old, what)
    for org, since in lost.items():
      if now - since > flower_cfg.rejoin_timeout_s:
        raise NodeLostError(
            f'Node {roster.node[org]} of participant {org!r} went away during {what} and no '
            f'node for {org!r} came back within {flower_cfg.rejoin_timeout_s:.0f} s '
            '(config.flower.rejoin_timeout_s). Restart its SuperNode (python -m '
            'launch.flower_node) and run the server again: it resumes from the last '
            'completed round.')
    if now - started > flower_cfg.round_timeout_s:
      late = sorted(set(requests) - set(done))
      raise NodeLostError(
          f'Nodes of {late} did not answer {what} within {flower_cfg.round_timeout_s:.0f} s '
          '(config.flower.round_timeout_s); raise it if their local training is that slow.')
    if len(done) < len(requests):
      time.sleep(flower_cfg.poll_s)
  return done


def _record_round(workdir: str, row: dict) -> None:
  """Replaces WORKDIR/flower_rounds.jsonl's rows from row's round on (a resumed run
  trains rounds again) with `row`."""
  path = os.path.join(workdir, ROUNDS_JSONL)
  rows = io.read_jsonl(path) if os.path.isfile(path) else []
  io.write_jsonl(path, [x for x in rows if x['round'] < row['round']] + [row])


def _nbytes(arrays: dict) -> int:
  return sum(int(a.nbytes) for a in arrays.values())


def node_federation(link: Link, roster: Roster, config, run_key: str,
                    workdir: str) -> federated.Federation:
  """A federated.Federation whose clients are the roster's nodes; each round's timing and
  the parameter bytes it moved are appended to WORKDIR/flower_rounds.jsonl."""
  names = run.participant_names(config)
  sizes = {org: roster.facts[org]['train_blocks'] for org in names}
  seq_len = roster.facts[names[0]]['seq_len']
  meta = {'config': roster.config_json, 'sizes': sizes, 'run_id': run_key}

  def start(plan, positions):
    positions = list(positions or [None] * len(names))

    def train_round(programs, plan, state, keys_N, ids, r):
      del keys_N  # Each node derives its own key from the config's seed.
      started = time.time()
      params = flatten(state['params'])
      requests = {names[i]: ({**meta, 'round': r, 'position': positions[i]}, params)
                  for i in ids}
      replies = gather(link, roster, 'train', requests, f'round {r + 1}', config.flower)
      trained = time.time()
      acc = programs.zeros(state['params'])
      sums, norms = [], []
      for k, i in enumerate(ids):  # Participant order, whatever the arrival order.
        reply = replies[names[i]]
        client = {'params': jax.tree_util.tree_map(lambda x: np.asarray(x)[None],
                                                   unflatten(reply.arrays))}
        state, acc, norms_C = federated.accumulate_block(programs, plan, state, acc, client,
                                                         np.asarray([i], np.int32))
        norms.append(norms_C)
        sums.append((k, {'loss_sum': np.asarray([reply.meta['loss_sum']]),
                         'tokens': np.asarray([reply.meta['tokens']])}))
        positions[i] = reply.meta['position']
      state, server_metrics = programs.apply(state, acc)
      result = federated.round_result(state, server_metrics, sums, norms, len(ids))
      _record_round(workdir, {
          'round': r + 1, 'seconds': time.time() - started,
          'exchange_seconds': trained - started, 'aggregate_seconds': time.time() - trained,
          'node_seconds': {names[i]: replies[names[i]].meta.get('seconds') for i in ids},
          'bytes_to_nodes': len(ids) * _nbytes(params),
          'bytes_from_nodes': sum(_nbytes(replies[names[i]].arrays) for i in ids)})
      return result

    def evaluate(params):
      params = flatten(params)
      replies = gather(link, roster, 'evaluate', {org: (meta, params) for org in names},
                       'validation', config.flower)
      results = {org: replies[org].meta['result'] for org in names}
      results[perplexity.POOLED] = perplexity._summary(  # pylint: disable=protected-access
          sum(r['loss_sum'] for r in results.values()),
          sum(r['tokens'] for r in results.values()))
      return results

    return train_round, evaluate, lambda: list(positions)
  return federated.Federation(sizes, seq_len, start, keeps_client_state=False)


def check_config(config) -> None:
  """What a Flower run does not support, with what to change."""
  federated.check_config(config)
  if config.federated.clients != 'participants':
    raise ValueError('A Flower federation has one node per participant; set '
                     "--config.federated.clients=participants.")


def serve(config, workdir: str, link: Link,
          version: Callable[[], str] = node_lib.collab_version) -> dict:
  """Runs (or resumes) config's federated training over the nodes; the run's summary."""
  run.check_config(config)
  check_config(config)
  config = config.copy_and_resolve_references()
  config.federated.vmap = False  # One client at a time, in participant order.
  os.makedirs(workdir, exist_ok=True)
  run.claim_workdir(workdir, config)
  roster = Roster(config, version())
  join(link, roster, config.flower.join_timeout_s, config.flower.poll_s)
  facts = roster.facts[roster.wanted[0]]
  model, _ = run.make_model(config, facts)
  federation = node_federation(link, roster, config, run_id(workdir), workdir)
  return federated.fit_with(config, workdir, model, federation, eot_id=facts['eot_id'])


def write_status(workdir: str, error: BaseException | None) -> None:
  """WORKDIR/flower_status.json: how the ServerApp ended (the launcher reports it)."""
  io.atomic_write_json(os.path.join(workdir, STATUS_JSON), {
      'ok': error is None, 'error': None if error is None else
      f'{type(error).__name__}: {error}', 'time': time.time()})


def read_status(workdir: str) -> dict | None:
  path = os.path.join(workdir, STATUS_JSON)
  return json.loads(open(path, encoding='utf-8').read()) if os.path.isfile(path) else None
