"""Secret canaries (Carlini et al. 2019, "The Secret Sharer") in each participant's training files.

A canary is a random secret (`length` characters drawn uniformly from `alphabet`, so the
randomness space R has |alphabet| ** length members) inside a code-like template, e.g.
`API_KEY = "3f9a"`. For every count n in `config.data.canaries.repeats`, each participant
gets `per_repeat` canaries of its own, each inserted n times, as n separate small files,
into its TRAINING files only. The build inserts them after cleaning and the byte cap, so
no filter or subsample can drop them, at seeded positions among the files; each copy
takes the repository of the file it follows (the secret sits in that organization's code,
also when clients are repositories) and a path beside that file.

Everything about them lands in DATA_DIR/canaries.json (written inside the atomic build):
the alphabet, the length, and per participant every canary's id, repeat count, template
prefix and suffix, and secret. collab/evals/privacy/exposure.py reads it back to measure exposure.
Canary files carry the license `canary`, so evaluations that want real code only (the
membership inference) can leave them out.
"""

import hashlib
import os

import numpy as np

from collab import io

CANARIES_JSON = 'canaries.json'
LICENSE = 'canary'  # The license field of every inserted copy (real files never have it).
# (prefix, suffix) pairs; the secret goes between them. Each prefix ends in a double
# quote and the secret is alphanumeric, so a byte-level BPE never merges a token across
# the prefix/secret boundary (a single quote could merge as the contraction "'s").
TEMPLATES = (
    ('API_KEY = "', '"\n'),
    ('def connect(client):\n    return client.login(token="', '")\n'),
    ('DATABASE_PASSWORD = "', '"  # rotate every 90 days\n'),
)


def enabled(cfg: dict | None) -> bool:
  """True when the data config asks for canaries (`repeats` non-empty)."""
  return bool(cfg and cfg.get('repeats'))


def validate(cfg: dict | None) -> None:
  """Raises ValueError naming the field when config.data.canaries cannot be built."""
  if not enabled(cfg):
    return
  repeats = list(cfg['repeats'])
  if any(not isinstance(n, int) or n < 1 for n in repeats) or len(set(repeats)) != len(repeats):
    raise ValueError(f'data.canaries.repeats={tuple(repeats)} must be distinct positive '
                     'integers, e.g. (1, 10, 100), or () for no canaries.')
  if cfg['per_repeat'] < 1:
    raise ValueError(f"data.canaries.per_repeat={cfg['per_repeat']} must be >= 1.")
  alphabet = cfg['alphabet']
  if len(alphabet) < 2 or len(set(alphabet)) != len(alphabet) or not alphabet.isalnum() \
      or not alphabet.isascii():
    raise ValueError(f'data.canaries.alphabet={alphabet!r} must be >= 2 distinct ASCII '
                     'letters or digits (e.g. "0123456789abcdef").')
  if cfg['length'] < 1:
    raise ValueError(f"data.canaries.length={cfg['length']} must be >= 1.")
  needed = len(repeats) * cfg['per_repeat']
  if space_size(alphabet, cfg['length']) < 2 * needed:
    raise ValueError(f'data.canaries: {len(alphabet)} ** {cfg["length"]} possible secrets '
                     f'are too few for {needed} distinct canaries; raise length.')


def space_size(alphabet: str, length: int) -> int:
  """|R|: how many secrets the canaries are drawn from."""
  return len(alphabet) ** length


def seeded_rng(*parts) -> np.random.Generator:
  """A generator fixed by its named parts (a purpose, a seed, a participant ...): one
  participant's draws never move when another participant is added or removed."""
  digest = hashlib.sha256('\0'.join(str(p) for p in parts).encode()).digest()
  return np.random.default_rng(int.from_bytes(digest[:8], 'little'))


def _rng(seed: int, participant: str) -> np.random.Generator:
  return seeded_rng('canaries', seed, participant)


def make_canaries(cfg: dict, participant: str) -> list:
  """The participant's canaries: [{id, repeats, template, prefix, secret, suffix}]."""
  rng = _rng(cfg['seed'], participant)
  alphabet, out, seen = np.array(list(cfg['alphabet'])), [], set()
  for n in cfg['repeats']:
    for j in range(cfg['per_repeat']):
      secret = ''.join(rng.choice(alphabet, cfg['length']))
      while secret in seen:  # Distinct secrets: each canary's exposure is its own.
        secret = ''.join(rng.choice(alphabet, cfg['length']))
      seen.add(secret)
      t = len(out) % len(TEMPLATES)
      prefix, suffix = TEMPLATES[t]
      out.append({'id': f'{participant}-x{n}-{j}', 'repeats': int(n), 'template': t,
                  'prefix': prefix, 'secret': secret, 'suffix': suffix})
  return out


def text(canary: dict) -> str:
  return canary['prefix'] + canary['secret'] + canary['suffix']


def insert(records: list, ids: list, canaries: list, encode, seed: int) -> tuple:
  """(records, ids) with every canary's copies inserted at seeded positions.

  `records` and `ids` (token ids per file) are the cleaned training files in stored
  order; `encode(texts) -> ids per text`. Copy k of a canary becomes the record
  `{repo of the file before it, path beside it, content, license 'canary'}`.
  """
  if not records:
    raise ValueError('Cannot insert canaries into a participant with no training files.')
  copies = [c for c in canaries for _ in range(c['repeats'])]
  # Keyed by the first canary's id, which names the participant.
  rng = _rng(seed, 'positions\0' + canaries[0]['id'])
  # Slot p means "after file p"; stable order for equal slots keeps it deterministic.
  slots = rng.integers(0, len(records), size=len(copies))
  encoded = dict(zip((c['id'] for c in canaries), encode([text(c) for c in canaries])))
  by_slot = {}
  for slot, c in sorted(zip(slots.tolist(), copies), key=lambda t: t[0]):
    by_slot.setdefault(slot, []).append(c)
  out_records, out_ids, count = [], [], {}
  for p, (record, record_ids) in enumerate(zip(records, ids)):
    out_records.append(record)
    out_ids.append(record_ids)
    for c in by_slot.get(p, ()):
      k = count[c['id']] = count.get(c['id'], -1) + 1
      folder = os.path.dirname(record['path'])
      out_records.append({**record, 'path': os.path.join(folder, f'canary_{c["id"]}_{k}.py'),
                          'content': text(c), 'license': LICENSE})
      out_ids.append(encoded[c['id']])
  return out_records, out_ids


def insert_for_build(cfg: dict, out_dir: str, participant: str, records: list,
                     ids: list, encode) -> tuple:
  """build.py's hook: inserts the participant's canaries and records them.

  Returns (records, ids, card entry). Adds the participant's canaries to
  OUT_DIR/canaries.json (the build's temporary folder, renamed into place with it).
  """
  c = cfg['canaries']
  canaries = make_canaries(c, participant)
  records, ids = insert(records, ids, canaries, encode, c['seed'])
  path = os.path.join(out_dir, CANARIES_JSON)
  meta = {'alphabet': c['alphabet'], 'length': c['length'], 'repeats': list(c['repeats']),
          'per_repeat': c['per_repeat'], 'seed': c['seed'], 'participants': {}}
  if os.path.isfile(path):
    meta = io.read_json(path)
  meta['participants'][participant] = canaries
  io.atomic_write_json(path, meta)
  entry = {'canaries': len(canaries), 'copies': sum(x['repeats'] for x in canaries),
           'repeats': list(c['repeats']), 'per_repeat': c['per_repeat']}
  return records, ids, entry


def load(data_dir: str) -> dict | None:
  """DATA_DIR/canaries.json, or None when the data was built without canaries."""
  path = os.path.join(data_dir, CANARIES_JSON)
  if not os.path.isfile(path):
    return None
  return io.read_json(path)


def is_canary(record: dict) -> bool:
  return record.get('license') == LICENSE
