"""Membership and dataset inference per participant: was this window, and was this
organization's code, in the model's training data?

Units (config.eval.membership.unit):
  'window' (default)  non-overlapping windows of `window` tokens of the built blocks
                      (collab/evals/privacy/windows.py), scored in the context they were
                      trained in: members from the participant's training blocks,
                      non-members from its validation blocks and, where the study built
                      them, from held-out files of the same organization that no run
                      trains on (DATA_DIR/../data-heldout, config.eval.membership.heldout).
                      Windows whose tokens also occur in another split or another
                      participant's data are ambiguous and left out (counted).
  'file'              each file's first seq_len tokens after its end-of-text, training
                      files against validation files (the units of earlier versions).

Scores (collab/evals/privacy/attacks.py): loss, zlib, Min-K%, Min-K%++ from the target
model alone, all from one forward pass per block; offline LiRA and RMIA against
reference models that never saw the participant (config.eval.membership.references:
'auto' = the study's single runs of the other participants; or Hugging Face folders that
saw nobody). RMIA's population is the other participants' non-member windows. Reported
per score: AUROC with a bootstrap 95% interval, the TPR at each of `fprs` with the number
of non-members behind it, the ROC curve; per participant, Maini et al.'s dataset
inference over every score.
"""

import os
from typing import Callable, Sequence

import numpy as np

from collab import io
from collab.data import canaries as canaries_lib
from collab.evals import interface
from collab.evals.privacy import attacks
from collab.evals.privacy import windows as windows_lib

SCORES = attacks.SCORES
HELDOUT_DATA = 'data-heldout'  # Beside the study's data folder.
HELDOUT_STAMP = 'tokenizer_of.json'  # The study data's inputs it was tokenized for.
ROC_POINTS = 200  # Points of each stored ROC curve (log-spaced in FPR).


def sample_files(records: Sequence[dict], max_files: int, seed: int, tag: str) -> list:
  """Up to `max_files` non-canary records in a seeded random order (0: all of them)."""
  order = canaries_lib.seeded_rng('membership', seed, tag).permutation(len(records))
  out = []
  for i in order.tolist():
    if max_files and len(out) >= max_files:
      break
    if not canaries_lib.is_canary(records[i]):
      out.append(records[i])
  return out


class Units:
  """The units of one participant and side: the token sequences a model scores (blocks
  or files) and, per unit, its sequence, its rows of that sequence's predictions, its
  tokens and whether it is ambiguous."""

  def __init__(self, sequences, spans, tokens, ambiguous):
    self.sequences = sequences  # [[token id]]: what is scored, each once.
    self.spans = spans  # [(sequence index, first row, end row)] per unit.
    self.tokens = tokens  # [token ids] per unit (its text, for zlib).
    self.ambiguous = np.asarray(ambiguous, bool)

  def rows(self, per_sequence: Sequence[np.ndarray]) -> list:
    return [per_sequence[i][a:b] for i, a, b in self.spans]


def _some_blocks(parts: Sequence, windows: int, seed: int, tag: str) -> list:
  """The parts (Windows) cut to a seeded choice of whole blocks holding at least
  `windows` windows in all (0: all of them): scoring costs a pass per block."""
  if not windows:
    return list(parts)
  blocks = [(i, b) for i, w in enumerate(parts) for b in np.unique(w.block_ids_N)]
  order = canaries_lib.seeded_rng('membership-heldout', seed, tag).permutation(len(blocks))
  keep, count = set(), 0
  for j in order.tolist():
    if count >= windows:
      break
    i, b = blocks[j]
    keep.add((i, int(b)))
    count += int(np.sum(parts[i].block_ids_N == b))
  out = []
  for i, w in enumerate(parts):
    mask = np.array([(i, int(b)) in keep for b in w.block_ids_N], bool)
    out.append(w._replace(block_ids_N=w.block_ids_N[mask], offsets_N=w.offsets_N[mask],
                          tokens_NxW=w.tokens_NxW[mask], ambiguous_N=w.ambiguous_N[mask]))
  return out


def window_units(data_dirs: Sequence[str], names, width: int, max_windows: int,
                 seed: int, heldout_windows: int = 0) -> dict:
  """{(participant, 'member'|'nonmember'): Units} of windows; non-members gather the
  validation windows and those of every extra data folder (held-out files), of which a
  seeded choice of whole blocks with at least `heldout_windows` windows (0: all)."""
  out = {}
  main = windows_lib.load(data_dirs[0], names, width, max_windows, seed,
                          others=[(d, names) for d in data_dirs[1:]])
  extra = [windows_lib.load(d, names, width, max_windows, seed, others=[(data_dirs[0], names)])
           for d in data_dirs[1:]]
  for p in names:
    heldout = _some_blocks([e[p, s] for e in extra for s in ('train', 'valid')],
                           heldout_windows, seed, p)
    for side, parts in (('member', [main[p, 'train']]),
                        ('nonmember', [main[p, 'valid']] + heldout)):
      sequences, spans, tokens, ambiguous = [], [], [], []
      for w in parts:
        blocks = {int(b): None for b in w.block_ids_N}
        index = {}
        for b in sorted(blocks):
          index[b] = len(sequences)
          sequences.append(w.blocks_NxL[b].tolist())
        for b, o, toks, amb in zip(w.block_ids_N, w.offsets_N, w.tokens_NxW, w.ambiguous_N):
          spans.append((index[int(b)], *windows_lib.prediction_rows(o, width)))
          tokens.append(toks.tolist())
          ambiguous.append(bool(amb))
      out[p, side] = Units(sequences, spans, tokens, ambiguous)
  return out


def file_units(data_dir: str, names, encode: Callable, eot_id: int, seq_len: int,
               max_files: int, seed: int) -> dict:
  """{(participant, side): Units} of files: [end-of-text] + the file's first tokens."""
  from collab.data import tfds_builder  # tensorflow-datasets: only to read files.
  out = {}
  for p in names:
    for side, split in windows_lib.SIDES:
      records = sample_files(tfds_builder.load_split(data_dir, p, split), max_files, seed,
                             f'{p}\0{split}')
      seqs = [[eot_id] + [int(t) for t in ids[:seq_len - 1]]
              for ids in encode([r['content'] for r in records]) if len(ids)]
      out[p, side] = Units(seqs, [(i, 0, len(s) - 1) for i, s in enumerate(seqs)],
                           [s[1:] for s in seqs], np.zeros(len(seqs), bool))
  return out


def _phi(rows_U: Sequence[np.ndarray]) -> np.ndarray:
  """Mean log-probability per token of each unit (log-probs in column 0, or alone)."""
  return np.array([float(np.mean(r[:, 0] if np.ndim(r) == 2 else r)) for r in rows_U])


def roc_points(members, nonmembers) -> dict:
  """The ROC curve thinned to at most ROC_POINTS points, log-spaced in FPR."""
  fpr, tpr = attacks.roc_curve(members, nonmembers)
  if len(fpr) > ROC_POINTS:
    grid = np.unique(np.r_[0.0, np.geomspace(max(fpr[fpr > 0].min(), 1e-6), 1.0,
                                             ROC_POINTS - 1)])
    tpr = np.interp(grid, fpr, tpr)  # Right-continuous steps are close enough to plot.
    fpr = grid
  return {'fpr': [round(float(x), 6) for x in fpr], 'tpr': [round(float(x), 6) for x in tpr]}


def attack_report(members, nonmembers, fprs: Sequence[float], seed: int) -> dict:
  return {'auroc': attacks.auroc(members, nonmembers),
          'auroc_ci': attacks.auroc_ci(members, nonmembers, seed),
          'tpr_at': {f'{f:g}': attacks.tpr_at_fpr(members, nonmembers, f) for f in fprs},
          'roc': roc_points(members, nonmembers)}


def participant_report(p: str, units: dict, target: dict, references: list, *,
                       fprs, seed: int, rmia_a: float, rmia_gamma: float) -> dict:
  """One participant's section: scores of its units under the target and the references
  that never saw it, each attack's quality, and dataset inference."""
  keep = {side: ~units[p, side].ambiguous for side in ('member', 'nonmember')}
  scores = {side: {s: np.asarray(v)[keep[side]] for s, v in target[p, side].items()}
            for side in keep}
  entry = {'members': int(keep['member'].sum()), 'nonmembers': int(keep['nonmember'].sum()),
           'ambiguous': {side: int((~k).sum()) for side, k in keep.items()}}
  if not entry['members'] or not entry['nonmembers']:
    return {**entry, 'scores': {}, 'dataset_inference': None, 'references': []}
  blind = [r for r in references if p not in r['saw']]
  entry['references'] = [r['folder'] for r in blind]
  if blind:
    others = [q for q, side in units if side == 'nonmember' and q != p]
    pop = np.concatenate([target[q, 'nonmember']['loss'][~units[q, 'nonmember'].ambiguous]
                          for q in others]) if others else np.zeros(0)
    refs = {side: np.array([r['phi'][p, side][keep[side]] for r in blind]) for side in keep}
    # One fit over both sides: LiRA's global sigma (few references) must be one number.
    both = attacks.lira(np.concatenate([scores['member']['loss'], scores['nonmember']['loss']]),
                        np.concatenate([refs['member'], refs['nonmember']], axis=1))
    scores['member']['lira'] = both[:entry['members']]
    scores['nonmember']['lira'] = both[entry['members']:]
    for side in keep:
      ref_RxN = refs[side]
      if len(pop):
        pop_ref = np.array([np.concatenate([r['phi'][q, 'nonmember'][
            ~units[q, 'nonmember'].ambiguous] for q in others]) for r in blind])
        scores[side]['rmia'] = attacks.rmia(scores[side]['loss'], ref_RxN, pop, pop_ref,
                                            a=rmia_a, gamma=rmia_gamma)
  entry['scores'] = {s: attack_report(scores['member'][s], scores['nonmember'][s], fprs,
                                      seed) for s in SCORES if s in scores['member']}
  # Held-out files are other modules than the training files: raw scores also separate
  # them in models that never saw the participant (distribution shift). LiRA subtracts,
  # window by window, what models blind to the participant make of the same window, so
  # the test rests on it wherever there are references. (RMIA's offline ratio against a
  # population kept the shift in the default study: AUROC 0.69 on organizations a single
  # run never saw, where LiRA's is 0.50.)
  used = ['lira'] if 'lira' in scores['member'] else list(attacks.MODEL_SCORES)
  entry['dataset_inference'] = {
      **attacks.dataset_inference({s: scores['member'][s] for s in used},
                                  {s: scores['nonmember'][s] for s in used}, seed),
      'calibrated': used != list(attacks.MODEL_SCORES)}
  return entry


_REFERENCE_PHI = {}  # (folder, stamp, units key) -> phi: a study scores each reference once.


def _reference_phi(folder: str, units: dict, units_key: tuple, vocab_multiple: int,
                   batch_size: int) -> dict:
  """{(participant, side): phi_U} of every unit under one reference model."""
  key = (folder, _stamp(folder), units_key)
  if key not in _REFERENCE_PHI:
    from collab import hf
    from collab.evals.generation import scoring
    params, model_config = hf.import_hf(folder, vocab_multiple)
    score = scoring.make_scorer(params, model_config, batch_size)
    _REFERENCE_PHI[key] = {k: _phi(u.rows(score(u.sequences))) for k, u in units.items()}
  return _REFERENCE_PHI[key]


def _stamp(folder: str) -> str:
  path = os.path.join(folder, 'model.safetensors')
  return f'{os.path.getmtime(path)}:{os.path.getsize(path)}' if os.path.isfile(path) else ''


def evaluate(ctx) -> dict:
  """results['membership'] of one model (see the module docstring)."""
  from collab.data import tokenizer as tokenizer_lib
  from collab.evals.generation import scoring
  from collab.evals.memorization import ranking
  cfg = ctx.config.eval.membership
  fprs = tuple(float(f) for f in cfg.fprs)
  if not all(0 < f < 1 for f in fprs):
    raise ValueError(f'config.eval.membership.fprs={fprs} must each be in (0, 1).')
  seed = int(ctx.config.seed)
  heldout = _heldout_dir(ctx)
  data_dirs = [ctx.data_dir] + ([heldout] if heldout else [])
  if cfg.unit == 'window':
    units = window_units(data_dirs, ctx.names, int(cfg.window), int(cfg.max_windows), seed,
                         int(cfg.get('heldout_windows', 0)))
  elif cfg.unit == 'file':
    units = file_units(ctx.data_dir, ctx.names, tokenizer_lib.make_encoder(ctx.tokenizer),
                       tokenizer_lib.eot_id(ctx.tokenizer), ctx.seq_len, int(cfg.max_files),
                       seed)
  else:
    raise ValueError(f"Unknown config.eval.membership.unit {cfg.unit!r}; use 'window' or "
                     "'file'.")
  stats = scoring.make_scorer(ctx.params, ctx.model_config,
                              int(ctx.config.train.eval_batch_size),
                              fn=scoring.token_stats)
  decode = lambda ids: ctx.tokenizer.decode(ids, clean_up_tokenization_spaces=False)
  target = {}
  for key, u in units.items():
    rows = u.rows(stats(u.sequences))
    per = [attacks.model_scores(r[:, 0], r[:, 1], r[:, 2], decode(t), float(cfg.min_k))
           for r, t in zip(rows, u.tokens)]
    target[key] = {s: np.array([x[s] for x in per]) for s in attacks.MODEL_SCORES}
  from collab.data import blocks as blocks_lib
  units_key = (tuple((d, str(blocks_lib.load_manifest(d).get('inputs'))) for d in data_dirs),
               cfg.unit, int(cfg.window), int(cfg.max_windows), int(cfg.max_files),
               int(cfg.get('heldout_windows', 0)),
               int(ctx.seq_len), seed, tuple(ctx.names))
  references = []
  for folder, saw in ranking.reference_folders(ctx, str(cfg.references)):
    if not os.path.isdir(folder):
      raise FileNotFoundError(f'config.eval.membership.references names {folder!r}, which '
                              'is not a folder; give Hugging Face GPT-2 folders or auto.')
    phi = _reference_phi(folder, units, units_key,
                         int(ctx.config.model.get('vocab_multiple', 1)),
                         int(ctx.config.train.eval_batch_size))
    references.append({'folder': folder, 'saw': saw, 'phi': phi})
  parts = {p: participant_report(p, units, target, references, fprs=fprs, seed=seed,
                                 rmia_a=float(cfg.rmia_a), rmia_gamma=float(cfg.rmia_gamma))
           for p in ctx.names}
  return {'participants': parts, 'scores': list(SCORES), 'unit': str(cfg.unit),
          'settings': {'window': int(cfg.window), 'fprs': list(fprs), 'seed': seed,
                       'heldout': len(data_dirs) > 1, 'min_k': float(cfg.min_k)}}


# ---- The evaluator (collab/evals/interface.py).

def heldout_current(folder: str, data_dir: str) -> bool:
  """A held-out data folder built with the tokenizer of the data folder as it is now."""
  from collab.data import blocks as blocks_lib
  stamp = os.path.join(folder, HELDOUT_STAMP)
  return (os.path.isfile(os.path.join(folder, 'manifest.json')) and os.path.isfile(stamp)
          and io.read_json(stamp) == {'inputs': blocks_lib.load_manifest(data_dir).get(
              'inputs')})


def _heldout_dir(ctx) -> str | None:
  folder = os.path.join(os.path.dirname(os.path.abspath(ctx.data_dir)), HELDOUT_DATA)
  return folder if (ctx.config.eval.membership.heldout and ctx.config.eval.membership.unit
                    == 'window' and heldout_current(folder, ctx.data_dir)) else None


def _inputs(ctx) -> list:
  """What the section depends on beyond its settings: the reference models and the
  held-out data."""
  from collab.data import blocks as blocks_lib
  from collab.evals.memorization import ranking
  heldout = _heldout_dir(ctx)
  return [[[folder, _stamp(folder)] for folder, _ in
           ranking.reference_folders(ctx, str(ctx.config.eval.membership.references))],
          heldout and blocks_lib.load_manifest(heldout).get('inputs')]


def mia_of(view: dict, score: str, key: str = 'auroc', participant: str | None = None):
  """A membership number ('auroc', or 'tpr@F' for F in fprs): of one participant, or the
  mean over the participants the model was trained on."""
  parts = ((view.get('membership') or {}).get('participants') or {})
  names = [participant] if participant else interface.trained_on(view)

  def value(p):
    s = ((parts.get(p) or {}).get('scores') or {}).get(score) or {}
    if key.startswith('tpr@'):
      return ((s.get('tpr_at') or {}).get(key[4:]) or {}).get('tpr')
    return s.get(key)
  return interface.mean([value(p) for p in names])


def _fmt_tpr(point: dict | None) -> str:
  if not point:
    return '–'
  text = f"{100 * point['tpr']:.1f}"
  # Fewer non-members than 1/FPR: the point is the TPR at zero false positives.
  return text + (f" (0 FP of {point['nonmembers']})" if not point['false_positives_allowed']
                 else f" ({point['false_positives_allowed']} FP of {point['nonmembers']})")


def _tables(views: Sequence[dict]) -> list:
  """membership.md: one row per run, model, participant and score; dataset_inference.md:
  one per run, model and participant."""
  if not any(v.get('membership') for v in views):
    return []
  first = next(v['membership'] for v in views if v.get('membership'))
  fprs = first['settings']['fprs']
  header = ['run', 'model', 'participant', 'trained on', 'members / non-members (ambiguous)',
            'score', 'AUROC [95% CI]'] + [f'TPR % at {100 * f:g}% FPR' for f in fprs]
  di_header = ['run', 'model', 'participant', 'trained on', 'p-value (one-sided Welch)',
               'windows for p < 0.01', 'members / non-members', 'scores (references)']
  rows, di_rows, groups = [], [], interface.group_views(views)
  for key in interface.privacy_ordered(groups):
    view = groups[key][0]  # Seeds: the first (the table is per run, not a mean).
    parts = (view.get('membership') or {}).get('participants') or {}
    for p, m in parts.items():
      trained = 'yes' if p in interface.trained_on(view) else 'no'
      counts = (f"{m['members']} / {m['nonmembers']} "
                f"({m['ambiguous']['member']} / {m['ambiguous']['nonmember']})")
      if not m.get('scores'):
        rows.append([*key, p, trained, counts, '–', '–'] + ['–'] * len(fprs))
      for s, a in m.get('scores', {}).items():
        lo, hi = a['auroc_ci']
        rows.append([*key, p, trained, counts, s, f"{a['auroc']:.3f} [{lo:.3f}, {hi:.3f}]"]
                    + [_fmt_tpr(a['tpr_at'].get(f'{f:g}')) for f in fprs])
      di = m.get('dataset_inference') or {}
      p_value = di.get('p_value')
      di_rows.append([*key, p, trained, '–' if p_value is None else f'{p_value:.2g}',
                      str(di.get('sequences_needed') or '> all'),
                      f"{m['members']} / {m['nonmembers']}",
                      (f"{', '.join(di.get('scores') or [])} "
                       f"({len(m.get('references') or []) or 'none left'})")])
  unit = first.get('unit', 'window')
  return [interface.Table('membership', f'Membership inference per {unit}: training vs '
                          'held-out (LiRA and RMIA against models that never saw the '
                          'participant)', header, rows),
          interface.Table('dataset_inference', "Dataset inference (Maini et al. 2024) on "
                          "reference-calibrated scores: was the participant's code in "
                          "training? (model-only scores where no reference is left: they "
                          "also separate training from held-out files in models that never "
                          "saw them)", di_header, di_rows)]


EVALUATOR = interface.Evaluator(
    name='membership', needs=frozenset({'model', 'data'}),
    enabled=interface.enabled_flag('membership'),
    settings=interface.settings_of('membership'),
    compute=evaluate, tables=_tables, inputs=_inputs)
