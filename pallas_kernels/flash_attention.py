"""Fused (flash) attention: the public entry point, its custom VJP, and the
Triton (GPU) forward kernel.

The forward pass walks over key/value tiles with an online softmax, so the
[T, S] score matrix never exists in memory; it saves only the output and the
per-row log-sum-exp for the backward kernels (``flash_backward`` for Triton,
``tpu`` for Mosaic). On CPU the same kernels run with ``interpret=True``.
Causal masks and sliding windows are exploited, not just applied: every
kernel skips the tiles they hide entirely (``kv_block_range`` and
``q_block_range`` in ``flash_common``), so windowed attention costs
O(T * window), not O(T * S).

Shapes in names: B batch, T query length, S key/value length, N query heads,
K key/value heads (N % K == 0, grouped-query attention), H head dim; ``Tp``
and ``Sp`` are lengths padded to a multiple of the block size.
"""
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import flash_backward, tpu
from pallas_kernels.flash_common import (BACKENDS, NN_DIMS, NT_DIMS, BlockSizes, Config,
                                         bias_index_map, dot, dot_precision, fit_block,
                                         kv_block_range, next_power_of_2, positions, round_up,
                                         scores_tile, visible_mask)
from pallas_kernels.reference import check_window_and_softcap


def flash_attention(
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
    block_sizes: Optional[BlockSizes] = None,
    backend: Optional[str] = None,
    interpret: Optional[bool] = None,
) -> jax.Array:
  """Flash attention with the semantics of ``attention_reference``; returns [B, T, N, H].

  Args:
    q_BxTxNxH, k_BxSxKxH, v_BxSxKxH: queries, keys, values; K divides N.
    bias_BxNxTxS: optional additive bias (T5's relative positions) of shape
      [B or 1, N or 1, T, S], added to the scaled (and capped) scores;
      differentiable.
    causal: query i sees key j iff i + (S - T) >= j (diagonal aligned at the
      end, so a shorter query block sees the whole prefix).
    window: sliding window (Mistral, Gemma's local layers), needs ``causal``:
      query i also needs i + (S - T) - j < window; 0 = none. Tiles entirely
      outside the window are skipped, forward and backward.
    softcap: Gemma 2's logit soft-capping, scores -> softcap * tanh(scores /
      softcap) before the bias; 0 = off.
    q_segment_ids_BxT, kv_segment_ids_BxS: packed sequences; a query sees
      only keys of its own segment and segment 0 (padding) is never attended.
      Without query ids, kv ids only mask padding keys (id 0); query ids
      without kv ids are ignored, as in the reference.
    sm_scale: score scale, default H ** -0.5.
    block_sizes: tiles (powers of two); default ``BlockSizes.default(backend)``,
      shrunk for short sequences.
    backend: ``triton`` (GPU) or ``mosaic`` (TPU); default by platform,
      ``triton`` on CPU.
    interpret: run the kernels in Pallas' interpreter; default True exactly
      when the platform cannot compile ``backend`` (e.g. on CPU).

  Lengths need not be multiples of the blocks: inputs are padded here and the
  padding masked. Rows that see no key at all return zeros (never NaN).
  """
  b, t, n, h = q_BxTxNxH.shape
  s, kv_heads = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2]
  if k_BxSxKxH.shape != v_BxSxKxH.shape or k_BxSxKxH.shape[0] != b or k_BxSxKxH.shape[3] != h:
    raise ValueError(f"incompatible q {q_BxTxNxH.shape}, k {k_BxSxKxH.shape}, "
                     f"v {v_BxSxKxH.shape}")
  if n % kv_heads:
    raise ValueError(f"query heads {n} not a multiple of kv heads {kv_heads}")
  if bias_BxNxTxS is not None and (
      bias_BxNxTxS.ndim != 4 or bias_BxNxTxS.shape[0] not in (1, b)
      or bias_BxNxTxS.shape[1] not in (1, n) or bias_BxNxTxS.shape[2:] != (t, s)):
    raise ValueError(f"bias shape {bias_BxNxTxS.shape} not [1 or {b}, 1 or {n}, {t}, {s}]")
  platform = jax.default_backend()
  if backend is None:
    backend = "mosaic" if platform == "tpu" else "triton"
  if backend not in BACKENDS:
    raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
  if interpret is None:
    interpret = platform != {"triton": "gpu", "mosaic": "tpu"}[backend]
  check_window_and_softcap(causal, window, softcap)
  if sm_scale is None:
    sm_scale = h ** -0.5

  q_seg, kv_seg = _normalize_segments(q_segment_ids_BxT, kv_segment_ids_BxS, b, t)
  blocks = block_sizes or BlockSizes.default(backend)
  blocks = BlockSizes(*(fit_block(size, length, backend) for size, length in (
      (blocks.block_q, t), (blocks.block_kv, s), (blocks.block_q_bwd, t),
      (blocks.block_kv_bwd, s))))
  tp = round_up(t, max(blocks.block_q, blocks.block_q_bwd))
  sp = round_up(s, max(blocks.block_kv, blocks.block_kv_bwd))
  # Triton loads need power-of-two tiles (and dots >= 16 wide); Mosaic takes
  # the full head dim as one block, whatever it is.
  hp = max(16, next_power_of_2(h)) if backend == "triton" else h
  cfg = Config(
      backend=backend, causal=causal,
      # No query is S or more positions past a key: such a window hides nothing.
      window=int(window) if window < s else 0, softcap=float(softcap),
      sm_scale=float(sm_scale), q_len=t, kv_len=s,
      q_len_padded=tp, kv_len_padded=sp, num_kv_groups=n // kv_heads, blocks=blocks,
      # Padded keys need a mask unless segment id 0 masks them already, or the
      # causal diagonal hides them from every real query (padded query rows
      # are dropped and get zero cotangents).
      mask_kv_tail=sp != s and kv_seg is None and not causal,
      interpret=bool(interpret))

  def pad(x, axis, length):
    if x is None or x.shape[axis] == length:
      return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths)

  q = pad(pad(q_BxTxNxH, 1, tp), 3, hp)
  k = pad(pad(k_BxSxKxH, 1, sp), 3, hp)
  v = pad(pad(v_BxSxKxH, 1, sp), 3, hp)
  q_seg, kv_seg = pad(q_seg, 1, tp), pad(kv_seg, 1, sp)
  bias = pad(pad(bias_BxNxTxS, 2, tp), 3, sp)
  if backend == "mosaic":
    # Mosaic tiles the two minor dims: put (length, head_dim) there.
    to_bnth = lambda x: jnp.swapaxes(x, 1, 2)
    out = to_bnth(_flash(to_bnth(q), to_bnth(k), to_bnth(v), q_seg, kv_seg, bias, cfg))
  else:
    out = _flash(q, k, v, q_seg, kv_seg, bias, cfg)
  return out[:, :t, :, :h]


def _normalize_segments(q_seg, kv_seg, batch, q_len):
  """Maps the three segment-id cases onto one kernel rule:
  ``q_seg == kv_seg and kv_seg != 0``."""
  if kv_seg is None:
    return None, None  # The reference ignores query ids without kv ids.
  if q_seg is None:
    # Only padding keys (id 0) are masked: every query gets id 1 and every
    # real key id 1.
    return (jnp.ones((batch, q_len), jnp.int32),
            (kv_seg != 0).astype(jnp.int32))
  return q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, q_seg, kv_seg, bias, cfg):
  """Padded attention in the backend's layout (Triton BTNH, Mosaic BNTH)."""
  return _forward(q, k, v, q_seg, kv_seg, bias, cfg)[0]


def _forward(q, k, v, q_seg, kv_seg, bias, cfg):
  if cfg.backend == "mosaic":
    return tpu.mosaic_forward(q, k, v, q_seg, kv_seg, bias, cfg)
  return triton_forward(q, k, v, q_seg, kv_seg, bias, cfg)


def _flash_fwd(q, k, v, q_seg, kv_seg, bias, cfg):
  out, lse = _forward(q, k, v, q_seg, kv_seg, bias, cfg)
  # Only the output and the log-sum-exp are saved: the backward kernels
  # recompute the probabilities tile by tile.
  return out, (q, k, v, q_seg, kv_seg, bias, out, lse)


def _flash_bwd(cfg, residuals, d_out):
  q, k, v, q_seg, kv_seg, bias, out, lse = residuals
  backward = tpu.mosaic_backward if cfg.backend == "mosaic" else flash_backward.triton_backward
  dq, dk, dv, dbias_BxNxTpxSp = backward(q, k, v, q_seg, kv_seg, bias, out, lse, d_out, cfg)
  dbias = None
  if bias is not None:
    # The kernels write one gradient per (batch, head); a broadcast bias sums them.
    axes = tuple(a for a in (0, 1) if bias.shape[a] == 1 and dbias_BxNxTpxSp.shape[a] != 1)
    dbias = dbias_BxNxTpxSp.sum(axis=axes, keepdims=True).astype(bias.dtype)
  return dq, dk, dv, None, None, dbias


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------
# Triton forward kernel. Grid (q tiles, B, N); each program owns one query
# tile of one head and loops over the kv tiles it can see.


def _triton_fwd_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, bias_ref,  # Inputs.
                       o_ref, lse_ref,  # Outputs.
                       *, cfg: Config):
  """q_ref [bq, H]; k_ref, v_ref [Sp, H]; q_seg_ref [bq]; kv_seg_ref [Sp];
  bias_ref [bq, Sp]; o_ref [bq, H]; lse_ref [bq]."""
  block_q, head_dim = q_ref.shape
  block_kv = cfg.blocks.block_kv
  precision = dot_precision(q_ref.dtype)
  q_start = pl.program_id(0) * block_q
  q_BqxH = q_ref[...]
  q_seg_Bqx1 = None if q_seg_ref is None else q_seg_ref[...][:, None]

  def body(j, carry):
    acc_BqxH, m_Bq, l_Bq = carry
    kv_start = j * block_kv
    kv_slice = pl.ds(kv_start, block_kv)
    qk_BqxBk = dot(q_BqxH, k_ref[kv_slice, :], NT_DIMS, precision)
    kv_seg_1xBk = None if kv_seg_ref is None else kv_seg_ref[kv_slice][None, :]
    mask = visible_mask(positions(q_start, qk_BqxBk.shape, 0),
                        positions(kv_start, qk_BqxBk.shape, 1), cfg, q_seg_Bqx1, kv_seg_1xBk)
    s_BqxBk, _ = scores_tile(qk_BqxBk, None if bias_ref is None else bias_ref[:, kv_slice],
                             mask, cfg)
    m_next = jnp.maximum(m_Bq, s_BqxBk.max(axis=1))
    p_BqxBk = jnp.exp(s_BqxBk - m_next[:, None])
    if mask is not None:
      # A tile with every key masked has max == MASK_VALUE and exp(0) == 1:
      # zero those so fully masked rows keep l == 0.
      p_BqxBk = jnp.where(mask, p_BqxBk, 0.0)
    alpha = jnp.exp(m_Bq - m_next)  # Rescales what was accumulated so far.
    l_next = alpha * l_Bq + p_BqxBk.sum(axis=1)
    v_BkxH = v_ref[kv_slice, :]
    acc_next = alpha[:, None] * acc_BqxH + dot(p_BqxBk.astype(v_BkxH.dtype), v_BkxH,
                                               NN_DIMS, precision)
    return acc_next, m_next, l_next

  init = (jnp.zeros((block_q, head_dim), jnp.float32),
          jnp.full((block_q,), -jnp.inf, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  first_kv, end_kv = kv_block_range(q_start, q_start + block_q, cfg, block_kv)
  acc_BqxH, m_Bq, l_Bq = lax.fori_loop(first_kv, end_kv, body, init)
  empty = l_Bq == 0.0  # No visible key: output 0, and lse = inf makes p = 0.
  l_safe = jnp.where(empty, 1.0, l_Bq)
  o_ref[...] = (acc_BqxH / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, jnp.inf, m_Bq + jnp.log(l_safe))


def triton_forward(q_BxTpxNxH, k_BxSpxKxH, v_BxSpxKxH, q_seg_BxTp, kv_seg_BxSp,
                   bias_BxNxTpxSp, cfg: Config):
  """Returns (out [B, Tp, N, H], lse [B, N, Tp] float32)."""
  b, tp, n, h = q_BxTpxNxH.shape
  sp = k_BxSpxKxH.shape[1]
  bq, g = cfg.blocks.block_q, cfg.num_kv_groups
  in_specs = [
      pl.BlockSpec((None, bq, None, h), lambda i, bi, ni: (bi, i, ni, 0)),
      pl.BlockSpec((None, sp, None, h), lambda i, bi, ni: (bi, 0, lax.div(ni, g), 0)),
      pl.BlockSpec((None, sp, None, h), lambda i, bi, ni: (bi, 0, lax.div(ni, g), 0)),
      None if q_seg_BxTp is None else pl.BlockSpec((None, bq), lambda i, bi, ni: (bi, i)),
      None if kv_seg_BxSp is None else pl.BlockSpec((None, sp), lambda i, bi, ni: (bi, 0)),
      None if bias_BxNxTpxSp is None else pl.BlockSpec(
          (None, None, bq, sp),
          bias_index_map(bias_BxNxTpxSp.shape, lambda i, bi, ni: (bi, ni, i, 0))),
  ]
  out_specs = [pl.BlockSpec((None, bq, None, h), lambda i, bi, ni: (bi, i, ni, 0)),
               pl.BlockSpec((None, None, bq), lambda i, bi, ni: (bi, ni, i))]
  out_shape = [jax.ShapeDtypeStruct(q_BxTpxNxH.shape, q_BxTpxNxH.dtype),
               jax.ShapeDtypeStruct((b, n, tp), jnp.float32)]
  return pl.pallas_call(
      functools.partial(_triton_fwd_kernel, cfg=cfg),
      grid=(tp // bq, b, n), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=4 if h <= 64 else 8, num_stages=2),
      interpret=cfg.interpret, name="flash_attention_fwd",
  )(q_BxTpxNxH, k_BxSpxKxH, v_BxSpxKxH, q_seg_BxTp, kv_seg_BxSp, bias_BxNxTpxSp)

