"""What a federated run reports: one metrics.jsonl line per round, and its token counts.

A round's line holds the clients sampled, tokens, the pooled training loss, quantiles of
the client losses and delta norms, the server update norm and, with DP, the privacy
spent so far (`privacy/epsilon`, None when infinite) and the clip bound. Per-client keys
(`client/NAME/loss|tokens|delta_norm` and the sampled names under `clients`) are kept only
when clients are few (the participants themselves, or at most PER_CLIENT_MAX), so a run
of thousands of clients writes lines of constant size.

Note that the client-loss and delta-norm quantiles (and the exact unclipped share) are
diagnostics of the simulation computed from the clients' raw updates: they are not
privatized and not part of what the privacy accounting covers.
"""

import math

import numpy as np

from collab import steps

PER_CLIENT_MAX = 16  # More clients than this: no per-client keys in metrics.jsonl.
QUANTILES = (('p10', 0.1), ('p50', 0.5), ('p90', 0.9), ('max', 1.0))


def keeps_per_client(num_clients: int, granularity: str) -> bool:
  """Whether round lines name every client (the participants, or few clients)."""
  return granularity == 'participants' or num_clients <= PER_CLIENT_MAX


def quantiles(prefix: str, values) -> dict:
  """{prefix_p10, prefix_p50, prefix_p90, prefix_max} of `values` (linear interpolation)."""
  values = np.asarray(values, np.float64)
  return {f'{prefix}_{name}': float(np.quantile(values, q)) for name, q in QUANTILES}


def check_losses(names, ids, loss_sum_C, round_: int) -> None:
  """Raises naming the first client whose loss is not finite."""
  for c, i in enumerate(ids):
    if not math.isfinite(loss_sum_C[c]):
      raise steps.NonFiniteLossError(
          f'Client {names[i]!r} has a training loss of {loss_sum_C[c]} in round {round_}; '
          'lower config.train.learning_rate, keep config.train.grad_clip > 0, or check its '
          'data.')


def round_row(names, ids, metrics: dict, lr: float, round_: int, per_client: bool) -> dict:
  """The metrics.jsonl line of a round from federated.run_round's metrics."""
  loss_sum_C, tokens_C = metrics['loss_sum'], metrics['tokens']
  check_losses(names, ids, loss_sum_C, round_)
  loss_C = loss_sum_C / np.maximum(tokens_C, 1.0)
  row = {'train/lr': lr, 'server/update_norm': metrics['update_norm'],
         'train/loss': float(np.sum(loss_sum_C) / max(np.sum(tokens_C), 1.0)),
         'train/tokens': int(np.sum(tokens_C)), 'clients/sampled': len(ids),
         **quantiles('clients/loss', loss_C),
         **quantiles('clients/delta_norm', metrics['delta_norm'])}
  for key in ('clip_norm', 'unclipped_fraction', 'unclipped_fraction_noisy',
              'next_clip_norm'):
    if key in metrics:
      row[f'privacy/{key}'] = metrics[key]
  if per_client:
    row['clients'] = [names[i] for i in ids]
    for c, i in enumerate(ids):
      row[f'client/{names[i]}/loss'] = float(loss_C[c])
      row[f'client/{names[i]}/tokens'] = int(tokens_C[c])
      row[f'client/{names[i]}/delta_norm'] = float(metrics['delta_norm'][c])
  return row


def tokens_seen(names, blocks_seen_N, seq_len: int, owner: dict | None) -> dict:
  """Predicted tokens trained on, in all and per participant (summed over its clients)."""
  per_block, owner = seq_len - 1, owner or {n: n for n in names}
  per_participant = {p: 0 for p in dict.fromkeys(owner[n] for n in names)}
  for i, n in enumerate(names):
    per_participant[owner[n]] += int(blocks_seen_N[i]) * per_block
  return {'tokens_seen': int(np.sum(blocks_seen_N)) * per_block,
          'tokens_seen_per_participant': per_participant}


def clients_table(plan, blocks_seen_N, seq_len: int, owner: dict, sizes_N) -> dict:
  """clients.json: per client its participant, blocks, local steps and tokens trained on."""
  return {'clients': {n: {'participant': owner[n], 'blocks': int(sizes_N[i]),
                          'local_steps': int(plan.steps_N[i]),
                          'tokens_seen': int(blocks_seen_N[i]) * (seq_len - 1)}
                      for i, n in enumerate(plan.names)}}
