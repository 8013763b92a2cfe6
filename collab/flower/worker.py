"""A node's persistent worker: keeps compiled programs across Flower's per-message processes.

Flower 1.42 starts a fresh ClientApp process for every message. Importing JAX and collab
and tracing a round's programs would then cost every round several seconds, even with
JAX's persistent compilation cache (which skips XLA's compilation, not tracing). So the
ClientApp only forwards each message to this worker, one per node, which the first
message starts and which keeps the round's programs (node.Setup) in memory: later rounds
only run them.

The worker listens on a Unix socket in the node's state-path, authenticated by a key
file only the node's user can read (multiprocessing.connection); it serves one request
at a time, and exits after `IDLE_S` seconds without one. It starts in the ClientApp's
process group, so stopping the SuperNode's group stops it too.

  python -m collab.flower.worker --state_path=DIR   (the ClientApp starts it)
"""

import json
import os
import secrets
import subprocess
import sys
import threading
import time
import traceback
from multiprocessing import connection

SOCKET = 'worker.sock'
KEY = 'worker.key'
IDLE_S = 900.0
START_TIMEOUT_S = 120.0


def _paths(state_path: str) -> tuple:
  return os.path.join(state_path, SOCKET), os.path.join(state_path, KEY)


def _key(state_path: str) -> bytes:
  """The socket's authentication key, made once (0600) in state-path."""
  path = _paths(state_path)[1]
  if not os.path.isfile(path):
    os.makedirs(state_path, exist_ok=True)
    tmp = f'{path}.{os.getpid()}.tmp'
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, 'wb') as f:
      f.write(secrets.token_bytes(32))
    os.replace(tmp, path)
  with open(path, 'rb') as f:
    return f.read()


def call(node_config: dict, kind: str, meta: dict, arrays) -> tuple:
  """(meta, arrays) of the node's reply to one message, computed by its worker (started
  when none answers). Errors on the worker come back as RuntimeError with its traceback."""
  state_path = str(node_config.get('state-path', ''))
  if not state_path:
    from collab.flower import node as node_lib  # pylint: disable=g-import-not-at-top
    node_lib.from_node_config(node_config)  # Raises, naming what is missing.
  sock, _ = _paths(state_path)
  key = _key(state_path)
  try:
    conn = connection.Client(sock, 'AF_UNIX', authkey=key)
  except (FileNotFoundError, ConnectionRefusedError):
    conn = _start(state_path, sock, key)
  with conn:
    conn.send((dict(node_config), kind, meta, arrays))
    ok, reply = conn.recv()
  if not ok:
    raise RuntimeError(reply)
  return reply


def _start(state_path: str, sock: str, key: bytes):
  if os.path.exists(sock):
    os.remove(sock)  # A worker that died left its socket.
  log = open(os.path.join(state_path, 'worker.log'), 'ab')
  proc = subprocess.Popen([sys.executable, '-m', 'collab.flower.worker',
                           f'--state_path={state_path}'], stdout=log, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL)
  deadline = time.time() + START_TIMEOUT_S
  while True:
    try:
      return connection.Client(sock, 'AF_UNIX', authkey=key)
    except (FileNotFoundError, ConnectionRefusedError):
      if proc.poll() is not None or time.time() > deadline:
        raise RuntimeError(f'The node\'s worker did not start (exit {proc.poll()}); see '
                           f'{os.path.join(state_path, "worker.log")}.') from None
      time.sleep(0.05)


# What a node's programs do not depend on: the server's optimizer and the waits.
NOT_PROGRAMS = {'federated': ('server_optimizer', 'server_learning_rate', 'server_momentum',
                              'server_b1', 'server_b2', 'server_eps'), 'flower': None}


def _programs_key(config) -> str:
  """The config as the node's programs see it (runs that differ only in the server's
  optimizer or waits share the programs a worker keeps)."""
  c = json.loads(config.to_json_best_effort())
  for section, fields in NOT_PROGRAMS.items():
    if fields is None:
      c.pop(section, None)
    for field in fields or ():
      c.get(section, {}).pop(field, None)
  return json.dumps(c, sort_keys=True)


_SETUPS = {}  # (node, programs key, sizes) -> node.Setup, the newest last.
KEPT_SETUPS = 4


def setup_for(node, config, sizes: dict):
  """The node's programs for this config and these sizes, kept across messages."""
  from collab.data import blocks as blocks_lib  # pylint: disable=g-import-not-at-top
  from collab.flower import node as node_lib  # pylint: disable=g-import-not-at-top
  key = (node, _programs_key(config), json.dumps(sizes, sort_keys=True))
  if key not in _SETUPS:
    _SETUPS[key] = node_lib.setup(config, node, sizes, blocks_lib.load_manifest(node.data_dir))
    while len(_SETUPS) > KEPT_SETUPS:
      del _SETUPS[next(iter(_SETUPS))]
  return _SETUPS[key]


def handle(node_config: dict, kind: str, meta: dict, arrays) -> tuple:
  """One message on this node: (reply meta, reply arrays)."""
  from collab.flower import node as node_lib  # pylint: disable=g-import-not-at-top
  from collab.flower import server as server_lib  # pylint: disable=g-import-not-at-top
  from collab.settings import run  # pylint: disable=g-import-not-at-top
  node = node_lib.from_node_config(node_config)
  if kind == 'identify':
    return node_lib.identity(node, meta['config'], meta['version']), None
  config = run.config_from_json(meta['config'])
  params = server_lib.unflatten(arrays)
  started = time.time()
  if kind == 'train':
    s = setup_for(node, config, meta['sizes'])
    params, metrics, position = node_lib.train(node, config, params, int(meta['round']),
                                               meta['sizes'], meta['position'],
                                               meta['run_id'], s)
    return ({**metrics, 'position': position, 'seconds': time.time() - started},
            server_lib.flatten(params))
  if kind == 'evaluate':
    return {'result': node_lib.evaluate(node, config, params),
            'seconds': time.time() - started}, None
  raise ValueError(f'Unknown message kind {kind!r}.')


def serve(state_path: str, idle_s: float = IDLE_S) -> None:
  """Answers requests on the node's socket until idle for `idle_s`."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_compilation_cache_dir', os.path.join(state_path, 'jax-cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  sock, _ = _paths(state_path)
  listener = connection.Listener(sock, 'AF_UNIX', authkey=_key(state_path))
  last = [time.time()]

  def watch():
    while time.time() - last[0] < idle_s:
      time.sleep(min(5.0, idle_s))
    os._exit(0)  # pylint: disable=protected-access
  threading.Thread(target=watch, daemon=True).start()
  while True:
    with listener.accept() as conn:
      request = conn.recv()
      try:
        conn.send((True, handle(*request)))
      except Exception:  # pylint: disable=broad-except
        conn.send((False, traceback.format_exc(limit=8)))
      last[0] = time.time()


if __name__ == '__main__':
  serve(sys.argv[1].split('=', 1)[1])
