"""WORKDIR/best: the model with the lowest pooled validation loss, in every setting."""

import json
import math
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest

from collab import checkpoint
from collab import hf
from collab import train as train_lib
from collab.model import ModelConfig, abstract_params
from collab.settings import centralized
from collab.settings import incremental
from collab.settings import best as best_lib
from collab.settings import run
from tests.conftest import tiny_run_config
from tests.test_federated import compile_cache  # noqa: F401  (module fixture, autouse)

STEPS = 8
# A learning rate this high makes the pooled validation loss bounce (its minimum is at
# step 2 on the tiny data), so the best model is not the final one.
BOUNCY_LR = 0.3


def _central_config(data_dir):
  return tiny_run_config(data_dir, steps=STEPS, eval_every=2, learning_rate=BOUNCY_LR,
                         checkpoint_every=2, keep_checkpoints=4)


@pytest.fixture(scope='module')
def central(tiny_data, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('best_central')
  return _central_config(tiny_data), workdir, train_lib.train(_central_config(tiny_data),
                                                              str(workdir))


def valid_losses(workdir, key='step') -> list:
  """(step or round, pooled validation loss) of every validation in metrics.jsonl."""
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  return [(r[key], math.log(r['valid/pooled/perplexity'])) for r in rows
          if 'valid/pooled/perplexity' in r]


def _point(workdir) -> dict:
  return json.load(open(os.path.join(workdir, best_lib.BEST_DIR, best_lib.POINT_JSON)))


def _weights(folder) -> bytes:
  return open(os.path.join(folder, hf.WEIGHTS_FILE), 'rb').read()


def _leaves(tree) -> list:
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def assert_first_minimum(workdir, key='step') -> dict:
  """best/point.json is the first validation with the lowest pooled loss."""
  losses = valid_losses(workdir, key)
  lowest = min(loss for _, loss in losses)
  first = next(at for at, loss in losses if loss == lowest)
  point = _point(workdir)
  assert point[key] == first
  assert point['pooled_loss'] == pytest.approx(lowest, rel=1e-12)
  assert point['pooled_loss'] == best_lib.pooled_loss(point['valid'])
  assert json.load(open(os.path.join(workdir, run.TRAIN_JSON)))['best'] == (
      best_lib.best_summary(point))
  return point


def test_best_is_the_first_minimum_and_the_model_at_its_step(central):
  config, workdir, summary = central
  point = assert_first_minimum(workdir)
  at = point['step']
  assert at < STEPS, 'the validation loss no longer bounces: raise BOUNCY_LR'
  assert [s for s, _ in valid_losses(workdir)] == [2, 4, 6, 8]
  assert point['steps'] == STEPS and point['fraction'] == at / STEPS
  data = run.load_data(config, str(workdir), run.participant_names(config))
  assert point['epochs'] == centralized.epochs(
      config, sum(len(b) for b in data.train.values()), at)
  assert summary['best'] == {'step': at, 'fraction': at / STEPS, 'epochs': point['epochs'],
                             'pooled_loss': point['pooled_loss'],
                             'perplexity': point['valid']['pooled']['perplexity']}
  best, best_config = hf.import_hf(os.path.join(workdir, best_lib.BEST_DIR))
  final, _ = hf.import_hf(os.path.join(workdir, run.FINAL_DIR))
  assert best_config.num_layers == config.model.num_layers
  manager = checkpoint.make_manager(str(workdir), 4, 1, async_save=False)
  saved = manager.restore(at)['state']['params']
  manager.close()
  for x, y in zip(_leaves(best), _leaves(saved)):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, y) for x, y in zip(_leaves(best), _leaves(final)))
  # The tokenizer is beside the weights, as in final/.
  assert sorted(os.listdir(os.path.join(workdir, best_lib.BEST_DIR))) == sorted(
      os.listdir(os.path.join(workdir, run.FINAL_DIR)) + [best_lib.POINT_JSON])


def test_resumed_run_keeps_the_best_from_before_its_checkpoint(central, tmp_path):
  """Killed after step 5 (last checkpoint 4; best/ holds step 2), resumed: the same
  best/ to the byte as the uninterrupted run's."""
  config, workdir, summary = central
  killed = tmp_path / 'killed'
  shutil.copytree(workdir, killed)
  for step in (6, 8):
    shutil.rmtree(killed / 'checkpoints' / str(step))
  shutil.rmtree(killed / run.FINAL_DIR)
  os.remove(killed / run.TRAIN_JSON)
  resumed = train_lib.train(config, str(killed))
  assert resumed['source'] != summary['source']  # It did resume from step 4.
  assert resumed['best'] == summary['best']
  assert _weights(killed / best_lib.BEST_DIR) == _weights(workdir / best_lib.BEST_DIR)
  assert _point(killed) == _point(workdir)


def _tiny_params(value: float):
  config = ModelConfig(vocab_size=16, num_layers=1, num_heads=1, d_model=8, d_ff=8,
                       max_len=4)
  shapes = nn.meta.unbox(abstract_params(config))
  return config, jax.tree_util.tree_map(lambda s: np.full(s.shape, value, s.dtype), shapes)


def _valid(loss: float) -> dict:
  return {'pooled': {'loss_sum': loss * 10, 'tokens': 10, 'perplexity': math.exp(loss)}}


LOSSES = (3.0, 2.0, 2.5, 2.0, 1.5, 1.5, 1.8)  # Best: the first 1.5 (step 5).


def _replay(workdir, config, steps) -> dict:
  for step in steps:
    _, params = _tiny_params(float(step))
    point = best_lib.keep_best(str(workdir), params, config, 0, {
        'step': step, 'steps': len(LOSSES), 'fraction': step / len(LOSSES), 'epochs': None,
        'valid': _valid(LOSSES[step - 1])})
  return point


class Killed(BaseException):
  """A kill, simulated: like SIGKILL, nothing catches it (atomic_dir cleans up, though)."""


# An export of a better point makes a dozen renames and removals (recovery, io.atomic_dir
# twice, the JSON writes, the swap); a kill before each of them, and none at all.
@pytest.mark.parametrize('kill_at', range(14))
def test_keep_best_after_a_kill_at_any_moment_of_an_export(tmp_path, monkeypatch, kill_at):
  """Strict <: ties keep the earlier point. A kill at any file operation of an export
  and a replay from an earlier point end as a run that was never killed."""
  config, _ = _tiny_params(0.0)
  straight = _replay(tmp_path / 'straight', config, range(1, len(LOSSES) + 1))
  assert straight['step'] == 5 and _point(tmp_path / 'straight')['step'] == 5
  calls = {'n': 0}
  real_replace, real_rmtree = os.replace, shutil.rmtree

  def dying(real):
    def call(*args, **kwargs):
      calls['n'] += 1
      if calls['n'] == kill_at + 1:
        raise Killed()
      return real(*args, **kwargs)
    return call
  _replay(tmp_path / 'killed', config, range(1, 5))  # Best so far: step 2.
  monkeypatch.setattr(os, 'replace', dying(real_replace))
  monkeypatch.setattr(shutil, 'rmtree', dying(real_rmtree))
  try:
    _replay(tmp_path / 'killed', config, [5])  # Dies somewhere in this export (or not).
  except Killed:
    pass
  monkeypatch.undo()
  assert _replay(tmp_path / 'killed', config, range(3, len(LOSSES) + 1)) == straight
  assert _weights(tmp_path / 'killed' / best_lib.BEST_DIR) == _weights(
      tmp_path / 'straight' / best_lib.BEST_DIR)
  assert not {'.best.new', '.best.old'} & set(os.listdir(tmp_path / 'killed'))


# The federated run's best round: tests/test_snapshots.py asserts it on the federated run
# it trains already (test_federated_runs_snapshot_at_rounds_and_keep_their_best_round).


def test_incremental_chain_best_is_its_stages_minimum(tiny_data, tmp_path):
  config = _central_config(tiny_data)  # Compiles as the centralized run (the same steps).
  config.train.eval_every = 0  # No periodic validation: each stage's best is its final.
  config.setting, config.incremental.order = 'incremental', 'alpha,beta'
  summary = train_lib.train(config, str(tmp_path))
  stages = [tmp_path / 'stages' / name for name in ('alpha', 'alpha-beta')]
  for stage in stages:
    assert _point(stage)['step'] == _point(stage)['steps']
    assert _weights(stage / best_lib.BEST_DIR) == _weights(stage / run.FINAL_DIR)
  losses = [_point(stage)['pooled_loss'] for stage in stages]
  k = int(np.argmin(losses))
  point = _point(tmp_path)
  assert point['pooled_loss'] == min(losses)
  assert (point['stage'], point['participant']) == (k + 1, ('alpha', 'beta')[k])
  assert _weights(tmp_path / best_lib.BEST_DIR) == _weights(stages[k] / best_lib.BEST_DIR)
  assert summary['best'] == best_lib.best_summary(point)
  assert summary['best']['stage'] == k + 1
  # A stage trained before runs kept best/: its final model and train.json stand in.
  shutil.rmtree(stages[k] / best_lib.BEST_DIR)
  data = run.load_data(config, str(tmp_path), ['alpha', 'beta'])
  again, model_dir = incremental.chain_best(config, str(tmp_path), ('alpha', 'beta'), data)
  assert model_dir == str(stages[k] / run.FINAL_DIR)
  assert {key: again[key] for key in ('stage', 'step', 'fraction', 'pooled_loss')} == {
      key: point[key] for key in ('stage', 'step', 'fraction', 'pooled_loss')}
  assert again['epochs'] == pytest.approx(point['epochs'])
