"""bench/data_build.py's corpus: the release schema, in the artifact's layout, that builds."""

import gzip
import json
import os

from bench import data_build
from collab.data import build
from collab.data import clean
from configs import paper
from tests import test_data_sources


def test_generated_corpus_is_the_release_schema_and_builds(tmp_path):
  root = str(tmp_path / 'artifact')
  total = data_build.write_corpus(root, 0.3)
  assert total >= 0.3e6
  rows = []
  for org in data_build.ORGS:
    for side in ('train', 'valid'):
      with gzip.open(os.path.join(root, 'dataset', org, f'{org}_{side}.json.gz'), 'rt') as f:
        rows += [json.loads(line) for line in f]
  assert all(list(r) == test_data_sources.RELEASE_FIELDS for r in rows)
  assert all(clean.pre_filter_reason(r['content']) is None for r in rows)
  cfg = paper.get_config(root).data
  cfg.seq_len, cfg.tokenizer.vocab_size = 64, 1000
  card = build.build_data(cfg, str(tmp_path / 'data'), progress=False)
  read = sum(e['read']['files'] for e in card['participants'].values())
  assert read == len(rows)
  assert all(f['before'] == f['after'] for e in card['participants'].values()
             for f in e['filters'])  # Deterministic filters 1-4 drop none.
