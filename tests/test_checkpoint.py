"""Orbax round trips and the resume > init_from > scratch order of restore_or_init."""

import functools
import os

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from collab import checkpoint, parallel, steps
from configs import common
from tests import multihost_worker as worker

RULES = common.parallel_config().rules


def _perturbed(state, seed):
  """Every leaf changed (Adam moments, counts, learning rate too), shardings kept."""
  rng = np.random.RandomState(seed)

  def change(x):
    value = np.asarray(x)
    value = value + (3 if value.dtype.kind == 'i' else rng.standard_normal(value.shape))
    return jax.device_put(value.astype(x.dtype), x.sharding)
  return jax.tree_util.tree_map(change, state)


@pytest.fixture(scope='module')
def run():
  """Abstract state, a fresh-state maker, and a state as if trained (no leaf at its init)."""
  _, model, optimizer = worker.tiny_setup()
  mesh = parallel.make_mesh(common.parallel_config())
  init = functools.partial(steps.init_state, model=model, optimizer=optimizer,
                           seq_len=worker.SEQ_LEN, boxed=True)
  abstract = parallel.abstract_state(init, mesh, RULES, jax.random.key(0))
  init_jit = jax.jit(lambda r: nn.meta.unbox(init(r)),
                     out_shardings=parallel.shardings_of(abstract))
  fresh = lambda seed=0: init_jit(jax.random.key(seed))  # Same executable for any seed.
  return abstract, fresh, _perturbed(fresh(), 1)


def _assert_bit_identical(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_bit_identical(tmp_path, run):
  abstract, _, trained = run
  extra = {'position': {'epoch': np.int64(1), 'index': 40}, 'round': 2}
  manager = checkpoint.make_manager(str(tmp_path), keep=2, every=1)
  assert checkpoint.save(manager, 3, trained, extra)
  manager.close()  # Waits for the asynchronous save.
  assert os.path.isdir(tmp_path / 'checkpoints' / '3')
  state, got_extra, source = checkpoint.restore_or_init(
      checkpoint.make_manager(str(tmp_path), keep=2, every=1), abstract, None)
  assert source == 'resume'
  assert got_extra == {'position': {'epoch': 1, 'index': 40}, 'round': 2}
  _assert_bit_identical(state, trained)
  # Optimizer types survive, and every array lands on the sharding it was asked for.
  assert type(state['opt_state'][1]) is type(trained['opt_state'][1])
  assert int(optax.tree_utils.tree_get(state['opt_state'], 'count', filtering=lambda p, _:
             'inner_state' in jax.tree_util.keystr(p))) == 3
  for leaf, a in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(abstract)):
    assert leaf.sharding == a.sharding


def test_interval_keep_and_force(tmp_path, run):
  _, fresh, _ = run
  state = fresh()
  manager = checkpoint.make_manager(str(tmp_path), keep=2, every=2)
  saved = [checkpoint.save(manager, s, state, {}) for s in range(1, 7)]
  assert saved == [False, True, False, True, False, True]
  assert checkpoint.save(manager, 7, state, {}, force=True)
  manager.wait_until_finished()
  assert manager.all_steps() == [6, 7]
  with pytest.raises(TypeError):
    checkpoint.save(manager, 8, state, {'bad': object()}, force=True)
  manager.close()


def test_restore_or_init_order(tmp_path, run):
  abstract, fresh, trained = run
  other = str(tmp_path / 'other')
  manager = checkpoint.make_manager(other, keep=1, every=1)
  checkpoint.save(manager, 3, trained, {'round': 1})
  manager.close()

  # Scratch: nothing to resume, no init_from.
  state, extra, source = checkpoint.restore_or_init(
      checkpoint.make_manager(str(tmp_path / 'a'), 1, 1), abstract, lambda: fresh(5))
  assert (source, extra) == ('scratch', {})
  _assert_bit_identical(state, fresh(5))

  # init_from another run: its parameters, a fresh optimizer at step 0.
  mine = checkpoint.make_manager(str(tmp_path / 'b'), 1, 1)
  state, extra, source = checkpoint.restore_or_init(mine, abstract, lambda: fresh(5),
                                                    init_from=other)
  assert (source, extra) == ('init_from', {})
  _assert_bit_identical(state['params'], trained['params'])
  _assert_bit_identical(state['opt_state'], fresh(5)['opt_state'])
  assert int(state['step']) == 0
  assert state['params']['wte'].sharding == abstract['params']['wte'].sharding

  # Once this run has a checkpoint, resuming wins over init_from.
  checkpoint.save(mine, 1, fresh(7), {'position': 9})
  mine.wait_until_finished()
  state, extra, source = checkpoint.restore_or_init(mine, abstract, lambda: fresh(5),
                                                    init_from=other)
  assert (source, extra) == ('resume', {'position': 9})
  _assert_bit_identical(state, fresh(7))
  mine.close()


# A failed Orbax restore leaves its pending reads to be collected after their event loop
# closed; pytest reports that as an unraisable warning. The errors raised are checked.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_init_from_hugging_face_folder_and_bad_sources(tmp_path, run):
  abstract, fresh, trained = run
  hf = tmp_path / 'hf'
  hf.mkdir()
  for name in checkpoint.HF_FILES:
    (hf / name).write_text('{}')
  params_np = jax.tree_util.tree_map(np.asarray, trained['params'])
  manager = checkpoint.make_manager(str(tmp_path / 'run'), 1, 1)
  state, _, source = checkpoint.restore_or_init(
      manager, abstract, fresh, init_from=str(hf), import_params=lambda f: params_np)
  assert source == 'init_from'
  _assert_bit_identical(state['params'], trained['params'])
  assert state['params']['wte'].sharding == abstract['params']['wte'].sharding

  with pytest.raises(ValueError, match='import_params'):
    checkpoint.restore_or_init(manager, abstract, fresh, init_from=str(hf))
  wrong = {**params_np, 'wte': np.zeros((7, 32), np.float32)}
  with pytest.raises(checkpoint.ParamsMismatchError, match=r"\['wte'\].*\(7, 32\)"):
    checkpoint.restore_or_init(manager, abstract, fresh, init_from=str(hf),
                               import_params=lambda f: wrong)
  with pytest.raises(checkpoint.InitFromError, match='neither a run'):
    checkpoint.restore_or_init(manager, abstract, fresh, init_from=str(tmp_path / 'nope'))
  (tmp_path / 'empty' / 'checkpoints').mkdir(parents=True)
  with pytest.raises(checkpoint.InitFromError, match='no finished checkpoint'):
    checkpoint.restore_or_init(manager, abstract, fresh, init_from=str(tmp_path / 'empty'))
  manager.close()

  # A run of another model: neither init_from nor resume may load it.
  other = checkpoint.make_manager(str(tmp_path / 'other'), 1, 1)
  checkpoint.save(other, 1, {'step': np.zeros((), np.int32), 'params': wrong}, {})
  other.close()
  with pytest.raises(checkpoint.ParamsMismatchError, match=r'\(7, 32\)'):
    checkpoint.restore_or_init(checkpoint.make_manager(str(tmp_path / 'new'), 1, 1), abstract,
                               fresh, init_from=str(tmp_path / 'other'))
  with pytest.raises(checkpoint.ParamsMismatchError, match='does not match'):
    checkpoint.restore_or_init(checkpoint.make_manager(str(tmp_path / 'other'), 1, 1),
                               abstract, fresh)
