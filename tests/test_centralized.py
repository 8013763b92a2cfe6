"""Centralized and single training: runs, resume after SIGKILL, pmap = pjit, bad input."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from collab import checkpoint
from collab import train as train_lib
from tests.conftest import tiny_run_config, xla_flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params(workdir):
  """The final parameters of a finished run, as numpy."""
  manager = checkpoint.make_manager(workdir, 2, 1, async_save=False)
  step = manager.latest_step()
  restored = manager.restore(step)
  manager.close()
  return jax.tree_util.tree_map(np.asarray, restored['state']['params'])


def _assert_same(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)


# Every in-process run here is tiny_run_config's as it stands (12 steps), so that the
# single and pmap runs reuse what the first run compiled (pmap: all but its own steps).
@pytest.fixture(scope='module')
def central(tiny_data, tmp_path_factory):
  """(workdir, summary) of the tiny centralized run (pjit, the default mode)."""
  workdir = tmp_path_factory.mktemp('central')
  config = tiny_run_config(tiny_data)
  assert config.parallel.mode == 'pjit'
  return workdir, train_lib.train(config, str(workdir))


def test_centralized_learns_and_writes_outputs(central):
  workdir, summary = central
  for name in ('config.json', 'metrics.jsonl', 'train.json'):
    assert os.path.isfile(workdir / name), name
  assert set(summary['valid']) == {'alpha', 'beta', 'gamma', 'pooled'}
  rows = [l for l in open(workdir / 'metrics.jsonl') if 'train/loss' in l]
  first, last = (float(r.split('"train/loss": ')[1].split(',')[0]) for r in (rows[0], rows[-1]))
  assert last < first
  # Tokens seen add up over participants and equal steps * batch * predictions per block.
  assert sum(summary['tokens_seen_per_participant'].values()) == summary['tokens_seen']
  assert summary['tokens_seen'] == 12 * 8 * 31
  assert summary['valid']['pooled']['perplexity'] < 300  # Better than uniform over 300.


def test_single_trains_on_one_participant_only(tiny_data, tmp_path):
  config = tiny_run_config(tiny_data)
  config.setting, config.single = 'single', 'beta'
  summary = train_lib.train(config, str(tmp_path))
  assert summary['participants'] == ['beta']
  assert list(summary['tokens_seen_per_participant']) == ['beta']


def test_pmap_and_pjit_give_the_same_run(central, tiny_data, tmp_path):
  config = tiny_run_config(tiny_data)
  config.parallel.mode = 'pmap'
  pmap = train_lib.train(config, str(tmp_path))
  a, b = central[1]['valid']['pooled']['loss_sum'], pmap['valid']['pooled']['loss_sum']
  assert abs(a - b) / abs(a) <= 1e-5


# Two devices on two cores: XLA's CPU collectives need every device's thread at once, and
# four virtual devices on a loaded 2-core machine can time out their rendezvous. The
# rest of XLA_FLAGS (the long collective timeout, a user's --xla_cpu_max_isa) carries over.
_ENV = {**os.environ, 'XLA_FLAGS': xla_flags('--xla_force_host_platform_device_count=2')}


def _launch(workdir, data_dir, steps, *extra):
  """launch.train in a subprocess; its output goes to a file (a pipe could fill and block)."""
  os.makedirs(workdir, exist_ok=True)
  log = open(os.path.join(workdir, '..', os.path.basename(str(workdir)) + '.log'), 'a+')
  proc = subprocess.Popen(
      [sys.executable, '-m', 'launch.train', '--config=configs/default.py',
       f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
       f'--config.train.steps={steps}', '--config.train.checkpoint_every=3',
       '--config.train.batch_size=8', '--config.train.warmup_steps=2',
       '--config.model.num_layers=1', '--config.model.d_model=32',
       '--config.model.num_heads=2', '--config.model.d_ff=64', '--config.model.max_len=32',
       '--config.data.seq_len=32', '--config.data.participants[0].name=alpha',
       '--config.data.participants[1].name=beta', '--config.data.participants[2].name=gamma',
       *extra],
      cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, text=True, env=_ENV)
  proc.output = lambda: (log.seek(0), log.read())[1]
  return proc


def test_sigkill_then_resume_is_bit_identical(tiny_data, tmp_path):
  steps = 40
  straight = _launch(tmp_path / 'straight', tiny_data, steps)
  assert straight.wait(timeout=300) == 0, straight.output()
  killed = _launch(tmp_path / 'killed', tiny_data, steps)
  ckpts = tmp_path / 'killed' / 'checkpoints'
  deadline = time.time() + 240
  while time.time() < deadline and not (ckpts.is_dir() and any(
      p.name.isdigit() and int(p.name) >= 6 for p in ckpts.iterdir())):
    time.sleep(0.05)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  assert not (tmp_path / 'killed' / 'train.json').exists(), 'killed too late to test resume'
  resumed = _launch(tmp_path / 'killed', tiny_data, steps)
  assert resumed.wait(timeout=300) == 0, resumed.output()
  _assert_same(_params(tmp_path / 'straight'), _params(tmp_path / 'killed'))
  metrics = open(tmp_path / 'killed' / 'metrics.jsonl').read().splitlines()
  train_steps = [int(l.split('"step": ')[1].split('}')[0].split(',')[0]) for l in metrics
                 if 'train/loss' in l]
  assert train_steps == sorted(set(train_steps))  # No step logged twice after resume.


@pytest.mark.parametrize('override, message', [
    (('--config.setting=sideways',), 'Unknown setting'),
    (('--config.data.seq_len=64',), 'longer than the model'),
    (('--config.train.batch_size=7',), 'cannot be split evenly'),
    (('--config.train.learning_rate=1e30', '--config.train.grad_clip=0'), 'at step'),
])
def test_bad_input_exits_with_a_clear_message(tiny_data, tmp_path, override, message):
  proc = _launch(tmp_path / 'bad', tiny_data, 6, *override)
  proc.wait(timeout=300)
  out = proc.output()
  assert proc.returncode == 1, out
  assert message in out


def test_unbuilt_data_folder_is_named(tmp_path):
  proc = _launch(tmp_path / 'run', tmp_path / 'never_built', 3)
  proc.wait(timeout=120)
  out = proc.output()
  assert proc.returncode == 1, out
  assert 'never_built' in out and 'launch.build_data' in out


def test_killed_incremental_chain_resumes_at_its_stage(tiny_data, tmp_path):
  """SIGKILL during stage 2 of alpha -> beta; the rerun keeps stage 1 and ends identical."""
  from collab import hf
  chain = ('--config.setting=incremental', '--config.incremental.order=alpha,beta')
  steps = 30
  straight = _launch(tmp_path / 'straight', tiny_data, steps, *chain)
  assert straight.wait(timeout=300) == 0, straight.output()
  killed = _launch(tmp_path / 'killed', tiny_data, steps, *chain)
  stage1 = tmp_path / 'killed' / 'stages' / 'alpha' / 'train.json'
  ckpts = tmp_path / 'killed' / 'stages' / 'alpha-beta' / 'checkpoints'
  deadline = time.time() + 240
  while time.time() < deadline and not (stage1.exists() and ckpts.is_dir() and any(
      p.name.isdigit() for p in ckpts.iterdir())):
    time.sleep(0.05)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  assert stage1.exists() and not (tmp_path / 'killed' / 'train.json').exists()
  stage1_mtime = stage1.stat().st_mtime
  resumed = _launch(tmp_path / 'killed', tiny_data, steps, *chain)
  assert resumed.wait(timeout=300) == 0, resumed.output()
  assert stage1.stat().st_mtime == stage1_mtime  # Stage 1 was not trained again.
  a, _ = hf.import_hf(str(tmp_path / 'straight' / 'final'))
  b, _ = hf.import_hf(str(tmp_path / 'killed' / 'final'))
  _assert_same(a, b)
