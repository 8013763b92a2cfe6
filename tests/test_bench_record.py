"""bench/record.py: one bench's section is rewritten, every other line is kept."""

import pytest

from bench import record
from bench import run_all

DOC = """# Benchmarks

Intro.

## Train step (`bench/train_step.py`)

Hand-written prose.

### CPU

old table

### GPU

gpu figures

## Sampling

```
# not a heading
```
sampling text
"""


def _write(tmp_path, text=DOC):
  path = tmp_path / 'BENCHMARKS.md'
  path.write_text(text)
  return str(path)


def test_replaces_only_the_subsection(tmp_path):
  path = _write(tmp_path)
  record.replace_section(path, '### CPU', 'new table',
                         parent='## Train step (`bench/train_step.py`)')
  text = open(path).read()
  assert text == DOC.replace('old table', 'new table')


def test_code_block_lines_are_not_headings(tmp_path):
  path = _write(tmp_path)
  record.replace_section(path, '## Sampling', 'fresh')
  text = open(path).read()
  assert text.endswith('## Sampling\n\nfresh\n')
  assert 'gpu figures' in text and '# not a heading' not in text


def test_missing_sections_are_added_in_place(tmp_path):
  path = _write(tmp_path)
  record.replace_section(path, '### Multi-host', 'mh', parent='## Sampling')
  record.replace_section(path, '## Clones', 'cl')
  text = open(path).read()
  assert text.index('## Clones') < text.index('## Train step')  # Before the first section.
  assert text.index('Intro.') < text.index('## Clones')
  assert text.rstrip().endswith('### Multi-host\n\nmh')
  assert text.count('old table') == 1
  record.replace_section(str(tmp_path / 'new.md'), '### A', 'a', parent='## P')
  assert open(tmp_path / 'new.md').read() == '## P\n\n### A\n\na\n'


def test_bad_heading_and_duplicates_raise(tmp_path):
  path = _write(tmp_path, DOC + '\n### CPU\n')
  with pytest.raises(ValueError, match='appears 2 times'):
    record.replace_section(path, '### CPU', 'x')
  with pytest.raises(ValueError, match='Markdown heading'):
    record.replace_section(path, 'CPU', 'x')


def test_runner_passes_record_only_where_defined():
  assert '--record=docs/BENCHMARKS.md' in run_all.command('train_step', 'docs/BENCHMARKS.md')
  assert not any(a.startswith('--record') for a in run_all.command('train_step', ''))


def test_gpu_check_runs_its_cpu_variants_so_a_device_session_needs_no_fixing(tmp_path):
  """The prepared GPU script must not rot while no device is lent: smoke it on the CPU."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'gpu.json'
  subprocess.run([sys.executable, '-m', 'bench.gpu_check', '--size=tiny', '--steps=1',
                  '--batch=2', f'--out={out}'], check=True, capture_output=True, timeout=300,
                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  variants = json.loads(out.read_text())['variants']
  ran = {n: v for n, v in variants.items() if 'skipped' not in v}
  assert len(ran) == 2 and all(v['finite'] and v['tokens_per_s'] > 0 for v in ran.values())
  assert all('NVIDIA GPU' in v['skipped'] for n, v in variants.items() if n not in ran)


def _recorded_sections() -> list:
  """(bench, heading, parent) of every record.replace_section call in bench/*.py, with
  module-level string constants resolved (read from the source: no bench is imported)."""
  import ast  # pylint: disable=g-import-not-at-top
  import glob  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  calls = []
  for path in sorted(glob.glob(os.path.join(run_all.ROOT, 'bench', '*.py'))):
    with open(path, encoding='utf-8') as f:
      tree = ast.parse(f.read())
    names = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
             and isinstance(n.value, ast.Constant) for t in n.targets if isinstance(t, ast.Name)}
    value = lambda node: node.value if isinstance(node, ast.Constant) else names[node.id]
    for node in ast.walk(tree):
      if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr == 'replace_section'
          and getattr(node.func.value, 'id', '') == 'record'):
        parent = [value(k.value) for k in node.keywords if k.arg == 'parent']
        calls.append((os.path.basename(path), value(node.args[1]), parent[0] if parent else ''))
  return calls


def test_every_recorded_section_exists_once_in_the_benchmarks_file(tmp_path):
  """A bench's --record rewrites its section in place: no heading drifts out of the file."""
  import os  # pylint: disable=g-import-not-at-top
  doc = os.path.join(run_all.ROOT, record.DEFAULT_PATH)
  text = open(doc, encoding='utf-8').read()
  lines = text.splitlines()
  calls = _recorded_sections()
  assert {c[0] for c in calls} >= {'train_step.py', 'sampling.py', 'many_clients.py',
                                   'data_build.py'}
  for bench, heading, parent in calls:
    assert lines.count(heading) == 1, (bench, heading)
    if parent:
      start = lines.index(parent)
      assert start < lines.index(heading) < record._section_end(lines, start), bench
    copy = _write(tmp_path, text)
    record.replace_section(copy, heading, 'new figures', parent=parent)
    after = open(copy).read().splitlines()
    headings = lambda ls: [x for x in ls if record._level(x)]
    assert headings(after) == headings(lines), bench  # Rewritten in place, nothing added.
    assert 'new figures' in after
    assert after[:after.index('## Default study (`make study`)')] == lines[
        :lines.index('## Default study (`make study`)')]  # The summary table is kept.
