"""The evaluator interface: a new evaluator is a module and one entry in the list."""

import json
import os

import pytest

from analysis import tables
from collab import evaluate
from collab import study
from collab import train as train_lib
from collab.evals import evaluators
from collab.evals import interface
from tests.conftest import tiny_run_config


def _toy_compute(ctx: interface.Context) -> dict:
  """A toy evaluator: the number of parameters and of training blocks it was given."""
  import jax  # pylint: disable=g-import-not-at-top
  from collab.data import blocks as blocks_lib  # pylint: disable=g-import-not-at-top
  return {'params': int(sum(x.size for x in jax.tree_util.tree_leaves(ctx.params))),
          'blocks': {p: int(len(blocks_lib.load_blocks(ctx.data_dir, p, 'train')))
                     for p in ctx.names},
          'model': ctx.model}


def _toy_tables(views):
  rows = [[v['run'], v['model'], str(v['toy']['params'])] for v in views if v.get('toy')]
  return [interface.Table('toy', 'A toy evaluator', ['run', 'model', 'params'], rows)]


TOY = interface.Evaluator(name='toy', needs=frozenset({'model', 'data'}),
                          enabled=lambda config: True, settings=lambda config: 1,
                          compute=_toy_compute, tables=_toy_tables)


@pytest.fixture(scope='module')
def trained(tiny_data, tmp_path_factory):
  root = tmp_path_factory.mktemp('toy')
  workdir = str(root / 'centralized')
  config = tiny_run_config(tiny_data, steps=8, eval_every=4, snapshot_fractions=(0.5,))
  config.eval.passk.enabled = config.eval.memorization.enabled = False
  config.eval.membership.enabled = False
  train_lib.train(config, workdir)
  return config, str(root), workdir


def test_a_toy_evaluator_reaches_results_and_tables(trained, monkeypatch):
  config, root, workdir = trained
  monkeypatch.setattr(evaluators, 'ALL', evaluators.ALL + (TOY,))
  config = config.copy_and_resolve_references()
  config.eval.snapshot_evals = ('fit', 'toy')
  results = evaluate.evaluate_run(config, workdir)
  assert results['toy']['params'] > 0 and results['toy']['model'] == 'final'
  assert set(results['toy']['blocks']) == {'alpha', 'beta', 'gamma'}
  assert results['models']['best']['toy']['model'] == 'best'  # Every model of eval.models.
  (point,) = results['snapshots']
  assert point['toy']['model'] == 'snapshot' and 'fit' in point
  assert os.path.isfile(os.path.join(workdir, 'toy', 'result.json'))  # Cached per model.
  assert os.path.isfile(os.path.join(workdir, 'eval-best', 'toy', 'result.json'))
  with open(os.path.join(root, 'summary.json'), 'w', encoding='utf-8') as f:
    json.dump({'runs': ['centralized']}, f)
  text = tables.write_tables(root)
  assert '### A toy evaluator' in text
  toy = open(os.path.join(root, 'tables', 'toy.md'), encoding='utf-8').read()
  assert '| centralized | final |' in toy and '| centralized | best |' in toy


def test_unknown_snapshot_evaluators_are_named(trained):
  with pytest.raises(ValueError, match="'nope'"):
    evaluators.by_name(('fit', 'nope'))


def test_snapshot_and_fit_matching_runs_expand_from_the_study_config(tiny_data):
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  specs = {s.name: s.overrides for s in study.expand(config)}
  assert specs['federated-fedavg-r32']['federated.rounds'] == 32
  assert all(specs[n].get('train.snapshot_fractions') for n in specs
             if not n.startswith('incremental'))
  assert 'memorization' in specs['centralized']['eval.snapshot_evals']
  assert 'eval.snapshot_evals' not in specs['federated-fedavg']
