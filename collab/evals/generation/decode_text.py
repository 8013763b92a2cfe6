"""Host-side text handling of sampled rows: end-of-text, stop strings, decoding.

Stop strings are text, not tokens: a row's new tokens are decoded after each chunk of
decoding steps, and a row whose text holds a stop string is cut at the shortest prefix
of tokens whose text holds one (the token that completes it is kept; `cut_at_stop` then
cuts the text itself).
"""

from typing import Optional, Sequence

import numpy as np

PAD = -1  # Token slot not produced (row already done); never a vocabulary id.


def decode(tokenizer, tokens) -> str:
  """Text of token ids, exactly as the tokenizer writes it (no space clean-up)."""
  return tokenizer.decode(list(tokens), clean_up_tokenization_spaces=False)


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
  """The text before the earliest occurrence of any stop string."""
  cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
  return text[:cut]


def finish_row(tokens_N, eot_id: Optional[int], cut: Optional[int]) -> list:
  """A row's new tokens: up to its end-of-text (excluded) or its stop-string cut."""
  out = [int(t) for t in tokens_N if t != PAD]
  if cut is not None:
    out = out[:cut]
  if eot_id is not None and eot_id in out:
    out = out[:out.index(eot_id)]
  return out


def find_stops(tokens_BxN, was_active_B, checked_B, *, tokenizer,
               stop_strings: Sequence[str], eot_id: Optional[int]) -> dict:
  """{slot: n} for rows whose new text has a stop string; n: the shortest such prefix.

  `checked_B[slot]` is how many tokens of the row were already found free of stop
  strings (after earlier chunks); it is updated in place.
  """
  def has_stop(row):
    text = decode(tokenizer, row)
    return any(s in text for s in stop_strings)
  cuts = {}
  for slot in np.flatnonzero(was_active_B):
    row = finish_row(tokens_BxN[slot], eot_id, None)
    if has_stop(row):  # Shorter prefixes than checked_B[slot] held none.
      cuts[slot] = next((n for n in range(checked_B[slot] + 1, len(row))
                         if has_stop(row[:n])), len(row))
    checked_B[slot] = len(row)
  return cuts
