"""requirements.lock: parsing, drift named by package, and agreement with setup.cfg."""

import configparser
import os
import subprocess
import sys

import pytest

from collab import envlock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_requirements(extras=('test',)) -> list:
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(ROOT, 'setup.cfg'))
  lines = cfg['options']['install_requires'].splitlines()
  for extra in extras:
    lines += cfg['options.extras_require'][extra].splitlines()
  return [line.strip() for line in lines if line.strip()]


def test_parse_lock_canonicalises_names_and_skips_comments():
  pins = envlock.parse_lock('# header\n\nMl_Collections==1.1.0\njax==0.10.2  # why\n')
  assert pins == {'ml-collections': '1.1.0', 'jax': '0.10.2'}


def test_a_line_that_is_no_pin_is_named():
  with pytest.raises(ValueError, match=r'x.lock:2: .*jax>=0.7.*make lock'):
    envlock.parse_lock('numpy==2.0\njax>=0.7\n', 'x.lock')


def test_differences_name_missing_and_drifted_packages_only():
  pins = {'jax': '0.10.2', 'rich': '15.0.0', 'numpy': '2.4.6'}
  have = {'jax': '0.10.2', 'rich': '14.1.0', 'torch': '2.13.0'}  # torch: not locked, fine.
  assert envlock.differences(pins, have) == [
      'numpy: locked 2.4.6, not installed', 'rich: locked 15.0.0, installed 14.1.0']


def test_the_lock_pins_pip_and_every_setup_cfg_requirement_within_its_range():
  pins = envlock.read_lock(os.path.join(ROOT, envlock.LOCK_FILE))
  assert 'pip' in pins and 'setuptools' in pins
  assert envlock.unsatisfied(_setup_requirements(), pins) == []
  # The check can fail: a pin outside a range is reported.
  assert envlock.unsatisfied(['jax>=0.7,<0.13'], {'jax': '0.13.1'}) == [
      'jax<0.13,>=0.7: the lock has 0.13.1']


FLOWER_LOCK = os.path.join(ROOT, 'requirements-flower.lock')
# What installing the flower extra changes of requirements.lock (flwr 1.42 pins older
# versions): none of them is read by the default study, whose corpus ships as files.
FLOWER_CHANGES = {'packaging', 'protobuf', 'rich', 'typer'}


def test_the_flower_lock_is_the_lock_plus_flwr_changing_only_what_flwr_pins():
  pins, flower = envlock.read_lock(os.path.join(ROOT, envlock.LOCK_FILE)), envlock.read_lock(
      FLOWER_LOCK)
  assert envlock.unsatisfied(_setup_requirements(('test', 'flower')), flower) == []
  assert set(pins) <= set(flower) and 'flwr' in flower
  changed = {name for name, version in pins.items() if flower[name] != version}
  assert changed == FLOWER_CHANGES, ('requirements-flower.lock changes other packages of '
                                     'requirements.lock: check that the default study\'s '
                                     'tables stay the same with the extra, then update '
                                     'FLOWER_CHANGES')


def test_check_env_exits_1_naming_the_drifted_package(tmp_path):
  lock = tmp_path / 'requirements.lock'
  lock.write_text('numpy==0.0.1\n')
  out = subprocess.run([sys.executable, '-m', 'launch.check_env', f'--lock={lock}'],
                       cwd=ROOT, capture_output=True, text=True, check=False)
  assert out.returncode == 1
  assert 'numpy: locked 0.0.1, installed' in out.stderr
