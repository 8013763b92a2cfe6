"""A whole Flower federation on this machine: a SuperLink and one SuperNode per participant.

`node_data` gives each node a data folder of its own participant only (the blocks,
the tokenizer and a manifest naming that participant), cut from a pooled build;
`Federation` starts and stops the Flower processes (insecure: localhost only), and
`run_server` submits a run with `flwr run` and waits for it. launch.flower_local and
the tests use these; on real machines each organization runs launch.flower_node and the
server launch.flower_server (README, "Federated training across machines").
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import NamedTuple

from collab import io
from collab.data import blocks as blocks_lib

SUPERLINK_PORTS = ('serverappio', 'fleet', 'control')


def node_data(data_dir: str, org: str, out: str) -> str:
  """OUT: a data folder with only `org`'s blocks (and the shared tokenizer); idempotent."""
  manifest = blocks_lib.load_manifest(data_dir)
  if org not in manifest['participants']:
    raise ValueError(f'{data_dir!r} has no participant {org!r} (it has '
                     f'{manifest["participants"]}).')
  wanted = {**manifest, 'participants': [org]}
  path = os.path.join(out, 'manifest.json')
  if os.path.isfile(path) and io.read_json(path) == wanted:
    return out
  with io.atomic_dir(out) as tmp:
    os.makedirs(os.path.join(tmp, 'blocks'))
    for split in ('train', 'valid'):
      shutil.copy2(blocks_lib.blocks_path(data_dir, org, split),
                   blocks_lib.blocks_path(tmp, org, split))
    shutil.copytree(os.path.join(data_dir, 'tokenizer'), os.path.join(tmp, 'tokenizer'))
    io.atomic_write_json(os.path.join(tmp, 'manifest.json'), wanted)
  return out


def free_ports(count: int) -> list:
  """`count` TCP ports free on 127.0.0.1 now."""
  socks = [socket.socket() for _ in range(count)]
  try:
    for s in socks:
      s.bind(('127.0.0.1', 0))
    return [s.getsockname()[1] for s in socks]
  finally:
    for s in socks:
      s.close()


def _bin(name: str) -> str:
  """A Flower command next to this interpreter (the venv's), else on PATH."""
  here = os.path.join(os.path.dirname(sys.executable), name)
  return here if os.path.exists(here) else name


class Ports(NamedTuple):
  serverappio: int
  fleet: int
  control: int


class Federation:
  """Flower processes on localhost, stopped by `stop` (or leaving a `with` block)."""

  def __init__(self, root: str, env: dict | None = None):
    self.root = root
    self.env = {**os.environ, **(env or {})}
    self.env['FLWR_HOME'] = os.path.join(root, 'flwr-home')
    self.ports = Ports(*free_ports(3))
    self.procs = {}  # name -> Popen
    os.makedirs(os.path.join(root, 'logs'), exist_ok=True)

  def _start(self, name: str, argv: list) -> subprocess.Popen:
    log = open(os.path.join(self.root, 'logs', f'{name}.log'), 'ab')
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                            start_new_session=True)
    self.procs[name] = proc
    return proc

  def log(self, name: str) -> str:
    with open(os.path.join(self.root, 'logs', f'{name}.log'), errors='replace') as f:
      return f.read()

  def start_superlink(self) -> None:
    p = self.ports
    self._start('superlink', [
        _bin('flower-superlink'), '--insecure', '--disable-runtime-dependency-installation',
        f'--serverappio-api-address=127.0.0.1:{p.serverappio}',
        f'--fleet-api-address=127.0.0.1:{p.fleet}',
        f'--control-api-address=127.0.0.1:{p.control}',
        f'--database={os.path.join(self.root, "superlink.db")}',
        f'--storage-dir={os.path.join(self.root, "superlink-storage")}'])
    _wait_port(p.control, self.procs['superlink'], 'the SuperLink')

  def start_node(self, org: str, data_path: str, state_path: str) -> subprocess.Popen:
    """A SuperNode for `org` (replacing a stopped one of the same name)."""
    (port,) = free_ports(1)
    return self._start(f'node-{org}', [
        _bin('flower-supernode'), '--insecure', f'--superlink=127.0.0.1:{self.ports.fleet}',
        f'--clientappio-api-address=127.0.0.1:{port}',
        '--node-config', f'org="{org}" data-path="{data_path}" state-path="{state_path}"'])

  def kill(self, name: str) -> None:
    """SIGKILL to a process and its children (the node's ClientApp processes)."""
    proc = self.procs.pop(name)
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    proc.wait()

  def stop(self) -> None:
    for name in list(self.procs):
      self.kill(name)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.stop()


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout_s: float = 60) -> None:
  deadline = time.time() + timeout_s
  while time.time() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f'{what} exited with {proc.returncode} before listening on {port}.')
    with socket.socket() as s:
      if s.connect_ex(('127.0.0.1', port)) == 0:
        return
    time.sleep(0.2)
  raise TimeoutError(f'{what} did not listen on 127.0.0.1:{port} within {timeout_s} s.')
