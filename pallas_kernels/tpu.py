"""Mosaic (TPU) flash-attention kernels: forward, dK/dV and dQ (+ dBias).

Unlike the Triton kernels, which loop over kv tiles inside one program, these
put the reduction axis in the grid (marked ``arbitrary``) and carry the online
softmax state in VMEM scratch: Pallas TPU copies each BlockSpec block into VMEM,
so whole-sequence blocks would not scale. Layouts follow Mosaic's (8, 128)
tiling: arrays are [B, N, T, H] (length and head dim minor); per-row values
(max, sum, lse) are kept lane-replicated [rows, 128] or as a [1, rows] row;
segment ids come pre-broadcast to [T, 128] (lanes) or [8, S] (sublanes).
The dK/dV kernel works on transposed [bk, bq] tiles so its per-query values
are rows, as in ``jax.experimental.pallas.ops.tpu.splash_attention``.

Grouped-query attention is native: the dK/dV grid walks (group member, query
tile) pairs on its ``arbitrary`` axis, accumulating one kv head's gradient.

Tiles hidden by the causal mask or the sliding window are still grid steps,
but they compute nothing (``pl.when``), and their index maps re-point to a
visible tile so no new block is copied in (``clamp_to_range``).

Shapes in names: B, N, K, Tp, Sp, H as in ``flash_attention``; G = N // K.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash_common import (NN_DIMS, NT_DIMS, Config, bias_index_map,
                                         clamp_to_range, dot, dot_precision, in_range,
                                         kv_block_range, positions, q_block_range, scores_tile,
                                         uncap_grad, visible_mask)

LANES, SUBLANES = 128, 8


def _lanes(x_Rx128, width):
  """Widens a lane-replicated [R, 128] value to [R, width]."""
  return jnp.tile(x_Rx128, (1, -(-width // LANES)))[:, :width]


def _masked_scores(q_BqxH, k_BkxH, bias_ref, q_start, kv_start, cfg, q_seg_ref, kv_seg_ref,
                   precision):
  """Scores of a [bq, bk] tile, scaled, capped, biased and masked (float32);
  returns ``(scores, mask, tanh)`` (see ``scores_tile``)."""
  qk_BqxBk = dot(q_BqxH, k_BkxH, NT_DIMS, precision)
  block_kv = qk_BqxBk.shape[1]
  q_seg = kv_seg = None
  if q_seg_ref is not None:
    q_seg = jnp.tile(q_seg_ref[...], (1, block_kv // LANES))  # [bq, bk]
    kv_seg = kv_seg_ref[:1, :]  # [1, bk]
  mask = visible_mask(positions(q_start, qk_BqxBk.shape, 0),
                      positions(kv_start, qk_BqxBk.shape, 1), cfg, q_seg, kv_seg)
  s_BqxBk, tanh_BqxBk = scores_tile(qk_BqxBk, None if bias_ref is None else bias_ref[...],
                                    mask, cfg)
  return s_BqxBk, mask, tanh_BqxBk


def _when_visible(visible, fn):
  """Runs ``fn`` only on tiles the causal mask and window do not hide entirely."""
  if visible is True:
    fn()
  else:
    pl.when(visible)(fn)


def _fwd_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, bias_ref,  # Inputs.
                o_ref, lse_ref,  # Outputs.
                m_scr, l_scr, acc_scr,  # Scratch.
                *, cfg: Config):
  """Grid (B, N, q tiles, kv tiles). q_ref, o_ref [bq, H]; k_ref, v_ref [bk, H];
  q_seg_ref [bq, 128]; kv_seg_ref [8, bk]; bias_ref [bq, bk]; lse_ref, m_scr,
  l_scr [bq, 128]; acc_scr [bq, H]."""
  block_q, head_dim = q_ref.shape
  block_kv = k_ref.shape[0]
  i, j = pl.program_id(2), pl.program_id(3)
  q_start, kv_start = i * block_q, j * block_kv

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  def _step():
    precision = dot_precision(q_ref.dtype)
    s_BqxBk, mask, _ = _masked_scores(q_ref[...], k_ref[...], bias_ref, q_start, kv_start, cfg,
                                      q_seg_ref, kv_seg_ref, precision)
    m_prev, l_prev = m_scr[...], l_scr[...]
    m_next = jnp.maximum(m_prev, s_BqxBk.max(axis=1)[:, None])
    p_BqxBk = jnp.exp(s_BqxBk - _lanes(m_next, block_kv))
    if mask is not None:
      p_BqxBk = jnp.where(mask, p_BqxBk, 0.0)  # Keeps fully masked rows at l == 0.
    alpha = jnp.exp(m_prev - m_next)
    l_scr[...] = alpha * l_prev + p_BqxBk.sum(axis=1)[:, None]
    m_scr[...] = m_next
    v_BkxH = v_ref[...]
    acc_scr[...] = acc_scr[...] * _lanes(alpha, head_dim) + dot(
        p_BqxBk.astype(v_BkxH.dtype), v_BkxH, NN_DIMS, precision)

  _when_visible(True if not cfg.causal else
                in_range(j, kv_block_range(q_start, q_start + block_q, cfg, block_kv)), _step)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    l = l_scr[...]
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc_scr[...] * _lanes(1.0 / l_safe, head_dim)).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m_scr[...] + jnp.log(l_safe))


def _segment_layouts(q_seg_BxTp, kv_seg_BxSp):
  """Segment ids broadcast to Mosaic-friendly 2-D tiles."""
  if q_seg_BxTp is None:
    return None, None, None, None
  b, tp = q_seg_BxTp.shape
  sp = kv_seg_BxSp.shape[1]
  return (jnp.broadcast_to(q_seg_BxTp[:, :, None], (b, tp, LANES)),        # q rows
          jnp.broadcast_to(kv_seg_BxSp[:, None, :], (b, SUBLANES, sp)),    # kv columns
          jnp.broadcast_to(q_seg_BxTp[:, None, :], (b, SUBLANES, tp)),     # q columns
          jnp.broadcast_to(kv_seg_BxSp[:, :, None], (b, sp, LANES)))       # kv rows


def _kv_tile_clamp(cfg, block_q, block_kv):
  """kv tile index for grid step (i, j): tiles past the causal diagonal (or
  before the window) map to the nearest visible one, so Pallas skips their
  (unused) copy into VMEM."""
  if not cfg.causal:
    return lambda i, j: j
  return lambda i, j: clamp_to_range(
      j, kv_block_range(i * block_q, (i + 1) * block_q, cfg, block_kv))


def mosaic_forward(q_BxNxTpxH, k_BxKxSpxH, v_BxKxSpxH, q_seg_BxTp, kv_seg_BxSp,
                   bias_BxNxTpxSp, cfg: Config):
  """Returns (out [B, N, Tp, H], lse [B, N, Tp] float32)."""
  b, n, tp, h = q_BxNxTpxH.shape
  sp = k_BxKxSpxH.shape[2]
  bq, bk, g = cfg.blocks.block_q, cfg.blocks.block_kv, cfg.num_kv_groups
  q_seg_rows, kv_seg_cols, _, _ = _segment_layouts(q_seg_BxTp, kv_seg_BxSp)
  kv_j = _kv_tile_clamp(cfg, bq, bk)
  in_specs = [
      pl.BlockSpec((None, None, bq, h), lambda bi, ni, i, j: (bi, ni, i, 0)),
      pl.BlockSpec((None, None, bk, h), lambda bi, ni, i, j: (bi, lax.div(ni, g), kv_j(i, j), 0)),
      pl.BlockSpec((None, None, bk, h), lambda bi, ni, i, j: (bi, lax.div(ni, g), kv_j(i, j), 0)),
      None if q_seg_rows is None else pl.BlockSpec(
          (None, bq, LANES), lambda bi, ni, i, j: (bi, i, 0)),
      None if kv_seg_cols is None else pl.BlockSpec(
          (None, SUBLANES, bk), lambda bi, ni, i, j: (bi, 0, kv_j(i, j))),
      None if bias_BxNxTpxSp is None else pl.BlockSpec(
          (None, None, bq, bk), bias_index_map(
              bias_BxNxTpxSp.shape, lambda bi, ni, i, j: (bi, ni, i, kv_j(i, j)))),
  ]
  out_specs = [pl.BlockSpec((None, None, bq, h), lambda bi, ni, i, j: (bi, ni, i, 0)),
               pl.BlockSpec((None, None, bq, LANES), lambda bi, ni, i, j: (bi, ni, i, 0))]
  out_shape = [jax.ShapeDtypeStruct(q_BxNxTpxH.shape, q_BxNxTpxH.dtype),
               jax.ShapeDtypeStruct((b, n, tp, LANES), jnp.float32)]
  out, lse_BxNxTpx128 = pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg),
      grid=(b, n, tp // bq, sp // bk), in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                      pltpu.VMEM((bq, h), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=cfg.interpret, name="flash_attention_fwd",
  )(q_BxNxTpxH, k_BxKxSpxH, v_BxKxSpxH, q_seg_rows, kv_seg_cols, bias_BxNxTpxSp)
  return out, lse_BxNxTpx128[..., 0]


def _dkv_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, bias_ref, do_ref, lse_ref,
                delta_ref,  # Inputs.
                dk_ref, dv_ref,  # Outputs.
                dk_scr, dv_scr,  # Scratch.
                *, cfg: Config, num_q_blocks: int):
  """Grid (B, K, kv tiles, G * q tiles), on transposed [bk, bq] tiles.
  q_ref, do_ref [bq, H]; k_ref, v_ref, dk_ref, dv_ref, scratch [bk, H];
  q_seg_ref [8, bq]; kv_seg_ref [bk, 128]; bias_ref [bq, bk]; lse_ref,
  delta_ref [8, bq]."""
  block_q = q_ref.shape[0]
  block_kv = k_ref.shape[0]
  j, t = pl.program_id(2), pl.program_id(3)
  i = lax.rem(t, num_q_blocks)
  q_start, kv_start = i * block_q, j * block_kv

  @pl.when(t == 0)
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  def _step():
    precision = dot_precision(q_ref.dtype)
    q_BqxH, k_BkxH, v_BkxH, do_BqxH = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    qk_BkxBq = dot(k_BkxH, q_BqxH, NT_DIMS, precision)
    q_seg = kv_seg = None
    if q_seg_ref is not None:
      q_seg = q_seg_ref[:1, :]  # [1, bq]
      kv_seg = jnp.tile(kv_seg_ref[...], (1, block_q // LANES))  # [bk, bq]
    mask = visible_mask(positions(q_start, qk_BkxBq.shape, 1),
                        positions(kv_start, qk_BkxBq.shape, 0), cfg, q_seg, kv_seg)
    s_BkxBq, tanh_BkxBq = scores_tile(
        qk_BkxBq, None if bias_ref is None else bias_ref[...].T, mask, cfg)
    p_BkxBq = jnp.exp(s_BkxBq - lse_ref[:1, :])  # Masked: exactly 0.
    dv_scr[...] += dot(p_BkxBq.astype(do_BqxH.dtype), do_BqxH, NN_DIMS, precision)
    dp_BkxBq = dot(v_BkxH, do_BqxH, NT_DIMS, precision)
    ds_BkxBq = uncap_grad(p_BkxBq * (dp_BkxBq - delta_ref[:1, :]), tanh_BkxBq)
    dk_scr[...] += dot(ds_BkxBq.astype(q_BqxH.dtype), q_BqxH, NN_DIMS, precision)

  _when_visible(True if not cfg.causal else
                in_range(i, q_block_range(kv_start, kv_start + block_kv, cfg, block_q)), _step)

  @pl.when(t == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = (dk_scr[...] * cfg.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, bias_ref, do_ref, lse_ref,
               delta_ref,  # Inputs.
               dq_ref, *rest,  # Outputs (dq, optional dbias) and scratch.
               cfg: Config):
  """Grid (B, N, q tiles, kv tiles). q_ref, do_ref, dq_ref [bq, H]; k_ref,
  v_ref [bk, H]; q_seg_ref [bq, 128]; kv_seg_ref [8, bk]; bias_ref, dbias_ref
  [bq, bk]; lse_ref, delta_ref [1, bq]; dq_scr [bq, H]."""
  dbias_ref, dq_scr = rest if len(rest) == 2 else (None, rest[0])
  block_q = q_ref.shape[0]
  block_kv = k_ref.shape[0]
  i, j = pl.program_id(2), pl.program_id(3)
  q_start, kv_start = i * block_q, j * block_kv

  @pl.when(j == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  def _step():
    precision = dot_precision(q_ref.dtype)
    k_BkxH = k_ref[...]
    s_BqxBk, _, tanh_BqxBk = _masked_scores(q_ref[...], k_BkxH, bias_ref, q_start, kv_start,
                                            cfg, q_seg_ref, kv_seg_ref, precision)
    lse_Bqx1 = jnp.expand_dims(lse_ref[0], -1)
    delta_Bqx1 = jnp.expand_dims(delta_ref[0], -1)
    p_BqxBk = jnp.exp(s_BqxBk - lse_Bqx1)
    dp_BqxBk = dot(do_ref[...], v_ref[...], NT_DIMS, precision)
    ds_BqxBk = p_BqxBk * (dp_BqxBk - delta_Bqx1)
    if dbias_ref is not None:
      dbias_ref[...] = ds_BqxBk.astype(dbias_ref.dtype)  # The bias is added after the cap.
    ds_BqxBk = uncap_grad(ds_BqxBk, tanh_BqxBk)
    dq_scr[...] += dot(ds_BqxBk.astype(k_BkxH.dtype), k_BkxH, NN_DIMS, precision)

  if cfg.causal:
    visible = in_range(j, kv_block_range(q_start, q_start + block_q, cfg, block_kv))
    pl.when(visible)(_step)
    if dbias_ref is not None:
      @pl.when(jnp.logical_not(visible))
      def _zero_bias_grad():
        dbias_ref[...] = jnp.zeros(dbias_ref.shape, dbias_ref.dtype)
  else:
    _step()

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (dq_scr[...] * cfg.sm_scale).astype(dq_ref.dtype)


def mosaic_backward(q_BxNxTpxH, k_BxKxSpxH, v_BxKxSpxH, q_seg_BxTp, kv_seg_BxSp, bias,
                    out_BxNxTpxH, lse_BxNxTp, do_BxNxTpxH, cfg: Config):
  """Returns (dq, dk, dv, dbias [B, N, Tp, Sp] float32 or None)."""
  b, n, tp, h = q_BxNxTpxH.shape
  kv_heads, sp = k_BxKxSpxH.shape[1], k_BxKxSpxH.shape[2]
  g = cfg.num_kv_groups
  bq, bk = cfg.blocks.block_q_bwd, cfg.blocks.block_kv_bwd
  nq = tp // bq
  delta_BxNxTp = jnp.einsum("bnth,bnth->bnt", out_BxNxTpxH.astype(jnp.float32),
                            do_BxNxTpxH.astype(jnp.float32))
  q_seg_rows, kv_seg_cols, q_seg_cols, kv_seg_rows = _segment_layouts(q_seg_BxTp, kv_seg_BxSp)
  as_cols = lambda x: jnp.broadcast_to(x[:, :, None, :], (b, n, SUBLANES, tp))

  # dK/dV: grid (B, K, kv tiles, G * q tiles); step t reads query head
  # kh * G + t // nq, query tile t % nq (clamped to the tiles that see kv tile j).
  def q_tile_of(j, t):
    i = lax.rem(t, nq)
    if not cfg.causal:
      return i
    return clamp_to_range(i, q_block_range(j * bk, (j + 1) * bk, cfg, bq))
  q_head = lambda ki, t: ki * g + lax.div(t, nq)
  q_spec = pl.BlockSpec((None, None, bq, h),
                        lambda bi, ki, j, t: (bi, q_head(ki, t), q_tile_of(j, t), 0))
  kv_spec = pl.BlockSpec((None, None, bk, h), lambda bi, ki, j, t: (bi, ki, j, 0))
  col_spec = pl.BlockSpec((None, None, SUBLANES, bq),
                          lambda bi, ki, j, t: (bi, q_head(ki, t), 0, q_tile_of(j, t)))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg, num_q_blocks=nq),
      grid=(b, kv_heads, sp // bk, g * nq),
      in_specs=[
          q_spec, kv_spec, kv_spec,
          None if q_seg_cols is None else pl.BlockSpec(
              (None, SUBLANES, bq), lambda bi, ki, j, t: (bi, 0, q_tile_of(j, t))),
          None if kv_seg_rows is None else pl.BlockSpec(
              (None, bk, LANES), lambda bi, ki, j, t: (bi, j, 0)),
          None if bias is None else pl.BlockSpec((None, None, bq, bk), bias_index_map(
              bias.shape, lambda bi, ki, j, t: (bi, q_head(ki, t), q_tile_of(j, t), j))),
          q_spec, col_spec, col_spec],
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k_BxKxSpxH.shape, k_BxKxSpxH.dtype)] * 2,
      scratch_shapes=[pltpu.VMEM((bk, h), jnp.float32)] * 2,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=cfg.interpret, name="flash_attention_dkv",
  )(q_BxNxTpxH, k_BxKxSpxH, v_BxKxSpxH, q_seg_cols, kv_seg_rows, bias, do_BxNxTpxH,
    as_cols(lse_BxNxTp), as_cols(delta_BxNxTp))

  # dQ (+ dBias): grid (B, N, q tiles, kv tiles).
  kv_j = _kv_tile_clamp(cfg, bq, bk)
  q_spec = pl.BlockSpec((None, None, bq, h), lambda bi, ni, i, j: (bi, ni, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, h),
                         lambda bi, ni, i, j: (bi, lax.div(ni, g), kv_j(i, j), 0))
  row_spec = pl.BlockSpec((None, None, 1, bq), lambda bi, ni, i, j: (bi, ni, 0, i))
  out_specs = [q_spec]
  out_shape = [jax.ShapeDtypeStruct(q_BxNxTpxH.shape, q_BxNxTpxH.dtype)]
  if bias is not None:
    out_specs.append(pl.BlockSpec((None, None, bq, bk), lambda bi, ni, i, j: (bi, ni, i, j)))
    out_shape.append(jax.ShapeDtypeStruct((b, n, tp, sp), jnp.float32))
  dq, *dbias = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg),
      grid=(b, n, nq, sp // bk),
      in_specs=[
          q_spec, kv_spec, kv_spec,
          None if q_seg_rows is None else pl.BlockSpec(
              (None, bq, LANES), lambda bi, ni, i, j: (bi, i, 0)),
          None if kv_seg_cols is None else pl.BlockSpec(
              (None, SUBLANES, bk), lambda bi, ni, i, j: (bi, 0, kv_j(i, j))),
          None if bias is None else pl.BlockSpec((None, None, bq, bk), bias_index_map(
              bias.shape, lambda bi, ni, i, j: (bi, ni, i, kv_j(i, j)))),
          q_spec, row_spec, row_spec],
      out_specs=out_specs, out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((bq, h), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=cfg.interpret, name="flash_attention_dq",
  )(q_BxNxTpxH, k_BxKxSpxH, v_BxKxSpxH, q_seg_rows, kv_seg_cols, bias, do_BxNxTpxH,
    lse_BxNxTp[:, :, None, :], delta_BxNxTp[:, :, None, :])
  return dq, dk, dv, (dbias[0] if dbias else None)
