"""Writing one benchmark's section of docs/BENCHMARKS.md without touching the others.

A section is a Markdown heading line and everything up to the next heading of the same or
a higher level, so a bench that owns `### CPU ...` under `## Train step ...` replaces its
subsection and keeps its siblings and the parent's prose. Writes are atomic.

Every bench takes `--record=docs/BENCHMARKS.md` (`define_flag()`); bench.run_all passes
it to the benches that define it.
"""

import datetime
import os
import platform

from absl import flags

from collab import io
from collab import provenance

DEFAULT_PATH = 'docs/BENCHMARKS.md'


def define_flag() -> flags.FlagHolder:
  """The `--record` flag: a Markdown file whose section this bench rewrites ('' = none)."""
  return flags.DEFINE_string('record', '', 'Rewrite this benchmark\'s section of this '
                             f'Markdown file (e.g. {DEFAULT_PATH}); empty: print only.')


def _level(line: str) -> int:
  """Heading level of a Markdown line (0 if it is not an ATX heading)."""
  stripped = line.lstrip('#')
  hashes = len(line) - len(stripped)
  return hashes if 0 < hashes <= 6 and (not stripped or stripped[0] == ' ') else 0


def _section_end(lines: list, start: int) -> int:
  """Index of the first line after the section whose heading is lines[start]."""
  level = _level(lines[start])
  in_code = False
  for i in range(start + 1, len(lines)):
    if lines[i].lstrip().startswith('```'):
      in_code = not in_code  # '#' lines inside code blocks are not headings.
    elif not in_code and 0 < _level(lines[i]) <= level:
      return i
  return len(lines)


def _find(lines: list, heading: str) -> int:
  matches = [i for i, line in enumerate(lines) if line.rstrip() == heading.rstrip()]
  if len(matches) > 1:
    raise ValueError(f'Heading {heading!r} appears {len(matches)} times; make it unique.')
  return matches[0] if matches else -1


def replace_section(path: str, heading: str, text: str, parent: str = '') -> None:
  """Sets the body of `heading`'s section in `path` to `text`; other sections are kept.

  A missing section is added at the end of `parent`'s section (created if missing too),
  or without a parent before the file's first second-level heading (after the title).
  """
  if not _level(heading):
    raise ValueError(f'heading must be a Markdown heading line like "## Name", got {heading!r}.')
  lines = []
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      lines = f.read().splitlines()
  block = [heading, ''] + text.strip('\n').splitlines() + ['']
  start = _find(lines, heading)
  if start >= 0:
    lines[start:_section_end(lines, start)] = block
  elif parent:
    if _find(lines, parent) < 0:
      replace_section(path, parent, '')
      replace_section(path, heading, text, parent)
      return
    end = _section_end(lines, _find(lines, parent))
    if end and lines[end - 1].strip():
      block = [''] + block
    lines[end:end] = block
  else:
    first = next((i for i, line in enumerate(lines) if _level(line) == 2), len(lines))
    if first and lines[first - 1].strip():
      block = [''] + block
    lines[first:first] = block
  io.atomic_write_text(path, '\n'.join(lines).rstrip('\n') + '\n')


# collab.provenance records the same machine into results.json; bench keeps its names.
cpu_model = provenance.cpu_model
usable_cores = provenance.usable_cores


def stamp() -> str:
  """Date, machine and load: the conditions line every recorded section starts with."""
  load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
  return (f'Measured {datetime.date.today().isoformat()} on {cpu_model()} '
          f'({os.cpu_count()} cores, {platform.system()} {platform.machine()}, Python '
          f'{platform.python_version()}); load average {load:.1f} at the end of the run.')


# /proc/cpuinfo flags worth naming beside a CPU table: the vector and matrix extensions
# XLA, YNNPACK, oneDNN and MKL choose kernels by.
_VECTOR_FLAG_PREFIXES = ('avx', 'fma', 'amx')


def vector_flags() -> list:
  """The CPU's vector/matrix extensions (avx2, avx512*, amx*, fma) from /proc/cpuinfo."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith('flags'):
          return sorted(flag for flag in line.split(':', 1)[1].split()
                        if flag.startswith(_VECTOR_FLAG_PREFIXES))
  except OSError:
    pass
  return []


def machine(threads: str = '') -> str:
  """One paragraph for beside a CPU table: processor, extensions, cores, jax and XLA flags
  in force, thread settings (plus `threads`, the bench's own), load average now."""
  import jax  # pylint: disable=import-outside-toplevel
  env = ', '.join(f'{name}={os.environ[name]}' for name in (
      'OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS') if name in os.environ)
  load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
  return (f'Machine: {cpu_model()}; {os.cpu_count()} cores ({usable_cores()} usable); '
          f'vector extensions: {" ".join(vector_flags()) or "unknown"}. jax '
          f'{jax.__version__} on {jax.default_backend()}, XLA_FLAGS='
          f'"{os.environ.get("XLA_FLAGS", "")}", XLA CPU intra-op threads: one per usable '
          f'core. Threads: {threads or "defaults"}{"; " + env if env else ""}. Load '
          f'average {load:.1f}.')
