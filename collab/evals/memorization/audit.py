"""Memorization audit: how much of each participant's training code a model emits verbatim.

PROTOCOL (Memorization). Prompted protocol: every documented function of a participant's
training files gives a prompt (`prompts.extract_prompts`), sampled after the end-of-text
token; unprompted (extraction) protocol: the end-of-text token alone. Every sample is
matched against every participant's training index (`clones.find_spans_batch`), and
against every participant's validation index for the null baseline.

Only generated text counts, exactly: a prompted sample is matched as prompt + completion
with all of the prompt's lines excluded (no window may touch them), so the line a
completion continues (the prompt's last) never counts either, and reported line numbers
are those of prompt + completion. Unprompted samples are matched as they are.

Clone indexes are built once per data folder (DATA_DIR/clones/, atomic, under a file
lock so concurrent runs of a study build each index once) and loaded afterwards.
"""

import contextlib
import dataclasses
import fcntl
import os
import shutil
import zlib
from typing import Callable, Sequence

from absl import logging
import jax
import numpy as np
from tqdm import auto as tqdm

from collab import io
from collab.data import blocks as blocks_lib
from collab.data import clients as clients_lib
from collab.data import tfds_builder
from collab.data import tokenizer as tokenizer_lib
from collab.evals.clones import index as clones
from collab.evals.clones import crossorg
from collab.evals.clones import duplication
from collab.evals.memorization import released_prompts
from collab.evals.generation import sampling
from collab.evals import stats

SPLITS = ('train', 'valid')
PROMPTED, UNPROMPTED = 'prompted', 'unprompted'
SAMPLES_JSONL = os.path.join('samples', 'memorization.jsonl')
_DETECT_BATCH = 200  # Texts per find_spans_batch call (its fastest size).


# --- Clone indexes, built once per data folder.

def index_path(data_dir: str, participant: str, split: str, min_lines: int,
               clone_type: int) -> str:
  """DATA_DIR/clones/{participant}_{split}_w{W}_t{type}_{inputs}.npz."""
  # The data's input fingerprint in the name: an index never outlives its data.
  inputs = str(blocks_lib.load_manifest(data_dir).get('inputs', ''))[:12]
  name = f'{participant}_{split}_w{min_lines}_t{clone_type}_{inputs}.npz'
  return os.path.join(data_dir, 'clones', name)


@contextlib.contextmanager
def _locked(folder: str):
  """An exclusive lock on `folder`: a second builder waits, then finds the index built."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, '.lock'), 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _copies(data_dir: str, participant: str, split: str, num_docs: int):
  """copies_D of a split's files from its provenance; None in folders built before."""
  try:
    copies_F = clients_lib.load_provenance(data_dir, participant, split).copies_F
  except blocks_lib.DataNotBuiltError:
    return None
  return copies_F if copies_F is not None and len(copies_F) == num_docs else None


def load_or_build_index(data_dir: str, participant: str, split: str, min_lines: int,
                        clone_type: int) -> clones.CloneIndex:
  """The clone index of one split, from DATA_DIR/clones/ or built (and saved) now, with
  its documents' duplication counts (`copies_D`) when the data folder has them."""
  path = index_path(data_dir, participant, split, min_lines, clone_type)
  with _locked(os.path.dirname(path)):
    index = None
    if os.path.isfile(path):
      try:
        index = clones.CloneIndex.load(path)
      except clones.IndexFormatError as e:
        logging.warning('Rebuilding %s: %s', path, e)
    if index is None:
      records = tfds_builder.load_split(data_dir, participant, split)
      index = clones.build_index(records, min_lines, clone_type, participant=participant)
      index.save(path)
  index.copies_D = _copies(data_dir, participant, split, index.num_docs)
  return index


def build_indexes(data_dir: str, participants: Sequence[str], min_lines: int = 6,
                  clone_type: int = 1, splits: Sequence[str] = SPLITS) -> dict:
  """{split: {participant: CloneIndex}}; both splits' indexes carry the participant's name."""
  return {split: {p: load_or_build_index(data_dir, p, split, min_lines, clone_type)
                  for p in participants} for split in splits}


def crossorg_summary(data_dir: str, participants: Sequence[str], min_lines: int = 6,
                     clone_type: int = 1, num_examples: int = 5) -> dict:
  """Study-level cross-organization clones of the training splits (for summary.json)."""
  train = build_indexes(data_dir, participants, min_lines, clone_type, ('train',))['train']
  report = crossorg.report(list(train.values()))
  return {'participants': report['participants'], 'matrix': report['containment'],
          'distinct_windows': report['distinct_windows'],
          'cross_org_windows': report['cross_org_windows'],
          'num_cross_org_fingerprints': len(report['clones']),
          'repository_pairs': report['repository_pairs'],
          'examples': report['clones'][:num_examples]}


# --- Samples.

@dataclasses.dataclass(frozen=True)
class Sample:
  """One generated sample and the prompt it continues (empty for unprompted samples)."""
  id: str
  protocol: str  # PROMPTED or UNPROMPTED.
  participant: str  # Whose training file the prompt came from; '' when unprompted.
  repo: str
  path: str
  line: int  # 1-based `def` line of the prompt in its training file; 0 when unprompted.
  name: str  # Qualified function name of the prompt.
  prompt: str  # Prompt text, without the end-of-text token.
  completion: str  # Generated text, cut at the stop strings.
  reference: str = ''  # The prompt's released function body (prompts CSV); '': none.

  @property
  def text(self) -> str:
    return self.prompt + self.completion

  @property
  def excluded_lines(self):
    """1-based lines of `text` that hold prompt text (the last one completion text too)."""
    return range(1, self.prompt.count('\n') + 2) if self.prompt else None


# complete(rows_tokens, key, **sampling options) -> one text per row.
Complete = Callable[..., list]


def make_complete(params, model_config, tokenizer, batch_size: int = 32) -> Complete:
  """A Complete over the compiled sampler; texts cut at the earliest stop string."""
  eot = tokenizer_lib.eot_id(tokenizer)

  def complete(rows_tokens, key, *, stop_strings=(), **options):
    new = sampling.generate(params, model_config, rows_tokens, key=key, eot_id=eot,
                            stop_strings=tuple(stop_strings), tokenizer=tokenizer,
                            batch_size=batch_size, **options)
    texts = [tokenizer.decode(ids, clean_up_tokenization_spaces=False) for ids in new]
    return [sampling.cut_at_stop(t, stop_strings) for t in texts]
  return complete


def _key(seed: int, unit: str):
  """The sampling key of one participant's prompts (or 'unprompted'), whatever the others."""
  base = jax.random.fold_in(jax.random.key(seed), 2)  # 1 is pass@k's.
  return jax.random.fold_in(base, zlib.crc32(unit.encode()) & 0x7FFFFFFF)


def prompted_samples(cfg, data_dir: str, participant: str, complete: Complete, tokenizer,
                     *, seed: int, stop_strings: Sequence[str], max_len: int) -> tuple:
  """(samples, prompt counts) of one participant's prompts, in one sampling call."""
  cap = min(int(cfg.max_prompt_tokens), max_len - 2)  # EOT + prompt + >= 1 new token.
  if cap < int(cfg.max_prompt_tokens):
    logging.info('Prompts capped at %d tokens (model max_len %d).', cap, max_len)
  records = tfds_builder.load_split(data_dir, participant, 'train')
  prompts, counts = released_prompts.participant_prompts(cfg, records, participant,
                                                           tokenizer, cap, seed)
  if not prompts:
    return [], counts
  n = int(cfg.samples_per_prompt)
  # A literal '<|endoftext|>' in a prompt is text, as in training blocks; the EOT id leads.
  encode, eot = tokenizer_lib.make_encoder(tokenizer), tokenizer_lib.eot_id(tokenizer)
  rows = [[eot] + ids.tolist() for ids in encode([p.text for p in prompts]) for _ in range(n)]
  logging.info('Memorization: %d prompts of %r x %d samples.', len(prompts), participant, n)
  texts = complete(rows, _key(seed, participant), stop_strings=stop_strings,
                   max_new_tokens=int(cfg.max_new_tokens),
                   temperature=float(cfg.temperature), top_p=float(cfg.top_p),
                   repetition_penalty=float(cfg.repetition_penalty))
  samples = [Sample(f'{participant}/{i}/{j}', PROMPTED, participant, p.repo, p.path, p.line,
                    p.name, p.text, texts[i * n + j], p.body)
             for i, p in enumerate(prompts) for j in range(n)]
  return samples, counts


def unprompted_samples(cfg, complete: Complete, tokenizer, *, seed: int) -> list:
  """The extraction protocol: end-of-text alone, top-k sampling, no stop strings.

  No stop strings: a sample starts a file, and cutting it at its first top-level `def`
  or `if` would leave little to match.
  """
  num = int(cfg.unprompted_samples)
  rows = [[tokenizer_lib.eot_id(tokenizer)]] * num
  logging.info('Memorization: %d unprompted samples.', num)
  texts = complete(rows, _key(seed, UNPROMPTED), max_new_tokens=int(cfg.max_new_tokens),
                   temperature=float(cfg.unprompted_temperature),
                   top_k=int(cfg.unprompted_top_k))
  return [Sample(f'{UNPROMPTED}/{j}', UNPROMPTED, '', '', '', 0, '', '', t)
          for j, t in enumerate(texts)]


def load_or_generate(cfg, workdir: str, data_dir: str, participants: Sequence[str],
                     complete: Complete, tokenizer, *, seed: int,
                     stop_strings: Sequence[str], max_len: int) -> tuple:
  """(samples, prompt counts): WORKDIR/samples/memorization.jsonl, or generated now.

  Each participant's samples are kept in WORKDIR/memorization/parts/ as they finish, so
  an interrupted generation resumes with the next participant.
  """
  final = os.path.join(workdir, SAMPLES_JSONL)
  counts_path = os.path.join(workdir, 'memorization', 'prompts.json')
  if os.path.isfile(final) and os.path.isfile(counts_path):
    return [Sample(**r) for r in io.read_jsonl(final)], io.read_json(counts_path)
  units = list(participants) + ([UNPROMPTED] if int(cfg.unprompted_samples) > 0 else [])
  samples, counts = [], {}
  for unit in units:
    part = os.path.join(workdir, 'memorization', 'parts', f'{unit}.json')
    if not os.path.isfile(part):
      if unit == UNPROMPTED:
        got, got_counts = unprompted_samples(cfg, complete, tokenizer, seed=seed), None
      else:
        got, got_counts = prompted_samples(cfg, data_dir, unit, complete, tokenizer,
                                           seed=seed, stop_strings=stop_strings,
                                           max_len=max_len)
      io.atomic_write_json(part, {'counts': got_counts,
                                  'samples': [dataclasses.asdict(s) for s in got]})
    stored = io.read_json(part)
    samples += [Sample(**r) for r in stored['samples']]
    if stored['counts'] is not None:
      counts[unit] = stored['counts']
  io.write_jsonl(final, [dataclasses.asdict(s) for s in samples])
  io.atomic_write_json(counts_path, counts)
  shutil.rmtree(os.path.join(workdir, 'memorization', 'parts'))  # The combined file has them.
  return samples, counts


# --- Detection and aggregation.

def detect(samples: Sequence[Sample], indexes: Sequence[clones.CloneIndex],
           max_refs: int = 5, desc: str = 'clones') -> list:
  """Clone spans of each sample's generated lines in `indexes` (one list per sample)."""
  out = []
  for s in tqdm.trange(0, len(samples), _DETECT_BATCH, desc=desc, unit='batch',
                       disable=len(samples) <= _DETECT_BATCH):
    chunk = samples[s:s + _DETECT_BATCH]
    out += clones.find_spans_batch([x.text for x in chunk], list(indexes),
                                   [x.excluded_lines for x in chunk], max_refs)
  return out


def _held(spans, name: str) -> list:
  """Spans with at least one window (so >= min_lines lines) in `name`'s data."""
  return [s for s in spans if name in s.participants]


def _ratio(flags) -> float | None:
  return float(np.mean(flags)) if len(flags) else None


def participant_stats(name: str, spans_S: Sequence[list], null_spans_S: Sequence[list],
                      names: Sequence[str], seed: int) -> dict:
  """Memorization of `name`'s training data in samples S (their spans against all indexes).

  null_spans_S: the same samples' spans against the validation indexes (null baseline).
  memorized_lines counts the normalized lines `name`'s windows cover in each span.
  """
  own_S = [_held(spans, name) for spans in spans_S]
  flags_S = [bool(own) for own in own_S]
  own = [s for spans in own_S for s in spans]
  exclusive = sum(s.exclusive for s in own)
  return {
      'samples': len(flags_S),
      'memorized_samples': int(sum(flags_S)),
      'ratio': _ratio(flags_S),
      'ratio_ci95': stats.bootstrap_ratio(flags_S, seed),
      'spans': len(own),
      'memorized_lines': int(sum(s.participant_lines[s.participants.index(name)]
                                 for s in own)),
      'fingerprints': len({s.fingerprint for s in own}),
      'exclusive_spans': int(exclusive),
      'shared_spans': len(own) - int(exclusive),
      'null_ratio': _ratio([bool(_held(spans, name)) for spans in null_spans_S]),
      # The same samples against every participant's training data.
      'ratio_by_index': {other: _ratio([bool(_held(spans, other)) for spans in spans_S])
                         for other in names},
  }


def leakage(samples: Sequence[Sample], spans_S: Sequence[list], names) -> dict:
  """Per participant: share of the samples not prompted from its code with spans in it."""
  out = {}
  for name in names:
    others = [spans for x, spans in zip(samples, spans_S) if x.participant != name]
    out[name] = _ratio([bool(_held(spans, name)) for spans in others])
  return out


def span_row(sample: Sample, span: clones.CloneSpan, cross_hashes_X, copies=None) -> dict:
  """One memorized.jsonl line: the span, its sample's provenance and its best match (with
  its duplication count when `copies`, participant -> copies_D, knows it)."""
  best = max(span.refs, key=lambda r: (r.num_lines, r.participant == sample.participant),
             default=None)
  lines = sample.text.replace('\r\n', '\n').replace('\r', '\n').split('\n')
  return {
      'sample_id': sample.id, 'protocol': sample.protocol,
      'prompt_participant': sample.participant, 'prompt_repo': sample.repo,
      'prompt_path': sample.path, 'prompt_line': sample.line,
      'sample_start_line': span.start_line, 'sample_end_line': span.end_line,
      'lines': span.num_lines, 'fingerprint': span.fingerprint,
      'participants': list(span.participants), 'exclusive': span.exclusive,
      'cross_org': crossorg.is_cross_org(span.window_hashes, cross_hashes_X),
      'matched_participant': best.participant if best else None,
      'matched_repo': best.repo if best else None,
      'matched_path': best.path if best else None,
      'matched_start_line': best.start_line if best else None,
      'matched_end_line': best.end_line if best else None,
      'matched_copies': (int(copies[best.participant][best.doc]) if best and copies
                         and copies.get(best.participant) is not None else None),
      'refs': [dataclasses.asdict(r) for r in span.refs],
      'text': '\n'.join(lines[span.start_line - 1:span.end_line]),
  }


def aggregate(samples: Sequence[Sample], spans_S: Sequence[list], null_spans_S: Sequence[list],
              names: Sequence[str], cross_hashes_X, seed: int) -> dict:
  """results['memorization'] from the samples' spans (training and validation indexes)."""
  def block(keep):
    idx = [i for i, x in enumerate(samples) if keep(x)]
    return ([spans_S[i] for i in idx], [null_spans_S[i] for i in idx])

  participants = {name: participant_stats(name, *block(
      lambda x, n=name: x.protocol == PROMPTED and x.participant == n), names, seed)
                  for name in names}
  unprompted = None
  un_spans, un_null = block(lambda x: x.protocol == UNPROMPTED)
  if un_spans:
    flags = [bool(spans) for spans in un_spans]
    unprompted = {'samples': len(flags), 'ratio': _ratio(flags),
                  'ratio_ci95': stats.bootstrap_ratio(flags, seed),
                  'participants': {name: participant_stats(name, un_spans, un_null, names,
                                                           seed) for name in names}}
  every = [s for spans in spans_S for s in spans]
  return {'participants': participants, 'unprompted': unprompted,
          'cross_org_share': crossorg.cross_org_share(every, cross_hashes_X),
          'leakage': leakage(samples, spans_S, names), 'spans': len(every),
          'samples': len(samples)}


def audit(samples: Sequence[Sample], train: dict, valid: dict, seed: int,
          max_refs: int = 5) -> tuple:
  """(results['memorization'], memorized.jsonl rows) of samples; indexes by participant."""
  names = list(train)
  spans_S = detect(samples, [train[n] for n in names], max_refs, 'clones vs train')
  null_spans_S = detect(samples, [valid[n] for n in names], 1, 'clones vs valid')
  cross_hashes_X, _ = crossorg.cross_org_windows([train[n] for n in names])
  copies = {n: train[n].copies_D for n in names}
  rows = [span_row(x, s, cross_hashes_X, copies) for x, spans in zip(samples, spans_S)
          for s in spans]
  result = aggregate(samples, spans_S, null_spans_S, names, cross_hashes_X, seed)
  result['duplication'] = duplication.breakdown(
      {n: [s for x, spans in zip(samples, spans_S) if x.protocol == PROMPTED
           and x.participant == n for s in _held(spans, n)] for n in names}, train)
  first = train[names[0]] if names else None
  for name in names:
    with_reference = [x for x in samples if x.participant == name and x.reference]
    if with_reference:
      result['participants'][name]['reproduces_reference'] = (
          released_prompts.reference_stats(with_reference, first.min_lines, first.clone_type))
  for name, r in result['participants'].items():
    logging.info('Memorization of %r: %s of %d samples (null %s), %d lines.', name,
                 r['ratio'], r['samples'], r['null_ratio'], r['memorized_lines'])
  return result, rows
