"""Incremental chains: stage k starts from stage k-1, orders differ, chains resume."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from collab import checkpoint
from collab import train as train_lib
from collab.settings import centralized
from collab.settings import incremental
from collab.settings import run
from tests.conftest import tiny_run_config
from tests.test_federated import compile_cache  # noqa: F401  (module fixture, autouse)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12  # Per stage (tiny_run_config), checkpoints every 4.


def _params(workdir):
  """The final parameters of a finished run, as numpy."""
  manager = checkpoint.make_manager(str(workdir), 2, 1, async_save=False)
  restored = manager.restore(manager.latest_step())
  manager.close()
  return jax.tree_util.tree_map(np.asarray, restored['state']['params'])


def _same(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                  jax.tree_util.tree_leaves(b)))


def _config(data_dir, order, all_orders=False):
  config = tiny_run_config(data_dir)
  config.setting, config.incremental.order = 'incremental', order
  config.incremental.all_orders = all_orders
  return config


class Spy:
  """Records every stage fit runs: its folder, where it started from, its first params."""

  def __init__(self, monkeypatch):
    self.stages = []
    fit, restore = centralized.fit, run.restore_or_init

    def spy_fit(config, workdir, *args, init_from='', **kwargs):
      self.stages.append({'workdir': os.path.relpath(workdir, os.path.dirname(
          os.path.dirname(workdir))), 'init_from': init_from})
      return fit(config, workdir, *args, init_from=init_from, **kwargs)

    def spy_restore(engine, manager, init_from, model_config):
      state, extra, source = restore(engine, manager, init_from, model_config)
      self.stages[-1].update(source=source, params=jax.tree_util.tree_map(
          np.asarray, jax.device_get(engine.to_host(state)['params'])))
      return state, extra, source
    monkeypatch.setattr(centralized, 'fit', spy_fit)
    monkeypatch.setattr(run, 'restore_or_init', spy_restore)


@pytest.fixture(scope='module')
def chains(tiny_data, tmp_path_factory):
  """A chain of one (alpha), then all orders of alpha and beta in the same folder."""
  workdir = tmp_path_factory.mktemp('incremental')
  with pytest.MonkeyPatch.context() as monkeypatch:
    spy = Spy(monkeypatch)
    one = train_lib.train(_config(tiny_data, 'alpha'), str(workdir))
    both = train_lib.train(_config(tiny_data, 'alpha,beta', all_orders=True), str(workdir))
  return workdir, one, both, spy.stages


@pytest.fixture(scope='module')
def single_alpha(tiny_data, tmp_path_factory):
  """(workdir, summary) of a finished single run on alpha, the chains' first stage alone."""
  workdir = tmp_path_factory.mktemp('singles') / 'single-alpha'
  config = _config(tiny_data, 'alpha')
  config.setting, config.single = 'single', 'alpha'
  return workdir, train_lib.train(config, str(workdir))


def test_chain_of_one_equals_single(chains, single_alpha):
  workdir, one, _, _ = chains
  single_dir, single = single_alpha
  assert _same(_params(workdir / 'stages' / 'alpha'), _params(single_dir))
  assert one['valid'] == single['valid'] and one['order'] == ['alpha']
  assert one['tokens_seen_per_participant'] == single['tokens_seen_per_participant']


def test_stages_start_where_their_predecessor_ended_and_share_prefixes(chains):
  workdir, _, both, stages = chains
  ran = [s['workdir'] for s in stages]
  # alpha ran once (for the chain of one); all_orders reused it and ran the rest once each.
  assert ran == ['stages/alpha', 'stages/alpha-beta', 'stages/beta', 'stages/beta-alpha']
  by_dir = {s['workdir']: s for s in stages}
  assert by_dir['stages/alpha']['source'] == by_dir['stages/beta']['source'] == 'scratch'
  for stage, before in (('alpha-beta', 'alpha'), ('beta-alpha', 'beta')):
    assert by_dir[f'stages/{stage}']['source'] == 'init_from'
    assert by_dir[f'stages/{stage}']['init_from'] == str(workdir / 'stages' / before)
    assert _same(by_dir[f'stages/{stage}']['params'], _params(workdir / 'stages' / before))
  # A fresh optimizer state: the stage counts its own steps from 0.
  assert checkpoint.make_manager(str(workdir / 'stages' / 'alpha-beta'), 2, 1).latest_step() \
      == STEPS
  assert [c['order'] for c in both['chains']] == [['alpha', 'beta'], ['beta', 'alpha']]


def test_order_matters_and_forgetting_curves_are_recorded(chains):
  workdir, _, both, _ = chains
  assert not _same(_params(workdir / 'stages' / 'alpha-beta'),
                   _params(workdir / 'stages' / 'beta-alpha'))
  ab, ba = both['chains']
  assert ab['valid'] != ba['valid']
  for chain in (ab, ba):
    assert [s['participant'] for s in chain['stages']] == chain['order']
    assert all(set(s['valid']) == {'alpha', 'beta', 'gamma', 'pooled'} for s in chain['stages'])
    assert chain['forgetting']['gamma'] == [s['valid']['gamma']['perplexity']
                                            for s in chain['stages']]
    assert chain['tokens_seen_per_participant'] == {'alpha': STEPS * 8 * 31,
                                                    'beta': STEPS * 8 * 31}
    assert chain['steps'] == 2 * STEPS
  # Training on a participant lowers its own validation perplexity (the curve moves).
  assert ab['forgetting']['beta'][1] < ab['forgetting']['beta'][0]
  on_disk = json.load(open(workdir / 'train.json'))
  assert on_disk['chains'][1]['order'] == ['beta', 'alpha'] and on_disk['order'] == ['alpha',
                                                                                     'beta']


def test_killed_chain_resumes_at_the_stage_where_it_stopped(chains, tiny_data, monkeypatch):
  workdir, _, both, _ = chains
  stage = workdir / 'stages' / 'beta-alpha'
  final = _params(stage)
  # What a kill after the step-8 checkpoint of the last stage leaves on disk (the
  # federated tests kill a real run with SIGKILL; stages resume through the same fit).
  os.remove(stage / 'train.json')
  shutil.rmtree(stage / 'checkpoints' / str(STEPS))
  spy = Spy(monkeypatch)
  again = train_lib.train(_config(tiny_data, 'alpha,beta', all_orders=True), str(workdir))
  assert [s['workdir'] for s in spy.stages] == ['stages/beta-alpha']
  assert spy.stages[0]['source'] == 'resume'
  assert _same(_params(stage), final)
  assert again['chains'][1]['valid'] == both['chains'][1]['valid']


def test_orders_and_budget_split(tiny_data):
  config = _config(tiny_data, 'gamma, alpha')
  assert incremental.orders(config) == [('gamma', 'alpha')]
  config.incremental.order = ''
  assert incremental.orders(config) == [('alpha', 'beta', 'gamma')]
  config.incremental.all_orders = True
  assert len(incremental.orders(config)) == 6
  for bad in ('alpha,delta', 'alpha,alpha'):
    config.incremental.order = bad
    with pytest.raises(ValueError, match='incremental.order'):
      incremental.orders(config)
  config.train.budget_tokens = 3 * 10 * 8 * 31 + 5
  stage = incremental.stage_config(config, 3)
  assert run.total_steps(stage.train, 100, 32) == 10 and config.train.budget_tokens > 1000
  assert incremental.stage_config(_config(tiny_data, ''), 3).train.budget_tokens == 0


def test_command_line_chain(tiny_data, tmp_path, compile_cache):  # noqa: F811
  # The same programs as the chains above, so the compilation cache serves them.
  env = {**os.environ, 'JAX_COMPILATION_CACHE_DIR': compile_cache,
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}
  proc = subprocess.run(
      [sys.executable, '-m', 'launch.train', '--config=configs/default.py',
       f'--workdir={tmp_path}', f'--config.data.data_dir={tiny_data}',
       '--config.setting=incremental', '--config.incremental.order=beta,gamma',
       f'--config.train.steps={STEPS}', f'--config.train.checkpoint_every={STEPS}',
       '--config.train.batch_size=8', '--config.train.warmup_steps=2',
       '--config.train.learning_rate=3e-3', '--config.train.eval_batch_size=16',
       '--config.model.num_layers=2', '--config.model.d_model=32',
       '--config.model.num_heads=2', '--config.model.d_ff=64', '--config.model.max_len=32',
       '--config.model.dropout=0.0', '--config.data.seq_len=32',
       '--config.data.participants[0].name=alpha', '--config.data.participants[1].name=beta',
       '--config.data.participants[2].name=gamma'],
      cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout
  assert 'done: incremental' in proc.stdout
  summary = json.load(open(tmp_path / 'train.json'))
  assert [s['workdir'] for s in summary['stages']] == ['stages/beta', 'stages/beta-gamma']
  assert [s['source'] for s in summary['stages']] == ['scratch', 'init_from']
  assert summary['tokens_seen_per_participant'] == {'beta': STEPS * 8 * 31,
                                                    'gamma': STEPS * 8 * 31}
  for stage in ('beta', 'beta-gamma'):  # Every stage keeps its checkpoint.
    assert (tmp_path / 'stages' / stage / 'checkpoints' / str(STEPS)).is_dir()


def test_a_stage_trained_under_another_config_is_not_reused(tmp_path):
  """Stages are shared across chains (whatever the rest of the order), not across configs."""
  stage = str(tmp_path / 'stages' / 'alpha')
  config = _config(str(tmp_path / 'data'), 'alpha')
  run.write_config(stage, incremental.stage_config(config, 1))
  other_order = _config(str(tmp_path / 'data'), 'alpha,beta', all_orders=True)
  run.check_same_training(other_order, stage, ignore=incremental.CHAIN_FIELDS)
  with pytest.raises(ValueError, match='incremental.order'):
    run.check_same_training(other_order, stage)
  other_lr = _config(str(tmp_path / 'data'), 'alpha')
  other_lr.train.learning_rate *= 2
  with pytest.raises(ValueError, match=r'train\.learning_rate'):
    incremental.run_stage(other_lr, str(tmp_path), ['alpha'], 0, model=None,
                          data=run.RunData('', {}, {}, {}))
  run.claim_workdir(str(tmp_path), other_lr)  # Nothing recorded there yet: it claims it.
  with pytest.raises(ValueError, match=r'train\.learning_rate'):
    run.claim_workdir(str(tmp_path), config)


def test_a_finished_single_run_is_the_first_stage_bit_for_bit(chains, single_alpha, tiny_data,
                                                              tmp_path, monkeypatch):
  """With incremental.first_stages, a chain starts from the single run of its first
  participant instead of training that stage again, and ends with the same bits as the
  chain that trained stage 1 itself (the chains fixture's alpha -> beta)."""
  single_dir, _ = single_alpha
  singles = single_dir.parent
  plain = chains[0]  # Trained alpha, then alpha-beta from it, without first_stages.
  shared = _config(tiny_data, 'alpha,beta')
  shared.incremental.first_stages = str(singles / 'single-{participant}')
  spy = Spy(monkeypatch)
  summary = train_lib.train(shared, str(tmp_path / 'shared'))
  assert [s['workdir'] for s in spy.stages] == ['stages/alpha-beta']  # Stage 1 not retrained.
  assert spy.stages[0]['init_from'] == str(single_dir)
  assert summary['stages'][0]['workdir'] == os.path.relpath(single_dir, tmp_path / 'shared')
  assert _same(_params(tmp_path / 'shared' / 'stages' / 'alpha-beta'),
               _params(plain / 'stages' / 'alpha-beta'))
  # Only that participant's finished single run is ever reused.
  other = _config(tiny_data, 'beta,alpha')
  other.incremental.first_stages = str(singles / 'single-{participant}')
  assert incremental.stage_dir(other, str(tmp_path), ('beta',)).endswith('stages/beta')
  other.incremental.first_stages = str(single_dir)  # No {participant}.
  assert incremental.stage_dir(other, str(tmp_path), ('alpha',)).endswith('stages/alpha')
  other.incremental.first_stages = str(plain / 'stages' / '{participant}')  # Not a single.
  assert incremental.stage_dir(other, str(tmp_path), ('alpha',)).endswith('stages/alpha')
