"""The Flower ServerApp (flwr 1.42, the `flower` extra): collab/flower/server.py over Grid.

The SuperLink runs it once per run (`flwr run collab/flower/app`, which launch.flower_server
and collab.flower.local call); it reads its run folder from the run config key `workdir`,
where the launcher wrote the resolved config, and records how it ended there
(flower_status.json). Messages are those of collab/flower/client_app.py.
"""

import os
import traceback

from absl import logging
from flwr.app import Context
from flwr.app import Message
from flwr.serverapp import Grid
from flwr.serverapp import ServerApp

from collab.flower import records
from collab.flower import server as server_lib
from collab.settings import run

# flwr.common.constant.ErrorCode: the message or its reply is gone with its node
# (MESSAGE_UNAVAILABLE, REPLY_MESSAGE_UNAVAILABLE, NODE_UNAVAILABLE) or the node's
# ClientApp process died (CLIENT_APP_CRASHED): the node is lost, not failing the task.
LOST_CODES = (3, 4, 5, 8)

class GridLink:
  """server_lib.Link over Flower's Grid."""

  def __init__(self, grid: Grid):
    self._grid = grid

  def nodes(self) -> list:
    return list(self._grid.get_node_ids())

  def send(self, node_id: int, kind: str, meta: dict, arrays) -> str:
    message_type = 'query.identify' if kind == 'identify' else kind
    msg = Message(records.pack(meta, arrays), dst_node_id=node_id, message_type=message_type)
    (mid,) = self._grid.push_messages([msg])
    return mid

  def poll(self, message_ids: list) -> dict:
    if not message_ids:
      return {}
    out = {}
    for reply in self._grid.pull_messages(message_ids):
      mid = reply.metadata.reply_to_message_id
      if reply.has_error():
        out[mid] = server_lib.Reply(None, None, f'{reply.error.reason} (code {reply.error.code})',
                                    lost=reply.error.code in LOST_CODES)
      else:
        out[mid] = server_lib.Reply(*records.unpack(reply.content))
    return out


app = ServerApp()


@app.main()
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
