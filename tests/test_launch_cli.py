"""Launchers on bad input: exit 1 with one 'launch.X: error:' line naming it, no traceback."""

import os
import subprocess
import sys

import pytest

from collab.evals.execution import sandbox
from launch import common

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> config file text; each is bad in one way.
_CONFIGS = {
    'noget.py': 'x = 1\n',
    'syntax.py': 'def get_config(:\n  pass\n',
    'bug.py': 'def get_config():\n  return undefined_name\n',  # A bug: keeps its traceback.
}


def _launch(module, *args):
  return subprocess.run([sys.executable, '-m', f'launch.{module}', *map(str, args)],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


@pytest.fixture
def files(tmp_path):
  for name, text in _CONFIGS.items():
    (tmp_path / name).write_text(text)
  (tmp_path / 'plain_file').write_text('not a folder')
  trained = tmp_path / 'trained'
  trained.mkdir()
  (trained / 'train.json').write_text('{}')  # Evaluation would go on to read the config.
  return tmp_path


_DEFAULT = '--config=configs/default.py'
_CASES = [  # (module, args with {t} for tmp_path, what the error line must name)
    ('train', ('--config=configs/nope.py', '--workdir={t}/w'), 'configs/nope.py'),
    ('study', ('--config=configs/nope.py', '--workdir={t}/w'), 'configs/nope.py'),
    ('build_data', ('--config=configs/nope.py', '--data_dir={t}/d'), 'configs/nope.py'),
    ('evaluate', ('--config=configs/nope.py', '--workdir={t}/trained'), 'configs/nope.py'),
    ('train', (_DEFAULT, '--config.nosuch=1', '--workdir={t}/w'), '--config.nosuch=1'),
    ('train', (_DEFAULT, '--config.model.num_layer=1', '--workdir={t}/w'), 'num_layers'),
    ('train', ('--config={t}/noget.py', '--workdir={t}/w'), 'get_config()'),
    ('train', ('--config={t}/syntax.py', '--workdir={t}/w'), 'syntax.py:1'),
    ('train', ('--config=configs/many_clients.py:nope', '--workdir={t}/w'), "argument 'nope'"),
    ('train', (_DEFAULT, '--workdir={t}/plain_file'), '--workdir={t}/plain_file'),
    ('study', (_DEFAULT, '--workdir={t}/plain_file/study'), '{t}/plain_file is a file'),
    ('build_data', (_DEFAULT, '--data_dir={t}/plain_file'), '--data_dir={t}/plain_file'),
    ('sweep', ('--config={t}/syntax.py', '--workdir={t}/s'), 'syntax.py'),
    ('flower_local', ('--config=configs/nope.py', '--workdir={t}/w'), 'configs/nope.py'),
    ('flower_server', (_DEFAULT, '--config.federated.clients=repositories', '--workdir={t}/w'),
     'clients=participants'),
    ('flower_node', ('--org=psf', '--data_dir={t}/nodata', '--state_dir={t}/s'),
     '--data_dir: '),
]


@pytest.mark.parametrize('module, args, named', _CASES)
def test_bad_input_is_one_error_line(files, module, args, named):
  proc = _launch(module, *(a.format(t=files) for a in args))
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 1, proc.stderr
  assert 'Traceback' not in proc.stderr, proc.stderr
  assert lines[-1].startswith(f'launch.{module}: error: '), proc.stderr
  assert named.format(t=files) in lines[-1], proc.stderr


def test_a_bug_in_a_config_keeps_its_traceback(files):
  proc = _launch('train', f'--config={files}/bug.py', f'--workdir={files}/w')
  assert proc.returncode != 0 and 'Traceback' in proc.stderr
  assert 'undefined_name' in proc.stderr


@pytest.fixture
def quiet(monkeypatch):
  """run_or_exit without its process-wide settings (this pytest process keeps its own)."""
  monkeypatch.setattr(common, 'compilation_cache', lambda: None)
  monkeypatch.setattr(common, 'quiet_libraries', lambda: None)


def _raise(error):
  def fn():
    raise error
  return fn


@pytest.mark.parametrize('error, named', [
    (sandbox.SandboxUnavailableError('Cannot isolate untrusted programs: no bwrap\n(x)'),
     'Cannot isolate untrusted programs: no bwrap (x)'),
    (FileExistsError(17, 'File exists', '/runs/r/data'), "'/runs/r/data'"),
])
def test_known_errors_at_the_top_become_one_line(quiet, capsys, error, named):
  with pytest.raises(SystemExit) as exit_info:
    common.run_or_exit('launch.study', _raise(error))
  assert exit_info.value.code == 1
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith('launch.study: error: ') and named in err


def test_other_errors_at_the_top_propagate(quiet):
  with pytest.raises(RuntimeError, match='a bug'):
    common.run_or_exit('launch.study', _raise(RuntimeError('a bug')))


def test_library_logs_keep_warnings_but_not_the_expected_ones():
  import logging  # pylint: disable=g-import-not-at-top
  keep = common._DropLibraryInfo().filter  # pylint: disable=protected-access
  record = lambda path, level, msg: logging.LogRecord('absl', level, path, 1, msg, (), None)
  orbax = '/site-packages/orbax/checkpoint/checkpoint_manager.py'
  assert not keep(record(orbax, logging.INFO, 'Saving item'))
  assert keep(record(orbax, logging.WARNING, 'Something unexpected'))
  assert not keep(record(orbax, logging.WARNING, 'Given directory is read only=%s'))
  assert keep(record('/repo/collab/train.py', logging.INFO, 'step 10'))
