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
