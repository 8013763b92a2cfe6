"""Membership inference per participant: its training files (members) against its
validation files (non-members), scored by the model alone.

Scores, each oriented so that higher means "member":
  loss   minus the mean next-token NLL of the file (Yeom et al. 2018: members have
         lower loss);
  min_k  Min-K% Prob (Shi et al. 2024): the mean log-probability of the k share of
         the file's tokens the model finds least likely (k = 0.2 by default; at least
         one token), so a few surprising tokens betray a non-member.
A file is scored on its first `seq_len` tokens (the data's block length) after the
end-of-text token that starts every file in training: the model's context as trained,
one fixed-size row per file. Up to `max_files` files per side are drawn (seeded);
canary files (license 'canary') are never drawn.

Attack quality per score: AUROC (the probability that a random member outscores a
random non-member, ties counting half: the Mann-Whitney U over both counts) and the
true-positive rate at a false-positive rate of at most `fpr` (1%): with
k = floor(fpr * non-members), the threshold t is the (k+1)-th highest non-member score
and TPR = share of members scoring strictly above t (the ROC curve's best point with
FPR <= fpr).
"""

import math
from typing import Callable, Sequence

import numpy as np
from scipy import stats as scipy_stats

from collab.data import canaries as canaries_lib
from collab.evals import interface

SCORES = ('loss', 'min_k')


def loss_score(logprobs_T) -> float:
  """Minus the mean NLL of a file's tokens (higher: more likely a member)."""
  return float(np.mean(logprobs_T))


def min_k_score(logprobs_T, k: float = 0.2) -> float:
  """Min-K% Prob: mean log-probability of the max(1, floor(k * T)) least likely tokens."""
  if not 0 < k <= 1:
    raise ValueError(f'config.eval.membership.min_k={k} must be in (0, 1].')
  lp = np.sort(np.asarray(logprobs_T, np.float64))
  return float(np.mean(lp[:max(1, int(len(lp) * k))]))


def auroc(members: Sequence[float], nonmembers: Sequence[float]) -> float:
  """P(member score > non-member score) + P(tie) / 2, from ranks (Mann-Whitney U)."""
  m, n = np.asarray(members, np.float64), np.asarray(nonmembers, np.float64)
  if not len(m) or not len(n):
    raise ValueError('AUROC needs at least one member and one non-member score.')
  ranks = scipy_stats.rankdata(np.concatenate([m, n]))  # Ties get their mean rank.
  u = float(np.sum(ranks[:len(m)])) - len(m) * (len(m) + 1) / 2
  return u / (len(m) * len(n))


def tpr_at_fpr(members: Sequence[float], nonmembers: Sequence[float],
               fpr: float = 0.01) -> float:
  """Highest TPR whose FPR is at most `fpr` (predict member when score > threshold)."""
  m, n = np.asarray(members, np.float64), np.sort(np.asarray(nonmembers, np.float64))[::-1]
  if not len(m) or not len(n):
    raise ValueError('TPR at FPR needs at least one member and one non-member score.')
  allowed = int(math.floor(fpr * len(n) + 1e-9))  # Non-members allowed above the bar.
  if allowed >= len(n):
    return 1.0
  return float(np.mean(m > n[allowed]))


def sample_files(records: Sequence[dict], max_files: int, seed: int, tag: str) -> list:
  """Up to `max_files` non-canary records in a seeded random order (0: all of them)."""
  order = canaries_lib.seeded_rng('membership', seed, tag).permutation(len(records))
  out = []
  for i in order.tolist():
    if max_files and len(out) >= max_files:
      break
    record = records[i]
    if not canaries_lib.is_canary(record):
      out.append(record)
  return out


def file_sequences(texts: Sequence[str], encode: Callable, eot_id: int,
                   seq_len: int) -> list:
  """[end-of-text] + the file's tokens, cut to seq_len; files with no token are dropped."""
  return [[eot_id] + [int(t) for t in ids[:seq_len - 1]] for ids in encode(list(texts))
          if len(ids)]


def attack(members: Sequence[float], nonmembers: Sequence[float], fpr: float) -> dict:
  return {'auroc': auroc(members, nonmembers), 'tpr_at_fpr': tpr_at_fpr(members, nonmembers, fpr)}


def participant_scores(score: Callable, encode: Callable, eot_id: int, data_dir: str,
                       participant: str, *, max_files: int, seq_len: int, k: float,
                       seed: int) -> dict:
  """{'member'|'nonmember': {'loss': [...], 'min_k': [...]}} of one participant's files."""
  out = {}
  for side, split in (('member', 'train'), ('nonmember', 'valid')):
    from collab.data import tfds_builder  # tensorflow-datasets: only to score.
    records = sample_files(tfds_builder.load_split(data_dir, participant, split), max_files,
                           seed, f'{participant}\0{split}')
    logprobs = score(file_sequences([r['content'] for r in records], encode, eot_id, seq_len))
    out[side] = {'loss': [loss_score(lp) for lp in logprobs],
                 'min_k': [min_k_score(lp, k) for lp in logprobs]}
  return out


def evaluate(score: Callable, encode: Callable, eot_id: int, data_dir: str,
             participants: Sequence[str], *, max_files: int, seq_len: int, k: float = 0.2,
             fpr: float = 0.01, seed: int = 1) -> dict:
  """results['membership']: AUROC and TPR at `fpr` per participant and score."""
  if not 0 < fpr < 1:
    raise ValueError(f'config.eval.membership.fpr={fpr} must be in (0, 1).')
  out = {}
  for name in participants:
    s = participant_scores(score, encode, eot_id, data_dir, name, max_files=max_files,
                           seq_len=seq_len, k=k, seed=seed)
    if not s['member']['loss'] or not s['nonmember']['loss']:
      out[name] = None  # Nothing to compare (a side without scorable files).
      continue
    out[name] = {'members': len(s['member']['loss']),
                 'nonmembers': len(s['nonmember']['loss']),
                 'member_nll': -float(np.mean(s['member']['loss'])),
                 'nonmember_nll': -float(np.mean(s['nonmember']['loss'])),
                 **{kind: attack(s['member'][kind], s['nonmember'][kind], fpr)
                    for kind in SCORES}}
  return {'participants': out, 'scores': list(SCORES),
          'settings': {'max_files': int(max_files), 'seq_len': int(seq_len), 'min_k': float(k),
                       'fpr': float(fpr), 'seed': int(seed)}}


# ---- The evaluator (collab/evals/interface.py): loss and Min-K% attacks on files.

def _compute(ctx) -> dict:
  from collab.data import tokenizer as tokenizer_lib
  cfg = ctx.config.eval.membership
  return evaluate(ctx.score, tokenizer_lib.make_encoder(ctx.tokenizer),
                  tokenizer_lib.eot_id(ctx.tokenizer), ctx.data_dir, ctx.names,
                  max_files=int(cfg.max_files), seq_len=ctx.seq_len, k=float(cfg.min_k),
                  fpr=float(cfg.fpr), seed=int(ctx.config.seed))


def mia_of(view: dict, score: str, key: str = 'auroc', participant: str | None = None):
  """A membership-inference number: of one participant, or the mean over those trained on."""
  parts = ((view.get('membership') or {}).get('participants') or {})
  names = [participant] if participant else interface.trained_on(view)
  return interface.mean([((parts.get(p) or {}).get(score) or {}).get(key) for p in names])


def _tables(views: Sequence[dict]) -> list:
  """AUROC and TPR at the configured FPR per run, model, participant and score."""
  if not any(v.get('membership') for v in views):
    return []
  fpr = next(v['membership']['settings']['fpr'] for v in views if v.get('membership'))
  tpr = f'TPR@{100 * fpr:g}%FPR %'
  header = ['run', 'model', 'participant', 'trained on', 'members / non-members',
            'AUROC loss', f'{tpr} loss', 'AUROC min-k', f'{tpr} min-k']
  rows, groups = [], interface.group_views(views)
  for key in interface.privacy_ordered(groups):
    group = groups[key]
    parts = (group[0].get('membership') or {}).get('participants') or {}
    for p, m in parts.items():
      if not m:
        continue
      rows.append([*key, p, 'yes' if p in interface.trained_on(group[0]) else 'no',
                   f"{m['members']} / {m['nonmembers']}"] + [
          interface.fmt([mia_of(g, s, k, p) for g in group], *spec) for s in SCORES
          for k, spec in (('auroc', (3,)), ('tpr_at_fpr', (1, True)))])
  return [interface.Table('membership', 'Membership inference: training vs validation files',
                          header, rows)]


EVALUATOR = interface.Evaluator(
    name='membership', needs=frozenset({'scorer', 'data'}),
    enabled=interface.enabled_flag('membership'),
    settings=interface.settings_of('membership'),
    compute=_compute, tables=_tables)
