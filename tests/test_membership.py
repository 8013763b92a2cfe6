"""Membership inference (collab.evals.privacy.membership): units, the evaluator against
reference models on a built data folder, and its tables."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collab import hf
from collab import model as model_lib
from collab.data import blocks as blocks_lib
from collab.data import canaries
from collab.data import tokenizer as tokenizer_lib
from collab.evals import interface
from collab.evals.privacy import attacks
from collab.evals.privacy import membership
from collab.evals.privacy import windows
from tests.conftest import TINY_PARTICIPANTS, tiny_run_config


def test_tpr_at_fpr_extremes_name_the_non_members_behind_them():
  # 100 non-members: 1% FPR allows exactly one above the bar (the 2nd highest, 98).
  nonmembers = list(range(100))
  point = attacks.tpr_at_fpr([99, 98.5, 97], nonmembers, 0.01)
  assert point['tpr'] == pytest.approx(2 / 3) and point['false_positives_allowed'] == 1
  small = attacks.tpr_at_fpr([99, 98.5, 97], nonmembers[:50], 0.01)
  assert small == {'tpr': 1.0, 'fpr': 0.01, 'nonmembers': 50, 'false_positives_allowed': 0}
  assert attacks.auroc([3, 4], [1, 2]) == 1.0 and attacks.auroc([1, 1], [1]) == 0.5
  with pytest.raises(ValueError, match='non-member'):
    attacks.auroc([1.0], [])


def test_sample_files_is_seeded_capped_and_skips_canaries():
  records = [{'content': str(i), 'license': canaries.LICENSE if i % 3 == 0 else 'mit'}
             for i in range(30)]
  a = membership.sample_files(records, 8, seed=1, tag='x')
  assert len(a) == 8 and not any(canaries.is_canary(r) for r in a)
  assert a == membership.sample_files(records, 8, seed=1, tag='x')
  assert a != membership.sample_files(records, 8, seed=2, tag='x')
  assert len(membership.sample_files(records, 0, seed=1, tag='x')) == 20


def test_window_units_cover_every_block_and_flag_shared_tokens(tiny_data):
  names = list(TINY_PARTICIPANTS)
  units = membership.window_units([tiny_data], names, 8, 0, seed=1)
  for p in names:
    for side, split in windows.SIDES:
      u, blocks = units[p, side], blocks_lib.load_blocks(tiny_data, p, split)
      assert len(u.spans) == len(blocks) * (blocks.shape[1] // 8)
      for (i, a, b), toks in zip(u.spans, u.tokens):
        # Rows a..b-1 predict tokens a+1..b: the window's, bar a block's first token.
        assert b - a in (7, 8) and b <= len(u.sequences[i]) - 1
        assert toks == u.sequences[i][b + 1 - 8:b + 1]
  # Every organization's files share their template: common 8-token runs are ambiguous,
  # and a window is ambiguous exactly when its tokens occur elsewhere.
  u = units['alpha', 'member']
  assert 0 < u.ambiguous.sum() < len(u.ambiguous)
  assert units['alpha', 'member'].ambiguous.sum() + units['alpha', 'nonmember'].ambiguous.sum() > 0


def _study_with_references(root, tiny_data):
  """study/{centralized, single-beta, single-gamma}: random tiny models, the singles
  exported as Hugging Face folders with train.json (the study's reference models)."""
  config = tiny_run_config(tiny_data)
  mc = model_lib.ModelConfig(vocab_size=300, num_layers=1, num_heads=2, d_model=32, d_ff=64,
                             max_len=32, dropout=0.0)
  model = model_lib.GPT2(mc)
  params = {}
  for i, name in enumerate(('centralized', 'single-beta', 'single-gamma')):
    params[name] = jax.device_get(model.init({'params': jax.random.key(i)},
                                             jnp.zeros((1, 4), jnp.int32),
                                             deterministic=True)['params'])
    os.makedirs(os.path.join(root, name))
    if name.startswith('single-'):
      hf.export_hf(params[name], mc, os.path.join(root, name, 'final'))
      with open(os.path.join(root, name, 'train.json'), 'w') as f:
        json.dump({'participants': [name.split('-')[1]]}, f)
  return config, mc, params['centralized']


def test_evaluate_scores_windows_against_reference_models(tiny_data, tmp_path):
  config, mc, params = _study_with_references(str(tmp_path), tiny_data)
  config.eval.membership.window = 8
  ctx = interface.Context(
      config=config, run_dir=str(tmp_path / 'centralized'), model='final',
      eval_dir=str(tmp_path / 'centralized'), out_dir='', params=params, model_config=mc,
      tokenizer=tokenizer_lib.load_tokenizer(tiny_data), data_dir=tiny_data,
      names=list(TINY_PARTICIPANTS), score=None, seq_len=32)
  out = membership.evaluate(ctx)
  assert out['unit'] == 'window' and out['settings']['fprs'] == [0.001, 0.01]
  alpha, beta, gamma = (out['participants'][p] for p in TINY_PARTICIPANTS)
  # Alpha: both singles never saw it; beta: only single-gamma; gamma: only single-beta.
  assert [os.path.basename(os.path.dirname(f)) for f in alpha['references']] == [
      'single-beta', 'single-gamma']
  assert len(beta['references']) == len(gamma['references']) == 1
  for part in (alpha, beta, gamma):
    assert set(part['scores']) == set(attacks.SCORES)
    for a in part['scores'].values():
      assert 0 <= a['auroc'] <= 1 and a['auroc_ci'][0] <= a['auroc'] <= a['auroc_ci'][1]
      assert a['tpr_at']['0.01']['nonmembers'] == part['nonmembers']
      assert a['roc']['fpr'][0] == 0 and a['roc']['tpr'][-1] == 1
    assert 0 <= part['dataset_inference']['p_value'] <= 1
    # Calibrated by the references: the test rests on LiRA.
    assert part['dataset_inference']['scores'] == ['lira']
    assert part['dataset_inference']['calibrated']
  # The same inputs give the same section (seeded bootstrap and dataset inference).
  assert membership.evaluate(ctx) == out
  views = [{'run': 'centralized', 'model': 'final', 'setting': 'centralized',
            'participants': list(TINY_PARTICIPANTS), 'membership': out}]
  tables = {t.stem: t for t in membership.EVALUATOR.tables(views)}
  assert len(tables['membership'].rows) == 3 * len(attacks.SCORES)
  assert len(tables['dataset_inference'].rows) == 3
  assert any('FP of' in cell for row in tables['membership'].rows for cell in row)
  # No reference left (every single run gone): the table says so, the scores still come.
  config.eval.membership.references = str(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match='membership.references'):
    membership.evaluate(ctx)


def test_heldout_data_is_the_studys_tokenizer_without_canaries_and_goes_stale(tmp_path,
                                                                             tiny_data):
  from collab import io
  from collab import study
  from configs import default
  config = default.get_config()
  config.data.canaries.repeats = (1, 10)
  cfg = study.heldout_data_config(config, str(tmp_path / 'data'))
  assert [tuple(p.sources) for p in cfg.participants] == [
      (f'corpus:heldout/{p}',) for p in ('psf', 'pypa', 'textualize')]
  assert cfg.tokenizer.path == str(tmp_path / 'data' / 'tokenizer')
  assert tuple(cfg.canaries.repeats) == () and tuple(config.data.canaries.repeats) == (1, 10)
  config.study.heldout_sources = ''
  assert study.heldout_data_config(config, str(tmp_path / 'data')) is None
  # Built for another tokenizer (another data folder's inputs): not used.
  folder = tmp_path / 'data-heldout'
  folder.mkdir()
  (folder / 'manifest.json').write_text('{}')
  assert not membership.heldout_current(str(folder), tiny_data)
  inputs = blocks_lib.load_manifest(tiny_data)['inputs']
  io.atomic_write_json(str(folder / membership.HELDOUT_STAMP), {'inputs': inputs})
  assert membership.heldout_current(str(folder), tiny_data)
  io.atomic_write_json(str(folder / membership.HELDOUT_STAMP), {'inputs': 'other'})
  assert not membership.heldout_current(str(folder), tiny_data)
