"""A micro study end to end: every run trained and evaluated, tables and figures, rerun no-op."""

import json
import os

import pytest

from analysis import plots
from analysis import tables
from collab import study
from configs import common
from tests.conftest import tiny_data_config


def micro_study_config(root: str):
  """Two tiny participants, every setting, a few steps each, small evaluations."""
  c = common.base_config('tiny')
  c.model.num_layers, c.model.num_heads, c.model.d_model = 1, 2, 32
  c.model.d_ff, c.model.max_len = 64, 64
  c.data = tiny_data_config(root, names=('alpha', 'beta'), seq_len=32)
  c.train.batch_size, c.train.steps, c.train.warmup_steps = 8, 6, 1
  c.train.learning_rate, c.train.log_every, c.train.checkpoint_every = 3e-3, 3, 6
  c.federated.rounds, c.federated.local_steps = 2, 3
  c.eval.batch_size = 16
  c.eval.passk.num_problems, c.eval.passk.n, c.eval.passk.ks = 3, 2, (1, 2)
  c.eval.passk.max_new_tokens, c.eval.passk.timeout = 12, 2.0
  c.eval.memorization.max_prompts, c.eval.memorization.samples_per_prompt = 3, 2
  c.eval.memorization.max_new_tokens = 24
  return c


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('micro'))
  workdir = os.path.join(root, 'study')
  config = micro_study_config(root)
  summary = study.run_study(config, workdir)
  return config, workdir, summary


def test_every_run_is_trained_evaluated_and_consistent(finished):
  config, workdir, summary = finished
  names = [s.name for s in study.expand(config)]
  assert names == ['single-alpha', 'single-beta', 'centralized', 'federated-fedavg',
                   'federated-fedyogi', 'incremental-alpha-beta', 'incremental-beta-alpha']
  assert summary['runs'] == names
  for name in names:
    with open(os.path.join(workdir, name, 'results.json')) as f:
      r = json.load(f)
    assert r['run'] == name
    assert set(r['perplexity']) == {'alpha', 'beta', 'pooled'}
    assert sum(r['tokens_seen_per_participant'].values()) == r['tokens_seen'] > 0
    for p, m in r['memorization']['participants'].items():
      assert 0.0 <= m['ratio'] <= 1.0 and 0.0 <= m['null_ratio'] <= 1.0
      assert m['memorized_samples'] <= m['samples']
      assert m['ratio'] == pytest.approx(m['memorized_samples'] / m['samples'])
      assert m['exclusive_spans'] + m['shared_spans'] == m['spans']
    for k, v in r['passk']['pass_at_k'].items():
      assert 0.0 <= v <= 1.0
  inc = json.load(open(os.path.join(workdir, 'incremental-beta-alpha', 'results.json')))
  assert inc['order'] == ['beta', 'alpha'] and len(inc['forgetting']['alpha']) == 2
  matrix = summary['crossorg']['matrix']
  assert matrix[0][0] == 1.0 and 0.0 <= matrix[0][1] <= 1.0


def test_every_run_appears_in_every_table(finished):
  config, workdir, _ = finished
  text = tables.write_tables(workdir)
  for name in [s.name for s in study.expand(config)]:
    assert name in text
  assert 'alpha → beta' in text and 'beta → alpha' in text
  for name in ('effectiveness', 'memorization', 'incremental', 'crossorg'):
    assert os.path.isfile(os.path.join(workdir, 'tables', f'{name}.tex'))
  figures = plots.write_figures(workdir)
  assert {os.path.basename(p) for p in figures} == {
      'memorization.png', 'incremental_orders.png', 'loss_curves.png', 'forgetting.png'}


def test_rerun_is_a_no_op_and_tables_are_byte_identical(finished):
  config, workdir, _ = finished
  before = {n: os.path.getmtime(os.path.join(workdir, n, 'results.json'))
            for n in ('centralized', 'federated-fedavg')}
  first = tables.write_tables(workdir)
  md = open(os.path.join(workdir, 'tables', 'memorization.md'), 'rb').read()
  study.run_study(config, workdir)
  assert tables.write_tables(workdir) == first
  assert open(os.path.join(workdir, 'tables', 'memorization.md'), 'rb').read() == md
  for n, t in before.items():
    assert os.path.getmtime(os.path.join(workdir, n, 'results.json')) == t


def test_command_lines_regenerate_the_same_tables(finished):
  import subprocess
  import sys
  _, workdir, _ = finished
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  expected = tables.write_tables(workdir)
  out = subprocess.run([sys.executable, '-m', 'analysis.tables', f'--workdir={workdir}'],
                       cwd=root, capture_output=True, text=True, check=True).stdout
  assert out.strip() == expected.strip()
  for module in ('analysis.plots', 'launch.study'):  # Both import analysis.tables.
    proc = subprocess.run([sys.executable, '-m', module, '--helpshort'], cwd=root,
                          capture_output=True, text=True, check=False)
    assert 'Traceback' not in proc.stderr and 'workdir' in proc.stdout + proc.stderr


def test_seeds_repeat_every_run_and_tables_report_mean_and_spread(tmp_path):
  config = micro_study_config(str(tmp_path))
  config.study.seeds = (1, 2)
  config.study.settings = ('centralized', 'federated')
  specs = study.expand(config)
  assert [s.name for s in specs] == ['centralized@seed1', 'federated-fedavg@seed1',
                                     'federated-fedyogi@seed1', 'centralized@seed2',
                                     'federated-fedavg@seed2', 'federated-fedyogi@seed2']
  assert {s.overrides['seed'] for s in specs} == {1, 2}
  assert specs[2].overrides['federated.server_learning_rate'] == (
      config.study.adaptive_server_learning_rate)
  runs = [{'run': f'centralized@seed{i}', 'setting': 'centralized',
           'perplexity': {'a': ppl, 'pooled': ppl}} for i, ppl in ((1, 10.0), (2, 14.0))]
  _, _, rows = tables.effectiveness(runs)
  assert rows == [['centralized', 'centralized', '12.00 ± 2.83', '12.00 ± 2.83']]
