"""A micro study end to end: every run trained and evaluated, tables and figures, rerun no-op."""

import json
import os
import threading

import pytest

from analysis import plots
from analysis import results
from analysis import tables
from collab.evals.privacy import exposure
from collab.evals.privacy import membership
from collab import study
from collab.settings import run
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
  c.eval.extractability.ks, c.eval.extractability.m = (8, 16), 8
  c.study.snapshot_runs, c.study.snapshot_fractions = ('centralized',), (0.5,)
  c.eval.models = ('final',)  # best/ is evaluated in test_evaluators: half the sampling here.
  c.study.server_optimizers = ('fedavg',)  # Adaptive servers: expanded below, trained elsewhere.
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
                   'incremental-alpha-beta', 'incremental-beta-alpha']
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
  for name in ('effectiveness', 'memorization', 'incremental', 'crossorg', 'extractability'):
    assert os.path.isfile(os.path.join(workdir, 'tables', f'{name}.tex'))
  figures = plots.write_figures(workdir)
  assert {os.path.basename(p) for p in figures} == {
      'memorization.png', 'incremental_orders.png', 'loss_curves.png', 'forgetting.png',
      'memorization_vs_fit.png', 'roc.png'}


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


def test_results_and_summary_record_the_machine_the_tables_name(finished, monkeypatch):
  from analysis import captions  # pylint: disable=g-import-not-at-top
  from collab import provenance  # pylint: disable=g-import-not-at-top
  config, workdir, summary = finished
  here = provenance.machine()
  assert summary['machine'] == here and here['cpu'] and here['jaxlib']
  for name in summary['runs']:
    with open(os.path.join(workdir, name, 'results.json'), encoding='utf-8') as f:
      assert json.load(f)['machine'] == here
  text = tables.write_tables(workdir)
  assert f'Measured on {captions.describe(here)}.' in text
  assert here['cpu'] in open(os.path.join(workdir, 'tables', 'findings.tex')).read()
  # Another machine that only re-reads the finished runs claims none of them.
  monkeypatch.setattr(provenance, 'machine', lambda environ=None: {**here, 'cpu': 'Other'})
  assert study.run_study(config, workdir)['machine'] == here
  assert tables.write_tables(workdir) == text


def test_a_changed_config_is_not_served_from_old_runs(finished):
  config, workdir, _ = finished
  changed = config.copy_and_resolve_references()
  changed.federated.rounds = 3  # Training: the federated runs must not be reused.
  with pytest.raises(ValueError, match=r'federated-fedavg.*federated\.rounds: 2 -> 3'):
    study.run_study(changed, workdir)
  # Runs trained before a config field existed were trained as its neutral value says.
  folder = os.path.join(workdir, 'centralized')
  cfg = study.run_config(config, study.RunSpec('centralized', {'setting': 'centralized'}),
                         workdir)
  with open(os.path.join(folder, 'config.json'), encoding='utf-8') as f:
    old = json.load(f)
  for field in ('attention_dropout', 'vocab_multiple'):
    del old['model'][field]
  with open(os.path.join(folder, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump(old, f)
  run.check_same_training(cfg, folder)
  padded = cfg.copy_and_resolve_references()
  padded.model.vocab_multiple = 64
  with pytest.raises(ValueError, match=r'model\.vocab_multiple: 1 -> 64.*vocab_multiple=1'):
    run.check_same_training(padded, folder)
  # Evaluation: only the changed part is recomputed, under its new settings.
  mem_before = os.path.getmtime(os.path.join(folder, 'memorization', 'result.json'))
  changed = config.copy_and_resolve_references()
  changed.eval.membership.window = 16
  cfg = study.run_config(changed, study.RunSpec('centralized', {'setting': 'centralized'}),
                         workdir)
  r = study.run_one(cfg, folder)
  assert r['membership']['settings']['window'] == 16
  assert os.path.getmtime(os.path.join(folder, 'memorization', 'result.json')) == mem_before
  assert study.run_one(study.run_config(config, study.RunSpec(
      'centralized', {'setting': 'centralized'}), workdir), folder)['membership'][
          'settings']['window'] == config.eval.membership.window


def test_evaluation_and_tables_follow_what_was_trained(finished, tmp_path):
  """A run is evaluated under the config and data it trained on; tables show the study's runs."""
  from collab import evaluate  # pylint: disable=g-import-not-at-top
  config, workdir, summary = finished
  folder = os.path.join(workdir, 'federated-fedavg')
  as_centralized = study.run_config(config, study.RunSpec('c', {'setting': 'centralized'}),
                                    workdir)
  with pytest.raises(ValueError, match='--config.setting=federated'):
    evaluate.evaluate_run(as_centralized, folder)
  # The data folder rebuilt from changed sources: the run no longer matches it.
  fed = study.run_config(config, study.RunSpec('f', {
      'setting': 'federated', 'federated.server_optimizer': 'fedavg'}), workdir)
  run.check_same_training(fed, folder, data_inputs=_inputs(folder))
  # How a run is computed or saved, not what it learns: resumed and re-evaluated as is.
  fed.model.loss_chunk, fed.train.eval_batch_size, fed.federated.vmap = 8, 2, False
  run.check_same_training(fed, folder, data_inputs=_inputs(folder))
  with pytest.raises(ValueError, match='data folder was rebuilt'):
    run.check_same_training(fed, folder, data_inputs='0' * 64)
  with pytest.raises(ValueError, match='data folder was rebuilt'):
    evaluate.check_trained_as(fed, folder, '0' * 64)
  # A run folder the study no longer lists stays out of its tables.
  stray = os.path.join(workdir, 'zz-old-run')
  os.makedirs(stray, exist_ok=True)
  with open(os.path.join(folder, 'results.json'), encoding='utf-8') as f:
    old = {**json.load(f), 'run': 'zz-old-run'}
  with open(os.path.join(stray, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump(old, f)
  assert [r['run'] for r in tables.load_results(workdir)] != [] and 'zz-old-run' not in [
      r['run'] for r in tables.load_results(workdir)]
  assert sorted(r['run'] for r in tables.load_results(workdir)) == sorted(summary['runs'])
  os.remove(os.path.join(stray, 'results.json'))
  os.rmdir(stray)
  bad = config.copy_and_resolve_references()
  bad.eval.passk.ks = (0, 1)
  bad.data.data_dir = os.path.join(workdir, 'data')
  with pytest.raises(ValueError, match=r'passk\.ks=\(0, 1\)'):
    evaluate.evaluate_part(bad, folder, 'passk')


def _inputs(folder):
  with open(os.path.join(folder, run.DATA_INPUTS_JSON), encoding='utf-8') as f:
    return json.load(f)['inputs']


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


def test_evaluation_follows_training_in_order_and_a_failure_stops_the_study(monkeypatch):
  """Runs are evaluated in order, each after its own training and the single runs'
  (their models are reference models), while later runs train; a failed evaluation
  ends the study with its error."""
  names = ['single-a', 'single-b', 'centralized', 'federated-fedavg']
  runs = [(study.RunSpec(n, {'setting': n.split('-')[0]}), n, None) for n in names]
  assert study.evaluable_after(runs) == [2, 2, 3, 4]
  events, guard = [], threading.Lock()

  def log(kind, folder):
    with guard:
      events.append((kind, folder))
  monkeypatch.setattr(study, 'train_one', lambda cfg, folder: log('train', folder))

  def evaluated(cfg, folder):
    log('evaluate', folder)
    return {'run': folder}
  monkeypatch.setattr(study, 'evaluated', evaluated)
  assert study.train_and_evaluate(runs) == {n: {'run': n} for n in names}
  assert [f for kind, f in events if kind == 'evaluate'] == names
  for i, name in enumerate(names):
    at = events.index(('evaluate', name))
    assert {f for kind, f in events[:at] if kind == 'train'} >= set(names[:max(i, 1) + 1])

  def failing(cfg, folder):
    raise RuntimeError(f'evaluation of {folder} failed')
  monkeypatch.setattr(study, 'evaluated', failing)
  with pytest.raises(RuntimeError, match='evaluation of single-a failed'):
    study.train_and_evaluate(runs)


def test_seeds_repeat_every_run_and_tables_report_mean_and_spread(tmp_path):
  config = micro_study_config(str(tmp_path))
  config.study.seeds = (1, 2)
  config.study.server_optimizers = ('fedavg', 'fedyogi')
  config.study.settings = ('centralized', 'federated')
  specs = study.expand(config)
  assert [s.name for s in specs] == ['centralized@seed1', 'federated-fedavg@seed1',
                                     'federated-fedyogi@seed1', 'centralized@seed2',
                                     'federated-fedavg@seed2', 'federated-fedyogi@seed2']
  assert {s.overrides['seed'] for s in specs} == {1, 2}
  assert specs[2].overrides['federated.server_learning_rate'] == (
      config.study.adaptive_server_learning_rate)
  # Each seed's incremental chains share stages among themselves only.
  config.study.settings = ('centralized', 'federated', 'incremental')
  stages = {study.run_config(config, s, '/w').incremental.stages_dir
            for s in study.expand(config) if s.name.startswith('incremental')}
  assert stages == {'/w/stages@seed1', '/w/stages@seed2'}
  config.study.settings = ('centralized', 'federated')
  config.study.seeds = (2,)  # One seed replaces config.seed; names stay plain.
  assert [(s.name, s.overrides['seed']) for s in study.expand(config)][:1] == [
      ('centralized', 2)]
  config.study.seeds = ()
  assert all('seed' not in s.overrides for s in study.expand(config))
  config.study.server_optimizers = ('fedavg', 'fedyogi', 'fedavg')
  with pytest.raises(ValueError, match=r"federated-fedavg'\] twice.*server_optimizers"):
    study.expand(config)
  runs = [{'run': f'centralized@seed{i}', 'setting': 'centralized',
           'perplexity': {'a': ppl, 'pooled': ppl}} for i, ppl in ((1, 10.0), (2, 14.0))]
  _, _, rows = tables.effectiveness(runs)
  assert rows == [['centralized', 'final', 'centralized', '100', '12.00 ± 2.83',
                   '12.00 ± 2.83']]


# ---- Privacy: DP runs in the study, privacy tables and figure from results only ------------

def test_dp_noise_multipliers_add_one_dp_fedavg_run_each(tmp_path):
  config = micro_study_config(str(tmp_path))
  config.study.settings = ('centralized', 'federated')
  config.study.server_optimizers = ('fedavg',)
  config.study.dp_noise_multipliers = (0.0, 1.0)
  specs = study.expand(config)
  assert [s.name for s in specs] == ['centralized', 'federated-fedavg', 'federated-dp-z0.0',
                                     'federated-dp-z1.0']
  assert specs[3].overrides == {
      'setting': 'federated', 'federated.server_optimizer': 'fedavg',
      'federated.weighting': 'uniform', 'federated.dp.enabled': True,
      'federated.dp.noise_multiplier': 1.0}
  cfg = study.run_config(config, specs[3], str(tmp_path / 'study'))
  assert cfg.federated.dp.enabled and cfg.federated.weighting == 'uniform'
  assert not config.federated.dp.enabled  # The study's own config is untouched.
  config.study.dp_noise_multipliers = (-1.0,)
  with pytest.raises(ValueError, match='dp_noise_multipliers'):
    study.expand(config)


def test_dp_run_canary_audit_stays_below_the_accountants_epsilon(tmp_path):
  """A DP-FedAvg run built for the check: canaries planted 1 and 20 times in each
  participant's training data; the canaries' empirical epsilon (a 95% lower bound) must
  not exceed the accountant's epsilon at the same delta."""
  config = micro_study_config(str(tmp_path))
  config.study.settings = ('federated',)
  config.study.dp_noise_multipliers = (1.0,)
  config.study.snapshot_runs, config.study.figures = (), False
  config.data.canaries.repeats, config.data.canaries.per_repeat = (1, 20), 4
  config.data.canaries.alphabet, config.data.canaries.length = 'abcdef', 3
  config.federated.rounds = 3
  config.eval.passk.enabled = config.eval.memorization.enabled = False
  config.eval.extractability.enabled = config.eval.membership.enabled = False
  config.eval.canaries.candidates = 200
  study.run_study(config, str(tmp_path / 'study'))
  with open(tmp_path / 'study' / 'federated-dp-z1.0' / 'results.json') as f:
    r = json.load(f)
  audit, eps = r['canaries']['epsilon_audit'], r['privacy']['epsilon']
  assert audit['members'] == 16 and audit['nonmembers'] == 16 * 200
  assert audit['delta'] == r['privacy']['delta'] and eps is not None
  assert 0.0 <= audit['epsilon_lower_bound'] <= eps, (audit, eps)


def _privacy_runs():
  """Synthetic results.json contents: two plain runs and DP runs at z = 2, 0.5 and 0."""
  def run(name, ppl, exposure, auroc, privacy=None):
    by = {'1': exposure / 4, '10': exposure / 2, '100': exposure}
    return {
        'run': name, 'setting': 'federated' if 'fed' in name else 'centralized',
        'participants': ['a', 'b'], 'perplexity': {'a': ppl, 'b': ppl, 'pooled': ppl},
        'memorization': {'participants': {p: {'samples': 4, 'ratio': 0.25} for p in 'ab'}},
        'privacy': privacy,
        'canaries': {'log2_space': 16.0, 'by_repeats': by, 'participants': {
            p: {'by_repeats': by} for p in 'abc'}},
        'membership': {'settings': {'fprs': [0.01]}, 'unit': 'window', 'participants': {p: {
            'members': 5, 'nonmembers': 4, 'ambiguous': {'member': 1, 'nonmember': 0},
            'references': [], 'dataset_inference': {'p_value': 0.5, 'sequences_needed': None},
            'scores': {'loss': {'auroc': auroc, 'auroc_ci': [auroc - 0.1, auroc],
                                'tpr_at': {'0.01': {'tpr': 0.2, 'nonmembers': 4,
                                                    'false_positives_allowed': 0}}},
                       'min_k': {'auroc': auroc - 0.1, 'auroc_ci': [auroc - 0.2, auroc],
                                 'tpr_at': {'0.01': {'tpr': 0.0, 'nonmembers': 4,
                                                     'false_positives_allowed': 0}}}}}
            for p in 'ab'}}}

  def dp(z, eps):
    return {'epsilon': eps, 'delta': 1e-5, 'noise_multiplier': z, 'clip_norm': 1.0,
            'rounds': 4, 'clients_per_round': 3, 'clients': 3, 'accountant': 'rdp'}
  return [run('centralized', 10.0, 12.0, 0.9), run('federated-fedavg', 11.0, 10.0, 0.8),
          run('federated-dp-z2.0', 40.0, 1.0, 0.5, dp(2.0, 3.5)),
          run('federated-dp-z0.5', 30.0, 4.0, 0.6, dp(0.5, 80.0)),
          run('federated-dp-z0.0', 12.0, 9.0, 0.7, dp(0.0, None))]


def test_privacy_tables_from_results():
  runs = _privacy_runs()
  _, header, rows = tables.privacy(runs)
  assert header == ['run', 'noise multiplier', 'ε', 'ppl pooled', 'mem ratio %',
                    'exposure 1x', 'exposure 10x', 'exposure 100x', 'MIA AUROC loss',
                    'MIA AUROC min-k']
  assert [r[0] for r in rows] == ['centralized', 'federated-fedavg', 'federated-dp-z0.0',
                                  'federated-dp-z0.5', 'federated-dp-z2.0']
  assert rows[0][1:3] == ['–', '–'] and rows[2][1:3] == ['0', '∞']
  assert rows[3][1:3] == ['0.5', '80.00']
  assert tables.fmt([1.34e298]) == '1.34e+298'  # A model the noise destroyed.
  assert rows[4] == ['federated-dp-z2.0', '2', '3.50', '40.00', '25.0', '0.25', '0.50',
                     '1.00', '0.500', '0.400']
  views = results.model_views(runs)
  (canaries,) = exposure.EVALUATOR.tables(views)
  assert canaries.header[-3:] == ['exposure 1x', 'exposure 10x', 'exposure 100x']
  assert canaries.rows[2] == ['centralized', 'final', 'c', 'no', '3.00', '6.00',
                              '12.00']  # Not trained on.
  mia, di = membership.EVALUATOR.tables(views)
  assert mia.header[-1] == 'TPR % at 1% FPR'
  assert mia.rows[0] == ['centralized', 'final', 'a', 'yes', '5 / 4 (1 / 0)', 'loss',
                         '0.900 [0.800, 0.900]', '20.0 (0 FP of 4)']
  assert di.rows[0] == ['centralized', 'final', 'a', 'yes', '0.5', '> all', '5 / 4',
                        ' (none left)']
  assert set(tables.all_tables(runs, {})) == {'effectiveness', 'memorization', 'privacy',
                                              'canaries', 'membership', 'dataset_inference',
                                              'findings'}


def test_existing_tables_are_unchanged_by_privacy_results():
  runs = _privacy_runs()
  bare = [{k: v for k, v in r.items() if k not in ('privacy', 'canaries', 'membership')}
          for r in runs]
  with_privacy, without = tables.all_tables(runs, {}), tables.all_tables(bare, {})
  assert set(without) == {'effectiveness', 'memorization', 'findings'}
  for name, (title, header, rows) in without.items():
    assert tables.markdown(title, header, rows) == tables.markdown(*with_privacy[name])
    assert tables.latex(title, header, rows) == tables.latex(*with_privacy[name])


def test_privacy_figure_is_drawn_only_with_dp_runs(tmp_path):
  runs = _privacy_runs()
  for r in runs:
    os.makedirs(tmp_path / r['run'])
    with open(tmp_path / r['run'] / 'results.json', 'w') as f:
      json.dump(r, f)
  made = {os.path.basename(p) for p in plots.write_figures(str(tmp_path))}
  assert 'privacy_utility.png' in made
  first = open(tmp_path / 'figures' / 'privacy_utility.png', 'rb').read()
  plots.write_figures(str(tmp_path))
  assert open(tmp_path / 'figures' / 'privacy_utility.png', 'rb').read() == first
  no_dp = [r for r in runs if not r['privacy']]
  assert plots.privacy_utility(no_dp, str(tmp_path / 'x.png')) is None
