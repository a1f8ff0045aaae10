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
  devices). The forward pass holds two chunks of keys and values at a time;
  for the backward pass each step keeps the chunk it received (c - 1 in
  all, against the all-gather's c) and its running output.

Both rematerialise their blocks in the backward pass and run them
``QUERY_CHUNK`` queries at a time: no [T, S] scores are kept, and at most
one piece's are alive. ``bigmodel.models.attention`` calls them when the
logical ``length`` axis is split over a mesh axis (``mesh.context``).

Masks are by *global* token index (``q_index_BxT``, ``kv_index_BxS``: the
token's place in the unsharded row), so chunks may hold any tokens: with
:func:`balanced_order` device i holds chunks i and 2c - 1 - i of the
sequence, which evens out causal work (an early chunk sees few keys, a late
one many). Segment ids (packing, padding 0), causal masking and a sliding
window apply as in :func:`pallas_kernels.attention_reference`, which the
tests compare against, forward and gradients.
"""
from __future__ import annotations

import functools
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


def balance_rows(batch: dict[str, np.ndarray], num_devices: int,
                 length: int) -> dict[str, np.ndarray]:
  """``batch`` with every [B, length, ...] array's tokens in
  :func:`balanced_order` for ``num_devices`` (others unchanged). The model
  reads their positions, so its outputs and a token-summed loss are the
  same; split over the context axis each device then holds an early and a
  late chunk."""
  order = balanced_order(length, num_devices)
  return {k: v[:, order] if v.ndim > 1 and v.shape[1] == length else v
          for k, v in batch.items()}


def _block(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_index_BxT, kv_index_BxS, q_seg_BxT, kv_seg_BxS,
           *, causal: bool, window: int, softcap: float, scale: float, bias_fn=None):
  """Attention of the local queries to one chunk of keys: (out [B, T, N, H]
  float32, normalised over this chunk only; lse [B, N, T], the log-sum-exp of
  the visible scores, ``_MASK_VALUE`` where none is visible). ``bias_fn``
  (query indices, key indices) -> [B, N, T, S] is added to the scores."""
  b, t, n, h = q_BxTxNxH.shape
  kv_heads = k_BxSxKxH.shape[2]
  group = n // kv_heads
  q_BxTxKxGxH = q_BxTxNxH.reshape(b, t, kv_heads, group, h)
  scores_BxKxGxTxS = jnp.einsum("btkgh,bskh->bkgts", q_BxTxKxGxH, k_BxSxKxH,
                                preferred_element_type=jnp.float32) * scale
  scores_BxNxTxS = scores_BxKxGxTxS.reshape(b, n, t, -1)
  if softcap:
    scores_BxNxTxS = softcap * jnp.tanh(scores_BxNxTxS / softcap)
  if bias_fn is not None:
    scores_BxNxTxS = scores_BxNxTxS + bias_fn(q_index_BxT, kv_index_BxS)
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


# Queries per piece of a block (default): a piece's scores are [B, N, C, S],
# not [B, N, T, S], forward and backward (each piece is rematerialised alone),
# so a long sequence's blocks never hold all their scores at once.
QUERY_CHUNK = 512


def _in_query_chunks(block, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_index_BxT, kv_index_BxS,
                     q_seg_BxT, kv_seg_BxS, *, query_chunk: int):
  """``block`` (``_block`` with its options) over pieces of ``query_chunk``
  queries in turn (whole when T is not a multiple of it); same results."""
  b, t = q_BxTxNxH.shape[:2]
  if t <= query_chunk or t % query_chunk:
    return block(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_index_BxT, kv_index_BxS, q_seg_BxT,
                 kv_seg_BxS)
  pieces = t // query_chunk

  def split(x_BxT):  # [B, T, ...] -> [pieces, B, C, ...]
    return jnp.moveaxis(x_BxT.reshape(b, pieces, query_chunk, *x_BxT.shape[2:]), 1, 0)

  piece = jax.checkpoint(lambda q, q_index, q_seg: block(
      q, k_BxSxKxH, v_BxSxKxH, q_index, kv_index_BxS, q_seg, kv_seg_BxS))
  out_PxBxCxNxH, lse_PxBxNxC = jax.lax.map(
      lambda xs: piece(*xs),
      (split(q_BxTxNxH), split(q_index_BxT), None if q_seg_BxT is None else split(q_seg_BxT)))
  out_BxTxNxH = jnp.moveaxis(out_PxBxCxNxH, 0, 1).reshape(q_BxTxNxH.shape)
  lse_BxNxT = jnp.moveaxis(lse_PxBxNxC, 0, 2).reshape(b, lse_PxBxNxC.shape[2], t)
  return out_BxTxNxH, lse_BxNxT


def _skipping_masked_quarters(block, *, causal: bool, window: int):
  """``block`` run as four quarters: each half of the queries against each
  half of the keys, a quarter whose indices allow no visible pair (every key
  after every query, or, with a window, every key too far back) skipped by
  ``lax.cond``. With :func:`balanced_order` a device's chunk is one early and
  one late half of the sequence, so on every ring step some quarters are
  wholly masked on every device alike: the causal work per device halves and
  stays even. Same results as ``block`` (merged by log-sum-exp)."""
  if not causal:
    return block

  def quarters(q, k, v, q_index, kv_index, q_seg, kv_seg):
    t, s = q.shape[1], k.shape[1]
    if t % 2 or s % 2:
      return block(q, k, v, q_index, kv_index, q_seg, kv_seg)
    halves = lambda x, n: (None, None) if x is None else (x[:, :n // 2], x[:, n // 2:])  # pylint: disable=g-long-lambda
    outs, lses = [], []
    for q_h, q_index_h, q_seg_h in zip(halves(q, t), halves(q_index, t), halves(q_seg, t)):
      out = lse = None
      for k_h, v_h, kv_index_h, kv_seg_h in zip(halves(k, s), halves(v, s), halves(kv_index, s),
                                                halves(kv_seg, s)):
        visible = jnp.max(q_index_h) >= jnp.min(kv_index_h)
        if window:
          visible &= jnp.min(q_index_h) - jnp.max(kv_index_h) < window
        b, tq, n = q_h.shape[0], q_h.shape[1], q_h.shape[2]
        part = jax.lax.cond(
            visible, block,
            lambda *_: (jnp.zeros(q_h.shape, jnp.float32),  # pylint: disable=g-long-lambda
                        jnp.full((b, n, tq), _MASK_VALUE, jnp.float32)),
            q_h, k_h, v_h, q_index_h, kv_index_h, q_seg_h, kv_seg_h)
        out, lse = part if out is None else _merge(out, lse, *part)
      outs.append(out)
      lses.append(lse)
    return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=2)
  return quarters


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
                   kv_segment_ids_BxS: Optional[jax.Array] = None,
                   query_chunk: int = QUERY_CHUNK, bias_fn=None) -> jax.Array:
  """Attention of this device's queries to every device's keys, by a ring.

  Call inside ``shard_map`` over ``axis``; shapes are per device. Keys,
  values, their segment ids and global indices go to the next device c - 1
  times; each step's partial result merges by log-sum-exp. Each step (its
  block and the merge) is rematerialised in the backward pass
  (``jax.checkpoint``): per step only the received chunks and the running
  output and log-sum-exp are saved, not the [T, S] scores; and each block
  runs ``query_chunk`` queries at a time, so even its transient scores are
  [B, N, query_chunk, S]. Causal blocks run as quarters, the wholly masked
  ones skipped (``_skipping_masked_quarters``).

  ``bias_fn`` (global query indices, key indices) -> [B, N, T, S]: an
  additive bias each block builds for itself (T5's relative positions).

  Returns:
    [B, T, N, H] in the queries' dtype; rows that see no key are zeros.
  """
  num_devices = jax.lax.axis_size(axis)
  block = _skipping_masked_quarters(functools.partial(_in_query_chunks, functools.partial(
      _block, causal=causal, window=window, softcap=softcap, scale=q_BxTxNxH.shape[-1] ** -0.5,
      bias_fn=bias_fn), query_chunk=query_chunk), causal=causal, window=window)

  @jax.checkpoint
  def attend_and_merge(out, lse, q, k, v, q_index, kv_index, q_seg, kv_seg):
    return _merge(out, lse, *block(q, k, v, q_index, kv_index, q_seg, kv_seg))

  kv_seg = kv_segment_ids_BxS
  q_seg = q_segment_ids_BxT if kv_seg is not None else None
  if kv_seg is not None and q_seg is None:
    q_seg = jnp.ones(q_BxTxNxH.shape[:2], kv_seg.dtype)  # Only padding keys are hidden.
  out, lse = jax.checkpoint(block)(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_index_BxT, kv_index_BxS,
                                   q_seg, kv_seg)
  shift = [(i, (i + 1) % num_devices) for i in range(num_devices)]

  def step(carry, _):
    # A scan, not a Python loop: its backward runs the steps one after
    # another, so one block's scores are alive at a time (XLA may schedule an
    # unrolled loop's recomputations together).
    out, lse, kv = carry
    kv = jax.tree_util.tree_map(lambda x: jax.lax.ppermute(x, axis, shift), kv)
    k, v, kv_index, kv_seg = kv
    out, lse = attend_and_merge(out, lse, q_BxTxNxH, k, v, q_index_BxT, kv_index, q_seg, kv_seg)
    return (out, lse, kv), None

  (out, _, _), _ = jax.lax.scan(
      step, (out, lse, (k_BxSxKxH, v_BxSxKxH, kv_index_BxS, kv_seg)), length=num_devices - 1)
  return out.astype(q_BxTxNxH.dtype)


def all_gather_attention(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array, *,
                         axis: str, q_index_BxT: jax.Array, kv_index_BxS: jax.Array,
                         causal: bool = False, window: int = 0, softcap: float = 0.0,
                         q_segment_ids_BxT: Optional[jax.Array] = None,
                         kv_segment_ids_BxS: Optional[jax.Array] = None,
                         query_chunk: int = QUERY_CHUNK, bias_fn=None) -> jax.Array:
  """Attention of this device's queries to every device's keys, by gathering
  them along ``axis`` first (inside ``shard_map``; shapes per device). The
  gathered keys and values are what the backward pass keeps."""
  def gather(x):
    return jax.lax.all_gather(x, axis, axis=1, tiled=True)
  kv_seg = None if kv_segment_ids_BxS is None else gather(kv_segment_ids_BxS)
  q_seg = q_segment_ids_BxT
  if kv_seg is not None and q_seg is None:
    q_seg = jnp.ones(q_BxTxNxH.shape[:2], kv_seg.dtype)
  # As in the ring, the backward pass recomputes the [T, S] scores: only the
  # gathered keys and values are kept.
  block = jax.checkpoint(functools.partial(_in_query_chunks, functools.partial(
      _block, causal=causal, window=window, softcap=softcap, scale=q_BxTxNxH.shape[-1] ** -0.5,
      bias_fn=bias_fn), query_chunk=query_chunk))
  out, _ = block(q_BxTxNxH, gather(k_BxSxKxH), gather(v_BxSxKxH), q_index_BxT,
                 gather(kv_index_BxS), q_seg, kv_seg)
  return out.astype(q_BxTxNxH.dtype)
