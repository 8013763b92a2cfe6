"""collab/host.py: glibc's huge-page tunable, asked for once, by starting the program over."""

import os
import subprocess
import sys

from collab import host


def test_hugepage_environ_adds_the_tunable_once_only_when_asked_on_linux():
  on = {'COLLAB_HUGEPAGES': '1'}
  assert host.hugepage_environ(on, 'linux')['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=1'
  kept = host.hugepage_environ({**on, 'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, 'linux')
  assert kept == {**on, 'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'}
  assert host.hugepage_environ(kept, 'linux') is None  # Set: no second start.
  assert host.hugepage_environ({**on, 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'},
                               'linux') is None
  # On by default; COLLAB_HUGEPAGES=0 turns it off.
  assert host.hugepage_environ({}, 'linux') == {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
  assert host.hugepage_environ({'COLLAB_HUGEPAGES': '0'}, 'linux') is None
  assert host.hugepage_environ({'COLLAB_HUGEPAGES': 'yes'}, 'linux') is not None  # Only 0 is off.
  assert host.hugepage_environ(on, 'darwin') is None


def test_without_hugepages_restores_the_environment_a_peer_program_gets():
  env = {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1', 'A': 'b'}
  assert host.without_hugepages(env) == {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2',
                                         'A': 'b', 'COLLAB_HUGEPAGES': '0'}
  assert host.without_hugepages({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}) == {
      'COLLAB_HUGEPAGES': '0'}
  assert host.hugepage_environ(host.without_hugepages(env), 'linux') is None


def test_use_hugepages_starts_the_program_over_with_the_tunable():
  code = ('import os, sys; print("start", flush=True); from collab import host; '
          'host.use_hugepages(); print(os.environ.get("GLIBC_TUNABLES"), sys.argv[1:])')
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  env[host.SWITCH] = '1'
  out = subprocess.run([sys.executable, '-c', code, 'x', '--flag=1'], env=env, check=True,
                       capture_output=True, text=True).stdout.splitlines()
  if not sys.platform.startswith('linux'):
    assert out == ['start', "None ['x', '--flag=1']"]
    return
  # Once started over (same arguments), it runs on with the tunable set.
  assert out == ['start', 'start', "glibc.malloc.hugetlb=1 ['x', '--flag=1']"]
  env[host.SWITCH] = '0'
  out = subprocess.run([sys.executable, '-c', code], env=env, check=True,
                       capture_output=True, text=True).stdout.splitlines()
  assert out == ['start', 'None []']
