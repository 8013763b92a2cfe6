"""Clone detection throughput: collab's hashed-window index against pylint's symilar.

Three measurements, in one run on this machine:

1. Agreement, on a small corpus (the first `--small_mb` of the Python standard library's
   .py files, sorted by path): both detectors find the clones of >= 6 lines between
   different files; their (file, line range) sets and covered lines are compared.
2. Throughput on a real corpus (the standard library, up to `--compare_mb`): symilar
   (min_lines 6) and collab (index build + cross-file runs), in lines per second.
3. Scale: indexes over up to `--scale_lines` real lines (standard library, then the
   installed site-packages) split into `--participants` participants, then
   `--samples` samples of `--sample_lines` lines audited against all of them; the
   measured rates give the projected time to audit 20,000 samples of 40 lines against
   10 million training lines.

  python -m bench.clones [--small_mb=3] [--compare_mb=0] [--scale_lines=10000000]
      [--samples=20000] [--sample_lines=40] [--participants=3] [--out=results.json]

symilar is pylint's duplicate-code detector (`pip install -e .[bench]`).
"""

import glob
import io as std_io
import json
import os
import platform
import sysconfig
import time

from absl import app
from absl import flags
import numpy as np

from collab import io
from collab.evals.clones import index as clones

_SMALL_MB = flags.DEFINE_float('small_mb', 3.0, 'Corpus size for the agreement check.')
_COMPARE_MB = flags.DEFINE_float('compare_mb', 0.0, 'Corpus size for the throughput '
                                 'comparison with symilar; 0: the whole standard library.')
_SCALE_LINES = flags.DEFINE_integer('scale_lines', 10_000_000, 'Training lines indexed '
                                    'at scale (as many as installed, up to this).')
_SAMPLES = flags.DEFINE_integer('samples', 20_000, 'Samples audited at scale.')
_SAMPLE_LINES = flags.DEFINE_integer('sample_lines', 40, 'Lines per sample (512 tokens).')
_PARTICIPANTS = flags.DEFINE_integer('participants', 3, 'Indexes the scale corpus is split into.')
_MIN_LINES = flags.DEFINE_integer('min_lines', 6, 'Clone threshold, both tools.')
_OUT = flags.DEFINE_string('out', '', 'Optional JSON file for the results.')


def read_py_files(root: str, exclude: str = ''):
  """(relative path, text) of every UTF-8 .py file under root, sorted by path."""
  files = []
  for path in sorted(glob.glob(os.path.join(root, '**', '*.py'), recursive=True)):
    if exclude and exclude in path:
      continue
    try:
      with open(path, encoding='utf-8') as f:
        files.append((os.path.relpath(path, root), f.read()))
    except (UnicodeDecodeError, OSError):
      continue
  return files


def first_mb(files, mb: float):
  """The first files totalling at least `mb` megabytes (all when mb <= 0)."""
  if mb <= 0:
    return files
  out, size = [], 0
  for name, text in files:
    if size >= mb * 1e6:
      break
    out.append((name, text))
    size += len(text)
  return out


def num_lines(files) -> int:
  return sum(text.count('\n') + 1 for _, text in files)


def _timed(fn, *args):
  """(wall seconds, CPU seconds of this process, result) of fn(*args)."""
  wall, cpu = time.perf_counter(), time.process_time()
  result = fn(*args)
  return time.perf_counter() - wall, time.process_time() - cpu, result


def run_symilar(files, min_lines: int):
  """symilar's cross-file clones: {(file, first line, last line)}, 1-based.

  symilar reports [start, end) in 0-based numbers, `end` being the next non-blank line;
  ranges are converted to the first and last non-blank line inside.
  """
  from pylint.checkers.symilar import Symilar  # Only the benchmark needs pylint.
  sim = Symilar(min_lines=min_lines, ignore_comments=True)
  for name, text in files:
    sim.append_stream(name, std_io.StringIO(text))
  commons = list(sim._iter_sims())  # The computation without the text report.
  ranges = set()
  for c in commons:
    for lines, a, b in ((c.fst_lset, c.fst_file_start, c.fst_file_end),
                        (c.snd_lset, c.snd_file_start, c.snd_file_end)):
      inside = [s.line_number for s in lines.stripped_lines if a <= s.line_number < b]
      ranges.add((lines.name, inside[0] + 1, inside[-1] + 1))
  return ranges


def run_collab(files, min_lines: int):
  """collab's cross-file clones: maximal runs of windows that occur in at least two
  files (symilar compares pairs of different files)."""
  index = clones.build_index(({'path': n, 'content': t} for n, t in files),
                             min_lines=min_lines, progress=False)
  first_R, length_R = index.runs(index.doc_freq_U[index.lookup(index.win_hash_N)] >= 2)
  return {(str(index.path_D[index.win_doc_N[g]]), int(index.win_start_N[g]),
             int(index.win_end_N[g + n - 1])) for g, n in zip(first_R, length_R)}


def agreement(files, sym: set, ours: set) -> dict:
  """Exact range matches, after trimming symilar's ranges to lines collab keeps, and
  overlap of the covered kept lines."""
  kept = {n: set(clones.line_hashes(t)[1].tolist()) for n, t in files}

  def trim(r):
    inside = [x for x in range(r[1], r[2] + 1) if x in kept[r[0]]]
    return (r[0], inside[0], inside[-1]) if inside else None

  def cover(ranges):
    return {(n, x) for n, a, b in ranges for x in range(a, b + 1) if x in kept[n]}

  sym_trim = {t for t in map(trim, sym) if t}
  cs, co = cover(sym), cover(ours)
  return dict(files=len(files), lines=num_lines(files), symilar_ranges=len(sym),
              collab_ranges=len(ours), exact_matches=len(sym & ours),
              exact_matches_trimmed=len(sym_trim & ours),
              symilar_lines=len(cs), collab_lines=len(co), common_lines=len(cs & co),
              only_symilar=sorted(sym_trim - ours)[:5], only_collab=sorted(ours - sym_trim)[:5])


def compare(files, min_lines: int, repeats: int = 3) -> dict:
  """One symilar run (it is slow); collab's median of `repeats` runs. Wall and CPU time."""
  lines = num_lines(files)
  sym_wall, sym_cpu, _ = _timed(run_symilar, files, min_lines)
  runs = sorted(_timed(run_collab, files, min_lines)[:2] for _ in range(repeats))
  wall, cpu = runs[len(runs) // 2]
  return dict(files=len(files), lines=lines, symilar_s=sym_wall, symilar_cpu_s=sym_cpu,
              collab_s=wall, collab_cpu_s=cpu, symilar_lines_per_s=lines / sym_wall,
              collab_lines_per_s=lines / wall, speedup_wall=sym_wall / wall,
              speedup_cpu=sym_cpu / cpu)


def scale(files, participants: int, samples: int, sample_lines: int, min_lines: int):
  """Build and audit rates at scale; projection to 10M training lines, 20k samples."""
  parts = [files[p::participants] for p in range(participants)]

  def build():
    return [clones.build_index(({'path': n, 'content': t} for n, t in part),
                               participant=f'p{p}', min_lines=min_lines, progress=False)
            for p, part in enumerate(parts)]

  build_s, build_cpu, indexes = _timed(build)
  rng = np.random.default_rng(0)
  texts = []
  for i in rng.integers(0, len(files), samples):  # Real code: most samples hold clones.
    lines = files[i][1].split('\n')
    s = int(rng.integers(0, max(1, len(lines) - sample_lines)))
    texts.append('\n'.join(lines[s:s + sample_lines]))
  query_lines = sum(t.count('\n') + 1 for t in texts)

  def audit():
    return [spans for c in range(0, len(texts), 200)
            for spans in clones.find_spans_batch(texts[c:c + 200], indexes)]

  audit_s, audit_cpu, found = _timed(audit)
  lines = num_lines(files)
  build_rate, audit_rate = lines / build_s, query_lines / audit_s
  return dict(train_lines=lines, windows=int(sum(ix.win_hash_N.size for ix in indexes)),
              build_s=build_s, build_cpu_s=build_cpu, build_lines_per_s=build_rate,
              samples=samples, sample_lines=query_lines, audit_s=audit_s,
              audit_cpu_s=audit_cpu, audit_lines_per_s=audit_rate,
              samples_with_clones=sum(map(bool, found)),
              projected_s=10_000_000 / build_rate + 20_000 * 40 / audit_rate)


def main(argv):
  del argv
  stdlib = sysconfig.get_paths()['stdlib']
  std_files = read_py_files(stdlib, exclude='site-packages')
  w = _MIN_LINES.value
  results = dict(machine=f'{platform.processor() or platform.machine()}, '
                         f'{os.cpu_count()} cores', python=platform.python_version(),
                 numpy=np.__version__)
  small = first_mb(std_files, _SMALL_MB.value)
  results['agreement'] = agreement(small, run_symilar(small, w), run_collab(small, w))
  print(json.dumps({'agreement': results['agreement']}, indent=1), flush=True)
  results['small'] = compare(small, w)
  results['compare'] = compare(first_mb(std_files, _COMPARE_MB.value), w)
  print(json.dumps({k: results[k] for k in ('small', 'compare')}, indent=1), flush=True)
  pool, total = [], 0
  for root, exclude in ((stdlib, 'site-packages'), (sysconfig.get_paths()['purelib'], '')):
    for name, text in read_py_files(root, exclude):
      if total >= _SCALE_LINES.value:
        break
      pool.append((name, text))
      total += text.count('\n') + 1
  results['scale'] = scale(pool, _PARTICIPANTS.value, _SAMPLES.value, _SAMPLE_LINES.value, w)
  print(json.dumps({'scale': results['scale']}, indent=1), flush=True)
  if _OUT.value:
    io.atomic_write_json(_OUT.value, results)


if __name__ == '__main__':
  app.run(main)
