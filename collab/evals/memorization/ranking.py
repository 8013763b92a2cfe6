"""Extraction ranking: which unprompted samples an attacker would single out as memorized.

Carlini et al. 2021 ("Extracting Training Data from Large Language Models"; Yang et al.
ICSE 2024 for code models) generate many samples from the end-of-text token alone, then
rank them by a membership signal and inspect the top n. The audit
(collab.evals.memorization.audit) already knows which samples hold a >= 6-line verbatim
clone of a participant's training code, so the precision of each ranking's top n tells
how well the attack would find them. Three rankings, every score LOWER = MORE SUSPICIOUS:

  perplexity  log-perplexity under the target model (mean NLL per token, nats);
  zlib        log-perplexity / zlib-compressed UTF-8 byte length of the text, as in
              Carlini et al.: text the target finds likelier than its compressibility
              suggests. Repetitive text compresses well, which lifts its ratio back up;
  reference   target log-perplexity MINUS the mean log-perplexity of reference models
              that never saw the participant: the per-token log likelihood ratio.
              Text any code model finds easy (boilerplate, repetition) scores near 0;
              a difference, not Carlini's quotient, so a reference log-perplexity near 0
              cannot blow the score up or flip its sign.

Everything here is pure over arrays; the caller scores texts with the models
(`score_texts` over collab.evals.generation.scoring.make_scorer). Ties break by sample
order (stable sort); a sample without a score (NaN: no token to score) ranks last.
"""

import dataclasses
import os
import zlib
from typing import Callable, Collection, Iterable, Mapping, Sequence

import numpy as np

from collab import io

NS = (10, 25)  # Carlini et al. inspect the top 100 of 200k samples; audits here are small.
RANKINGS = ('perplexity', 'zlib', 'reference')


@dataclasses.dataclass(frozen=True)
class Reference:
  """One reference model: the samples' log-perplexities under it and whose code it saw."""
  nll_S: np.ndarray  # Mean NLL per token of each sample (score_texts).
  saw: frozenset = frozenset()  # Participants in its training data.


# --- Inputs from the audit's files.

def unprompted_inputs(samples: Sequence, rows: Iterable[Mapping]) -> tuple:
  """(ids, texts, memorized_by) of the unprompted samples; `rows` are memorized.jsonl's.

  memorized_by[i] is the set of participants whose training data holds a clone in sample
  i: every participant a span's windows were found in (the row's 'participants', as the
  audit counts them), not only its best match.
  """
  from collab.evals.memorization import audit  # Sampling and clone indexes: heavy.
  kept = [s for s in samples if s.protocol == audit.UNPROMPTED]
  held = {}
  for row in rows:
    held.setdefault(row['sample_id'], set()).update(row['participants'])
  return ([s.id for s in kept], [s.text for s in kept],
          [frozenset(held.get(s.id, ())) for s in kept])


def mean_nll(logprobs_S: Sequence[np.ndarray]) -> np.ndarray:
  """nll_S: -mean of each sample's token log-probs (its log-perplexity); NaN when empty."""
  return np.array([-float(np.mean(lp)) if len(lp) else np.nan for lp in logprobs_S],
                  np.float64)


def score_texts(score: Callable, tokenizer, texts: Sequence[str], eot_id: int, *,
                max_len: int | None = None) -> np.ndarray:
  """nll_S of texts under one model: `score` (make_scorer's) of [EOT] + each text's tokens.

  The samples were generated after EOT alone, so EOT leads here too and the text's first
  token is scored. Sequences are cut to max_len tokens (the model's context); a text
  with no token has nothing to score and gets NaN (it ranks last).
  """
  from collab.data import tokenizer as tokenizer_lib  # transformers: only to score.
  encode = tokenizer_lib.make_encoder(tokenizer)
  cut = None if max_len is None else max_len - 1
  ids_S = [[int(t) for t in ids[:cut]] for ids in encode(list(texts))]
  scored = [i for i, ids in enumerate(ids_S) if ids]
  logprobs = score([[eot_id] + ids_S[i] for i in scored]) if scored else []
  nll_S = np.full(len(texts), np.nan)
  nll_S[scored] = mean_nll(logprobs)
  return nll_S


# --- Scores (lower = more suspicious) and rankings.

def zlib_bytes(texts: Sequence[str]) -> np.ndarray:
  """Carlini et al.'s zlib entropy: bytes of zlib.compress(text as UTF-8)."""
  return np.array([len(zlib.compress(t.encode('utf-8'))) for t in texts], np.float64)


def zlib_scores(nll_S: np.ndarray, texts: Sequence[str]) -> np.ndarray:
  return np.asarray(nll_S, np.float64) / zlib_bytes(texts)


def reference_scores(nll_S: np.ndarray, reference_nll_RxS: Sequence[np.ndarray]) -> np.ndarray:
  """Target log-perplexity minus the references' mean log-perplexity."""
  return np.asarray(nll_S, np.float64) - np.mean(np.asarray(reference_nll_RxS, np.float64),
                                                 axis=0)


def rank(scores_S: np.ndarray) -> np.ndarray:
  """Sample indices, most suspicious (lowest score) first; ties by sample order, NaN last."""
  return np.argsort(np.asarray(scores_S, np.float64), kind='stable')


def orders(texts: Sequence[str], nll_S: np.ndarray,
           references: Sequence[Reference] = ()) -> dict:
  """{ranking: order_S}; 'reference' (over all of `references`) only when there are some."""
  out = {'perplexity': rank(nll_S), 'zlib': rank(zlib_scores(nll_S, texts))}
  if references:
    out['reference'] = rank(reference_scores(nll_S, [r.nll_S for r in references]))
  return out


# --- Precision of the top n.

def capped_ns(ns: Sequence[int], num_samples: int) -> list:
  """Each n capped at the number of samples (duplicates dropped, order kept); none if 0."""
  out = []
  for n in ns:
    if n < 1:
      raise ValueError(f'Every n must be >= 1, got {n}.')
    m = min(int(n), num_samples)
    if m > 0 and m not in out:
      out.append(m)
  return out


def top_counts(order_S: np.ndarray, flags_S: np.ndarray, ns: Sequence[int]) -> dict:
  """{str(n): {'memorized': flagged samples in the top n, 'precision': that / n}}."""
  flags_S = np.asarray(flags_S, bool)
  out = {}
  for n in ns:
    count = int(flags_S[order_S[:n]].sum())
    out[str(n)] = {'memorized': count, 'precision': count / n}
  return out


def _rankings(order_by: Mapping[str, np.ndarray], flags_S: np.ndarray, ns) -> dict:
  return {name: top_counts(order_by[name], flags_S, ns)
          for name in RANKINGS if name in order_by}


def _participant(p: str, nll_S, memorized_by, references, base: dict, ns) -> dict:
  """One participant's block: its flags; the reference ranking over references blind to p."""
  flags_S = np.array([p in m for m in memorized_by], bool)
  blind = [r for r in references if p not in r.saw]
  order_by = {k: v for k, v in base.items() if k != 'reference'}
  if blind:
    order_by['reference'] = (base['reference'] if len(blind) == len(references)
                             else rank(reference_scores(nll_S, [r.nll_S for r in blind])))
  return {'memorized': int(flags_S.sum()), 'rankings': _rankings(order_by, flags_S, ns)}


def evaluate(texts: Sequence[str], memorized_by: Sequence[Collection[str]],
             nll_S: np.ndarray, references: Sequence[Reference] = (), *,
             participants: Sequence[str] | None = None, ns: Sequence[int] = NS) -> dict:
  """Precision of the top n of each ranking, pooled and per participant.

  texts, memorized_by (participants each sample clones) and nll_S (target log-perplexity,
  score_texts) are per sample, in sample order. The pooled reference ranking averages
  every reference; a participant's averages only the references that never saw it, and
  is absent when every reference saw it. `participants` defaults to those any sample clones.
  n is capped at the number of samples ('ns' lists the n used). random_precision: the
  precision of a random ranking (memorized share), None without samples.
  """
  num = len(texts)
  nll_S = np.asarray(nll_S, np.float64)
  if len(memorized_by) != num or nll_S.shape != (num,) or any(
      np.shape(r.nll_S) != (num,) for r in references):
    raise ValueError(f'texts, memorized_by, nll_S and each reference need {num} samples.')
  if participants is None:
    participants = sorted(set().union(*map(set, memorized_by)))
  ns = capped_ns(ns, num)
  base = orders(texts, nll_S, references)
  flags_S = np.array([bool(m) for m in memorized_by], bool)
  return {
      'samples': num, 'memorized': int(flags_S.sum()), 'ns': ns,
      'rankings': _rankings(base, flags_S, ns),
      'participants': {p: _participant(p, nll_S, memorized_by, references, base, ns)
                       for p in participants},
      'random_precision': float(flags_S.mean()) if num else None,
  }


# ---- The evaluator (collab/evals/interface.py): rankings of the clone audit's samples.

def reference_folders(ctx, spec: str | None = None) -> list:
  """(folder, participants it saw) of the reference models `spec` names (default:
  config.eval.ranking.references): 'auto' is the study's single runs of each participant
  (at the run's seed), which never saw the others; otherwise comma-separated Hugging Face
  folders that saw nobody."""
  spec = str(ctx.config.eval.ranking.references if spec is None else spec).strip()
  if spec != 'auto':
    return [(f.strip(), frozenset()) for f in spec.split(',') if f.strip()]
  study, name = os.path.split(os.path.abspath(ctx.run_dir))
  seed = name[name.index('@'):] if '@' in name else ''
  out = []
  for p in ctx.names:
    folder = os.path.join(study, f'single-{p}{seed}')
    # Finished runs only, and never the evaluated run itself.
    if folder != os.path.abspath(ctx.run_dir) and os.path.isfile(
        os.path.join(folder, 'train.json')):
      out.append((os.path.join(folder, 'final'), frozenset({p})))
  return out


def reference_inputs(ctx) -> list:
  """What the ranking's cache depends on beyond its settings: each reference model
  (its folder and, for a study's run, its train.json)."""
  out = []
  for folder, _ in reference_folders(ctx):
    info = os.path.join(os.path.dirname(folder), 'train.json')
    out.append([folder, open(info, encoding='utf-8').read() if os.path.isfile(info) else ''])
  return out


def _blind(out: dict) -> dict:
  """The reference ranking summed over participants, each ranked only against the
  references that never saw it: {n: {'memorized', 'inspected'}}."""
  blind = {}
  for block in out['participants'].values():
    for n, top in (block['rankings'].get('reference') or {}).items():
      cell = blind.setdefault(n, {'memorized': 0, 'inspected': 0})
      cell['memorized'] += top['memorized']
      cell['inspected'] += int(n)
  return blind


def _compute(ctx) -> dict | None:
  from collab import hf
  from collab.data import tokenizer as tokenizer_lib
  from collab.evals.generation import scoring
  from collab.evals.memorization import audit
  mem_dir = os.path.join(ctx.eval_dir, 'memorization')
  samples_path = os.path.join(ctx.eval_dir, audit.SAMPLES_JSONL)
  rows_path = os.path.join(mem_dir, 'memorized.jsonl')
  if not (ctx.config.eval.memorization.enabled and os.path.isfile(samples_path)
          and os.path.isfile(rows_path)):
    return None  # No clone audit of this model: nothing to rank.
  samples = [audit.Sample(**r) for r in io.read_jsonl(samples_path)]
  _, texts, memorized_by = unprompted_inputs(samples, io.read_jsonl(rows_path))
  if not texts:
    return None  # eval.memorization.unprompted_samples is 0.
  eot, max_len = tokenizer_lib.eot_id(ctx.tokenizer), ctx.model_config.max_len
  nll_S = score_texts(ctx.score, ctx.tokenizer, texts, eot, max_len=max_len)
  references = []
  for folder, saw in reference_folders(ctx):
    if not os.path.isdir(folder):
      raise FileNotFoundError(f'config.eval.ranking.references names {folder!r}, which is '
                              'not a folder; give Hugging Face GPT-2 folders or auto.')
    params, model_config = hf.import_hf(folder,
                                        int(ctx.config.model.get('vocab_multiple', 1)))
    score = scoring.make_scorer(params, model_config, int(ctx.config.train.eval_batch_size))
    references.append(Reference(score_texts(score, ctx.tokenizer, texts, eot,
                                            max_len=model_config.max_len), saw))
  out = evaluate(texts, memorized_by, nll_S, references, participants=list(ctx.names),
                 ns=tuple(int(n) for n in ctx.config.eval.ranking.top))
  out['references'] = [folder for folder, _ in reference_folders(ctx)]
  trained = set(io.read_json(os.path.join(ctx.run_dir, 'train.json'))['participants'])
  if any(r.saw & trained for r in references):
    # A pooled reference ranking would cancel memorization with a model that saw it:
    # each participant is ranked against the references that never saw it instead.
    out['rankings'].pop('reference', None)
    out['reference_blind'] = _blind(out)
  return out


def _tables(views) -> list:
  """Precision of each ranking's top n beside a random ranking's, per run and model."""
  from collab.evals import interface
  with_rankings = [v for v in views if v.get('ranking')]
  if not with_rankings:
    return []
  ns = sorted({int(n) for v in with_rankings for n in v['ranking']['ns']})
  header = ['run', 'model', 'samples', 'memorized', 'ranking'] + [
      f'top {n} memorized' for n in ns] + ['random precision %', 'references']
  rows = []
  for v in with_rankings:
    r = v['ranking']
    for name in RANKINGS:
      blind = name == 'reference' and r.get('reference_blind')
      block = r['reference_blind'] if blind else r['rankings'].get(name)
      top = [(block or {}).get(str(n)) for n in ns]
      rows.append([v['run'], v.get('model', 'final'), str(r['samples']), str(r['memorized']),
                   name + (' (per participant, summed)' if blind else '')] + [
          f"{t['memorized']}/{t.get('inspected', n)}" if t else '–'
          for t, n in zip(top, ns)] + [
          interface.fmt([r['random_precision']], 1, percent=True),
          str(len(r.get('references') or [])) if name == 'reference' else ''])
  return [interface.Table('ranking', 'Extraction ranking of unprompted samples: memorized '
                          'samples among each ranking\'s top n (no reference model: –)',
                          header, rows)]


def _evaluator():
  from collab.evals import interface
  from collab.evals.memorization import clone_audit
  return interface.Evaluator(
      name='ranking', needs=frozenset({'model', 'scorer', 'samples'}),
      enabled=interface.enabled_flag('ranking'),
      # The samples it ranks are the clone audit's: its settings are part of the key.
      settings=lambda c: [c.eval.ranking.to_dict(), clone_audit.EVALUATOR.settings(c)],
      compute=_compute, tables=_tables, inputs=reference_inputs)


EVALUATOR = _evaluator()
