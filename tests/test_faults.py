"""Faults: a corrupt latest checkpoint, a full disk, two processes on one workdir.

Each recovery ends where an uninterrupted run ends, bit for bit: the final model's
safetensors file is compared byte for byte with the `straight` run's.
"""

import collections
import filecmp
import gc
import glob
import logging
import os
import shutil
import subprocess
import sys
import time

import pytest

from collab import checkpoint, io, lock
from collab import train as train_lib
from collab.settings import run
from tests.conftest import tiny_data_config, tiny_run_config

# A failed Orbax read or write abandons its other reads or writes, which pytest reports
# as unraisable warnings once collected (launch/common.py keeps launchers quiet about
# them); the errors raised are what these tests check.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 12, 4  # Checkpoints at 4, 8 and 12, all kept.


def _config(data_dir):
  return tiny_run_config(data_dir, steps=STEPS, checkpoint_every=EVERY, keep_checkpoints=3)


@pytest.fixture(scope='module')
def straight(tiny_data, tmp_path_factory):
  """A finished uninterrupted run's workdir."""
  workdir = str(tmp_path_factory.mktemp('straight'))
  train_lib.train(_config(tiny_data), workdir)
  return workdir


def _same_final(a, b) -> bool:
  return filecmp.cmp(os.path.join(a, run.FINAL_DIR, 'model.safetensors'),
                     os.path.join(b, run.FINAL_DIR, 'model.safetensors'), shallow=False)


def _unfinished_copy(straight, workdir) -> str:
  """The finished run copied, its finished marker gone: the next train() resumes it."""
  shutil.copytree(straight, workdir)
  os.remove(os.path.join(workdir, run.TRAIN_JSON))
  return str(workdir)


def _steps(workdir) -> list:
  return sorted(os.listdir(checkpoint.checkpoint_dir(workdir)))


def _garble(path: str) -> None:
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 3)
    f.write(b'\x5a' * 64)


def _tmp_folders(workdir) -> list:
  return glob.glob(os.path.join(checkpoint.checkpoint_dir(workdir), '*orbax-checkpoint-tmp*'))


# --- A corrupt latest checkpoint ---------------------------------------------------------


def test_corrupt_checkpoints_fall_back_and_end_identical(straight, tiny_data, tmp_path, caplog):
  workdir = _unfinished_copy(straight, tmp_path / 'run')
  ckpts = checkpoint.checkpoint_dir(workdir)
  for data_file in glob.glob(os.path.join(ckpts, '12', 'state', '**', 'd', '*'), recursive=True):
    open(data_file, 'r+b').truncate(os.path.getsize(data_file) // 2)  # Arrays cut short.
  _garble(os.path.join(ckpts, '8', 'extra', 'metadata'))  # The data position's JSON.
  with caplog.at_level(logging.WARNING):
    train_lib.train(_config(tiny_data), workdir)
  lines = [r.getMessage() for r in caplog.records if 'is corrupt' in r.getMessage()]
  assert len(lines) == 2, lines  # One line per corrupt step, naming its folder and cause.
  assert f'step 12 is corrupt ({ckpts}/12: ' in lines[0] and 'falling back to step 8' in lines[0]
  assert f'step 8 is corrupt ({ckpts}/8: JSONDecodeError' in lines[1]
  assert '\n' not in ''.join(lines)
  # Set aside out of Orbax's way; steps 8 and 12 were saved again.
  assert _steps(workdir) == ['12', '12.corrupt', '4', '8', '8.corrupt']
  assert _same_final(straight, workdir)


def test_no_readable_checkpoint_is_a_clear_error(straight, tiny_data, tmp_path):
  workdir = _unfinished_copy(straight, tmp_path / 'run')
  for step in ('4', '8', '12'):
    _garble(os.path.join(checkpoint.checkpoint_dir(workdir), step, 'extra', 'metadata'))
  with pytest.raises(checkpoint.NoGoodCheckpointError,
                     match=rf'{checkpoint.checkpoint_dir(workdir)} can be read .*remove'):
    train_lib.train(_config(tiny_data), workdir)
  assert _steps(workdir) == ['12', '4', '8']  # Nothing moved: the run did not start over.


def test_another_model_is_a_mismatch_not_corruption(straight, tiny_data, tmp_path):
  workdir = _unfinished_copy(straight, tmp_path / 'run')
  os.remove(os.path.join(workdir, run.CONFIG_JSON))  # Past the config check, to Orbax.
  config = _config(tiny_data)
  config.model.d_model = 48
  with pytest.raises(checkpoint.ParamsMismatchError,
                     match=r'does not match.*: params\.h_0\.\S+ is \(.*\) on disk but \(.*\) here'):
    train_lib.train(config, workdir)
  assert _steps(workdir) == ['12', '4', '8']


# --- A full disk -------------------------------------------------------------------------


def test_full_disk_before_a_checkpoint_then_resume_is_identical(straight, tiny_data, tmp_path,
                                                                monkeypatch):
  """The space check refuses step 8's save; once space is free the run resumes from 4."""
  workdir = str(tmp_path / 'run')
  real = shutil.disk_usage
  usage = collections.namedtuple('usage', 'total used free')

  def disk_usage(path):
    full = os.path.isdir(os.path.join(checkpoint.checkpoint_dir(workdir), '4'))
    return usage(1 << 30, 1 << 30, 1000) if full else real(path)
  monkeypatch.setattr(shutil, 'disk_usage', disk_usage)
  with pytest.raises(io.DiskFullError, match=rf'no space left .* {workdir}/checkpoints/8 '
                                             r'\(0\.0 MiB free, 1\.\d MiB needed\)'):
    train_lib.train(_config(tiny_data), workdir)
  monkeypatch.undo()
  assert _steps(workdir) == ['4'] and not run.is_done(workdir)
  train_lib.train(_config(tiny_data), workdir)
  assert _same_final(straight, workdir)


def test_atomic_writes_on_a_full_disk_leave_nothing(tmp_path, monkeypatch):
  def full(*args, **kwargs):
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(os, 'fsync', full)
  with pytest.raises(io.DiskFullError, match=r'results\.json \(.* free, 0\.0 MiB needed\)'):
    io.atomic_write_json(str(tmp_path / 'results.json'), {'a': 1})
  with pytest.raises(io.DiskFullError, match='data'):
    with io.atomic_dir(str(tmp_path / 'data')) as tmp:
      io.atomic_write_text(os.path.join(tmp, 'x'), 'x')
  assert os.listdir(tmp_path) == []


def _launch(workdir, data_dir, file_size_limit_kib: int = 0):
  """launch.train of the same run as _config (a config file that returns it, so the
  compiled programs come from the tests' cache), output to a log beside workdir.

  With `file_size_limit_kib` writes past that size fail with EFBIG (`ulimit -f`; SIGXFSZ
  ignored, as Python does anyway), like a full disk but with no mount needed.
  """
  config = f'{workdir}.config.py'
  with open(config, 'w') as f:
    f.write('from tests import test_faults\n\n\ndef get_config():\n'
            f'  return test_faults._config({str(data_dir)!r})\n')
  log = open(f'{workdir}.log', 'w+')
  limit = ['bash', '-c', f"trap '' XFSZ; ulimit -f {file_size_limit_kib} && exec \"$@\"",
           'bash'] if file_size_limit_kib else []
  proc = subprocess.Popen(
      [*limit, sys.executable, '-m', 'launch.train', f'--config={config}',
       f'--workdir={workdir}'],
      cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
  proc.output = lambda: (log.seek(0), log.read())[1]
  return proc


def test_failed_checkpoint_write_is_one_line_and_leaves_no_tmp(tiny_data, tmp_path):
  """A write that fails inside Orbax (no mount needed: a file size limit) ends as one line."""
  workdir = tmp_path / 'run'
  proc = _launch(workdir, tiny_data, file_size_limit_kib=64)
  proc.wait(timeout=300)
  out = proc.output()
  assert proc.returncode == 1, out
  assert 'Traceback' not in out and 'Event loop is closed' not in out, out
  last = out.strip().splitlines()[-1]
  assert last.startswith('launch.train: error: the file size limit (ulimit -f) stopped a '
                         f'write to {workdir}/checkpoints'), out
  assert _tmp_folders(workdir) == [] and not run.is_done(workdir)


@pytest.fixture
def small_disk(tmp_path):
  """A 400 KiB tmpfs (skips where mounting is not allowed); yields (folder, resize)."""
  folder = tmp_path / 'disk'
  folder.mkdir()
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=400k', 'tmpfs', str(folder)],
                           capture_output=True, text=True)
  if mounted.returncode:
    pytest.skip(f'cannot mount a small tmpfs here: {mounted.stderr.strip()}')
  resize = lambda size: subprocess.run(['mount', '-o', f'remount,size={size}', str(folder)],
                                       check=True)
  try:
    yield str(folder), resize
  finally:
    subprocess.run(['umount', '-l', str(folder)], check=False)


def test_real_full_disk_then_resume_is_identical(straight, tiny_data, small_disk, monkeypatch):
  """With the space check fooled, Orbax's own write fails on a full tmpfs: one
  DiskFullError, no temporary folder; with space added the run ends as if never stopped."""
  folder, resize = small_disk
  workdir = os.path.join(folder, 'run')
  # The abandoned writes' tasks report themselves when collected; the error said it all.
  monkeypatch.setattr(logging.getLogger('asyncio'), 'disabled', True)
  with monkeypatch.context() as fooled:
    fooled.setattr(checkpoint, 'SPACE_MARGIN', -0.99)
    fooled.setattr(checkpoint, 'SPACE_EXTRA', 0)
    with pytest.raises(io.DiskFullError, match=f'no space left on the disk to write {workdir}'):
      train_lib.train(_config(tiny_data), workdir)
  assert _tmp_folders(workdir) == [] and not run.is_done(workdir)
  resize('16m')
  train_lib.train(_config(tiny_data), workdir)
  assert _same_final(straight, workdir)
  gc.collect()


def test_data_build_on_a_full_disk_leaves_nothing(tiny_data, small_disk, tmp_path):
  from collab.data import build
  folder, resize = small_disk
  data_dir = os.path.join(folder, 'data')
  config = tiny_data_config(str(tmp_path / 'corpora'))
  with pytest.raises(io.DiskFullError, match=rf'no space left on the disk to write {data_dir} '
                                             r'\(\d+\.\d MiB free, not enough'):
    build.build_data(config, data_dir, progress=False)
  assert os.listdir(folder) == []
  resize('16m')
  build.build_data(config, data_dir, progress=False)
  for name in os.listdir(os.path.join(tiny_data, 'blocks')):
    assert filecmp.cmp(os.path.join(tiny_data, 'blocks', name),
                       os.path.join(data_dir, 'blocks', name), shallow=False), name


# --- Two processes on one workdir --------------------------------------------------------


def test_second_process_on_a_workdir_is_refused(tiny_data, tmp_path):
  workdir = str(tmp_path / 'run')
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time\nfrom collab import lock\n'
       'with lock.hold(sys.argv[1]):\n  print("held", flush=True)\n  time.sleep(120)\n',
       workdir], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    with pytest.raises(lock.WorkdirBusyError, match=rf'{workdir} is in use by pid {holder.pid}'):
      train_lib.train(_config(tiny_data), workdir)
    assert os.listdir(workdir) == [lock.LOCK_FILE]  # Refused before writing anything.
    start = time.time()
    second = _launch(workdir, tiny_data)
    second.wait(timeout=120)
    out = second.output()
    assert second.returncode == 1, out
    assert out.strip().splitlines()[-1].startswith(
        f'launch.train: error: {workdir} is in use by pid {holder.pid}'), out
    assert time.time() - start < 60 and holder.poll() is None  # The first goes on.
  finally:
    holder.kill()
    holder.wait()
  with lock.hold(workdir):  # Released when its holder died.
    with lock.hold(workdir):  # Nested holds of one process (a study's runs) re-enter.
      pass
