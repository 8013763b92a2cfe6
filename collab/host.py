"""Host-process settings that change no result: transparent huge pages for XLA's buffers.

XLA:CPU maps each step's large temporary buffers afresh, so every step first-touches them
one 4 KiB page at a time: ~305,000 page faults and ~0.45 CPU s of kernel time per `small`
train step (16 x 256 tokens) on a 2-core Intel Xeon, 17% of the step's CPU time
(docs/BENCHMARKS.md). glibc (>= 2.35) asks the kernel for transparent huge pages on the
memory it maps when its tunable `glibc.malloc.hugetlb=1` is set; with it the same step
takes ~950 faults and 1.19 s instead of 1.43 s. The numbers computed are the same:
only where the memory comes from changes.

It is on by default on Linux; `COLLAB_HUGEPAGES=0` turns it off. The whole default study
(many short runs with sampling in between) is what decided it, not a step: cold on a
quiet 2-core AMD EPYC it took 273 s with huge pages against 316 s without (kernel time
48 against 123 CPU s; training faster, sampling ~5% slower; docs/BENCHMARKS.md). An
earlier back-to-back comparison on an Intel Xeon had found the study slower with them
(511 s against 454 s warm), which is why they were opt-in until then. PyTorch's train
step runs ~25% longer with the tunable, so the benches' PyTorch peers run without it
(`without_hugepages`). glibc reads tunables when a process starts, so
`use_hugepages()` re-executes the program once, with the same command line and
`GLIBC_TUNABLES` extended, before any work (the launchers and the train-step benches call
it first). Nothing happens off Linux or when the tunable is already set; a glibc without
the tunable ignores it, and a kernel with transparent huge pages `never` just keeps 4 KiB
pages.
"""

import os
import sys
from typing import Mapping, Optional

TUNABLE = 'glibc.malloc.hugetlb'
SETTING = f'{TUNABLE}=1'
SWITCH = 'COLLAB_HUGEPAGES'  # '0': leave the allocator; anything else: ask for huge pages.


def hugepage_environ(environ: Mapping[str, str],
                     platform: str = sys.platform) -> Optional[dict]:
  """`environ` with glibc asked for transparent huge pages, or None if there is nothing
  to change (not Linux, turned off with COLLAB_HUGEPAGES=0, or the tunable already set,
  to any value)."""
  if not platform.startswith('linux') or environ.get(SWITCH) == '0':
    return None
  tunables = environ.get('GLIBC_TUNABLES', '')
  if TUNABLE + '=' in tunables:
    return None
  return {**environ, 'GLIBC_TUNABLES': ':'.join(t for t in (tunables, SETTING) if t)}


def without_hugepages(environ: Mapping[str, str]) -> dict:
  """`environ` as a program that is not collab's would get it: SETTING taken out of
  GLIBC_TUNABLES and COLLAB_HUGEPAGES=0 (so a collab program started in it stays out)."""
  tunables = [t for t in environ.get('GLIBC_TUNABLES', '').split(':') if t and t != SETTING]
  out = {k: v for k, v in environ.items() if k != 'GLIBC_TUNABLES'}
  if tunables:
    out['GLIBC_TUNABLES'] = ':'.join(tunables)
  return {**out, SWITCH: '0'}


def use_hugepages() -> None:
  """Re-executes this program with SETTING in GLIBC_TUNABLES unless it is set (see the
  module docstring); returns only when nothing needs changing. Call it before any work:
  the new process starts the program over."""
  environ = hugepage_environ(os.environ)
  if environ is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, environ)
