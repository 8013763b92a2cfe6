"""The Flower ServerApp and ClientApp (flwr 1.42, the `flower` extra) over collab's rounds.

Flower starts these in its own processes: the SuperLink runs `server_app` once per run,
and each SuperNode runs `client_app` in a fresh process per message. They only translate
between Flower's messages and collab/flower/server.py and node.py:
  message type   content sent                       reply
  query.identify config, collab version             node.identity
  train          params, round, position, sizes     trained params, loss, tokens, position
  evaluate       params                             the node's validation sums
Records: `meta` (a ConfigRecord holding one JSON string) and `arrays` (an ArrayRecord of
the flattened parameters, float32 bits as they are).

The app folder for `flwr run` is collab/flower/app (its pyproject.toml names these two
objects); the ServerApp reads its run folder from the run config key `workdir`, where
launch.flower_server wrote the resolved config.
"""

import json
import os
import time
import traceback

from absl import logging
from flwr.app import Array
from flwr.app import ArrayRecord
from flwr.app import ConfigRecord
from flwr.app import Context
from flwr.app import Message
from flwr.app import RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.serverapp import ServerApp

from collab.flower import node as node_lib
from collab.flower import server as server_lib
from collab.settings import run

NODE_UNAVAILABLE = 5  # flwr.common.constant.ErrorCode.NODE_UNAVAILABLE
APP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'app')


def _content(meta: dict, arrays: dict | None) -> RecordDict:
  records = {'meta': ConfigRecord({'json': json.dumps(meta)})}
  if arrays:
    records['arrays'] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
  return RecordDict(records)


def _unpack(content: RecordDict) -> tuple:
  meta = json.loads(content['meta']['json'])
  arrays = ({k: v.numpy() for k, v in content['arrays'].items()}
            if 'arrays' in content else None)
  return meta, arrays


# --- ClientApp: one message, one fresh process --------------------------------------------

client_app = ClientApp()


def _node(context: Context) -> node_lib.Node:
  node = node_lib.from_node_config(context.node_config)
  # Compiled programs survive the per-message processes in the node's own cache.
  import jax  # pylint: disable=g-import-not-at-top
  cache = os.path.join(node.state_dir, 'jax-cache')
  jax.config.update('jax_compilation_cache_dir', cache)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return node


@client_app.query('identify')
def identify(msg: Message, context: Context) -> Message:
  meta, _ = _unpack(msg.content)
  node = node_lib.from_node_config(context.node_config)
  return Message(_content(node_lib.identity(node, meta['config'], meta['version']), None),
                 reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
  node = _node(context)
  meta, arrays = _unpack(msg.content)
  config = run.config_from_json(meta['config'])
  started = time.time()
  params, metrics, position = node_lib.train(
      node, config, server_lib.unflatten(arrays), int(meta['round']), meta['sizes'],
      meta['position'], meta['run_id'])
  return Message(_content({**metrics, 'position': position,
                           'seconds': time.time() - started},
                          server_lib.flatten(params)), reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
  node = _node(context)
  meta, arrays = _unpack(msg.content)
  config = run.config_from_json(meta['config'])
  result = node_lib.evaluate(node, config, server_lib.unflatten(arrays))
  return Message(_content({'result': result}, None), reply_to=msg)


# --- ServerApp -----------------------------------------------------------------------------

class GridLink:
  """server_lib.Link over Flower's Grid."""

  def __init__(self, grid: Grid):
    self._grid = grid
    self._waiting = {}  # message id -> node id

  def nodes(self) -> list:
    return list(self._grid.get_node_ids())

  def send(self, node_id: int, kind: str, meta: dict, arrays) -> str:
    message_type = 'query.identify' if kind == 'identify' else kind
    msg = Message(_content(meta, arrays), dst_node_id=node_id, message_type=message_type)
    (mid,) = self._grid.push_messages([msg])
    self._waiting[mid] = node_id
    return mid

  def poll(self, message_ids: list) -> dict:
    if not message_ids:
      return {}
    out = {}
    for reply in self._grid.pull_messages(message_ids):
      mid = reply.metadata.reply_to_message_id
      if reply.has_error():
        out[mid] = server_lib.Reply(None, None, f'{reply.error.reason} (code {reply.error.code})',
                                    lost=reply.error.code == NODE_UNAVAILABLE)
      else:
        out[mid] = server_lib.Reply(*_unpack(reply.content))
    return out


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
  workdir = str(context.run_config['workdir'])
  try:
    with open(os.path.join(workdir, run.CONFIG_JSON), encoding='utf-8') as f:
      config = run.config_from_json(f.read())
    server_lib.serve(config, workdir, GridLink(grid))
  except BaseException as e:  # Recorded for the launcher, then Flower's own handling.
    logging.error('ServerApp failed: %s', traceback.format_exc())
    server_lib.write_status(workdir, e)
    raise
  server_lib.write_status(workdir, None)
