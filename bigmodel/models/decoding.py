"""The state cached decoding carries between steps (``bigmodel.generation``).

Each generating family's ``prefill`` and ``step`` (``bigmodel.models.families``)
build and advance a ``DecodeState``; the search loops only move its rows.
Shape letters as in ``bigmodel.models``: B rows, E encoder length, S cache
slots, W window slots, K kv heads, H head dim.
"""
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from bigmodel.models.layers import KVCache


@flax.struct.dataclass
class LocalGlobalCache:
  """A decoder's caches when windowed and global layers alternate (Gemma 2/3).

  local: the windowed layers' rings of W slots (``KVCache.ring``), leaves
    [local layers, B, W, K, H] in layer order.
  full: the global layers' caches of every slot, leaves [global layers, B, S, K, H].

  A local layer sees the last W keys only, so caching more for it would be
  memory spent on keys it never reads: at Gemma 3's 5 local layers per
  global one and a 1,024-key window, a 32k-token cache is 5.2x smaller.
  """
  local: KVCache
  full: KVCache

  @property
  def index(self) -> jax.Array:
    """[global layers]: how many keys every layer has cached so far."""
    return self.full.index

  @classmethod
  def split(cls, cache: KVCache, local_L: np.ndarray, window: int,
            num_slots: int) -> "LocalGlobalCache":
    """Stacked prefill caches [layers, B, P, K, H] split by layer kind: rings
    of ``window`` for the ``local_L`` layers, ``num_slots`` for the rest."""
    take = lambda layers: jax.tree_util.tree_map(lambda a: a[layers], cache)  # pylint: disable=g-long-lambda
    return cls(take(np.flatnonzero(local_L)).ring(window),
               take(np.flatnonzero(~local_L)).padded(num_slots))


@flax.struct.dataclass
class DecodeState:
  """What one decoding step needs besides the parameters and the new token.

  cache: a decoder: ``KVCache`` with leaves [layers, B, S or W, K, H], or a
    ``LocalGlobalCache``; an encoder-decoder: (self-attention,
    cross-attention) ``KVCache`` pair.
  kv_segment_ids_BxS: 1 on filled cache slots, 0 on empty or padding ones,
    for all S keys (a ring of W slots views them: ``ring_segment_ids``).
  positions_B: the position of the next token (GPT: learned / rotary).
  encoder_segment_ids_BxE: an encoder-decoder's encoder padding (1 real, 0 padding).
  """
  cache: Any
  kv_segment_ids_BxS: jax.Array
  positions_B: jax.Array
  encoder_segment_ids_BxE: Optional[jax.Array] = None

  @property
  def self_cache(self) -> Any:
    """The self-attention cache: a ``KVCache`` or ``LocalGlobalCache``."""
    return self.cache[0] if isinstance(self.cache, tuple) else self.cache

  def take_rows(self, rows_B: jax.Array) -> "DecodeState":
    """The state of rows ``rows_B`` (beam search keeps its best beams).

    Only the self-attention keys/values differ between the beams of one
    prompt: slots, positions and the encoder's cache are the same for all
    of them, so they are not gathered.
    """
    # Keys and values [layers, B, ...] move; the [layers] indices do not.
    moved = jax.tree_util.tree_map(
        lambda x: x if x.ndim < 2 else jnp.take(x, rows_B, axis=1), self.self_cache)
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
  """Marks the slot of key ``index`` filled in every row."""
  ones_Bx1 = jnp.ones((kv_segment_ids_BxS.shape[0], 1), kv_segment_ids_BxS.dtype)
  return jax.lax.dynamic_update_slice_in_dim(kv_segment_ids_BxS, ones_Bx1, index, axis=1)
