"""The one attention entry point every model family calls.

``dot_product_attention`` picks an implementation by ``model.attention_impl``
so that faster kernels plug in here without touching GPT, BERT or T5.
"""
from typing import Optional

import jax

from pallas_kernels import attention_reference

# `auto` picks the best implementation for the platform; today that is XLA.
ATTENTION_IMPLS = ("auto", "xla")


def dot_product_attention(
    q_BxTxNxH: jax.Array,
    k_BxSxKxH: jax.Array,
    v_BxSxKxH: jax.Array,
    *,
    impl: str = "auto",
    causal: bool = False,
    q_segment_ids_BxT: Optional[jax.Array] = None,
    kv_segment_ids_BxS: Optional[jax.Array] = None,
    bias_BxNxTxS: Optional[jax.Array] = None,
) -> jax.Array:
  """Scaled dot-product attention; returns [B, T, N, H].

  Segment id 0 marks padding; queries attend only to keys of their segment.
  """
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"unknown attention_impl {impl!r}; choose from {ATTENTION_IMPLS}")
  return attention_reference(
      q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, bias_BxNxTxS=bias_BxNxTxS, causal=causal,
      q_segment_ids_BxT=q_segment_ids_BxT, kv_segment_ids_BxS=kv_segment_ids_BxS)
