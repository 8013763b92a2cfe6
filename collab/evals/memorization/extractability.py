"""k-extractability: which training blocks a model continues verbatim from their start.

PROTOCOL (Extractability; Carlini et al. 2022, "Quantifying Memorization Across Neural
Language Models"; Hayes et al. 2024 for (n, p)-extraction). A window of a block is its
first k tokens (the prompt) and the next m (the suffix); it is k-extractable when greedy
decoding of the prompt reproduces the suffix exactly. Blocks are packed
`[EOT f1 EOT f2 ...]` cut into L-token rows, and training fed every row from position 0:
the prompt is block[:k] at positions 0..k-1, the very positions it was trained at. A
window cut from the middle of a block and fed at position 0 would ask what training never
asked. A k with k + m > L (or past the model's context) is skipped and reported.

- Null: validation blocks of the same participant, decoded the same way (boilerplate is
  extractable without memorizing anything).
- (n, p)-extraction: with `samples` = n > 0, each training window at the smallest k is
  sampled n times at `temperature`; it counts when at least one sample is the suffix.
- Provenance: the file of an extracted window's first suffix token (the data folder's
  block provenance), with that file's duplication count.
- Cross-organization: a training window whose suffix occurs verbatim in another
  participant's training stream may have been learned from there.

Rates carry a 95% Wilson score interval, not a bootstrap: extraction is rare, and a
percentile bootstrap of a share of 0 is the degenerate [0, 0], while Wilson's upper
bound stays informative (about 3.84 / (n + 3.84) at c = 0); its bounds are exactly 0 at
c = 0 and 1 at c = n.
"""

import os
import zlib
from typing import NamedTuple, Sequence

from absl import logging
import numpy as np

from collab.data import blocks as blocks_lib
from collab.data import clients as clients_lib
from collab.evals.clones import token_search

SPLITS = ('train', 'valid')
_Z95 = 1.959963984540054


# --- Windows and their decoding.

def fitting_ks(ks: Sequence[int], m: int, length: int) -> tuple:
  """(ks whose windows fit in `length` tokens: 1 <= k and k + m <= length, the others)."""
  fit = [int(k) for k in ks if 1 <= k and k + m <= length]
  return fit, [int(k) for k in ks if int(k) not in fit]


def windows(blocks_NxL, ks: Sequence[int], m: int) -> tuple:
  """({k: (prefix_NxK, suffix_NxM)} as int32 for each k that fits a block, skipped ks).

  Both parts come from the block's start (block[:k], block[k:k + m]): never past its end.
  """
  if m < 1:
    raise ValueError(f'm (suffix tokens) must be >= 1, got {m}.')
  fit, skipped = fitting_ks(ks, m, blocks_NxL.shape[1])
  width = max(fit) + m if fit else 0
  rows_NxW = np.asarray(blocks_NxL[:, :width], np.int32)
  return {k: (rows_NxW[:, :k], rows_NxW[:, k:k + m]) for k in fit}, skipped


def _padded(rows: Sequence, m: int) -> np.ndarray:
  """rows as an [N, m] int32 array; -1 (never a token) where a row is short."""
  out_NxM = np.full((len(rows), m), -1, np.int32)
  for i, row in enumerate(rows):
    row = np.asarray(row, np.int32)[:m]
    out_NxM[i, :len(row)] = row
  return out_NxM


def greedy_suffixes(params, model_config, prefixes_NxK, m: int, batch_size: int) -> np.ndarray:
  """generated_NxM: each prefix's greedy continuation, in one batched generate call.

  No end-of-text stop, so a row is m tokens long unless the context ran out (then -1s).
  """
  import jax  # The model's side: only where a model decodes (analysis reads tables).
  from collab.evals.generation import sampling
  if len(prefixes_NxK) == 0:
    return np.zeros((0, m), np.int32)
  new = sampling.generate(params, model_config, np.asarray(prefixes_NxK),
                          key=jax.random.key(0), max_new_tokens=m, temperature=0.0,
                          eot_id=None, batch_size=batch_size, progress=False)
  return _padded(new, m)


def match_lengths(generated_NxM, suffix_NxM) -> np.ndarray:
  """match_N: how many leading suffix tokens each row reproduces (0..m; m is exact)."""
  same_NxM = np.asarray(generated_NxM) == np.asarray(suffix_NxM)
  return np.cumprod(same_NxM, axis=1).sum(axis=1).astype(np.int64)


def sampled_extracted(params, model_config, prefixes_NxK, suffix_NxM, n: int,
                      temperature: float, key, batch_size: int) -> np.ndarray:
  """extracted_N: at least one of n samples of window i reproduces its suffix exactly.

  Sample j of window i is request row i * n + j, so it draws from fold_in(key, i * n + j)
  (see sampling.generate): every sample is its own draw, whatever the batching.
  """
  from collab.evals.generation import sampling
  suffix_NxM = np.asarray(suffix_NxM)
  num, m = suffix_NxM.shape
  if num == 0 or n < 1:
    return np.zeros(num, bool)
  rows = np.repeat(np.asarray(prefixes_NxK), n, axis=0)
  new = sampling.generate(params, model_config, rows, key=key, max_new_tokens=m,
                          temperature=temperature, eot_id=None, batch_size=batch_size,
                          progress=False)
  samples_NxSxM = _padded(new, m).reshape(num, n, m)
  return (samples_NxSxM == suffix_NxM[:, None, :]).all(axis=-1).any(axis=-1)


# --- Where a window came from, and where else it occurs.

def attribute_files(prov: clients_lib.Provenance, block_ids_N, k: int, seq_len: int) -> list:
  """Per window, the file holding its first suffix token (stream offset block * L + k)."""
  offsets_N = np.asarray(block_ids_N, np.int64) * seq_len + k
  file_N = np.searchsorted(prov.start_F, offsets_N, 'right') - 1
  return [{'file': int(f), 'repo': prov.repo_F[f], 'path': prov.path_F[f],
           'copies': None if prov.copies_F is None else int(prov.copies_F[f])}
          for f in file_N]


def attribute(data_dir: str, participant: str, block_ids_N, k: int, seq_len: int,
              split: str = 'train'):
  """attribute_files from the data folder's provenance; None for folders built without it."""
  try:
    prov = clients_lib.load_provenance(data_dir, participant, split)
  except blocks_lib.DataNotBuiltError:
    return None
  return attribute_files(prov, block_ids_N, k, seq_len)


cross_org = token_search.occurs_in  # found_N: suffix i occurs in another's training stream.


# --- Rates.

def wilson(extracted: int, windows_n: int):
  """95% Wilson score interval of extracted / windows_n; None without windows."""
  if windows_n == 0:
    return None
  z2, share = _Z95**2, extracted / windows_n
  center = (share + z2 / (2 * windows_n)) / (1 + z2 / windows_n)
  half = (_Z95 * np.sqrt(share * (1 - share) / windows_n + z2 / (4 * windows_n**2))
          / (1 + z2 / windows_n))
  low = 0.0 if extracted == 0 else max(0.0, float(center - half))
  high = 1.0 if extracted == windows_n else min(1.0, float(center + half))
  return [low, high]


def rate_entry(extracted_N, match_N=None) -> dict:
  """{'windows', 'extracted', 'rate', 'ci95'} (+ 'mean_match' with match lengths)."""
  n, c = len(extracted_N), int(np.sum(extracted_N))
  entry = {'windows': n, 'extracted': c, 'rate': c / n if n else None,
           'ci95': wilson(c, n)}
  if match_N is not None:
    entry['mean_match'] = float(np.mean(match_N)) if n else None
  return entry


# --- The evaluation: every participant's training and validation blocks.

class _Cell(NamedTuple):
  """The windows of one participant's split."""
  block_ids: np.ndarray  # Which blocks (all, or a seeded choice of max_blocks), sorted.
  seq_len: int
  windows: dict  # k -> (prefix_NxK, suffix_NxM).


def choose_blocks(num_blocks: int, max_blocks: int, seed: int, participant: str,
                  split: str) -> np.ndarray:
  """All block ids, or a seeded choice of max_blocks, sorted (memmaps read in order)."""
  if not 0 < max_blocks < num_blocks:
    return np.arange(num_blocks)
  rng = np.random.default_rng([seed, zlib.crc32(participant.encode()), SPLITS.index(split)])
  return np.sort(rng.choice(num_blocks, max_blocks, replace=False))


def _load_cells(data_dir, names, ks, m, max_len, max_blocks, seed) -> tuple:
  """({(participant, split): _Cell}, ks that fit blocks and context, skipped ks)."""
  blocks = {(p, s): blocks_lib.load_blocks(data_dir, p, s) for p in names for s in SPLITS}
  seq_len = min(b.shape[1] for b in blocks.values())
  fit, skipped = fitting_ks(ks, m, min(seq_len, max_len))
  cells = {}
  for (p, s), blocks_NxL in blocks.items():
    ids_N = choose_blocks(len(blocks_NxL), max_blocks, seed, p, s)
    cells[p, s] = _Cell(ids_N, blocks_NxL.shape[1], windows(blocks_NxL[ids_N], fit, m)[0])
  return cells, fit, skipped


def _per_cell(keys: list, sizes: list, values_N: np.ndarray) -> dict:
  """Cuts values of concatenated cells back into {key: values}."""
  bounds = np.cumsum([0] + list(sizes))
  return {c: values_N[a:b] for c, a, b in zip(keys, bounds[:-1], bounds[1:])}


def _stacked(cells: dict, keys: list, k: int) -> tuple:
  """(prefix_NxK, suffix_NxM, sizes) of the cells `keys` at k, concatenated."""
  prefixes, suffixes = zip(*(cells[c].windows[k] for c in keys))
  return np.concatenate(prefixes), np.concatenate(suffixes), [len(p) for p in prefixes]


def _greedy_matches(params, model_config, cells, k, m, batch_size) -> dict:
  """{(participant, split): match_N} at k, from one generate call for all of them."""
  keys = list(cells)
  prefixes_NxK, suffix_NxM, sizes = _stacked(cells, keys, k)
  generated_NxM = greedy_suffixes(params, model_config, prefixes_NxK, m, batch_size)
  return _per_cell(keys, sizes, match_lengths(generated_NxM, suffix_NxM))


def _sampled(params, model_config, cells, names, k, samples, temperature, seed,
             batch_size) -> dict:
  """{participant: {str(k): rate entry + samples, temperature}} of training windows at k."""
  import jax  # Keys only.
  keys = [(p, 'train') for p in names]
  prefixes_NxK, suffix_NxM, sizes = _stacked(cells, keys, k)
  extracted_N = sampled_extracted(params, model_config, prefixes_NxK, suffix_NxM, samples,
                                  temperature, jax.random.key(seed), batch_size)
  per = _per_cell(keys, sizes, extracted_N)
  return {p: {str(k): {**rate_entry(per[p, 'train']), 'samples': int(samples),
                       'temperature': float(temperature)}} for p in names}


def _cross_flags(data_dir, names, cells, fit) -> dict:
  """{(participant, k): found_N}: training suffixes occurring in another's training stream."""
  keys = [(p, k) for p in names for k in fit]
  if not keys:
    return {}
  suffixes = [cells[p, 'train'].windows[k][1] for p, k in keys]
  all_NxM = np.concatenate(suffixes)
  owner_N = np.concatenate([np.full(len(s), names.index(p)) for (p, _), s in
                            zip(keys, suffixes)])
  found_N = np.zeros(len(all_NxM), bool)
  for i, other in enumerate(names if len(names) > 1 else ()):
    todo_N = (owner_N != i) & ~found_N  # One pass over each stream, for all the others.
    found_N[todo_N] = cross_org(all_NxM[todo_N],
                                [blocks_lib.load_blocks(data_dir, other, 'train')])
  return _per_cell(keys, [len(s) for s in suffixes], found_N)


def _participant(p, fit, m, matches, cross, sampled) -> dict:
  """One participant's section: rates per split and k, sampled rates, cross-org counts."""
  entry = {s: {str(k): rate_entry(matches[k][p, s] == m, matches[k][p, s]) for k in fit}
           for s in SPLITS}
  if p in sampled:
    entry['sampled'] = sampled[p]
  entry['cross_org'] = None  # No k fitted: nothing was looked for.
  if fit:
    shared_N, extracted_N = cross[p, min(fit)], matches[min(fit)][p, 'train'] == m
    entry['cross_org'] = {'extracted': int((shared_N & extracted_N).sum()),
                          'windows': int(shared_N.sum())}
  return entry


def _rows(data_dir, names, cells, fit, m, matches, cross) -> list:
  """One small dict per extracted training window, with its file and cross-org flag."""
  rows, unknown = [], dict.fromkeys(('file', 'repo', 'path', 'copies'))
  for p in names:
    cell = cells[p, 'train']
    for k in fit:
      hit = np.flatnonzero(matches[k][p, 'train'] == m)
      files = (attribute(data_dir, p, cell.block_ids[hit], k, cell.seq_len) if hit.size
               else None) or [unknown] * len(hit)
      for i, where in zip(hit, files):
        rows.append({'participant': p, 'split': 'train', 'k': k,
                     'block': int(cell.block_ids[i]), 'match': m, **where,
                     'cross_org': bool(cross[p, k][i]),
                     'suffix': cell.windows[k][1][i].tolist()})
  return rows


def evaluate(params, model_config, data_dir: str, names: Sequence[str], *,
             ks: Sequence[int], m: int, batch_size: int, seed: int, samples: int = 0,
             temperature: float = 1.0, max_blocks: int = 0) -> tuple:
  """(section, rows): k-extractability of each participant's training and validation blocks.

  section: {'ks', 'm', 'skipped_ks', 'participants': {p: {
      'train' and 'valid': {str(k): {'windows', 'extracted', 'rate', 'ci95' (Wilson),
                                     'mean_match' (mean leading tokens reproduced)}},
      'sampled' (samples > 0): {str(smallest k): {'windows', 'extracted' (in any of
                                'samples' draws), 'rate', 'ci95', 'samples', 'temperature'}},
      'cross_org': {'windows' (training windows at the smallest k whose suffix occurs in
                    another participant's training stream), 'extracted' (those extracted)}}}}
  rows: one per extracted training window (any k), with its file (None without provenance).
  Greedy decoding is one generate call per k for every participant and split; `max_blocks`
  > 0 caps the blocks of each participant and split (a seeded choice).
  """
  names = list(names)
  cells, fit, skipped = _load_cells(data_dir, names, ks, m, model_config.max_len,
                                    max_blocks, seed)
  if skipped:
    logging.warning('Extractability: ks %s skipped (k + m = k + %d exceeds the block or '
                    'context length).', skipped, m)
  matches = {k: _greedy_matches(params, model_config, cells, k, m, batch_size) for k in fit}
  cross = _cross_flags(data_dir, names, cells, fit)
  sampled = (_sampled(params, model_config, cells, names, min(fit), samples, temperature,
                      seed, batch_size) if samples > 0 and fit else {})
  participants = {p: _participant(p, fit, m, matches, cross, sampled) for p in names}
  rows = _rows(data_dir, names, cells, fit, m, matches, cross)
  logging.info('Extractability: %d extracted training windows over ks %s.', len(rows), fit)
  return ({'ks': [int(k) for k in ks], 'm': int(m), 'skipped_ks': skipped,
           'participants': participants}, rows)


# ---- The evaluator (collab/evals/interface.py): k-extractability of one model.

NAME = 'extractability'


def _compute(ctx) -> dict:
  """The section, with every extracted window (file, copies, cross-organization) written
  to EVAL_DIR/extractability/extracted.jsonl."""
  from collab import io
  cfg = ctx.config.eval.extractability
  sampled = int(cfg.samples) if ctx.model in tuple(cfg.sampled_models) else 0
  section, rows = evaluate(
      ctx.params, ctx.model_config, ctx.data_dir, ctx.names, ks=tuple(int(k) for k in cfg.ks),
      m=int(cfg.m), batch_size=int(ctx.config.eval.batch_size), seed=int(ctx.config.seed),
      samples=sampled, temperature=float(cfg.temperature), max_blocks=int(cfg.max_blocks))
  io.write_jsonl(os.path.join(ctx.out_dir, 'extracted.jsonl'), rows)
  return section


def primary_k(section: dict | None) -> str | None:
  """The smallest k the audit measured (the one findings and figures use); keys are
  strings in results.json."""
  skipped = {str(k) for k in (section or {}).get('skipped_ks') or ()}
  ks = [int(k) for k in (section or {}).get('ks') or () if str(k) not in skipped]
  return str(min(ks)) if ks else None


def _tables(views: Sequence[dict]) -> list:
  """One row per run, model and participant: its fit, the extractable share of its
  training windows at each k (Wilson 95% CI), the validation null and (n, p)-extraction."""
  from collab.evals import interface
  with_section = [v for v in views if v.get(NAME)]
  if not with_section:
    return []
  ks = sorted({int(k) for v in with_section for k in v[NAME]['ks']
               if k not in v[NAME].get('skipped_ks', ())})
  if not ks:
    return []  # No k fitted the blocks: the section says which were skipped.
  m = with_section[0][NAME]['m']
  header = ['run', 'model', 'participant', 'train loss'] + [
      f'k={k} extractable % [95% CI]' for k in ks] + [
      f'k={ks[0]} mean match', f'k={ks[0]} valid (null) %', f'k={ks[0]} sampled %',
      f'k={ks[0]} cross-org extracted / windows']
  rows = []
  for v in with_section:
    for p, block in v[NAME]['participants'].items():
      train, valid = block.get('train') or {}, block.get('valid') or {}
      first = train.get(str(ks[0])) or {}
      null = valid.get(str(ks[0])) or {}
      sampled = (block.get('sampled') or {}).get(str(ks[0])) or {}
      cross = block.get('cross_org') or {}
      fit = ((v.get('fit') or {}).get('participants') or {}).get(p) or {}
      rows.append([v['run'], v.get('model', 'final'), p,
                   interface.fmt([fit.get('train_loss')], 3)] + [
          interface.fmt_ci((train.get(str(k)) or {}).get('rate'),
                           (train.get(str(k)) or {}).get('ci95')) +
          f" ({(train.get(str(k)) or {}).get('extracted', '–')}/"
          f"{(train.get(str(k)) or {}).get('windows', '–')})" for k in ks] + [
          interface.fmt([first.get('mean_match')], 1),
          interface.fmt([null.get('rate')], 1, percent=True),
          interface.fmt([sampled.get('rate')], 1, percent=True),
          f"{cross.get('extracted', '–')}/{cross.get('windows', '–')}"])
  return [interface.Table(NAME, f'k-extractability: greedy decoding of a training block\'s '
                          f'first k tokens (at their training positions) reproduces its next '
                          f'{m} exactly; validation blocks are the null', header, rows)]


def _evaluator():
  from collab.evals import interface
  return interface.Evaluator(
      name=NAME, needs=frozenset({'model', 'data'}), enabled=interface.enabled_flag(NAME),
      settings=interface.settings_of(NAME),
      compute=_compute, tables=_tables)


EVALUATOR = _evaluator()
