"""The sandbox: verdicts, limits, and a suite of hostile programs that must be contained."""

import os
import signal
import socket
import sys
import tempfile
import time

import pytest

from collab.evals.execution import sandbox
from collab.evals.execution import sandbox_exec

STRONG = not sandbox._bwrap_problem()  # pylint: disable=protected-access
needs_bwrap = pytest.mark.skipif(not STRONG, reason='bubblewrap cannot run here')


def _descendants() -> list:
  """Processes below this one (the sandboxes, their servers and programs)."""
  parents = {}
  for name in os.listdir('/proc'):
    if name.isdigit():
      try:
        with open(f'/proc/{name}/stat', encoding='utf-8', errors='replace') as f:
          parents[int(name)] = int(f.read().rsplit(')', 1)[1].split()[1])
      except (OSError, IndexError, ValueError):
        pass
  found, frontier = [], {os.getpid()}
  while frontier:
    frontier = {pid for pid, ppid in parents.items() if ppid in frontier}
    found += frontier
  return found


def _wait_no_descendants(seconds: float = 10.0) -> list:
  """Teardown of a killed pid namespace is asynchronous: poll until it is done."""
  deadline = time.monotonic() + seconds
  while _descendants() and time.monotonic() < deadline:
    time.sleep(0.05)
  return _descendants()


@pytest.fixture(params=['bwrap', 'weak'])
def allow_weak(request, monkeypatch):
  """Runs a test in both modes (weak forced by pretending bwrap is missing)."""
  if request.param == 'bwrap':
    if not STRONG:
      pytest.skip('bubblewrap cannot run here')
    return False
  monkeypatch.setattr(sandbox, '_bwrap_problem', lambda: 'forced by the test')
  return True


def test_verdicts(allow_weak):
  programs = ['print("hi")', 'raise ValueError("boom")', 'import sys; sys.exit(0)',
              'import os; os._exit(0)', 'x = (', '', 'while True: pass',
              'import sys; sys.stdout.buffer.write(b"\\xff\\xfeok")']
  outcomes = sandbox.run_many(programs, timeout=1.5, workers=2, allow_weak=allow_weak,
                              progress=False)
  assert [o.status for o in outcomes] == [
      'passed', 'failed', 'failed', 'failed', 'failed', 'passed', 'timeout', 'passed']
  assert {o.mode for o in outcomes} == {'weak' if allow_weak else 'bwrap'}
  assert outcomes[0].stdout == 'hi\n' and outcomes[0].returncode == 0
  assert 'ValueError: boom' in outcomes[1].stderr_tail
  assert 'SystemExit' in outcomes[2].stderr_tail  # An early exit(0) is not a pass.
  assert 'SyntaxError' in outcomes[4].stderr_tail
  assert outcomes[6].returncode is None and 1.5 <= outcomes[6].duration_s < 4.0
  assert outcomes[7].stdout == '\ufffd\ufffdok'  # Not UTF-8: replaced, not a crash.


def test_order_is_kept_and_outputs_are_capped(allow_weak):
  programs = [f'import time; time.sleep({0.3 * (i % 3)}); print({i})' for i in range(6)]
  programs.append('import sys\nfor _ in range(40): sys.stdout.write("x" * 10**6)\n'
                  'sys.stderr.write("e" * 10**6 + "END")')
  limits = sandbox.Limits(output_bytes=1000)
  outcomes = sandbox.run_many(programs, timeout=10, workers=2, allow_weak=allow_weak,
                              limits=limits, progress=False)
  assert [o.stdout for o in outcomes[:6]] == [f'{i}\n' for i in range(6)]
  big = outcomes[-1]
  assert big.status == 'passed'
  assert big.stdout == 'x' * 1000 and big.stderr_tail.endswith('eEND')
  assert 900 < len(big.stderr_tail) <= 1000


def test_clean_environment_and_stdin(allow_weak):
  outcome = sandbox.run_program(
      'import os, sys\nprint(sorted(os.environ))\nprint(repr(sys.stdin.read()))',
      timeout=5, allow_weak=allow_weak)
  names, stdin = outcome.stdout.splitlines()
  assert set(eval(names)) <= {'PATH', 'LANG', 'PWD', 'TMPDIR', 'HOME'}  # pylint: disable=eval-used
  assert stdin == "''"


def test_weak_mode_needs_consent(monkeypatch):
  monkeypatch.setattr(sandbox, '_bwrap_problem', lambda: 'no bwrap for this test')
  with pytest.raises(sandbox.SandboxUnavailableError, match='allow_weak_sandbox'):
    sandbox.run_program('print(1)', timeout=5)
  assert sandbox.sandbox_mode(allow_weak=True) == 'weak'


def test_bad_timeout():
  with pytest.raises(ValueError, match='timeout'):
    sandbox.run_many(['pass'], timeout=0)


@needs_bwrap
def test_each_program_gets_fresh_tmp_and_shm():
  programs = ['open("/tmp/mark", "w").write("1"); open("/dev/shm/mark", "w").write("1")',
              'import os; assert not os.path.exists("/tmp/mark")\n'
              'assert not os.path.exists("/dev/shm/mark")']
  outcomes = sandbox.run_many(programs, timeout=5, workers=1, progress=False)
  assert [o.status for o in outcomes] == ['passed', 'passed']


def _hostile_programs(targets, secrets, port) -> dict:
  """Attacks by name: escape, exhaust, snoop, signal, or flood."""
  return {
      'infinite loop': 'while True:\n  pass',
      'fork bomb': 'import os\nwhile True:\n  try:\n    os.fork()\n  except OSError:\n'
                   '    pass',
      'memory bomb': 'x = []\nwhile True:\n  x.append(bytearray(10**8))',
      'write outside': ''.join(f'open({t!r}, "w").write("x")\n' for t in targets[:1]) +
                       ''.join(f'try:\n  open({t!r}, "w").write("x")\nexcept OSError:\n'
                               '  pass\n' for t in targets[1:]) + 'raise SystemExit(1)',
      'read secrets': ''.join(f'try:\n  print(open({s!r}).read())\nexcept OSError:\n'
                              '  pass\n' for s in secrets) + 'raise SystemExit(1)',
      'network': f'import socket\nsocket.create_connection(("127.0.0.1", {port}), 1)',
      'internet': 'import socket\nsocket.create_connection(("1.1.1.1", 53), 1)',
      'signal parent': 'import os, signal\n'
                       f'for pid in (os.getppid(), 0, 1, -1, {os.getpid()}):\n'
                       '  try:\n    os.kill(pid, signal.SIGKILL)\n  except OSError:\n'
                       '    pass\nraise SystemExit(1)',
      'leave a daemon': 'import os, time\nif os.fork() == 0:\n  os.setsid()\n'
                        '  time.sleep(60)\nraise SystemExit(1)',
      'fill tmp': 'f = open("/tmp/big", "wb")\nwhile True:\n  f.write(b"x" * 10**6)',
      'close outputs, loop': 'import os\nos.close(1)\nos.close(2)\nwhile True:\n  pass',
  }


@needs_bwrap
def test_hostile_programs_are_contained(tmp_path):
  """Every attack fails (or times out), leaves nothing behind, and we go on working."""
  marker = f'PWNED-{os.getpid()}-{time.monotonic_ns()}'
  # The repository, the home folder, and the Python prefix (bound, but read-only).
  targets = [os.path.join(os.path.dirname(os.path.abspath(__file__)), marker),
             os.path.join(os.path.expanduser('~'), marker),
             os.path.join(sys.base_prefix, marker)]
  secret_dir = tempfile.mkdtemp(dir=os.path.expanduser('~')) if os.access(
      os.path.expanduser('~'), os.W_OK) else str(tmp_path)
  secrets = [os.path.join(secret_dir, 'secret.txt'), str(tmp_path / 'secret.txt')]
  for path in secrets:
    with open(path, 'w', encoding='utf-8') as f:
      f.write('TOP-SECRET')
  listener = socket.socket()
  listener.bind(('127.0.0.1', 0))
  listener.listen()
  listener.settimeout(0)
  hostile = _hostile_programs(targets, secrets, listener.getsockname()[1])
  try:
    start = time.monotonic()
    outcomes = dict(zip(hostile, sandbox.run_many(list(hostile.values()), timeout=2.0,
                                                  workers=2, progress=False)))
    elapsed = time.monotonic() - start
    for name, outcome in outcomes.items():
      assert outcome.status in ('failed', 'timeout'), (name, outcome)
    assert outcomes['infinite loop'].status == 'timeout'
    assert outcomes['fork bomb'].status == 'timeout'
    assert outcomes['close outputs, loop'].status == 'timeout'
    assert 'MemoryError' in outcomes['memory bomb'].stderr_tail or (
        outcomes['memory bomb'].status == 'timeout')
    assert 'TOP-SECRET' not in outcomes['read secrets'].stdout
    assert 'File too large' in outcomes['fill tmp'].stderr_tail
    assert not any(os.path.exists(t) for t in targets)
    with pytest.raises(BlockingIOError):
      listener.accept()  # Nobody reached our port.
    assert elapsed < 20
    assert _wait_no_descendants() == []
    assert sandbox.run_program('print(6 * 7)', timeout=5).stdout == '42\n'
  finally:
    listener.close()
    for path in targets + secrets:
      if os.path.exists(path):
        os.remove(path)
    if secret_dir != str(tmp_path):
      os.rmdir(secret_dir)


@needs_bwrap
def test_process_limit_holds():
  code = ('import os, time\nn = 0\ntry:\n  while True:\n    if os.fork() == 0:\n'
          '      time.sleep(2)\n      os._exit(0)\n    n += 1\nexcept OSError:\n  print(n)')
  outcome = sandbox.run_program(code, timeout=10, limits=sandbox.Limits(processes=8))
  assert outcome.status == 'passed'
  assert 0 < int(outcome.stdout) < 8
  assert _wait_no_descendants() == []


def test_signal_status_is_reported():
  """A program killed by a signal fails with returncode 128 + signal (bwrap) or -signal."""
  if not STRONG:
    pytest.skip('bubblewrap cannot run here')
  outcome = sandbox.run_program('import os, signal\nos.kill(os.getpid(), signal.SIGTERM)',
                                timeout=5)
  assert outcome.status == 'failed'
  assert outcome.returncode == 128 + signal.SIGTERM


@needs_bwrap
def test_a_broken_server_is_an_error_not_a_hang(monkeypatch):
  monkeypatch.setattr(sandbox_exec, '_server_source', lambda: 'import sys; sys.exit(3)')
  start = time.monotonic()
  outcomes = sandbox.run_many(['print(1)'] * 3, timeout=5, workers=2, progress=False)
  assert [o.status for o in outcomes] == ['error'] * 3
  assert 'sandbox server failed' in outcomes[0].stderr_tail
  assert time.monotonic() - start < 10


_AS_NOBODY = r"""
import os, sys
from collab.evals.execution import sandbox
assert os.geteuid() != 0 and sandbox.sandbox_mode() == 'bwrap'
programs = ['print(open("/proc/self/status").read().split("CapEff:")[1].split()[0])',
            'import os, signal\nfor pid in (os.getppid(), 0, -1):\n  try:\n'
            '    os.kill(pid, signal.SIGKILL)\n  except OSError:\n    pass\n'
            'print("alive")',
            'import socket\nsocket.create_connection(("1.1.1.1", 53), 1)',
            'import os\nwhile True:\n  try:\n    os.fork()\n  except OSError:\n    pass']
print([(o.status, o.stdout.strip()) for o in sandbox.run_many(programs, 2, progress=False)])
"""


def test_non_root_sandbox(tmp_path):
  """As an ordinary user bwrap makes a user namespace: the programs keep no capability."""
  import shutil  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import tqdm  # pylint: disable=import-outside-toplevel
  import collab  # pylint: disable=import-outside-toplevel
  python = f'/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}'
  paths = [os.path.dirname(os.path.dirname(os.path.abspath(collab.__file__))),
           os.path.dirname(os.path.dirname(tqdm.__file__))]
  bwrap = sandbox_exec.bwrap_binary()
  reachable = all(sandbox_exec._others_can_reach(p) for p in paths + [bwrap])  # pylint: disable=protected-access
  if os.geteuid() != 0 or not shutil.which('setpriv') or not os.path.exists(python) or (
      not reachable):
    pytest.skip('needs root, setpriv, a system Python of this version, readable sources')
  result = subprocess.run(
      ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups', python, '-c',
       _AS_NOBODY], env={'PATH': '/usr/bin:/bin', 'PYTHONPATH': ':'.join(paths)},
      cwd=str(tmp_path), capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == str([('passed', '0000000000000000'),
                                       ('passed', 'alive'), ('failed', ''),
                                       ('timeout', '')])
