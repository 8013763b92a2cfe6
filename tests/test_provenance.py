"""collab/provenance.py and analysis/captions.py: results say where they were measured."""

import json
import os
import subprocess
import sys

from analysis import captions
from analysis import tables
from collab import provenance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDED = {'cpu': 'Intel(R) Xeon(R) Platinum 8481C', 'cores': 2, 'usable_cores': 2,
            'accelerator': None, 'platform': 'cpu', 'devices': 1, 'jax': '0.4.35',
            'jaxlib': '0.4.34', 'xla_flags': '--xla_cpu_use_thunk_runtime=false',
            'hugepages': False, 'system': 'Linux x86_64', 'python': '3.11.7'}


def test_machine_records_processor_cores_versions_and_flags():
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  m = provenance.machine({'XLA_FLAGS': '--xla_foo=1',
                          'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'})
  assert set(RECORDED) == set(m)
  assert m['cpu'] and m['cores'] >= m['usable_cores'] >= 1
  assert (m['jax'], m['jaxlib']) == (jax.__version__, jaxlib.__version__)
  assert m['xla_flags'] == '--xla_foo=1' and m['hugepages']
  assert m['platform'] == 'cpu' and m['accelerator'] is None  # Tests run on CPU.
  assert json.loads(json.dumps(m)) == m  # Plain JSON: results.json stores it as is.
  off = provenance.machine({'COLLAB_HUGEPAGES': '1'})  # Asked for but not restarted: off.
  assert off['xla_flags'] == '' and not off['hugepages']


def test_cpu_model_reads_cpuinfo_and_falls_back(tmp_path):
  info = tmp_path / 'cpuinfo'
  info.write_text('processor\t: 0\nmodel name\t: Fancy CPU @ 2.0GHz\nflags\t: avx2\n')
  assert provenance.cpu_model(str(info)) == 'Fancy CPU @ 2.0GHz'
  assert provenance.cpu_model(str(tmp_path / 'missing'))  # platform's guess, not empty.


def test_caption_names_each_machine_with_its_runs_and_old_results_still_render():
  gpu = {**RECORDED, 'accelerator': 'NVIDIA H100 80GB HBM3', 'platform': 'gpu',
         'devices': 8, 'xla_flags': '', 'hugepages': True}
  one = captions.machine_caption([{'run': 'a', 'machine': RECORDED},
                                  {'run': 'b', 'machine': RECORDED}], {})
  assert one == ('Measured on Intel(R) Xeon(R) Platinum 8481C (2 cores), jax 0.4.35 / '
                 'jaxlib 0.4.34, XLA_FLAGS: --xla_cpu_use_thunk_runtime=false.')
  mixed = captions.machine_caption([{'run': 'a', 'machine': RECORDED},
                                    {'run': 'b', 'machine': gpu}, {'run': 'c'}], {})
  assert '8 x NVIDIA H100 80GB HBM3 (gpu)' in mixed and 'XLA_FLAGS: none' in mixed
  assert 'huge pages' in mixed and '(runs a)' in mixed and '(runs b)' in mixed
  assert mixed.endswith('machine not recorded (runs c).')
  old_summary = {'machine': {'platform': 'Linux-6.1', 'processor': 'x86_64', 'cpus': 2}}
  assert captions.machine_caption([{'run': 'a'}], old_summary) == 'Machine not recorded.'
  assert captions.machine_caption([{'run': 'a'}], {'machine': RECORDED}) == one


def _study(folder, machine):
  """A study folder with two runs' results.json (as evaluate writes them) and a summary."""
  for name, setting in (('single-a', 'single'), ('centralized', 'centralized')):
    os.makedirs(folder / name)
    result = {'run': name, 'setting': setting, 'participants': ['a'],
              'perplexity': {'a': 9.5, 'pooled': 9.5}, **({'machine': machine} if machine
                                                           else {})}
    (folder / name / 'results.json').write_text(json.dumps(result))
  (folder / 'summary.json').write_text(json.dumps({'runs': ['single-a', 'centralized']}))
  return str(folder)


def test_tables_carry_the_recorded_machine_and_regenerate_byte_identically(tmp_path):
  workdir = _study(tmp_path / 'study', RECORDED)
  text = tables.write_tables(workdir)
  caption = captions.machine_caption([{'run': 'x', 'machine': RECORDED}], {})
  assert text.count(caption) == len(os.listdir(tmp_path / 'study' / 'tables')) // 2
  md = (tmp_path / 'study' / 'tables' / 'effectiveness.md').read_bytes()
  tex = (tmp_path / 'study' / 'tables' / 'effectiveness.tex').read_text()
  assert md.decode().rstrip().endswith(caption)
  assert (r'one (lowest pooled validation loss). Measured on '
          r'Intel(R) Xeon(R) Platinum 8481C (2 cores)') in tex
  assert r'XLA\_FLAGS: --xla\_cpu\_use\_thunk\_runtime=false.}' in tex
  # Regenerated in another process, with other XLA flags in force: the same bytes.
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=3'}
  subprocess.run([sys.executable, '-m', 'analysis.tables', f'--workdir={workdir}'], cwd=ROOT,
                 env=env, check=True, capture_output=True)
  assert (tmp_path / 'study' / 'tables' / 'effectiveness.md').read_bytes() == md
  assert (tmp_path / 'study' / 'tables' / 'effectiveness.tex').read_text() == tex


def test_results_without_a_machine_still_render(tmp_path):
  workdir = _study(tmp_path / 'old', None)
  text = tables.write_tables(workdir)
  assert 'Machine not recorded.' in text and 'Measured on' not in text


def test_findings_no_longer_imports_tables():
  code = ('import sys, analysis.findings as f; f._names([]); '
          'assert "analysis.tables" not in sys.modules')
  subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True, capture_output=True)


def test_latex_caption_follows_a_title_that_ends_a_sentence():
  tex = tables.latex('Rules apply.', ['a'], [['1']], 'Measured on X.')
  assert r'\caption{Rules apply. Measured on X.}' in tex
  assert tables.latex('T', ['a'], [['1']]) == tables.latex('T', ['a'], [['1']], '')
