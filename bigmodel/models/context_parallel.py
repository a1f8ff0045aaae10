"""Context parallelism: attention over a sequence sharded along a mesh axis.

Each device of the ``axis`` (the ``context`` mesh axis) holds one chunk of
the queries, keys and values along the sequence. Two ways to attend over the
whole sequence, both called inside ``shard_map`` (per-device shapes: B rows,
T local queries, S local keys, N query heads, K kv heads, H head size):

* :func:`all_gather_attention`: gather every chunk's keys and values, then
  attend locally. Simple; keys and values of the whole sequence on every
  device.
* :func:`ring_attention`: keys and values travel around the ring
  (``ppermute`` to the next device, c - 1 times for c devices) while each
  device attends its queries to the chunk it holds, merging the partial
  results by their log-sum-exp (the flash-attention recurrence across
  devices). Memory per device stays at two chunks of keys and values.

Masks are by *global* token index (``q_index_BxT``, ``kv_index_BxS``: the
token's place in the unsharded row), so chunks may hold any tokens: with
:func:`balanced_order` device i holds chunks i and 2c - 1 - i of the
sequence, which evens out causal work (an early chunk sees few keys, a late
one many). Segment ids (packing, padding 0), causal masking and a sliding
window apply as in :func:`pallas_kernels.attention_reference`, which the
tests compare against, forward and gradients.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

# A finite "minus infinity": exp(x - max) stays 0 and never NaN.
_MASK_VALUE = -1e30


def balanced_order(length: int, num_devices: int) -> np.ndarray:
  """The token order that gives device i chunks i and 2c - 1 - i (c devices).

  ``x[:, order]`` sharded in c equal parts along the length puts those two
  chunks on device i; ``order`` itself is each slot's global token index
  (what the masks take). Raises ValueError unless 2c divides ``length``.
  """
  if length % (2 * num_devices):
    raise ValueError(f"a causal-balanced split needs the length {length} to be a multiple of "
                     f"2 x {num_devices} devices")
  chunk = length // (2 * num_devices)
  chunks = np.arange(length).reshape(2 * num_devices, chunk)
  return np.concatenate([np.concatenate([chunks[i], chunks[2 * num_devices - 1 - i]])
                         for i in range(num_devices)])


def _block(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_index_BxT, kv_index_BxS, q_seg_BxT, kv_seg_BxS,
           *, causal: bool, window: int, softcap: float, scale: float):
  """Attention of the local queries to one chunk of keys: (out [B, T, N, H]
  float32, normalised over this chunk only; lse [B, N, T], the log-sum-exp of
  the visible scores, ``_MASK_VALUE`` where none is visible)."""
  b, t, n, h = q_BxTxNxH.shape
  kv_heads = k_BxSxKxH.shape[2]
  group = n // kv_heads
  q_BxTxKxGxH = q_BxTxNxH.reshape(b, t, kv_heads, group, h)
  scores_BxKxGxTxS = jnp.einsum("btkgh,bskh->bkgts", q_BxTxKxGxH, k_BxSxKxH,
                                preferred_element_type=jnp.float32) * scale
  scores_BxNxTxS = scores_BxKxGxTxS.reshape(b, n, t, -1)
  if softcap:
    scores_BxNxTxS = softcap * jnp.tanh(scores_BxNxTxS / softcap)
  visible_BxTxS = jnp.ones((b, t, k_BxSxKxH.shape[1]), bool)
  if causal:
    distance_BxTxS = q_index_BxT[:, :, None] - kv_index_BxS[:, None, :]
    visible_BxTxS = distance_BxTxS >= 0
    if window:
      visible_BxTxS &= distance_BxTxS < window
  if kv_seg_BxS is not None:
    visible_BxTxS &= ((q_seg_BxT[:, :, None] == kv_seg_BxS[:, None, :])
                      & (kv_seg_BxS[:, None, :] != 0))
  visible_Bx1xTxS = visible_BxTxS[:, None]
  scores_BxNxTxS = jnp.where(visible_Bx1xTxS, scores_BxNxTxS, _MASK_VALUE)
  max_BxNxT = scores_BxNxTxS.max(axis=-1)
  probs_BxNxTxS = jnp.where(visible_Bx1xTxS, jnp.exp(scores_BxNxTxS - max_BxNxT[..., None]), 0.0)
  sum_BxNxT = probs_BxNxTxS.sum(axis=-1)
  any_visible_BxNxT = sum_BxNxT > 0
  lse_BxNxT = jnp.where(any_visible_BxNxT, max_BxNxT + jnp.log(jnp.where(
      any_visible_BxNxT, sum_BxNxT, 1.0)), _MASK_VALUE)
  probs_BxKxGxTxS = (probs_BxNxTxS / jnp.where(any_visible_BxNxT, sum_BxNxT, 1.0)[..., None]
                     ).reshape(b, kv_heads, group, t, -1)
  out_BxTxKxGxH = jnp.einsum("bkgts,bskh->btkgh", probs_BxKxGxTxS.astype(v_BxSxKxH.dtype),
                             v_BxSxKxH, preferred_element_type=jnp.float32)
  return out_BxTxKxGxH.reshape(b, t, n, h), lse_BxNxT


def _merge(out_a, lse_a, out_b, lse_b):
  """Two partial attentions over disjoint keys -> the attention over both."""
  lse = jnp.logaddexp(lse_a, lse_b)
  # Rows that see nothing in either part keep weight 0 (lse stays _MASK_VALUE).
  weight_a = jnp.where(lse_a > _MASK_VALUE / 2, jnp.exp(lse_a - lse), 0.0)
  weight_b = jnp.where(lse_b > _MASK_VALUE / 2, jnp.exp(lse_b - lse), 0.0)

  def per_token(w_BxNxT):
    return jnp.swapaxes(w_BxNxT, 1, 2)[..., None]  # [B, T, N, 1]
  return out_a * per_token(weight_a) + out_b * per_token(weight_b), lse


def ring_attention(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array, *,
                   axis: str, q_index_BxT: jax.Array, kv_index_BxS: jax.Array,
                   causal: bool = False, window: int = 0, softcap: float = 0.0,
                   q_segment_ids_BxT: Optional[jax.Array] = None,
                   kv_segment_ids_BxS: Optional[jax.Array] = None) -> jax.Array:
  """Attention of this device's queries to every device's keys, by a ring.

  Call inside ``shard_map`` over ``axis``; shapes are per device. Keys,
  values, their segment ids and global indices go to the next device c - 1
  times; each step's partial result merges by log-sum-exp. Each step's block
  is rematerialised in the backward pass (``jax.checkpoint``): only the
  chunks are saved, not the [T, S] scores.

  Returns:
    [B, T, N, H] in the queries' dtype; rows that see no key are zeros.
  """
  num_devices = jax.lax.axis_size(axis)
  scale = q_BxTxNxH.shape[-1] ** -0.5
  block = jax.checkpoint(lambda q, k, v, qi, ki, qs, ks: _block(
      q, k, v, qi, ki, qs, ks, causal=causal, window=window, softcap=softcap, scale=scale))
  kv_seg = kv_segment_ids_BxS
  q_seg = q_segment_ids_BxT if kv_seg is not None else None
  if kv_seg is not None and q_seg is None:
    q_seg = jnp.ones(q_BxTxNxH.shape[:2], kv_seg.dtype)  # Only padding keys are hidden.
  out, lse = block(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_index_BxT, kv_index_BxS, q_seg, kv_seg)
  shift = [(i, (i + 1) % num_devices) for i in range(num_devices)]
  k, v, kv_index = k_BxSxKxH, v_BxSxKxH, kv_index_BxS
  for _ in range(num_devices - 1):
    k, v, kv_index = (jax.lax.ppermute(x, axis, shift) for x in (k, v, kv_index))
    if kv_seg is not None:
      kv_seg = jax.lax.ppermute(kv_seg, axis, shift)
    out_step, lse_step = block(q_BxTxNxH, k, v, q_index_BxT, kv_index, q_seg, kv_seg)
    out, lse = _merge(out, lse, out_step, lse_step)
  return out.astype(q_BxTxNxH.dtype)


def all_gather_attention(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array, *,
                         axis: str, q_index_BxT: jax.Array, kv_index_BxS: jax.Array,
                         causal: bool = False, window: int = 0, softcap: float = 0.0,
                         q_segment_ids_BxT: Optional[jax.Array] = None,
                         kv_segment_ids_BxS: Optional[jax.Array] = None) -> jax.Array:
  """Attention of this device's queries to every device's keys, by gathering
  them along ``axis`` first (inside ``shard_map``; shapes per device)."""
  def gather(x):
    return jax.lax.all_gather(x, axis, axis=1, tiled=True)
  kv_seg = None if kv_segment_ids_BxS is None else gather(kv_segment_ids_BxS)
  q_seg = q_segment_ids_BxT
  if kv_seg is not None and q_seg is None:
    q_seg = jnp.ones(q_BxTxNxH.shape[:2], kv_seg.dtype)
  out, _ = _block(q_BxTxNxH, gather(k_BxSxKxH), gather(v_BxSxKxH), q_index_BxT,
                  gather(kv_index_BxS), q_seg, kv_seg, causal=causal, window=window,
                  softcap=softcap, scale=q_BxTxNxH.shape[-1] ** -0.5)
  return out.astype(q_BxTxNxH.dtype)
