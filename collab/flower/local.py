"""A whole Flower federation on this machine: a SuperLink and one SuperNode per participant.

`node_data` gives each node a data folder of its own participant only (the blocks,
the tokenizer and a manifest naming that participant), cut from a pooled build;
`Federation` starts and stops the Flower processes (insecure: localhost only), and
`run_server` submits a run with `flwr run` and waits for it. launch.flower_local and
the tests use these; on real machines each organization runs launch.flower_node and the
server launch.flower_server (README, "Federated training across machines").
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from collab import io
from collab.data import blocks as blocks_lib

APP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'app')


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


class RunFailed(RuntimeError):
  """A Flower run that did not complete; the message says why (the ServerApp's error)."""


FEDERATION = 'collab'  # The SuperLink connection's name in FLWR_HOME/config.toml.


def cli_env(home: str, superlink: str, root_certificates: str = '',
            env: dict | None = None) -> dict:
  """The environment for Flower's commands: FLWR_HOME=home, whose config.toml names the
  SuperLink (TLS with `root_certificates`, else insecure), and this venv's commands."""
  os.makedirs(home, exist_ok=True)
  tls = (f'root-certificates = "{os.path.abspath(root_certificates)}"' if root_certificates
         else 'insecure = true')
  io.atomic_write_text(os.path.join(home, 'config.toml'),
                       f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
                       f'address = "{superlink}"\n{tls}\n')
  bindir = os.path.dirname(sys.executable)  # Flower spawns flwr-serverapp etc. by name.
  return {**os.environ, 'FLWR_HOME': home, 'FLWR_TELEMETRY_ENABLED': '0',
          'FLWR_DISABLE_UPDATE_CHECK': '1', 'FLWR_SUPEREXEC_TASK_POLL_INTERVAL': '0.2',
          'PATH': bindir + os.pathsep + os.environ.get('PATH', ''), **(env or {})}


def run_app(env: dict, workdir: str, federation: str = FEDERATION, log: str = '',
            timeout_s: float | None = None) -> None:
  """`flwr run` of collab's app on WORKDIR, waiting for its end (ServerApp log to `log`);
  RunFailed with the ServerApp's own error when it did not complete."""
  from collab.flower import server as server_lib  # pylint: disable=g-import-not-at-top
  started = time.time()
  out = subprocess.run([_bin('flwr'), 'run', APP_DIR, federation, '--format', 'json',
                        '--run-config', f'workdir="{os.path.abspath(workdir)}"'],
                       env=env, capture_output=True, text=True, check=False)
  try:
    run_id = int(json.loads(out.stdout)['run-id'])
  except (ValueError, KeyError) as e:
    raise RunFailed(f'flwr run failed ({out.returncode}): {out.stdout}{out.stderr}') from e
  log = log or os.path.join(workdir, 'server.log')
  with open(log, 'ab') as f:
    subprocess.run([_bin('flwr'), 'log', str(run_id), federation, '--stream'], env=env,
                   stdout=f, stderr=subprocess.STDOUT, check=False, timeout=timeout_s)
  out = subprocess.run([_bin('flwr'), 'ls', federation, '--run-id', str(run_id), '--format',
                        'json'], env=env, capture_output=True, text=True, check=False)
  status = json.loads(out.stdout)['runs'][0]
  ended = server_lib.read_status(workdir)
  if ended is None or ended['time'] < started or not ended['ok']:
    why = ended['error'] if ended and ended['time'] >= started else (
        f"run {run_id} ended {status['status']} {status.get('status-details', '')}")
    raise RunFailed(f'The Flower run on {workdir!r} failed: {why} (ServerApp log: {log}).')


class Federation:
  """Flower processes on localhost (insecure), stopped by `stop` or leaving a `with`.

  flwr 1.42's SuperLink serves the Fleet, Control and ServerAppIo APIs over HTTP on one
  port; each SuperNode listens on a port of its own for its ClientApp processes. The
  Flower CLI's state (its SuperLink connection, unpacked apps) lives in ROOT/flwr-home.
  """

  FEDERATION = FEDERATION

  def __init__(self, root: str, env: dict | None = None):
    self.root = os.path.abspath(root)
    (self.port,) = free_ports(1)
    self.env = cli_env(os.path.join(self.root, 'flwr-home'), f'127.0.0.1:{self.port}',
                       env=env)
    self.procs = {}  # name -> Popen
    os.makedirs(os.path.join(self.root, 'logs'), exist_ok=True)

  def log_path(self, name: str) -> str:
    return os.path.join(self.root, 'logs', f'{name}.log')

  def _start(self, name: str, argv: list) -> subprocess.Popen:
    with open(self.log_path(name), 'ab') as log:
      proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                              start_new_session=True)
    self.procs[name] = proc
    return proc

  def log(self, name: str) -> str:
    with open(self.log_path(name), errors='replace') as f:
      return f.read()

  def start_superlink(self, timeout_s: float = 60) -> None:
    proc = self._start('superlink', [
        _bin('flower-superlink'), '--insecure', '--disable-runtime-dependency-installation',
        '--host', '127.0.0.1', '--port', str(self.port)])
    _wait(lambda: _healthy(self.port), proc, 'the SuperLink', self.log_path('superlink'),
          timeout_s)

  def start_node(self, org: str, data_path: str, state_path: str, name: str = '',
                 timeout_s: float = 60) -> subprocess.Popen:
    """A SuperNode for `org`, as process `name` (default node-ORG; a new one where one of
    that name was killed); returns once it has registered with the SuperLink."""
    name = name or f'node-{org}'
    if os.path.exists(self.log_path(name)):
      os.rename(self.log_path(name), self.log_path(name) + f'.{time.time():.0f}')
    (port,) = free_ports(1)
    proc = self._start(name, [
        _bin('flower-supernode'), '--insecure', '--superlink', f'127.0.0.1:{self.port}',
        '--host', '127.0.0.1', '--port', str(port),
        '--node-config', f'org="{org}" data-path="{data_path}" state-path="{state_path}"'])
    _wait(lambda: 'SuperNode ID' in self.log(name), proc, f'the SuperNode of {org!r}',
          self.log_path(name), timeout_s)
    return proc

  def run(self, workdir: str, timeout_s: float | None = None) -> None:
    """Runs the ServerApp on WORKDIR (its config.json written) to its end, its log in
    WORKDIR/server.log; RunFailed."""
    run_app(self.env, workdir, self.FEDERATION, timeout_s=timeout_s)

  def kill(self, name: str) -> None:
    """SIGKILL to a process and everything it started (a node's ClientApp processes)."""
    proc = self.procs.pop(name)
    for pid in [proc.pid] + _descendants(proc.pid):
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    proc.wait()

  def stop(self) -> None:
    for name in list(self.procs):
      self.kill(name)
    # Flower's own children that outlived their parents still name our port.
    subprocess.run(['pkill', '-KILL', '-f', f'127.0.0.1:{self.port}( |$)'], check=False)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.stop()


def _descendants(pid: int) -> list:
  out = subprocess.run(['pgrep', '-P', str(pid)], capture_output=True, text=True, check=False)
  children = [int(p) for p in out.stdout.split()]
  return children + [d for c in children for d in _descendants(c)]


def _bin(name: str) -> str:
  """A Flower command next to this interpreter (the venv's), else on PATH."""
  here = os.path.join(os.path.dirname(sys.executable), name)
  return here if os.path.exists(here) else name


def _healthy(port: int) -> bool:
  try:
    with urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=2) as r:
      return r.status == 200
  except OSError:
    return False


def _wait(ready, proc: subprocess.Popen, what: str, log: str, timeout_s: float) -> None:
  deadline = time.time() + timeout_s
  while not ready():
    if proc.poll() is not None:
      raise RunFailed(f'{what} exited with {proc.returncode}; see {log}.')
    if time.time() > deadline:
      raise RunFailed(f'{what} was not up within {timeout_s:.0f} s; see {log}.')
    time.sleep(0.1)
