"""The Flower ClientApp (the `flower` extra): every message goes to the node's worker.

Flower runs this in a fresh process per message, so it imports neither JAX nor collab's
training code: it hands the message to the node's persistent worker
(collab/flower/worker.py), which runs node.py and keeps the compiled programs.
  message type     content sent                           reply
  query.identify   config, collab version                 node.identity
  train            params, round, position, sizes, run    params, loss, tokens, position
  evaluate         params                                 the node's validation sums
"""

from flwr.app import Context
from flwr.app import Message
from flwr.clientapp import ClientApp

from collab.flower import records
from collab.flower import worker

app = ClientApp()


def _answer(kind: str, msg: Message, context: Context) -> Message:
  meta, arrays = records.unpack(msg.content)
  return Message(records.pack(*worker.call(dict(context.node_config), kind, meta, arrays)),
                 reply_to=msg)


@app.query('identify')
def identify(msg: Message, context: Context) -> Message:
  return _answer('identify', msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
  return _answer('train', msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
  return _answer('evaluate', msg, context)
