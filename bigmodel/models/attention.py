"""The one attention entry point every model family calls.

``dot_product_attention`` picks an implementation by ``model.attention_impl``
so that faster kernels plug in here without touching GPT, BERT or T5:

- ``xla``: ``pallas_kernels.attention_reference``, plain jnp (float32 softmax,
  materialises the [T, S] scores); causal self-attention runs in query
  blocks that skip the keys after the block (``causal_query_blocks``).
- ``pallas``: ``pallas_kernels.flash_attention``, the fused kernel: Triton on
  GPU, Mosaic on TPU, Pallas' interpreter on CPU (slow; a correctness check).
- ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")``, NVIDIA
  GPUs only, float16/bfloat16 only, no logit soft-capping.
- ``auto``: ``pallas`` on GPU and TPU, ``xla`` on CPU.

Every implementation takes the same masks: causal, segment ids (packing and
padding), an additive bias, and a causal sliding ``window`` (Mistral, Gemma's
local layers); all but ``cudnn`` also take Gemma 2's ``softcap``.

Under context parallelism (the logical ``length`` axis on a mesh axis of
size > 1: ``mesh.context``) self-attention over the whole sequence runs per
device under ``shard_map`` as a ring or an all-gather over that axis
(``context_parallel``; ``model.context_attention``), whatever ``impl`` says;
its blocks are plain jnp, and take T5's relative bias as a ``RelativeBias``
that each block builds from its token indices (no [T, S] bias at once).
"""
import functools
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from bigmodel.models import context_parallel
from bigmodel.models.relative_bias import RelativeBias
from bigmodel.sharding import axes_size, split_axes
from pallas_kernels import (attention_mask, attention_reference, check_window_and_softcap,
                            flash_attention)

ATTENTION_IMPLS = ("auto", "xla", "pallas", "cudnn")
CONTEXT_ATTENTION = {"ring": context_parallel.ring_attention,
                     "all_gather": context_parallel.all_gather_attention}


def resolve_impl(impl: str, platform: Optional[str] = None) -> str:
  """The concrete implementation ``impl`` means on ``platform`` (default: JAX's)."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"unknown attention_impl {impl!r}; choose from {ATTENTION_IMPLS}")
  platform = platform or jax.default_backend()
  if impl == "auto":
    return "pallas" if platform in ("gpu", "tpu") else "xla"
  if impl == "cudnn" and platform != "gpu":
    raise ValueError(
        f"attention_impl='cudnn' needs an NVIDIA GPU (cuDNN flash attention) but JAX's "
        f"platform is {platform!r}; use 'pallas', 'xla' or 'auto'")
  return impl


def dot_product_attention(
    q_BxTxNxH: jax.Array,
    k_BxSxKxH: jax.Array,
    v_BxSxKxH: jax.Array,
    *,
    impl: str = "auto",
    causal: bool = False,
    window: int = 0,
    softcap: float = 0.0,
    q_segment_ids_BxT: Optional[jax.Array] = None,
    kv_segment_ids_BxS: Optional[jax.Array] = None,
    bias_BxNxTxS: Optional[jax.Array] = None,
    context_attention: str = "ring",
    positions_BxT: Optional[jax.Array] = None,
) -> jax.Array:
  """Scaled dot-product attention of q [B, T, N, H] over k, v [B, S, K, H]
  (K divides N); returns [B, T, N, H].

  Segment id 0 marks padding; queries attend only to keys of their segment.
  ``causal`` aligns the diagonal at the end (query i sees key j iff
  i + S - T >= j). ``window`` > 0 (needs ``causal``) also hides keys
  ``window`` or more positions back: i + S - T - j < window (0 = none).
  ``softcap`` > 0 caps the scaled scores to softcap * tanh(scores / softcap)
  (Gemma 2; not with ``cudnn``). ``bias_BxNxTxS`` ([B or 1, N, T, S]) is then
  added. Rows that see no key return zeros. ``context_attention`` (ring |
  all_gather): how a sequence split over a context axis attends;
  ``positions_BxT`` (self-attention: the tokens' positions in their
  sequence) are then what its masks compare, so a row's tokens may come in
  any order (the trainer's causal-balanced order), else their order is
  their place. ``bias_BxNxTxS`` may be a ``RelativeBias`` (T5's, built
  per block under context parallelism).
  """
  impl = resolve_impl(impl)
  axis = context_axis(q_BxTxNxH.shape[1], k_BxSxKxH.shape[1])
  if isinstance(bias_BxNxTxS, RelativeBias) and axis is None:  # Whole, as the others take it.
    t, s = q_BxTxNxH.shape[1], k_BxSxKxH.shape[1]
    bias_BxNxTxS = bias_BxNxTxS.block(jnp.arange(s - t, s)[None], jnp.arange(s)[None])
  kwargs = dict(causal=causal, window=window, softcap=softcap,
                q_segment_ids_BxT=q_segment_ids_BxT, kv_segment_ids_BxS=kv_segment_ids_BxS,
                bias_BxNxTxS=bias_BxNxTxS)
  if axis is not None:
    return _context_parallel(CONTEXT_ATTENTION[context_attention], axis,
                             q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, positions_BxT=positions_BxT,
                             **kwargs)
  if impl == "pallas":
    return _per_device(flash_attention, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, **kwargs)
  if impl == "cudnn":
    return _cudnn_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, **kwargs)
  blocks = causal_query_blocks(q_BxTxNxH.shape[1], k_BxSxKxH.shape[1], causal)
  if blocks > 1:
    return _causal_blocked(blocks, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, **kwargs)
  return attention_reference(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, **kwargs)


# Query blocks of at least this many rows: shorter ones make the batched
# matmuls too small to run well (64 was fastest for L=512 on the development
# CPU: 8 blocks took 0.72x the whole attention's forward + backward time, 4 blocks
# 0.75-0.87x, 16 blocks 0.83x).
_MIN_QUERY_BLOCK = 64
_MAX_QUERY_BLOCKS = 16


def causal_query_blocks(q_len: int, kv_len: int, causal: bool) -> int:
  """How many query blocks the XLA path splits causal self-attention into.

  Block i of n sees only keys [0, (i + 1) T / n): the scores above the
  diagonal's blocks are never computed, forward or backward, which saves
  (n - 1) / 2n of the score and softmax work (44% at n = 8). 1 = unsplit
  (not causal, cross-attention or a cache, or too short).
  """
  if not causal or q_len != kv_len:
    return 1
  blocks = 1
  while (blocks * 2 <= _MAX_QUERY_BLOCKS and q_len % (blocks * 2) == 0
         and q_len // (blocks * 2) >= _MIN_QUERY_BLOCK):
    blocks *= 2
  return blocks


def _causal_blocked(blocks, q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, *, causal, window, softcap,
                    q_segment_ids_BxT, kv_segment_ids_BxS, bias_BxNxTxS):
  """``attention_reference`` of causal self-attention, one query block at a time.

  Block i's C queries start at position iC and attend keys [start, (i+1)C):
  with the diagonal aligned at the end (``attention_reference``'s causal rule)
  local query t and key j are at global iC + t and start + j, so the causal
  mask, the sliding ``window`` (which also moves ``start`` past keys no query
  of the block sees) and the slices of the segment ids and bias are exact.
  """
  t = q_BxTxNxH.shape[1]
  block = t // blocks
  outs = []
  for i in range(blocks):
    q_start, end = i * block, (i + 1) * block
    start = max(0, q_start - window + 1) if window else 0
    outs.append(attention_reference(
        q_BxTxNxH[:, q_start:end], k_BxTxKxH[:, start:end], v_BxTxKxH[:, start:end],
        causal=causal, window=window, softcap=softcap,
        q_segment_ids_BxT=(None if q_segment_ids_BxT is None
                           else q_segment_ids_BxT[:, q_start:end]),
        kv_segment_ids_BxS=(None if kv_segment_ids_BxS is None
                            else kv_segment_ids_BxS[:, start:end]),
        bias_BxNxTxS=(None if bias_BxNxTxS is None
                      else bias_BxNxTxS[:, :, q_start:end, start:end])))
  return jnp.concatenate(outs, axis=1)


def _cudnn_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, *, causal, window, softcap,
                     q_segment_ids_BxT, kv_segment_ids_BxS, bias_BxNxTxS):
  """cuDNN flash attention with this module's mask semantics."""
  check_window_and_softcap(causal, window, softcap)
  if softcap:
    raise ValueError(f"attention_impl='cudnn' does not support logit soft-capping "
                     f"(softcap={softcap}); use 'pallas' or 'xla'")
  if q_BxTxNxH.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"attention_impl='cudnn' supports float16/bfloat16, not "
                     f"{q_BxTxNxH.dtype}; set model.dtype or use 'pallas'")
  t, s = q_BxTxNxH.shape[1], k_BxSxKxH.shape[1]
  # cuDNN's own causal mask is used only for square attention: its diagonal
  # may not be end-aligned for T != S, so that case goes into the explicit mask.
  # So does the window: jax's local_window_size=(window - 1, 0) is
  # (q - k <= window - 1, k <= q), i.e. this module's window, only when the
  # positions are aligned (T == S); cuDNN then runs it as its sliding window.
  native_causal = causal and t == s
  mask_Bx1xTxS = attention_mask(t, s, causal=causal and not native_causal,
                                window=0 if native_causal else window,
                                q_segment_ids_BxT=q_segment_ids_BxT,
                                kv_segment_ids_BxS=kv_segment_ids_BxS)
  bias = None if bias_BxNxTxS is None else bias_BxNxTxS.astype(q_BxTxNxH.dtype)
  out_BxTxNxH = jax.nn.dot_product_attention(
      q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, bias=bias, mask=mask_Bx1xTxS,
      is_causal=native_causal, implementation="cudnn",
      local_window_size=(window - 1, 0) if native_causal and window else None)
  if mask_Bx1xTxS is not None:
    # Rows with no visible key: zeros, as every other implementation returns.
    any_visible_Bx1xT = mask_Bx1xTxS.any(axis=-1)
    out_BxTxNxH = jnp.where(jnp.swapaxes(any_visible_Bx1xT, 1, 2)[..., None], out_BxTxNxH, 0)
  return out_BxTxNxH.astype(q_BxTxNxH.dtype)


def _per_device(kernel, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, *, causal, window, softcap,
                q_segment_ids_BxT, kv_segment_ids_BxS, bias_BxNxTxS):
  """Runs ``kernel`` on each device's shard of batch and heads (``shard_map``).

  A compiled Pallas kernel is opaque to XLA's sharding propagation, which would
  otherwise gather q, k and v onto every device. Attention is independent per
  (batch, head), so each device runs the kernel on its own block. The mesh
  axes come from the logical rules in effect (``batch`` and ``act_heads``); a
  dimension they do not divide stays whole.
  """
  mesh = jax.sharding.get_abstract_mesh()
  # Window and cap act along the lengths, which stay whole on every device.
  call = functools.partial(kernel, causal=causal, window=window, softcap=softcap)
  if mesh.empty or math.prod(mesh.shape.values()) == 1:
    return call(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_segment_ids_BxT=q_segment_ids_BxT,
                kv_segment_ids_BxS=kv_segment_ids_BxS, bias_BxNxTxS=bias_BxNxTxS)
  batch_axes, heads_axes = _batch_and_head_axes(mesh, q_BxTxNxH, k_BxSxKxH)
  heads_spec = P(batch_axes, None, heads_axes, None)
  segment_spec = P(batch_axes, None)
  bias_spec = None
  if bias_BxNxTxS is not None:
    bias_spec = P(batch_axes if bias_BxNxTxS.shape[0] > 1 else None,
                  heads_axes if bias_BxNxTxS.shape[1] > 1 else None, None, None)

  def local(q, k, v, q_seg, kv_seg, bias):
    return call(q, k, v, q_segment_ids_BxT=q_seg, kv_segment_ids_BxS=kv_seg, bias_BxNxTxS=bias)

  return jax.shard_map(
      local, mesh=mesh,
      in_specs=(heads_spec, heads_spec, heads_spec,
                None if q_segment_ids_BxT is None else segment_spec,
                None if kv_segment_ids_BxS is None else segment_spec, bias_spec),
      out_specs=heads_spec, check_vma=False)(
          q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_segment_ids_BxT, kv_segment_ids_BxS,
          bias_BxNxTxS)


def _batch_and_head_axes(mesh, q_BxTxNxH, k_BxSxKxH):
  """The mesh axes of the ``batch`` and ``act_heads`` rules in effect, each
  None where it does not divide the dimension (which then stays whole)."""
  batch_axes, _, heads_axes, _ = nn.logical_to_mesh_axes(
      ("batch", "length", "act_heads", "act_kv"))
  if q_BxTxNxH.shape[0] % axes_size(mesh, batch_axes):
    batch_axes = None
  # Query heads [i*N/t, (i+1)*N/t) use kv heads [i*K/t, (i+1)*K/t): grouped-query
  # attention stays consistent when both head counts split the same way.
  if (q_BxTxNxH.shape[2] % axes_size(mesh, heads_axes)
      or k_BxSxKxH.shape[2] % axes_size(mesh, heads_axes)):
    heads_axes = None
  return batch_axes, heads_axes


def context_axis(q_len: int, kv_len: int) -> Optional[str]:
  """The mesh axis the rules split ``length`` over, if attention should run
  context-parallel: self-attention over equal lengths it divides (a decode
  step's few queries, or a length it does not divide, run whole instead)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  axes = split_axes(mesh, nn.logical_to_mesh_axes(("length",))[0])
  if len(axes) > 1:
    raise ValueError(f"context parallelism splits the sequence over one mesh axis, not {axes}")
  if not axes or q_len != kv_len or q_len % mesh.shape[axes[0]]:
    return None
  return axes[0]


def _context_parallel(attention, axis, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, *, causal, window,
                      softcap, q_segment_ids_BxT, kv_segment_ids_BxS, bias_BxNxTxS,
                      positions_BxT):
  """``attention`` (ring or all-gather) per device of a sequence split over
  ``axis``, batch and heads split as the rules say (``shard_map``); masks by
  ``positions_BxT`` when given (within a segment they order the tokens as
  their places would), else by each token's place in the row."""
  if bias_BxNxTxS is not None and not isinstance(bias_BxNxTxS, RelativeBias):
    raise ValueError("context-parallel attention builds its bias per block: pass a "
                     "RelativeBias, not a [B, N, T, S] array")
  mesh = jax.sharding.get_abstract_mesh()
  batch_axes, heads_axes = _batch_and_head_axes(mesh, q_BxTxNxH, k_BxSxKxH)
  heads_spec = P(batch_axes, axis, heads_axes, None)
  token_spec = P(batch_axes, axis)
  # The bias table [R, N] splits its heads as the heads do.
  bias_spec = None if bias_BxNxTxS is None else bias_BxNxTxS.replace(
      table_RxN=P(None, heads_axes))

  def local(q, k, v, q_seg, kv_seg, positions, bias):
    # Without positions, contiguous chunks: device i holds places [i*T/c, (i+1)*T/c).
    b, t = q.shape[:2]
    index_BxT = (positions if positions is not None else
                 jnp.broadcast_to(jax.lax.axis_index(axis) * t + jnp.arange(t), (b, t)))
    return attention(q, k, v, axis=axis, q_index_BxT=index_BxT, kv_index_BxS=index_BxT,
                     causal=causal, window=window, softcap=softcap,
                     q_segment_ids_BxT=q_seg, kv_segment_ids_BxS=kv_seg,
                     bias_fn=None if bias is None else bias.block)

  return jax.shard_map(
      local, mesh=mesh,
      in_specs=(heads_spec, heads_spec, heads_spec,
                None if q_segment_ids_BxT is None else token_spec,
                None if kv_segment_ids_BxS is None else token_spec,
                None if positions_BxT is None else token_spec, bias_spec),
      out_specs=heads_spec, check_vma=False)(
          q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_segment_ids_BxT, kv_segment_ids_BxS, positions_BxT,
          bias_BxNxTxS)
