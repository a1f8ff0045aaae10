"""Cached decoding of any generating family: prefill once, then one token per step.

The family (``bigmodel.models.families``) owns its prefill and step; this is
the object the search loops (``bigmodel.generation.search``) hold. Shape
letters as in ``bigmodel.models``: B rows, P prompt slots, E encoder length,
S cache slots, V vocabulary.

A decoder-only family's prompts are left-padded to P: every row's last
prompt token sits in slot P - 1, so all rows write the cache at the same
slot each step (one ``dynamic_update_slice``). An encoder-decoder encodes
once (encoder input right-padded, segment id 0 on padding), caches every
decoder layer's cross-attention keys/values, and decodes from the start id
with a self-attention cache.
"""
from typing import Any

import flax.linen as nn
import jax

from bigmodel.models.decoding import DecodeState
from bigmodel.models.families import family_of


class CachedDecoder:
  """``prefill`` and ``step`` of a model; pure functions, traced under jit."""

  def __init__(self, model: nn.Module):
    self.model = model
    self.family = family_of(model)
    self.is_encoder_decoder = self.family.encoder_decoder

  def prefill(self, params: Any, tokens_BxP: jax.Array, lengths_B: jax.Array,
              num_new: int, start_id: int) -> tuple[jax.Array, DecodeState]:
    """Runs the prompt; returns (next-token logits [B, V], state with room for
    ``num_new`` more tokens).

    Decoder-only: ``tokens_BxP`` left-padded, ``lengths_B`` real tokens per
    row. Encoder-decoder: the encoder input, right-padded; decoding starts
    from ``start_id``.
    """
    return self.family.prefill(self.model, params, tokens_BxP, lengths_B, num_new, start_id)

  def step(self, params: Any, tokens_B: jax.Array,
           state: DecodeState) -> tuple[jax.Array, DecodeState]:
    """Feeds one token per row; returns (next-token logits [B, V], new state)."""
    return self.family.step(self.model, params, tokens_B, state)


__all__ = ["CachedDecoder", "DecodeState"]
