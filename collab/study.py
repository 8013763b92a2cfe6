"""A study: one config expanded into runs, run where missing, evaluated, summarized.

A study folder holds `data/` (built once), `data-heldout/` (with
`config.study.heldout_sources`: held-out files, never trained on), one folder per run (`single-NAME`,
`centralized`, `federated-OPT`, `federated-fedavg-rN` (FedAvg with N rounds, to reach
the centralized fit), `federated-dp-zZ` (DP-FedAvg at noise multiplier Z),
`incremental-A-B-C`, with `@seedN` when several seeds are asked for), `stages/`
(incremental stages, shared by the orders that begin alike; `stages@seedN/` per seed
when there are several; a chain's first stage is the single run of its first
participant when the study has single runs), `summary.json` and, from
analysis, `tables/` and `figures/`. Every step skips what is already done, so a study
interrupted anywhere resumes, and a finished one re-prints its tables in seconds. Runs
are trained in order; one background thread evaluates each, in order, once it and the
single runs are trained, since some evaluators read those runs' models.
"""

import concurrent.futures
import copy
import itertools
import os
import shutil
import time
from typing import NamedTuple

from absl import logging
from tqdm import auto as tqdm

from collab import evaluate
from collab import io
from collab import lock
from collab import provenance
from collab import train as train_lib
from collab.data import blocks as blocks_lib
from collab.data import build
from collab.settings import run

SUMMARY_JSON = 'summary.json'
ADAPTIVE = ('fedadam', 'fedyogi', 'fedadagrad')  # Server optimizers with their own lr.


class RunSpec(NamedTuple):
  """One run of a study: its folder name and the config fields it sets."""
  name: str
  overrides: dict  # Dotted config path -> value.


def expand(config) -> list:
  """The runs of a study config, in the order they run."""
  names = run.participant_names(config)
  study = config.study
  unknown = [s for s in study.settings if s not in run.SETTINGS]
  if unknown:
    raise ValueError(f'config.study.settings has unknown settings {unknown}; use {run.SETTINGS}.')
  specs = []
  if 'single' in study.settings:
    specs += [RunSpec(f'single-{p}', {'setting': 'single', 'single': p}) for p in names]
  if 'centralized' in study.settings:
    specs.append(RunSpec('centralized', {'setting': 'centralized'}))
  if 'federated' in study.settings:
    adaptive = {'federated.server_learning_rate': study.adaptive_server_learning_rate}
    specs += [RunSpec(f'federated-{o}', {'setting': 'federated',
                                         'federated.server_optimizer': o,
                                         **(adaptive if o in ADAPTIVE else {})})
              for o in study.server_optimizers]
    specs += [fit_matching_spec(config, n) for n in study.get('fit_matching_rounds', ())]
  specs += [dp_spec(z) for z in study.get('dp_noise_multipliers', ())]
  if 'incremental' in study.settings:
    orders = itertools.permutations(names) if study.all_orders else [tuple(names)]
    specs += [RunSpec('incremental-' + '-'.join(o), {
        'setting': 'incremental', 'incremental.order': ','.join(o),
        'incremental.all_orders': False}) for o in orders]
  specs = with_snapshots(config, specs)
  seeds = tuple(study.seeds)
  if len(seeds) > 1:
    specs = [RunSpec(f'{s.name}@seed{seed}', {**s.overrides, 'seed': seed})
             for seed in seeds for s in specs]
  elif seeds:  # One seed: it replaces config.seed, and names stay plain.
    specs = [RunSpec(s.name, {**s.overrides, 'seed': seeds[0]}) for s in specs]
  names = [s.name for s in specs]
  twice = sorted({n for n in names if names.count(n) > 1})
  if twice:
    raise ValueError(f'config.study asks for the runs {twice} twice; remove the repeated '
                     'value from study.server_optimizers, study.dp_noise_multipliers or '
                     'study.seeds.')
  return specs


def with_snapshots(config, specs: list) -> list:
  """The specs, with snapshots where config.study asks for them: study.snapshot_runs
  export models at study.snapshot_fractions ('all': every run but the incremental chains,
  whose stages are their trajectory), and study.snapshot_clone_audit's snapshots are also
  clone-audited."""
  study = config.study
  allowed = [s.name for s in specs if s.overrides.get('setting') != 'incremental']
  snapshots = tuple(study.get('snapshot_runs', ()))
  snapshots = tuple(allowed) if snapshots == ('all',) else snapshots
  audited = tuple(study.get('snapshot_clone_audit', ()))
  unknown = sorted((set(snapshots) | set(audited)) - set(allowed))
  if unknown or set(audited) - set(snapshots):
    bad = unknown or sorted(set(audited) - set(snapshots))
    raise ValueError(f'config.study.snapshot_runs / snapshot_clone_audit name {bad}, '
                     'which this study does not run, which share stages (incremental) or '
                     f'which take no snapshots; use names among {allowed} (audited runs '
                     'must also be in snapshot_runs).')
  out = []
  for s in specs:
    extra = {}
    if s.name in snapshots:
      extra['train.snapshot_fractions'] = tuple(study.snapshot_fractions)
    if s.name in audited:
      extra['eval.snapshot_evals'] = tuple(config.eval.snapshot_evals) + ('memorization',)
    out.append(RunSpec(s.name, {**s.overrides, **extra}) if extra else s)
  return out


def fit_matching_spec(config, rounds: int) -> RunSpec:
  """FedAvg with `rounds` rounds of the configured local epochs: more training, so that it
  reaches the centralized run's fit and memorization can be compared at matched fit."""
  if config.train.get('budget_tokens', 0):
    raise ValueError('config.study.fit_matching_rounds adds training, which a token budget '
                     '(config.train.budget_tokens) forbids: set one of them only.')
  if int(rounds) <= int(config.federated.rounds):
    raise ValueError(f'config.study.fit_matching_rounds has {rounds}; each must exceed '
                     f'config.federated.rounds={config.federated.rounds} (it adds training).')
  return RunSpec(f'federated-fedavg-r{int(rounds)}', {
      'setting': 'federated', 'federated.server_optimizer': 'fedavg',
      'federated.rounds': int(rounds)})


def dp_spec(noise_multiplier: float) -> RunSpec:
  """A DP-FedAvg run: FedAvg with client clipping and Gaussian noise (uniform weights,
  which DP-FedAvg's sensitivity bound needs)."""
  z = float(noise_multiplier)
  if z < 0:
    raise ValueError(f'config.study.dp_noise_multipliers has {z}; noise multipliers must be '
                     '>= 0 (0.0: clipping only).')
  return RunSpec(f'federated-dp-z{z}', {
      'setting': 'federated', 'federated.server_optimizer': 'fedavg',
      'federated.weighting': 'uniform', 'federated.dp.enabled': True,
      'federated.dp.noise_multiplier': z})


def run_config(config, spec: RunSpec, workdir: str):
  """The config of one run: the study's, with the run's fields and shared folders set."""
  cfg = config.copy_and_resolve_references()
  cfg.unlock()
  for path, value in spec.overrides.items():
    node = cfg
    *parents, leaf = path.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  cfg.data.data_dir = run.data_dir_of(config, workdir)
  # Chains share stages with their prefix; a seed's chains share only among themselves.
  seeded = f'@seed{cfg.seed}' if len(tuple(config.study.seeds)) > 1 else ''
  cfg.incremental.stages_dir = os.path.join(os.path.abspath(workdir), 'stages' + seeded)
  if 'single' in config.study.settings and not cfg.train.get('budget_tokens', 0):
    # The single runs (trained first) are the chains' first stages: the same training.
    cfg.incremental.first_stages = os.path.join(os.path.abspath(workdir),
                                                'single-{participant}' + seeded)
  cfg.lock()
  return cfg


def train_one(cfg, folder: str) -> None:
  """Trains (or resumes) one run; a finished run is reused only if it was trained under
  the same config and data."""
  inputs = blocks_lib.load_manifest(run.data_dir_of(cfg, folder)).get('inputs')
  run.check_same_training(cfg, folder, data_inputs=inputs)
  if not run.is_done(folder):
    train_lib.train(cfg, folder)


def run_one(cfg, folder: str) -> dict:
  """Trains (where needed) and evaluates one run; returns its results, reused only if
  they were evaluated under the same settings and models (collab.evaluate)."""
  train_one(cfg, folder)
  return evaluated(cfg, folder)


def evaluated(cfg, folder: str) -> dict:
  """A trained run's results: reused if current, evaluated otherwise."""
  return evaluate.load_current_results(cfg, folder) or evaluate.evaluate_run(cfg, folder)


def _crossorg(config, data_dir: str) -> dict | None:
  """The participants' containment matrix and cross-org clones (once per data folder)."""
  if not config.study.crossorg:
    return None
  # Only studies that audit clones need it.
  from collab.evals.memorization import audit as memorization
  mem = config.eval.memorization
  return memorization.crossorg_summary(data_dir, run.participant_names(config),
                                       int(mem.min_lines), int(mem.clone_type))


def evaluable_after(runs) -> list:
  """For each run, how many runs (a prefix of `runs`) must be trained before it may be
  evaluated: itself and every single run, whose models evaluators may read (the
  extraction ranking's and membership's reference models)."""
  singles = [i for i, (spec, _, _) in enumerate(runs)
             if spec.overrides.get('setting') == 'single']
  last_single = max(singles, default=-1)
  return [max(i, last_single) + 1 for i in range(len(runs))]


def train_and_evaluate(runs, timing: dict | None = None) -> dict:
  """{run name: results}: every run trained in order, and evaluated in order by one
  background thread as soon as evaluable_after allows, while the next runs train.
  timing['train_seconds'] gets the wall time of the training loop.

  On a CPU neither a small model's training step nor a decoding step keeps every core
  busy, so the two overlap; each computes what it would alone, in the same order, so
  the results are the same bits. A failure on either side stops both.
  """
  after = evaluable_after(runs)
  results, submitted = {}, []
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix='evaluate')
  ebar = tqdm.tqdm(total=len(runs), desc='study: evaluate', unit='run', position=1)

  def evaluate_one(spec, folder, cfg):
    ebar.set_postfix_str(spec.name)
    out = evaluated(cfg, folder)
    ebar.update(1)
    return out

  def submit(trained: int) -> None:
    while len(submitted) < len(runs) and after[len(submitted)] <= trained:
      spec, folder, cfg = runs[len(submitted)]
      submitted.append((spec.name, pool.submit(evaluate_one, spec, folder, cfg)))
    for _, future in submitted:  # An evaluation that failed stops the study now.
      if future.done() and future.exception():
        raise future.exception()
  start = time.time()
  try:
    with tqdm.tqdm(runs, desc='study: train', unit='run', position=0, leave=True) as bar:
      for i, (spec, folder, cfg) in enumerate(bar):
        bar.set_postfix_str(spec.name)
        train_one(cfg, folder)
        submit(i + 1)
    if timing is not None:
      timing['train_seconds'] = time.time() - start
    for name, future in submitted:
      results[name] = future.result()
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
    ebar.close()
  return results


def heldout_data_config(config, data_dir: str):
  """The data config of WORKDIR/data-heldout: each participant's held-out sources
  (config.study.heldout_sources), cleaned like its training data and tokenized with the
  study's tokenizer; None when the study has none."""
  spec = str(config.study.get('heldout_sources', '') or '')
  if not spec:
    return None
  cfg = copy.deepcopy(config.data)
  with cfg.unlocked():
    for p in cfg.participants:
      p.sources = (spec.format(participant=p.name),)
      p.valid_sources = ()
    cfg.split = 'file'
    cfg.canaries.repeats = ()  # Secrets planted in training files only.
    cfg.max_file_bytes = int(config.study.heldout_max_file_bytes)
    cfg.tokenizer.path = os.path.join(os.path.abspath(data_dir), 'tokenizer')
    cfg.data_dir = ''
  return cfg


def build_heldout(config, data_dir: str) -> None:
  """Builds DATA_DIR/../data-heldout (membership's extra non-members) if the study has
  held-out sources; rebuilt whenever the study's data (so its tokenizer) changes."""
  from collab.evals.privacy import membership
  folder = os.path.join(os.path.dirname(os.path.abspath(data_dir)), membership.HELDOUT_DATA)
  cfg = heldout_data_config(config, data_dir)
  if cfg is None or not membership.heldout_current(folder, data_dir):
    shutil.rmtree(folder, ignore_errors=True)  # None wanted, or another tokenizer's.
  if cfg is None:
    return
  build.build_data(cfg, folder)
  io.atomic_write_json(os.path.join(folder, membership.HELDOUT_STAMP),
                       {'inputs': blocks_lib.load_manifest(data_dir).get('inputs')})


@lock.holding_workdir  # One process per study folder; its runs lock their own folders.
def run_study(config, workdir: str) -> dict:
  """Builds the data, runs every missing run, and writes summary.json."""
  start = time.time()
  specs = expand(config)
  data_dir = run.data_dir_of(config, workdir)
  card = build.build_data(config.data, data_dir)
  build_heldout(config, data_dir)
  data_seconds = time.time() - start
  run.write_config(workdir, config)
  worked = False
  runs = [(spec, os.path.join(workdir, spec.name), run_config(config, spec, workdir))
          for spec in specs]
  for spec, folder, cfg in runs:
    worked |= not (run.is_done(folder) and evaluate.load_current_results(cfg, folder))
  timing = {}
  train_and_evaluate(runs, timing)
  summary = {
      'runs': [s.name for s in specs],
      'participants': run.participant_names(config),
      'data': {p: {split: {k: card['participants'][p]['splits'][split].get(k) for k in (
          'files', 'lines', 'tokens', 'blocks')} for split in ('train', 'valid')}
          for p in run.participant_names(config)},
      'crossorg': _crossorg(config, data_dir),
  }
  previous = os.path.join(workdir, SUMMARY_JSON)
  # Time over the invocations that trained or evaluated something: a rerun that only
  # reads finished runs leaves it (and the summary) as it was.
  stored = io.read_json(previous) if os.path.isfile(previous) else {}
  before = stored.get('wall_seconds')
  # The machine of the last invocation that did work, like the time: a rerun elsewhere
  # that only reads finished runs must not claim them.
  summary['machine'] = (provenance.machine() if worked or before is None
                        else stored.get('machine'))
  summary['wall_seconds'] = ((before or 0.0) + time.time() - start if worked or before is None
                             else before)
  for key, value in (('data_seconds', data_seconds),
                     ('train_seconds', timing.get('train_seconds'))):
    # The data build and training loop of the invocation that did the work; evaluation
    # overlaps training (train_and_evaluate), so the rest of the wall time is its tail.
    summary[key] = value if worked or before is None else stored.get(key)
  io.atomic_write_json(previous, summary)
  logging.info('Study %s: %d runs in %.0fs.', workdir, len(specs), time.time() - start)
  return summary
