"""Special token ids beyond the tokenizer's: the MLM mask and T5 sentinels.

The tokenizer owns ids ``[0, tokenizer_vocab_size)``, its special ids among
them (``Tokenizer.special_tokens``: pad 0, bos 1, eos 2, unk 3 for a
tokenizer trained here; an imported one keeps its own, and
:class:`SpecialIds` carries them to the pipelines). The model's embedding
table usually has more rows (``model.vocab_size``, rounded up for sharding);
the extra rows hold ids no text ever encodes to:

* ``mask_id = tokenizer_vocab_size``: BERT's ``[MASK]``;
* sentinel ``i`` = ``tokenizer_vocab_size + 1 + i``, for i = 0, 1, ... up to
  ``model_vocab_size - 1``: T5's ``<extra_id_i>``, in increasing order (T5
  itself counts down from the top of its vocabulary; the order does not
  matter, only that the mapping is fixed).

Keeping them above the tokenizer means a tokenizer can be retrained or swapped
without renumbering ordinary tokens, and ``decode`` can render them instead
of failing on ids sentencepiece does not know.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from bigmodel.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from bigmodel.data.tokenizer import SpecialTokens, Tokenizer
from bigmodel.errors import UserError

# The ids of a tokenizer trained here (and the default of special_ids).
_TRAINED_TOKENS = SpecialTokens(pad=PAD_ID, bos=BOS_ID, eos=EOS_ID, unk=UNK_ID,
                                decoder_start=BOS_ID)


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """Where the special ids of a (tokenizer, model) pair lie.

  Attributes:
    tokenizer_vocab_size: Ids the tokenizer produces: [0, this).
    model_vocab_size: Rows of the model's embedding: [0, this).
    pad_id, bos_id, eos_id, unk_id, decoder_start_id: The tokenizer's
      (``Tokenizer.special_tokens``).
    first_ordinary_id: The smallest id that is no special one: MLM's random
      replacement tokens are drawn from [this, tokenizer_vocab_size).
  """
  tokenizer_vocab_size: int
  model_vocab_size: int
  pad_id: int = PAD_ID
  bos_id: int = BOS_ID
  eos_id: int = EOS_ID
  unk_id: int | None = UNK_ID
  decoder_start_id: int = BOS_ID
  first_ordinary_id: int = 4

  @property
  def no_text_ids(self) -> tuple[int, ...]:
    """Ids that never stand for text (pad, bos, eos, decoder start): never
    masked nor predicted by MLM."""
    return tuple(sorted({self.pad_id, self.bos_id, self.eos_id,
                         self.decoder_start_id}))

  @property
  def mask_id(self) -> int:
    """BERT's mask token (valid when ``num_extra_ids >= 1``)."""
    return self.tokenizer_vocab_size

  @property
  def first_sentinel_id(self) -> int:
    return self.tokenizer_vocab_size + 1

  @property
  def num_extra_ids(self) -> int:
    """Embedding rows above the tokenizer: the mask, then the sentinels."""
    return self.model_vocab_size - self.tokenizer_vocab_size

  @property
  def num_sentinels(self) -> int:
    return max(self.num_extra_ids - 1, 0)

  def sentinel_id(self, index: int) -> int:
    """Id of ``<extra_id_{index}>``."""
    if not 0 <= index < self.num_sentinels:
      raise ValueError(f"sentinel {index} is outside the {self.num_sentinels}"
                       " available")
    return self.first_sentinel_id + index

  def require(self, num_extra_ids: int, purpose: str) -> None:
    """Raises UserError unless ``num_extra_ids`` ids fit above the tokenizer.

    Args:
      num_extra_ids: 1 for the mask; 1 + sentinels for span corruption (the
        mask id is reserved even when unused, so sentinel ids never move).
      purpose: What needs them, for the message.
    """
    if num_extra_ids > self.num_extra_ids:
      raise UserError(
          f"{purpose} needs {num_extra_ids} ids above the tokenizer's"
          f" {self.tokenizer_vocab_size}, but model.vocab_size="
          f"{self.model_vocab_size} leaves {max(self.num_extra_ids, 0)}; set"
          " model.vocab_size >="
          f" {self.tokenizer_vocab_size + num_extra_ids} or use a smaller"
          " tokenizer (data.vocab_size)")


def special_ids(tokenizer_vocab_size: int, model_vocab_size: int,
                tokens: SpecialTokens = _TRAINED_TOKENS) -> SpecialIds:
  """The special-id layout; UserError if the tokenizer exceeds the model.

  Args:
    tokenizer_vocab_size: Ids the tokenizer produces.
    model_vocab_size: Rows of the model's embedding.
    tokens: The tokenizer's special ids (default: a tokenizer trained here).
  """
  if tokenizer_vocab_size > model_vocab_size:
    raise UserError(
        f"the tokenizer has {tokenizer_vocab_size} pieces, more than"
        f" model.vocab_size={model_vocab_size}; raise model.vocab_size"
        " or use a smaller tokenizer")
  taken = {tokens.pad, tokens.bos, tokens.eos, tokens.unk,
           tokens.decoder_start}
  first_ordinary_id = 0
  while first_ordinary_id in taken:
    first_ordinary_id += 1
  return SpecialIds(tokenizer_vocab_size=tokenizer_vocab_size,
                    model_vocab_size=model_vocab_size, pad_id=tokens.pad,
                    bos_id=tokens.bos, eos_id=tokens.eos, unk_id=tokens.unk,
                    decoder_start_id=tokens.decoder_start,
                    first_ordinary_id=first_ordinary_id)


def tokenizer_special_ids(tokenizer: Tokenizer,
                          model_vocab_size: int) -> SpecialIds:
  """:func:`special_ids` of ``tokenizer`` with its own special ids."""
  return special_ids(tokenizer.vocab_size, model_vocab_size,
                     tokenizer.special_tokens)


def decode(tokenizer: Tokenizer, ids: Sequence[int] | np.ndarray,
           special: SpecialIds | None = None) -> str:
  """Text of ``ids`` with the mask as ``<mask>`` and sentinels as
  ``<extra_id_i>``; ids beyond the model's vocabulary as ``<id_N>``.

  Pad, bos and eos decode to nothing, as in ``Tokenizer.decode``.
  """
  tokenizer_vocab_size = tokenizer.vocab_size
  pieces, ordinary = [], []
  for token in (int(i) for i in np.asarray(ids).reshape(-1)):
    if 0 <= token < tokenizer_vocab_size:
      ordinary.append(token)
      continue
    if ordinary:
      pieces.append(tokenizer.decode(ordinary))
      ordinary = []
    if token == tokenizer_vocab_size:
      pieces.append("<mask>")
    elif (token > tokenizer_vocab_size
          and (special is None or token < special.model_vocab_size)):
      pieces.append(f"<extra_id_{token - tokenizer_vocab_size - 1}>")
    else:
      pieces.append(f"<id_{token}>")
  if ordinary:
    pieces.append(tokenizer.decode(ordinary))
  return "".join(pieces)
