"""Plain-jnp attention: the oracle for the Pallas kernels and the XLA fallback.

Tensors are named with their shapes: B batch, T query length, S key/value
length, N query heads, K key/value heads (N % K == 0, grouped-query attention),
H head dim.

Two Gemma-2-style options refine the scores: ``window`` (sliding-window
attention, Mistral and Gemma's local layers: query i sees key j only when
(i + S - T) - j < window) and ``softcap`` (attention-logit soft-capping:
scores pass through softcap * tanh(scores / softcap) before the bias).
"""
from typing import Optional

import jax
import jax.numpy as jnp

# Large but finite: exp() of it underflows to 0 without producing NaN in
# rows where every key is masked (those rows are zeroed explicitly below).
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def check_window_and_softcap(causal: bool, window: int, softcap: float = 0.0) -> None:
  """Raises ValueError unless ``window`` / ``softcap`` are valid (0 = off)."""
  if window < 0:
    raise ValueError(f"window={window} must be >= 0 (0 = no sliding window)")
  if window and not causal:
    raise ValueError(f"a sliding window (window={window}) needs causal=True: it only "
                     "limits how far back a query looks")
  if softcap < 0:
    raise ValueError(f"softcap={softcap} must be >= 0 (0 = no soft-capping)")


def attention_mask(
    q_len: int,
    kv_len: int,
    *,
    causal: bool = False,
    window: int = 0,
    q_segment_ids_BxT: Optional[jax.Array] = None,
    kv_segment_ids_BxS: Optional[jax.Array] = None,
) -> Optional[jax.Array]:
  """Boolean mask [B or 1, 1, T, S]; True where a query may attend to a key.

  Segment id 0 marks padding: a padded key is never attended, and queries
  only attend within their own segment (packed sequences). ``window`` > 0
  (needs ``causal``) also hides keys ``window`` or more positions behind the
  query, as Hugging Face's sliding-window mask (q_idx - kv_idx < window).
  """
  check_window_and_softcap(causal, window)
  mask = None
  if causal:
    # Aligned at the end so a shorter query block sees the whole prefix
    # (decoding with a cache); equal lengths give the usual lower triangle.
    q_idx = jnp.arange(q_len)[:, None] + (kv_len - q_len)
    distance_TxS = q_idx - jnp.arange(kv_len)[None, :]
    mask = distance_TxS >= 0
    if window:
      mask = mask & (distance_TxS < window)
    mask = mask[None, None]
  if kv_segment_ids_BxS is not None:
    if q_segment_ids_BxT is None:
      seg_mask = (kv_segment_ids_BxS != 0)[:, None, None, :]
    else:
      seg_mask = ((q_segment_ids_BxT[:, :, None] == kv_segment_ids_BxS[:, None, :])
                  & (kv_segment_ids_BxS[:, None, :] != 0))[:, None]
    mask = seg_mask if mask is None else mask & seg_mask
  return mask


def attention_reference(
    q_BxTxNxH: jax.Array,
    k_BxSxKxH: jax.Array,
    v_BxSxKxH: jax.Array,
    *,
    bias_BxNxTxS: Optional[jax.Array] = None,
    causal: bool = False,
    window: int = 0,
    softcap: float = 0.0,
    q_segment_ids_BxT: Optional[jax.Array] = None,
    kv_segment_ids_BxS: Optional[jax.Array] = None,
    sm_scale: Optional[float] = None,
) -> jax.Array:
  """Multi-head attention with float32 softmax; returns [B, T, N, H].

  Scores are ``(q . k) * sm_scale``, then soft-capped to
  ``softcap * tanh(scores / softcap)`` when ``softcap`` > 0 (Gemma 2), then
  ``bias`` (e.g. T5's relative position bias, [B or 1, N or 1, T, S]) is
  added, then the mask (``causal``, ``window``, segment ids; see
  ``attention_mask``) applies. Rows whose keys are all masked return zeros
  (never NaN).
  """
  _, t, n, h = q_BxTxNxH.shape
  s, kv_heads = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2]
  if n % kv_heads:
    raise ValueError(f"query heads {n} not a multiple of kv heads {kv_heads}")
  check_window_and_softcap(causal, window, softcap)
  if sm_scale is None:
    sm_scale = h ** -0.5
  group = n // kv_heads
  # [B, T, K, G, H] so each kv head serves `group` query heads without copies.
  q_BxTxKxGxH = q_BxTxNxH.reshape(q_BxTxNxH.shape[0], t, kv_heads, group, h)
  scores_BxKxGxTxS = jnp.einsum(
      "btkgh,bskh->bkgts", q_BxTxKxGxH, k_BxSxKxH,
      preferred_element_type=jnp.float32) * sm_scale
  scores_BxNxTxS = scores_BxKxGxTxS.reshape(-1, n, t, s)
  if softcap:
    scores_BxNxTxS = softcap * jnp.tanh(scores_BxNxTxS / softcap)
  if bias_BxNxTxS is not None:
    scores_BxNxTxS = scores_BxNxTxS + bias_BxNxTxS.astype(jnp.float32)
  mask = attention_mask(t, s, causal=causal, window=window, q_segment_ids_BxT=q_segment_ids_BxT,
                        kv_segment_ids_BxS=kv_segment_ids_BxS)
  if mask is not None:
    scores_BxNxTxS = jnp.where(mask, scores_BxNxTxS, _MASK_VALUE)
  probs_BxNxTxS = jax.nn.softmax(scores_BxNxTxS, axis=-1)
  if mask is not None:
    probs_BxNxTxS = jnp.where(mask, probs_BxNxTxS, 0.0)
  probs_BxKxGxTxS = probs_BxNxTxS.reshape(-1, kv_heads, group, t, s)
  out_BxTxKxGxH = jnp.einsum(
      "bkgts,bskh->btkgh", probs_BxKxGxTxS.astype(v_BxSxKxH.dtype), v_BxSxKxH,
      preferred_element_type=jnp.float32)
  return out_BxTxKxGxH.reshape(q_BxTxNxH.shape).astype(q_BxTxNxH.dtype)
