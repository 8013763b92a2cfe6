"""Canaries in the build (collab.data.canaries) and their exposure (collab.evals.privacy.exposure)."""

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from collab import model as model_lib
from collab import steps
from collab.data import blocks
from collab.data import build
from collab.data import canaries
from collab.data import tfds_builder
from collab.data import tokenizer as tokenizer_lib
from collab.evals.privacy import exposure
from collab.evals.generation import scoring
from tests.conftest import tiny_data_config

CANARIES = {'repeats': [1, 5], 'per_repeat': 2, 'alphabet': 'abcd', 'length': 2, 'seed': 3}


def _cfg(**kw):
  return {**CANARIES, **kw}


def test_canaries_are_seeded_distinct_and_per_participant():
  a, b = canaries.make_canaries(_cfg(), 'alpha'), canaries.make_canaries(_cfg(), 'beta')
  assert a == canaries.make_canaries(_cfg(), 'alpha')
  assert [c['repeats'] for c in a] == [1, 1, 5, 5]
  assert len({c['secret'] for c in a}) == 4 and len({c['id'] for c in a + b}) == 8
  assert all(len(c['secret']) == 2 and set(c['secret']) <= set('abcd') for c in a + b)
  assert a != b and a != canaries.make_canaries(_cfg(seed=4), 'alpha')


def test_insert_puts_every_copy_once_and_keeps_the_files_in_order():
  records = [{'repo': f'r{i % 2}', 'path': f'src/f{i}.py', 'content': f'x = {i}',
              'license': 'mit'} for i in range(7)]
  ids = [np.array([i], np.uint32) for i in range(7)]
  cs = canaries.make_canaries(_cfg(), 'alpha')
  encode = lambda texts: [np.array([100 + len(t)], np.uint32) for t in texts]
  out, out_ids = canaries.insert(records, ids, cs, encode, seed=3)
  assert [r for r in out if not canaries.is_canary(r)] == records  # Originals, in order.
  assert len(out) == len(out_ids) == 7 + 12
  for c in cs:
    copies = [r for r in out if r['content'] == canaries.text(c)]
    assert len(copies) == c['repeats'] and all(canaries.is_canary(r) for r in copies)
  for i, r in enumerate(out):  # A copy sits in the repository of the file before it.
    if canaries.is_canary(r):
      host = next(x for x in reversed(out[:i]) if not canaries.is_canary(x))
      assert r['repo'] == host['repo'] and r['path'].startswith('src/canary_')
      assert out_ids[i][0] == 100 + len(r['content'])
  again, _ = canaries.insert(records, ids, cs, encode, seed=3)
  assert again == out


@pytest.mark.parametrize('field,value,message', [
    ('repeats', [1, 1], 'distinct positive'), ('repeats', [0], 'distinct positive'),
    ('alphabet', 'ab"', 'letters or digits'), ('alphabet', 'aa', 'distinct'),
    ('length', 0, 'length'), ('per_repeat', 0, 'per_repeat'),
    ('length', 1, 'too few')])
def test_bad_canary_config_is_rejected(field, value, message):
  with pytest.raises(ValueError, match=message):
    canaries.validate(_cfg(**{field: value}))


@pytest.fixture(scope='module')
def canary_data(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('canary_corpus'))
  cfg = tiny_data_config(root, names=('alpha', 'beta'))
  cfg.canaries.update(_cfg(repeats=(1, 5)))
  data_dir = os.path.join(str(tmp_path_factory.mktemp('canary_data')), 'data')
  card = build.build_data(cfg, data_dir, progress=False)
  return cfg, data_dir, card


def test_build_inserts_canaries_into_training_files_only(canary_data):
  cfg, data_dir, card = canary_data
  meta = canaries.load(data_dir)
  assert set(meta['participants']) == {'alpha', 'beta'} and meta['alphabet'] == 'abcd'
  encode = tokenizer_lib.make_encoder(tokenizer_lib.load_tokenizer(data_dir))
  eot = blocks.load_manifest(data_dir)['eot_id']
  for name, cs in meta['participants'].items():
    assert card['participants'][name]['canaries'] == {
        'canaries': 4, 'copies': 12, 'repeats': [1, 5], 'per_repeat': 2}
    train = list(tfds_builder.load_split(data_dir, name, 'train'))
    valid = list(tfds_builder.load_split(data_dir, name, 'valid'))
    assert not any(canaries.is_canary(r) for r in valid)
    assert card['participants'][name]['splits']['train']['files'] == len(train)
    stream = blocks.load_blocks(data_dir, name, 'train').reshape(-1).tolist()
    for c in cs:
      assert sum(r['content'] == canaries.text(c) for r in train) == c['repeats']
      # The packed stream holds [EOT] + the canary's tokens, as the exposure scores them.
      ids = [eot] + encode([canaries.text(c)])[0].tolist()
      hits = sum(stream[i:i + len(ids)] == ids for i in range(len(stream) - len(ids) + 1))
      assert 0 < hits <= c['repeats']  # The last copies may fall in the dropped remainder.
  assert 'canaries: 4 secrets, 12 files added' in build.format_card(card)


def test_fingerprint_follows_the_canary_config(canary_data):
  cfg, _, _ = canary_data
  plain = build._plain(cfg)
  with_canaries = build.inputs_fingerprint(plain)
  assert build.inputs_fingerprint({**plain, 'canaries': _cfg(repeats=[1, 10])}) != with_canaries
  assert build.inputs_fingerprint({**plain, 'canaries': _cfg(seed=9)}) != with_canaries
  off = {**plain, 'canaries': _cfg(repeats=[])}
  predating = {k: v for k, v in plain.items() if k != 'canaries'}
  assert build.inputs_fingerprint(off) == build.inputs_fingerprint(predating)


# ---- Exposure -------------------------------------------------------------------------------

REF_LEN = 64  # The reference forward pads every sequence to this (the model is causal).


def _reference_logprobs(forward, params, ids):
  """log p(ids[t] | ids[:t]) for t >= 1, one sequence at a time, log-softmax in float64."""
  padded = np.zeros((1, REF_LEN), np.int32)
  padded[0, :len(ids)] = ids
  logits = np.asarray(forward(params, padded), np.float64)[0, :len(ids) - 1]
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  return logp[np.arange(len(ids) - 1), np.asarray(ids[1:])]


def _brute_force_losses(forward, params, eot, encode, prefix, secrets):
  """Each secret's summed NLL after the prefix, from an unbatched reference forward."""
  n_prefix = 1 + len(encode([prefix])[0])
  return np.array([-_reference_logprobs(forward, params, [eot] + encode(
      [prefix + s])[0].tolist())[n_prefix - 1:].sum() for s in secrets])


@pytest.fixture(scope='module')
def tiny_model(canary_data):
  """A real tiny GPT-2 over the canary data's tokenizer, trained a little on one canary."""
  _, data_dir, _ = canary_data
  tok = tokenizer_lib.load_tokenizer(data_dir)
  encode, eot = tokenizer_lib.make_encoder(tok), tokenizer_lib.eot_id(tok)
  cfg = model_lib.ModelConfig(vocab_size=len(tok), num_layers=1, num_heads=2, d_model=32,
                              d_ff=64, max_len=REF_LEN, dropout=0.0)
  model = model_lib.GPT2(cfg)
  meta = canaries.load(data_dir)
  target = meta['participants']['alpha'][-1]  # Repeated 5 times in the data.
  row = [eot] + encode([canaries.text(target)])[0].tolist()
  optimizer = optax.adam(1e-2)
  state = jax.jit(functools.partial(steps.init_state, model=model, optimizer=optimizer,
                                    seq_len=16))(jax.random.key(0))
  step = jax.jit(functools.partial(steps.train_step, model=model, optimizer=optimizer))
  for _ in range(20):
    state, _ = step(state, {'tokens': jnp.asarray([row], jnp.int32)}, jax.random.key(1))
  forward = jax.jit(lambda p, t: model.apply({'params': p}, t))
  score = scoring.make_scorer(state['params'], cfg, batch_size=8)
  return forward, cfg, state['params'], score, encode, eot, meta, target


def test_exposure_equals_brute_force_rank_over_the_whole_space(tiny_model):
  forward, _, params, score, encode, eot, meta, target = tiny_model
  result = exposure.evaluate(score, encode, eot, meta, candidates=15, seed=0)
  space = [a + b for a in 'abcd' for b in 'abcd']
  assert result['space_size'] == 16 and result['exact']
  for name, cs in meta['participants'].items():
    for c, got in zip(cs, result['participants'][name]['canaries']):
      losses = _brute_force_losses(forward, params, eot, encode, c['prefix'], space)
      own = losses[space.index(c['secret'])]
      rank = 1 + int(np.sum(losses < own))
      assert got['rank'] == rank and got['loss'] == pytest.approx(own, rel=1e-4)
      assert got['exposure'] == pytest.approx(4.0 - math.log2(rank))
  trained = result['participants']['alpha']['canaries'][-1]
  assert trained['id'] == target['id'] and trained['rank'] == 1 and trained['exposure'] == 4.0
  mean5 = np.mean([x['exposure'] for x in result['participants']['alpha']['canaries']
                   if x['repeats'] == 5])
  assert result['participants']['alpha']['by_repeats']['5'] == pytest.approx(mean5)


def test_sampled_rank_is_the_documented_estimate(tiny_model):
  forward, _, params, score, encode, eot, meta, target = tiny_model
  others, exact = exposure.candidate_secrets('abcd', 2, target['secret'], 6, seed=2)
  assert not exact and len(others) == 6 and target['secret'] not in others
  assert others == exposure.candidate_secrets('abcd', 2, target['secret'], 6, seed=2)[0]
  result = exposure.evaluate(score, encode, eot, {**meta, 'participants': {
      'beta': meta['participants']['beta']}}, candidates=6, seed=2)
  for c, got in zip(meta['participants']['beta'], result['participants']['beta']['canaries']):
    others, _ = exposure.candidate_secrets('abcd', 2, c['secret'], 6, seed=2)
    losses = _brute_force_losses(forward, params, eot, encode, c['prefix'],
                                 [c['secret']] + others)
    lower = int(np.sum(losses[1:] < losses[0]))
    assert got['rank'] == pytest.approx(1 + 15 * lower / 6) and not got['exact']
  assert exposure.rank(1.0, [0.5, 2.0, 3.0], 16, exact=True) == 2.0
  assert exposure.exposure(1.0, 16) == 4.0 and exposure.exposure(16.0, 16) == 0.0


def test_scorer_matches_unbatched_log_probs_for_mixed_lengths(tiny_model):
  forward, cfg, params, score, *_ = tiny_model
  rng = np.random.default_rng(0)
  seqs = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (2, 5, 17, 9, 3, 20, 11)]
  for seq, lp in zip(seqs, score(seqs)):  # 7 rows in batches of 8: padding rows too.
    np.testing.assert_allclose(lp, _reference_logprobs(forward, params, seq), rtol=1e-4,
                               atol=1e-4)
  with pytest.raises(ValueError, match='max_len'):
    score([[1] * (REF_LEN + 1)])


def test_evaluate_run_adds_privacy_canaries_and_membership(canary_data, tiny_model, tmp_path,
                                                           monkeypatch):
  from collab import evaluate
  from collab.settings import run
  from configs import common
  _, data_dir, _ = canary_data
  _, model_cfg, params, _, _, eot, meta, _ = tiny_model
  config = common.base_config('tiny')
  config.data = common.data_config([common.participant(n, ('dir:built',))
                                    for n in ('alpha', 'beta')], seq_len=32)
  config.data.data_dir = data_dir
  config.eval.passk.enabled = config.eval.memorization.enabled = False
  config.eval.canaries.candidates, config.eval.membership.max_windows = 15, 5
  config.eval.batch_size = 8
  privacy = {'epsilon': None, 'delta': 1e-5, 'noise_multiplier': 0.0, 'clip_norm': 1.0,
             'rounds': 2, 'clients_per_round': 2, 'clients': 2, 'accountant': 'rdp'}
  workdir = str(tmp_path / 'run')
  run.finish(workdir, params, model_cfg, eot, {
      'participants': ['alpha', 'beta'], 'tokens_seen': 10,
      'tokens_seen_per_participant': {'alpha': 5, 'beta': 5}, 'privacy': privacy,
      'valid': {'alpha': {'perplexity': 9.0}, 'beta': {'perplexity': 8.0}}})
  results = evaluate.evaluate_run(config, workdir)
  assert results['privacy'] == privacy
  exp = results['canaries']
  assert exp['exact'] and set(exp['participants']) == set(meta['participants'])
  assert set(exp['by_repeats']) == {'1', '5'}
  assert all(0.0 <= x['exposure'] <= 4.0 for p in exp['participants'].values()
             for x in p['canaries'])
  mia = results['membership']['participants']
  assert set(mia) == {'alpha', 'beta'}
  assert mia['alpha']['members'] + mia['alpha']['ambiguous']['member'] == 5
  assert 0.0 <= mia['beta']['scores']['min_k']['auroc'] <= 1.0
  # Cached: a second evaluation reads canaries/ and membership/ instead of scoring again.
  monkeypatch.setattr(evaluate.scoring, 'make_scorer', lambda *a, **k: 1 / 0)
  again = evaluate.evaluate_run(config, workdir)
  assert again['canaries'] == exp and again['membership'] == results['membership']
  config.eval.canaries.enabled = config.eval.membership.enabled = False
  off = evaluate.evaluate_run(config, workdir)
  assert off['canaries'] is None and off['membership'] is None
