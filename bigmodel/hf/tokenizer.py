"""Hugging Face tokenizers behind bigmodel's tokenizer interface.

A converted model keeps its tokenizer files in ``WORKDIR/tokenizer/`` and its
config points ``data.tokenizer`` there; ``bigmodel.data.tokenizer.Tokenizer.load``
hands such a directory to :class:`HfTokenizer`, so training, sampling and
evaluation tokenize exactly as the original model did:

* ``spiece.model`` (T5) is read with ``sentencepiece``, keeping its own
  special ids (pad 0, eos 1, unk 2; no bos);
* otherwise ``tokenizer.json`` (GPT-2's byte-level BPE, BERT's WordPiece, any
  "fast" tokenizer) is read with the ``tokenizers`` library.

It implements ``bigmodel.data.tokenizer.Tokenizer``: the special ids are data
read from the files (``special_tokens``). ``bos_id`` / ``eos_id`` are what
bigmodel puts around a text: GPT-2's ``<|endoftext|>`` (both), BERT's
``[CLS]`` / ``[SEP]``, T5's pad / ``</s>``. ``decoder_start_id`` is T5's pad
(transformers' ``decoder_start_token_id`` for T5) for a sentencepiece model
without bos, else bos.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import sentencepiece as spm

from bigmodel.data.tokenizer import SpecialTokens, Tokenizer, sentencepiece_special_tokens
from bigmodel.errors import UserError
from bigmodel.hf.files import load_json, model_file

# Files of a HF tokenizer worth keeping with a converted model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "spiece.model", "vocab.txt", "vocab.json", "merges.txt")
# Special tokens by role, in order of preference, when tokenizer_config.json
# does not name them.
_BOS = ("cls_token", "bos_token", "[CLS]", "<|endoftext|>", "<s>", "<pad>")
_EOS = ("sep_token", "eos_token", "[SEP]", "<|endoftext|>", "</s>")
_PAD = ("pad_token", "[PAD]", "<pad>", "<|endoftext|>")
_UNK = ("unk_token", "[UNK]", "<unk>")


def tokenizer_files(source: str) -> list[str]:
  """The names of the tokenizer files in ``source``; UserError if one resolves outside it."""
  return [n for n in TOKENIZER_FILES if os.path.isfile(model_file(source, n))]


def copy_tokenizer_files(source: str, target: str) -> list[str]:
  """Copies the tokenizer files of ``source`` into ``target``; returns their names."""
  names = tokenizer_files(source)
  if names:
    os.makedirs(target, exist_ok=True)
  for name in names:
    shutil.copyfile(os.path.join(source, name), os.path.join(target, name))
  return names


def has_tokenizer(directory: str) -> bool:
  return any(os.path.isfile(os.path.join(directory, n)) for n in ("spiece.model", "tokenizer.json"))


def _load(path: str, load: Any) -> Any:
  """``load()``; a file the library cannot read is a UserError naming it."""
  try:
    return load()
  except Exception as e:  # pylint: disable=broad-except  (both libraries raise bare errors)
    raise UserError(f"{path} is not a readable tokenizer file: {e}") from e


class HfTokenizer(Tokenizer):
  """Text <-> ids with a Hugging Face tokenizer directory (see the module doc)."""

  def __init__(self, directory: str):
    self.directory = directory
    spiece, fast = (os.path.join(directory, n) for n in ("spiece.model", "tokenizer.json"))
    self._sp: Optional[spm.SentencePieceProcessor] = None
    self._fast: Any = None
    if os.path.isfile(spiece):
      self._sp = _load(spiece, lambda: spm.SentencePieceProcessor(model_file=spiece))
      self._special = sentencepiece_special_tokens(self._sp, spiece)
    elif os.path.isfile(fast):
      import tokenizers  # pylint: disable=g-import-not-at-top  (only for tokenizer.json)
      self._fast = _load(fast, lambda: tokenizers.Tokenizer.from_file(fast))
      bos = self._find(_BOS)
      self._special = SpecialTokens(pad=self._find(_PAD), bos=bos, eos=self._find(_EOS),
                                    unk=self._find(_UNK, required=False), decoder_start=bos)
    else:
      raise UserError(f"{directory} has neither spiece.model nor tokenizer.json")

  @classmethod
  def load(cls, directory: str) -> HfTokenizer:
    return cls(directory)

  def _find(self, candidates: Sequence[str], required: bool = True) -> Optional[int]:
    """The id of the first candidate: a tokenizer_config.json role or a token;
    None if there is none and not ``required``."""
    config_path = os.path.join(self.directory, "tokenizer_config.json")
    config = load_json(config_path) if os.path.isfile(config_path) else {}
    for candidate in candidates:
      token = config.get(candidate, candidate)
      token = token.get("content") if isinstance(token, dict) else token
      token_id = self._fast.token_to_id(token) if isinstance(token, str) else None
      if token_id is not None:
        return token_id
    if not required:
      return None
    raise UserError(f"the tokenizer in {self.directory} has none of the special tokens "
                    f"{', '.join(c for c in candidates if not c.endswith('_token'))}")

  def __getstate__(self):
    return {"directory": self.directory}

  def __setstate__(self, state):
    self.__init__(state["directory"])

  @property
  def vocab_size(self) -> int:
    if self._sp is not None:
      return self._sp.get_piece_size()
    return self._fast.get_vocab_size(with_added_tokens=True)

  @property
  def special_tokens(self) -> SpecialTokens:
    return self._special

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text``, without special tokens."""
    if self._sp is not None:
      return self._sp.encode(text)
    return self._fast.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of ``ids``; special tokens decode to nothing."""
    ids = [int(i) for i in ids]
    if self._sp is not None:
      return self._sp.decode(ids)
    return self._fast.decode(ids, skip_special_tokens=True)
