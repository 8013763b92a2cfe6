"""A tiny training run shared by the parallelism tests, and a multi-host worker.

As a script (`python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT`) it
joins a localhost jax.distributed cluster, trains on a mesh over every process's CPU
devices while feeding only its own rows of each global batch, and (process 0) writes the
loss trajectory to OUT as JSON. The parent test compares it with a one-process run of
`trajectory` on the same global batches.
"""

import functools
import json
import os
import sys

import numpy as np

SEQ_LEN = 16
GLOBAL_BATCH = 8
NUM_STEPS = 5
SEED = 0


def tiny_setup(dropout: float = 0.0, **model_overrides):
  """(train config, model, optimizer) of a ~50k-parameter GPT-2."""
  from collab import model as model_lib
  from collab import steps
  from configs import common
  train_cfg = common.train_config()
  train_cfg.warmup_steps = 1
  train_cfg.learning_rate = 1e-2
  config = model_lib.ModelConfig(vocab_size=128, num_layers=2, num_heads=2, d_model=32,
                                 d_ff=128, max_len=32, dropout=dropout, dtype='float32',
                                 **model_overrides)
  model = model_lib.GPT2(config)
  return train_cfg, model, steps.make_optimizer(train_cfg, NUM_STEPS)


def global_batches(num_steps: int = NUM_STEPS):
  """[steps, B, L] int32 tokens, with the last row of every batch marked as padding.

  Tokens come from the first 16 of 128 ids, so the loss falls fast and a trajectory that
  drifted would show.
  """
  rng = np.random.RandomState(SEED)
  tokens = rng.randint(0, 16, size=(num_steps, GLOBAL_BATCH, SEQ_LEN)).astype(np.int32)
  weights = np.ones((num_steps, GLOBAL_BATCH), np.float32)
  weights[:, -1] = 0.0
  return tokens, weights


def trajectory(mesh, rules, rows: slice = slice(None), **model_overrides):
  """(per-step mean losses, final state) of a pjit run on `mesh` fed `rows` of each batch."""
  import jax
  from collab import parallel, steps
  _, model, optimizer = tiny_setup(**model_overrides)
  init = functools.partial(steps.init_state, model=model, optimizer=optimizer,
                           seq_len=SEQ_LEN, boxed=True)
  rng = jax.random.key(SEED)
  abstract = parallel.abstract_state(init, mesh, rules, rng)
  state = parallel.sharded_init(init, mesh, rules, rng)
  step = parallel.jit_train_step(
      functools.partial(steps.train_step, model=model, optimizer=optimizer),
      parallel.shardings_of(abstract), mesh, rules)
  tokens, weights = global_batches()
  losses = []
  for i in range(NUM_STEPS):
    batch = parallel.shard_batch(mesh, {'tokens': tokens[i, rows], 'weights': weights[i, rows]})
    state, metrics = step(state, batch, rng)
    losses.append(float(metrics['loss_sum']) / float(metrics['tokens']))
  return losses, state


def main(argv):
  process_id, num_processes, port, out = int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
  from collab import parallel
  from configs import common
  parallel.start_multihost(f'localhost:{port}', num_processes, process_id)
  import jax
  cfg = common.parallel_config()
  mesh = parallel.make_mesh(cfg)
  share = GLOBAL_BATCH // num_processes
  losses, _ = trajectory(mesh, cfg.rules, slice(process_id * share, (process_id + 1) * share))
  if process_id == 0:
    with open(out, 'w', encoding='utf-8') as f:
      json.dump({'losses': losses, 'devices': jax.device_count(),
                 'local_devices': jax.local_device_count()}, f)
  jax.distributed.shutdown()


if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main(sys.argv)
