"""Cached evaluation parts: reused under the same key, recomputed (from scratch) otherwise."""

import json
import os

from collab import evaluate
from tests import conftest


def _part(tmp_path):
  path = os.path.join(tmp_path, 'part', 'result.json')
  calls = []

  def compute():
    calls.append(os.path.isfile(os.path.join(tmp_path, 'part', 'sample.txt')))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(os.path.join(tmp_path, 'part', 'sample.txt'), 'w') as f:
      f.write('x')
    return {'n': len(calls)}
  return path, calls, compute


def test_same_key_reuses_and_another_key_recomputes_from_scratch(tmp_path):
  path, calls, compute = _part(tmp_path)
  stale = os.path.join(tmp_path, 'samples.jsonl')
  open(stale, 'w').close()
  assert evaluate._cached(path, compute, 'a', stale=(stale,)) == {'n': 1}
  assert not os.path.exists(stale)  # No key yet: whatever was there is not trusted.
  open(stale, 'w').close()
  assert evaluate._cached(path, compute, 'a', stale=(stale,)) == {'n': 1}
  assert calls == [False] and os.path.exists(stale)
  assert evaluate._cached(path, compute, 'b', stale=(stale,)) == {'n': 2}
  assert calls == [False, False] and not os.path.exists(stale)  # Intermediates removed.


def test_an_interrupted_part_resumes_from_its_intermediates(tmp_path):
  path, calls, compute = _part(tmp_path)
  evaluate._cached(path, compute, 'a')
  os.remove(path)  # Killed after the samples, before the result.
  assert evaluate._cached(path, compute, 'a') == {'n': 2}
  assert calls == [False, True]


def test_fingerprint_follows_settings_seed_data_and_model(tiny_data, tmp_path):
  config = conftest.tiny_run_config(tiny_data)
  with open(os.path.join(tmp_path, 'train.json'), 'w') as f:
    json.dump({'tokens_seen': 1}, f)
  key = evaluate.fingerprint(config, str(tmp_path), {'n': 1})
  assert key == evaluate.fingerprint(config, str(tmp_path), {'n': 1})
  assert key != evaluate.fingerprint(config, str(tmp_path), {'n': 2})
  config.seed += 1
  assert key != evaluate.fingerprint(config, str(tmp_path), {'n': 1})
  config.seed -= 1
  with open(os.path.join(tmp_path, 'train.json'), 'w') as f:
    json.dump({'tokens_seen': 2}, f)  # Another trained model.
  assert key != evaluate.fingerprint(config, str(tmp_path), {'n': 1})
