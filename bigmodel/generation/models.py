"""Each family's prefill and one-token step for cached decoding.

Shapes: B rows, P prompt slots, E encoder length, S cache slots, L layers,
K kv heads, H head dim, V vocabulary.

GPT prompts are left-padded to P: every row's last prompt token sits in slot
P - 1, so all rows write the cache at the same slot each step (one
``dynamic_update_slice``), while positions count from each row's first real
token and padding slots have segment id 0 (never attended). A row then
computes what it would alone. T5 encodes once (encoder input right-padded,
segment id 0 on padding), caches every decoder layer's cross-attention
keys/values, and decodes from BOS with a self-attention cache.
"""
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from bigmodel.models import T5
from bigmodel.models.layers import KVCache


@flax.struct.dataclass
class DecodeState:
  """What one decoding step needs besides the parameters and the new token.

  cache: GPT: ``KVCache`` with leaves [L, B, S, K, H]; T5: (self-attention,
    cross-attention) ``KVCache`` pair.
  kv_segment_ids_BxS: 1 on filled cache slots, 0 on empty or padding ones.
  positions_B: the position of the next token (GPT: learned / rotary).
  encoder_segment_ids_BxE: T5's encoder padding (1 real, 0 padding).
  """
  cache: Any
  kv_segment_ids_BxS: jax.Array
  positions_B: jax.Array
  encoder_segment_ids_BxE: Optional[jax.Array] = None

  @property
  def self_cache(self) -> KVCache:
    return self.cache[0] if isinstance(self.cache, tuple) else self.cache

  def take_rows(self, rows_B: jax.Array) -> "DecodeState":
    """The state of rows ``rows_B`` (beam search keeps its best beams).

    Only the self-attention keys/values differ between the beams of one
    prompt: slots, positions and the encoder's cache are the same for all
    of them, so they are not gathered.
    """
    self_cache = self.self_cache
    moved = KVCache(jnp.take(self_cache.k_BxSxKxH, rows_B, axis=1),
                    jnp.take(self_cache.v_BxSxKxH, rows_B, axis=1), self_cache.index)
    cache = (moved, self.cache[1]) if isinstance(self.cache, tuple) else moved
    return self.replace(cache=cache)

  def repeat_rows(self, times: int) -> "DecodeState":
    """Each row repeated ``times`` times in place (a prompt's beams)."""
    def repeat(x, axis):
      return None if x is None else jnp.repeat(x, times, axis=axis)
    cache = jax.tree_util.tree_map(
        lambda x: x if x.ndim < 2 else jnp.repeat(x, times, axis=1), self.cache)
    return DecodeState(cache, repeat(self.kv_segment_ids_BxS, 0), repeat(self.positions_B, 0),
                       repeat(self.encoder_segment_ids_BxE, 0))


def _fill_slot(kv_segment_ids_BxS: jax.Array, slot: jax.Array) -> jax.Array:
  ones_Bx1 = jnp.ones((kv_segment_ids_BxS.shape[0], 1), kv_segment_ids_BxS.dtype)
  return jax.lax.dynamic_update_slice_in_dim(kv_segment_ids_BxS, ones_Bx1, slot, axis=1)


class CachedDecoder:
  """``prefill`` and ``step`` of a model; pure functions, traced under jit."""

  def __init__(self, model: nn.Module):
    self.model = model
    self.is_encoder_decoder = isinstance(model, T5)

  def prefill(self, params: Any, tokens_BxP: jax.Array, lengths_B: jax.Array,
              num_new: int, start_id: int) -> tuple[jax.Array, DecodeState]:
    """Runs the prompt; returns (next-token logits [B, V], state with room for
    ``num_new`` more tokens).

    GPT: ``tokens_BxP`` left-padded, ``lengths_B`` real tokens per row. T5:
    the encoder input, right-padded; decoding starts from ``start_id``.
    """
    if self.is_encoder_decoder:
      return self._prefill_t5(params, tokens_BxP, lengths_B, num_new, start_id)
    batch, prompt_len = tokens_BxP.shape
    first_real_B = prompt_len - lengths_B
    slots_BxP = jnp.broadcast_to(jnp.arange(prompt_len), (batch, prompt_len))
    segment_ids_BxP = (slots_BxP >= first_real_B[:, None]).astype(jnp.int32)
    positions_BxP = jnp.maximum(slots_BxP - first_real_B[:, None], 0)
    logits_BxPxV, cache = self.model.apply(
        {"params": params}, tokens_BxP, segment_ids_BxL=segment_ids_BxP,
        positions_BxL=positions_BxP, return_cache=True)
    state = DecodeState(
        cache=cache.padded(prompt_len + num_new),
        kv_segment_ids_BxS=jnp.pad(segment_ids_BxP, ((0, 0), (0, num_new))),
        positions_B=lengths_B.astype(jnp.int32))
    return logits_BxPxV[:, -1], state

  def _prefill_t5(self, params, encoder_BxE, lengths_B, num_new, start_id):
    batch, encoder_len = encoder_BxE.shape
    encoder_segment_ids_BxE = (jnp.arange(encoder_len)[None, :] < lengths_B[:, None]).astype(
        jnp.int32)
    encoded_BxExD = self.model.apply({"params": params}, encoder_BxE, encoder_segment_ids_BxE,
                                     method=T5.encode)
    start_Bx1 = jnp.full((batch, 1), start_id, jnp.int32)
    ones_Bx1 = jnp.ones((batch, 1), jnp.int32)
    logits_Bx1xV, (self_cache, cross_cache) = self.model.apply(
        {"params": params}, encoded_BxExD, start_Bx1, encoder_segment_ids_BxE, ones_Bx1,
        return_cache=True, method=T5.decode)
    state = DecodeState(
        cache=(self_cache.padded(1 + num_new), cross_cache),
        kv_segment_ids_BxS=jnp.pad(ones_Bx1, ((0, 0), (0, num_new))),
        positions_B=jnp.ones((batch,), jnp.int32),
        encoder_segment_ids_BxE=encoder_segment_ids_BxE)
    return logits_Bx1xV[:, -1], state

  def step(self, params: Any, tokens_B: jax.Array,
           state: DecodeState) -> tuple[jax.Array, DecodeState]:
    """Feeds one token per row; returns (next-token logits [B, V], new state)."""
    slot = state.self_cache.index[0]  # The same in every layer.
    kv_segment_ids_BxS = _fill_slot(state.kv_segment_ids_BxS, slot)
    tokens_Bx1 = tokens_B[:, None]
    if self.is_encoder_decoder:
      logits_Bx1xV, cache = self.model.apply(
          {"params": params}, None, tokens_Bx1, state.encoder_segment_ids_BxE,
          kv_segment_ids_BxS, cache=state.cache, method=T5.decode)
    else:
      logits_Bx1xV, cache = self.model.apply(
          {"params": params}, tokens_Bx1, positions_BxL=state.positions_B[:, None],
          cache=state.cache, kv_segment_ids_BxS=kv_segment_ids_BxS)
    return logits_Bx1xV[:, 0], state.replace(cache=cache, kv_segment_ids_BxS=kv_segment_ids_BxS,
                                             positions_B=state.positions_B + 1)
