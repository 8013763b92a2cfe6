"""Intermediate models (dose-response) and the self-contained exported folder."""

import json
import os

import jax
import numpy as np
import pytest

from collab import checkpoint
from collab import evaluate
from collab import hf
from collab import train as train_lib
from collab.settings import best as best_lib
from collab.settings import run
from tests import test_best
from tests.conftest import tiny_run_config


def _config(data_dir, setting='centralized'):
  config = tiny_run_config(data_dir, steps=12, checkpoint_every=6, keep_checkpoints=4,
                           snapshot_fractions=(0.5,))
  config.setting = setting
  config.model.max_len = 64  # Room for the tiny corpus's prompts (blocks stay 32 tokens).
  config.federated.rounds, config.federated.local_steps = 4, 3
  config.eval.passk.enabled = config.eval.membership.enabled = False
  m = config.eval.memorization
  m.max_prompts, m.samples_per_prompt, m.max_new_tokens, m.unprompted_samples = 3, 2, 24, 0
  return config


@pytest.fixture(scope='module')
def trained(tiny_data, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('snap_run'))
  config = _config(tiny_data)
  train_lib.train(config, workdir)
  return config, workdir


def test_snapshot_is_the_model_at_its_step(trained):
  config, workdir = trained
  folder = os.path.join(workdir, run.SNAPSHOTS_DIR, '000006')
  info = json.load(open(os.path.join(folder, run.TRAIN_JSON)))
  assert info['step'] == 6 and info['fraction'] == 0.5 and info['train_loss'] > 0
  assert set(info['valid']) == {'alpha', 'beta', 'gamma', 'pooled'}
  manager = checkpoint.make_manager(workdir, 4, 1, async_save=False)
  saved = manager.restore(6)['state']['params']
  manager.close()
  params, _ = hf.import_hf(os.path.join(folder, run.FINAL_DIR))
  for x, y in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(saved)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_snapshots_are_audited_by_the_final_models_code_path(trained, monkeypatch):
  config, workdir = trained
  calls = []
  real = evaluate.run_evaluator

  def spy(ev, ctx, model):
    result = real(ev, ctx, model)
    calls.append((model.eval_dir, ev.name, result))
    return result
  monkeypatch.setattr(evaluate, 'run_evaluator', spy)
  config = config.copy_and_resolve_references()
  config.eval.snapshot_evals = ('fit', 'memorization')  # What a study's audited runs get.
  results = evaluate.evaluate_run(config, workdir)
  snapshot = os.path.join(workdir, run.SNAPSHOTS_DIR, '000006')
  audits = [(folder, r) for folder, name, r in calls if name == 'memorization']
  assert [folder for folder, _ in audits] == [
      workdir, os.path.join(workdir, 'eval-best'), snapshot]
  (point,) = results['snapshots']
  assert point['step'] == 6 and point['fraction'] == 0.5
  direct = audits[-1][1]
  assert direct['participants']['alpha']['samples'] == 3 * 2
  for name, block in point['memorization']['participants'].items():
    assert block['memorized_samples'] == direct['participants'][name]['memorized_samples']
    assert block['samples'] == direct['participants'][name]['samples']
  # Every point records its fit: the training loss on each participant's own blocks.
  assert set(point['fit']['participants']) == {'alpha', 'beta', 'gamma'}
  # Halfway through, the model fits its training data less well than at the end.
  assert point['fit']['pooled']['train_loss'] > results['fit']['pooled']['train_loss']
  # The snapshot's audit is cached in its own folder, as the final model's is in the run's.
  assert os.path.isfile(os.path.join(snapshot, 'memorization', 'result.json'))
  assert os.path.isfile(os.path.join(workdir, 'memorization', 'result.json'))


def test_federated_runs_snapshot_at_rounds_and_keep_their_best_round(tiny_data, tmp_path):
  """Snapshots at rounds; best/ is the first round of lowest pooled validation loss (the
  federated half of test_best, on this run rather than a second federated training)."""
  config = _config(tiny_data, 'federated')
  # Validation after every round. test_best's bouncy learning rate makes the pooled loss
  # rise from round 1 to round 2 (the cosine decay still ends lowest at round 4 here).
  config.federated.eval_every, config.train.learning_rate = 1, test_best.BOUNCY_LR
  summary = train_lib.train(config, str(tmp_path))
  info = json.load(open(tmp_path / run.SNAPSHOTS_DIR / '000002' / run.TRAIN_JSON))
  assert info['round'] == 2 and info['rounds'] == 4
  assert [r for r, _ in test_best.valid_losses(tmp_path, 'round')] == [1, 2, 3, 4]
  point = test_best.assert_first_minimum(tmp_path, key='round')
  assert point['rounds'] == 4 and 'step' not in point
  assert summary['best']['round'] == point['round']
  best, _ = hf.import_hf(os.path.join(tmp_path, best_lib.BEST_DIR))
  final, _ = hf.import_hf(os.path.join(tmp_path, run.FINAL_DIR))
  same = all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(best),
                                                  jax.tree_util.tree_leaves(final)))
  assert same == (point['round'] == 4)


def test_snapshot_fractions_must_lie_inside_the_run():
  assert run.snapshot_points((0.25, 0.5, 0.999), 8) == {2: 0.25, 4: 0.5}
  with pytest.raises(ValueError, match='snapshot_fractions'):
    run.snapshot_points((1.0,), 8)


def test_final_folder_serves_transformers_alone(trained):
  """AutoTokenizer and GPT2LMHeadModel load WORKDIR/final and generate code."""
  _, workdir = trained
  final = os.path.join(workdir, run.FINAL_DIR)
  transformers = pytest.importorskip('transformers')
  tokenizer = transformers.AutoTokenizer.from_pretrained(final)
  ids = tokenizer('def alpha_compute_1(left, right):\n')['input_ids']
  assert tokenizer.decode(ids) == 'def alpha_compute_1(left, right):\n'
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    pytest.skip('torch is not installed; `pip install torch==2.13.0` (a CPU build) runs '
                'the generation half of this test.')
  model = transformers.GPT2LMHeadModel.from_pretrained(final)
  out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                       pad_token_id=tokenizer.eos_token_id)
  assert out.shape[1] > len(ids)
  assert isinstance(tokenizer.decode(out[0][len(ids):]), str)
