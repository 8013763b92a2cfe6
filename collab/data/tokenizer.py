"""The tokenizer: a byte-level BPE trained on training code, or a local Hugging Face folder.

Either way it is saved beside the data (DATA_DIR/tokenizer) and reloaded as a transformers
fast tokenizer whose end-of-text token "<|endoftext|>" is also its BOS and EOS. Encoding
for filters and blocks treats a literal "<|endoftext|>" inside a source file as plain text
(source code quotes it: the GPT-2 tokenizer does), so only the packer inserts boundaries.
"""

import os
from typing import Callable, Iterable

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOT = '<|endoftext|>'
MIN_VOCAB = 257  # 256 byte symbols + the end-of-text token.


def _wrap(backend: tokenizers.Tokenizer) -> PreTrainedTokenizerFast:
  return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOT, bos_token=EOT,
                                 clean_up_tokenization_spaces=False)


def train_bpe(texts: Iterable[str], vocab_size: int,
              progress: bool = True) -> PreTrainedTokenizerFast:
  """A byte-level BPE (GPT-2 style, no prefix space) with EOT as token 0."""
  if vocab_size < MIN_VOCAB:
    raise ValueError(f'data.tokenizer.vocab_size={vocab_size} is too small for a byte-level '
                     f'BPE; use at least {MIN_VOCAB}.')
  backend = tokenizers.Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=progress)
  backend.train_from_iterator(texts, trainer=trainer)
  return _wrap(backend)


def from_folder(folder: str) -> PreTrainedTokenizerFast:
  """A local Hugging Face tokenizer folder, with "<|endoftext|>" added if it lacks it."""
  if not os.path.isfile(os.path.join(folder, 'tokenizer.json')):
    raise FileNotFoundError(f'No Hugging Face fast tokenizer at {folder!r} (tokenizer.json '
                            'missing); set data.tokenizer.path to a folder saved with '
                            "save_pretrained(), or to '' to train a BPE.")
  tok = PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
  if EOT not in tok.get_vocab():
    tok.add_special_tokens({'eos_token': EOT})
  tok.eos_token = EOT
  tok.bos_token = EOT
  return tok


def load_tokenizer(path: str) -> PreTrainedTokenizerFast:
  """The tokenizer of a built data folder, or of a tokenizer folder itself."""
  sub = os.path.join(path, 'tokenizer')
  folder = sub if os.path.isdir(sub) else path
  if not os.path.isfile(os.path.join(folder, 'tokenizer.json')):
    raise FileNotFoundError(f'No tokenizer in {path!r}; build the data first: python -m '
                            'launch.build_data --config=YOUR_CONFIG --data_dir=DIR')
  return from_folder(folder)


def prepare_tokenizer(tok_cfg, texts: Callable[[], Iterable[str]], out_dir: str,
                      progress: bool = True) -> PreTrainedTokenizerFast:
  """Loads `tok_cfg.path` or trains a BPE on `texts()`; saves it to `out_dir`, reloaded."""
  if tok_cfg['path']:
    tok = from_folder(tok_cfg['path'])
  else:
    tok = train_bpe(texts(), tok_cfg['vocab_size'], progress)
  tok.save_pretrained(out_dir)
  return from_folder(out_dir)


def eot_id(tok: PreTrainedTokenizerFast) -> int:
  return tok.convert_tokens_to_ids(EOT)


def make_encoder(tok: PreTrainedTokenizerFast) -> Callable[[list[str]], list[np.ndarray]]:
  """texts -> token ids per text (uint32), no added specials, literal specials as text."""
  backend = tokenizers.Tokenizer.from_str(tok.backend_tokenizer.to_str())
  backend.encode_special_tokens = True
  backend.no_truncation()
  backend.no_padding()

  def encode(texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(e.ids, np.uint32)
            for e in backend.encode_batch(texts, add_special_tokens=False)]

  return encode
