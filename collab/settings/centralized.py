"""Centralized training: one participant's blocks ('single') or all of them pooled.

`fit` is the one training loop over pooled blocks; incremental stages reuse it. It
resumes from the run's latest checkpoint (state and data position), so a run killed at
any point and restarted ends bit-identical to an uninterrupted one.
"""

import time
from typing import Sequence

from absl import logging
import jax
import numpy as np
from tqdm import auto as tqdm

from collab import checkpoint
from collab import io
from collab import steps
from collab.data import blocks as blocks_lib
from collab.evals import perplexity
from collab.settings import best as best_lib
from collab.settings import run

def train(config, workdir: str, participants: Sequence[str] | None = None, *,
          init_from: str = '') -> dict:
  """Trains on `participants` pooled (default: all, or config.single for 'single')."""
  run.check_config(config)
  if participants is None:
    participants = ([config.single] if config.setting == 'single'
                    else run.participant_names(config))
  data = run.load_data(config, workdir, participants)
  model, _ = run.make_model(config, data.manifest)
  run.claim_workdir(workdir, config, data_inputs=data.manifest.get('inputs'))
  summary = fit(config, workdir, model, data.train, data.valid,
                init_from=init_from or config.train.init_from, eot_id=data.manifest['eot_id'],
                tokenizer_dir=run.tokenizer_dir_of(data.data_dir))
  return summary


def _pool(train: dict) -> tuple:
  """(blocks_NxL of every participant in order, owner_N: participant index per block)."""
  names = list(train)
  pooled = (train[names[0]] if len(names) == 1
            else np.concatenate([np.asarray(train[n]) for n in names]))
  owner_N = np.concatenate([np.full(len(train[n]), i, np.int32) for i, n in enumerate(names)])
  return pooled, owner_N


def evaluate_valid(config, model, params, valid: dict) -> dict:
  """Perplexity of every participant's validation blocks, and pooled."""
  return perplexity.evaluate(params, model, valid, config.train.eval_batch_size,
                             progress=False)


def _ppl_metrics(result: dict) -> dict:
  return {f'valid/{name}/perplexity': r['perplexity'] for name, r in result.items()
          if r['perplexity'] is not None}


def fit(config, workdir: str, model, train: dict, valid: dict, *, init_from: str = '',
        eot_id: int = 0, desc: str = 'train', tokenizer_dir: str = '') -> dict:
  """Trains `model` on the pooled `train` blocks; returns the run's training summary.

  At config.train.snapshot_fractions of the steps the model is also exported, with its
  validation results, to WORKDIR/snapshots/ (run.save_snapshot) for evaluation over
  training. After every validation the best model so far is kept in WORKDIR/best
  (best_lib.keep_best).
  """
  start_time = time.time()
  pooled, owner_N = _pool(train)
  num_steps = run.total_steps(config.train, len(pooled), pooled.shape[1])
  optimizer = steps.make_optimizer(config.train, num_steps)
  init_key, data_seed, train_key = run.seeds(config.seed)
  engine = run.make_engine(config, model, optimizer, init_key)
  manager = checkpoint.make_manager(workdir, config.train.keep_checkpoints,
                                    config.train.checkpoint_every)
  state, extra, source = run.restore_or_init(engine, manager, init_from, model.config)
  start = int(jax.device_get(engine.to_host(state)['step']))
  logging.info('%s: %s at step %d of %d.', workdir, source, start, num_steps)
  batches = blocks_lib.BatchIterator(pooled, config.train.batch_size, data_seed,
                                     extra.get('data'))
  seen_P = np.asarray(extra.get('blocks_seen', [0] * len(train)), np.int64)
  writer = io.MetricsWriter(workdir)
  writer.truncate_after(start)
  tokens_per_step = config.train.batch_size * (pooled.shape[1] - 1)
  snapshots = run.snapshot_points(config.train.get('snapshot_fractions', ()), num_steps)
  pending, last_loss = [], None
  with tqdm.tqdm(total=num_steps, initial=start, desc=desc, unit='step',
                 unit_scale=False, dynamic_ncols=True) as bar:
    for step in range(start, num_steps):
      tokens_BxL = next(batches)
      seen_P += np.bincount(owner_N[batches.last_indices], minlength=len(train))
      state, metrics = engine.step(state, tokens_BxL, train_key)
      pending.append((step, metrics))
      done = step + 1
      if done % config.train.log_every == 0 or done == num_steps or done in snapshots:
        last_loss = _log(writer, pending, done, bar, tokens_per_step)
        pending = []
      every = config.train.eval_every
      if done in snapshots or (every and done % every == 0 and done < num_steps):
        params = engine.to_host(state)['params']
        result = evaluate_valid(config, model, params, valid)
        writer.write(done, _ppl_metrics(result))
        point = _point(config, len(pooled), done, num_steps, result)
        best_lib.keep_best(workdir, params, model.config, eot_id, point, tokenizer_dir)
        if done in snapshots:
          run.save_snapshot(workdir, done, params, model.config, eot_id, {
              **point, 'requested_fraction': snapshots[done], 'train_loss': last_loss},
              tokenizer_dir)
      checkpoint.save(manager, done, engine.to_host(state),
                      {'data': batches.position, 'blocks_seen': seen_P.tolist()},
                      force=done == num_steps)
      bar.update(1)
  manager.wait_until_finished()
  manager.close()
  params = engine.to_host(state)['params']
  final = evaluate_valid(config, model, params, valid)
  writer.write(num_steps, _ppl_metrics(final))
  writer.close()
  # best/ before train.json, which marks the run finished.
  best = best_lib.keep_best(workdir, params, model.config, eot_id,
                       _point(config, len(pooled), num_steps, num_steps, final), tokenizer_dir)
  summary = {
      'setting': config.setting, 'participants': list(train),
      'steps': num_steps, 'source': source,
      'tokens_seen': int(seen_P.sum()) * (pooled.shape[1] - 1),
      'tokens_seen_per_participant': {
          n: int(seen_P[i]) * (pooled.shape[1] - 1) for i, n in enumerate(train)},
      'valid': final, 'best': best_lib.best_summary(best),
      'train_seconds': time.time() - start_time}
  return run.finish(workdir, params, model.config, eot_id, summary, tokenizer_dir)


def epochs(config, num_blocks: int, num_steps: int) -> float:
  """Passes over the pooled blocks that `num_steps` steps make."""
  return num_steps * config.train.batch_size / max(num_blocks, 1)


def _point(config, num_blocks: int, done: int, num_steps: int, valid: dict) -> dict:
  """Where step `done` lies in the run, with its validation (snapshots, best_lib.keep_best)."""
  return {'step': done, 'steps': num_steps, 'fraction': done / num_steps,
          'epochs': epochs(config, num_blocks, done), 'valid': valid}


def _log(writer, pending: list, done: int, bar, tokens_per_step: int) -> float:
  """Writes the mean loss of the pending steps (and returns it); raises naming the first
  NaN step."""
  host = jax.device_get([m for _, m in pending])
  for (step, _), m in zip(pending, host):
    steps.check_finite(m, step)
  loss = sum(float(m['loss_sum']) for m in host) / sum(float(m['tokens']) for m in host)
  last = host[-1]
  writer.write(done, {'train/loss': loss, 'train/grad_norm': float(last['grad_norm']),
                      'train/lr': float(last['lr'])})
  rate = bar.format_dict.get('rate') or 0.0
  bar.set_postfix(loss=f'{loss:.3f}', tok_s=f'{rate * tokens_per_step:,.0f}')
  return loss
