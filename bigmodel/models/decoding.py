"""The state cached decoding carries between steps (``bigmodel.generation``).

Each generating family's ``prefill`` and ``step`` (``bigmodel.models.families``)
build and advance a ``DecodeState``; the search loops only move its rows.
Shape letters as in ``bigmodel.models``: B rows, E encoder length, S cache
slots, K kv heads, H head dim.
"""
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp

from bigmodel.models.layers import KVCache


@flax.struct.dataclass
class DecodeState:
  """What one decoding step needs besides the parameters and the new token.

  cache: a decoder: ``KVCache`` with leaves [layers, B, S, K, H]; an
    encoder-decoder: (self-attention, cross-attention) ``KVCache`` pair.
  kv_segment_ids_BxS: 1 on filled cache slots, 0 on empty or padding ones.
  positions_B: the position of the next token (GPT: learned / rotary).
  encoder_segment_ids_BxE: an encoder-decoder's encoder padding (1 real, 0 padding).
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


def fill_slot(kv_segment_ids_BxS: jax.Array, index: jax.Array) -> jax.Array:
  """Marks the slot of key ``index`` filled in every row (``index % S``: a ring
  cache reuses slots, ``KVCache.ring``)."""
  ones_Bx1 = jnp.ones((kv_segment_ids_BxS.shape[0], 1), kv_segment_ids_BxS.dtype)
  slot = index % kv_segment_ids_BxS.shape[1]
  return jax.lax.dynamic_update_slice_in_dim(kv_segment_ids_BxS, ones_Bx1, slot, axis=1)
