"""Canary exposure (Carlini et al. 2019, "The Secret Sharer"), from the model's loss.

For a canary `prefix + secret + suffix` whose secret was drawn uniformly from a randomness
space R (|R| = |alphabet| ** length, see collab/data/canaries.py):

  loss(s)   = -log p(tokens of s | end-of-text, prefix): the summed negative
              log-likelihood of the secret's tokens after the template's prefix;
  rank      = 1 + #{r in R, r != secret : loss(r) < loss(secret)}  (1 = most likely);
  exposure  = log2 |R| - log2 rank   (0 when the secret is the least likely,
              log2 |R| when it is the most likely).

Exact when |R| - 1 <= `candidates`: every member of R is scored. Otherwise the rank is
estimated from a seeded uniform sample S of `candidates` secrets from R \\ {secret}:
rank ~= 1 + (|R| - 1) * #{r in S : loss(r) < loss(secret)} / |S|, which is the exact rank
when S is all of R \\ {secret}; the estimate cannot resolve ranks below about |R| / |S|
(an exposure of at most log2 |S| short of the maximum), except that a secret beating
every sample gets rank 1. Ties count against nothing (strictly lower losses only).

The text is tokenized as in the build (end-of-text, then the text, literal specials as
text); a secret's loss covers the tokens after the prefix's own tokens (the templates end
in a quote and secrets are alphanumeric, so the BPE keeps that boundary; should it not,
the loss starts after the longest shared token prefix).
"""

import itertools
import math
import os
from typing import Callable, Sequence

import numpy as np

from collab import io
from collab.data import canaries as canaries_lib
from collab.evals import interface


def candidate_secrets(alphabet: str, length: int, secret: str, max_candidates: int,
                      seed: int) -> tuple:
  """(secrets other than `secret`, exact): all of R \\ {secret}, or a seeded sample."""
  size = canaries_lib.space_size(alphabet, length)
  if size <= max_candidates + 1:
    return [''.join(t) for t in itertools.product(alphabet, repeat=length)
            if ''.join(t) != secret], True
  rng = canaries_lib.seeded_rng('exposure', seed, secret)
  letters = np.array(list(alphabet))
  out = []
  while len(out) < max_candidates:  # Uniform over R \ {secret}: redraw the secret itself.
    draws = letters[rng.integers(0, len(alphabet), size=(max_candidates, length))]
    out += [s for s in map(''.join, draws) if s != secret][:max_candidates - len(out)]
  return out, False


def rank(secret_loss: float, candidate_losses: Sequence[float], space: int,
         exact: bool) -> float:
  """The secret's rank in R (1 = lowest loss); estimated from a sample unless `exact`."""
  lower = int(np.sum(np.asarray(candidate_losses) < secret_loss))
  if exact:
    return float(1 + lower)
  return 1.0 + (space - 1) * lower / len(candidate_losses)


def exposure(rank_value: float, space: int) -> float:
  """log2 |R| - log2 rank."""
  return math.log2(space) - math.log2(rank_value)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return n


def _sequences(encode: Callable, eot_id: int, prefix: str, secrets: Sequence[str]) -> tuple:
  """(prefix token ids, token ids of each prefix + secret), both after end-of-text."""
  prefix_ids = [eot_id] + [int(t) for t in encode([prefix])[0]]
  seqs = [[eot_id] + [int(t) for t in ids] for ids in encode([prefix + s for s in secrets])]
  return prefix_ids, seqs


def _secret_nll(prefix_ids: Sequence[int], seq: Sequence[int], logprobs_T) -> float:
  # logprobs_T[t] scores token t + 1, so the tokens from position k are entries k - 1 on.
  return -float(np.sum(logprobs_T[_common_prefix(prefix_ids, seq) - 1:]))


def secret_losses(score: Callable, encode: Callable, eot_id: int,
                  jobs: Sequence[tuple]) -> list:
  """For [(prefix, secrets)]: summed NLL of each secret's tokens given end-of-text and
  the prefix, as one array per job, from a single score() call over all sequences."""
  encoded = [_sequences(encode, eot_id, prefix, secrets) for prefix, secrets in jobs]
  logprobs = score([seq for _, seqs in encoded for seq in seqs])
  out, start = [], 0
  for prefix_ids, seqs in encoded:
    out.append(np.array([_secret_nll(prefix_ids, seq, lp) for seq, lp in
                         zip(seqs, logprobs[start:start + len(seqs)])]))
    start += len(seqs)
  return out


def epsilon_audit(rows: Sequence[dict], candidate_losses: Sequence[np.ndarray],
                  delta: float, confidence: float = 0.95) -> dict:
  """An empirical lower bound on epsilon (Jagielski et al. 2020) from the canaries: the
  planted secrets are members, the candidate secrets (uniform draws from the same space,
  never planted) non-members, each scored by minus its loss. Under (epsilon, delta)-DP
  at the level of a canary's unit (a client holds all its participant's canaries) no
  threshold may separate them by more than the bound allows."""
  members = [-x['loss'] for x in rows]
  nonmembers = np.concatenate([-np.asarray(c, np.float64) for c in candidate_losses]
                              ) if len(candidate_losses) else np.zeros(0)
  if not members or not len(nonmembers):
    return None
  from collab.evals.privacy import attacks
  return attacks.epsilon_lower_bound(members, nonmembers, delta, confidence)


def evaluate(score: Callable, encode: Callable, eot_id: int, meta: dict, *,
             candidates: int, seed: int, participants: Sequence[str] | None = None,
             delta: float = 0.0, trained_on: Sequence[str] | None = None) -> dict:
  """results['canaries']: every canary's exposure, and means by participant and repeats.

  `score(sequences) -> logprobs_T each` (collab.evals.generation.scoring.make_scorer); `meta` is
  DATA_DIR/canaries.json; `participants` (default: all in meta) are the ones measured.
  """
  if candidates < 1:
    raise ValueError(f'config.eval.canaries.candidates={candidates} must be >= 1.')
  alphabet, length = meta['alphabet'], int(meta['length'])
  space = canaries_lib.space_size(alphabet, length)
  names = list(meta['participants']) if participants is None else list(participants)
  jobs, secrets = [], []  # One scoring call for every canary of every participant.
  for name in names:
    for c in meta['participants'][name]:
      others, exact = candidate_secrets(alphabet, length, c['secret'], candidates, seed)
      jobs.append((name, c, exact, len(secrets)))
      secrets.append((c['prefix'], [c['secret']] + others))
  losses = secret_losses(score, encode, eot_id, secrets)
  out = {name: {'canaries': []} for name in names}
  candidate_losses, audited = [], []  # The audit: canaries of participants trained on.
  for name, c, exact, j in jobs:
    own, others = losses[j][0], losses[j][1:]
    if trained_on is None or name in trained_on:
      candidate_losses.append(others)
      audited.append({'loss': float(own)})
    r = rank(own, others, space, exact)
    out[name]['canaries'].append({
        'id': c['id'], 'repeats': c['repeats'], 'loss': float(own), 'rank': r,
        'exposure': exposure(r, space), 'exact': exact, 'scored': len(others)})
  for name in names:
    out[name]['by_repeats'] = _mean_by_repeats(out[name]['canaries'])
  every = [x for name in names for x in out[name]['canaries']]
  return {'alphabet': alphabet, 'length': length, 'space_size': space,
          'log2_space': math.log2(space), 'candidates': int(candidates), 'seed': int(seed),
          'exact': all(x['exact'] for x in every), 'participants': out,
          'by_repeats': _mean_by_repeats(every),
          'epsilon_audit': epsilon_audit(audited, candidate_losses, delta)}


def _mean_by_repeats(rows: Sequence[dict]) -> dict:
  """{str(repeats): mean exposure} (JSON keys are strings)."""
  groups = {}
  for x in rows:
    groups.setdefault(x['repeats'], []).append(x['exposure'])
  return {str(n): float(np.mean(v)) for n, v in sorted(groups.items())}


# ---- The evaluator (collab/evals/interface.py): exposure of the planted canaries.

def _compute(ctx) -> dict | None:
  from collab.data import tokenizer as tokenizer_lib
  meta = canaries_lib.load(ctx.data_dir)
  if meta is None:
    return None  # A data folder without canaries: nothing to measure.
  dp = ctx.config.federated.dp if ctx.config.get('federated') else None
  delta = float(dp.delta) if dp is not None and dp.enabled else 0.0
  info = os.path.join(ctx.run_dir, 'train.json')
  trained_on = io.read_json(info).get('participants') if os.path.isfile(info) else None
  return evaluate(ctx.score, tokenizer_lib.make_encoder(ctx.tokenizer),
                  tokenizer_lib.eot_id(ctx.tokenizer), meta,
                  candidates=int(ctx.config.eval.canaries.candidates),
                  seed=int(ctx.config.seed), delta=delta, trained_on=trained_on)


def empirical_epsilon(view: dict):
  """The canaries' empirical lower bound on epsilon (None without canaries)."""
  audit = (view.get('canaries') or {}).get('epsilon_audit') or {}
  return audit.get('epsilon_lower_bound')


def exposure_of(view: dict, repeats: int, participant: str | None = None):
  """Mean canary exposure at a repeat count: of one participant, or of those trained on."""
  parts = ((view.get('canaries') or {}).get('participants') or {})
  names = [participant] if participant else interface.trained_on(view)
  return interface.mean([((parts.get(p) or {}).get('by_repeats') or {}).get(str(repeats))
                         for p in names])


def repeat_counts(views: Sequence[dict]) -> list:
  counts = set()
  for v in views:
    counts.update(int(n) for n in ((v.get('canaries') or {}).get('by_repeats') or {}))
  return sorted(counts)


def _tables(views: Sequence[dict]) -> list:
  """Mean exposure per run, model, participant and repeat count."""
  if not any(v.get('canaries') for v in views):
    return []
  counts = repeat_counts(views)
  space = next(v['canaries'].get('log2_space') for v in views if v.get('canaries'))
  header = ['run', 'model', 'participant', 'trained on'] + [f'exposure {n}x' for n in counts]
  rows, groups = [], interface.group_views(views)
  for key in interface.privacy_ordered(groups):
    group = groups[key]
    if not group[0].get('canaries'):
      continue
    for p in group[0]['canaries']['participants']:
      rows.append([*key, p, 'yes' if p in interface.trained_on(group[0]) else 'no'] +
                  [interface.fmt([exposure_of(g, n, p) for g in group]) for n in counts])
  return [interface.Table('canaries', f'Canary exposure in bits (max log2|R| = {space:.1f})',
                          header, rows)]


EVALUATOR = interface.Evaluator(
    name='canaries', needs=frozenset({'scorer', 'data'}),
    enabled=interface.enabled_flag('canaries'), settings=interface.settings_of('canaries'),
    compute=_compute, tables=_tables)
