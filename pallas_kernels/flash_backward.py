"""Triton (GPU) backward kernels for flash attention: dK/dV and dQ (+ dBias).

Both recompute the probabilities of a tile from the saved log-sum-exp,
``p = exp(s - lse)``, and use ``delta = rowsum(out * d_out)`` so that
``ds = p * (dp - delta)`` with ``dp = d_out @ v.T`` is the gradient of the
(scaled, capped, biased) scores; with a soft cap, ``uncap_grad`` chains it
through the tanh before it reaches q and k (the bias gradient is ``ds``
itself). Two kernels, not one fused one, so that neither
needs atomic adds: the dK/dV kernel owns a kv tile and loops over query
tiles; the dQ kernel owns a query tile and loops over kv tiles (and writes
``ds`` itself as the bias gradient). Both loop only over the tiles that the
causal mask and the sliding window leave visible.

Shapes in names as in ``flash_attention``: B, Tp, Sp, N, K, H; G = N // K.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash_common import (NN_DIMS, NT_DIMS, TN_DIMS, Config, bias_index_map,
                                         dot, dot_precision, kv_block_range, positions,
                                         q_block_range, scores_tile, uncap_grad, visible_mask)


def _scores(q_BqxH, k_BkxH, bias_ref, bias_index, q_start, kv_start, cfg, q_seg, kv_seg,
            precision):
  """Scores of one [bq, bk] tile as the forward saw them, and the soft cap's
  tanh (see ``scores_tile``)."""
  qk_BqxBk = dot(q_BqxH, k_BkxH, NT_DIMS, precision)
  mask = visible_mask(positions(q_start, qk_BqxBk.shape, 0),
                      positions(kv_start, qk_BqxBk.shape, 1), cfg, q_seg, kv_seg)
  bias = None if bias_ref is None else bias_ref[bias_index]
  return scores_tile(qk_BqxBk, bias, mask, cfg)


def _dkv_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, bias_ref, do_ref, lse_ref,
                delta_ref,  # Inputs.
                dk_ref, dv_ref,  # Outputs.
                *, cfg: Config):
  """k_ref, v_ref, dk_ref, dv_ref [bk, H]; q_ref, do_ref [Tp, H]; q_seg_ref,
  lse_ref, delta_ref [Tp]; kv_seg_ref [bk]; bias_ref [Tp, bk]."""
  block_kv, head_dim = k_ref.shape
  block_q = cfg.blocks.block_q_bwd
  precision = dot_precision(q_ref.dtype)
  kv_start = pl.program_id(0) * block_kv
  k_BkxH, v_BkxH = k_ref[...], v_ref[...]
  kv_seg_1xBk = None if kv_seg_ref is None else kv_seg_ref[...][None, :]

  def body(i, carry):
    dk_BkxH, dv_BkxH = carry
    q_start = i * block_q
    q_slice = pl.ds(q_start, block_q)
    q_BqxH = q_ref[q_slice, :]
    q_seg_Bqx1 = None if q_seg_ref is None else q_seg_ref[q_slice][:, None]
    s_BqxBk, tanh_BqxBk = _scores(q_BqxH, k_BkxH, bias_ref, (q_slice, slice(None)), q_start,
                                  kv_start, cfg, q_seg_Bqx1, kv_seg_1xBk, precision)
    # Masked scores sit at MASK_VALUE, so exp underflows to exactly 0; rows
    # with no visible key have lse = inf and give 0 too.
    p_BqxBk = jnp.exp(s_BqxBk - lse_ref[q_slice][:, None])
    do_BqxH = do_ref[q_slice, :]
    dv_BkxH = dv_BkxH + dot(p_BqxBk.astype(do_BqxH.dtype), do_BqxH, TN_DIMS, precision)
    dp_BqxBk = dot(do_BqxH, v_BkxH, NT_DIMS, precision)
    ds_BqxBk = uncap_grad(p_BqxBk * (dp_BqxBk - delta_ref[q_slice][:, None]), tanh_BqxBk)
    dk_BkxH = dk_BkxH + dot(ds_BqxBk.astype(q_BqxH.dtype), q_BqxH, TN_DIMS, precision)
    return dk_BkxH, dv_BkxH

  zeros = jnp.zeros((block_kv, head_dim), jnp.float32)
  # Causal: query tiles above the diagonal cannot see this kv tile; with a
  # sliding window, neither can those that have moved past it.
  first_q, end_q = q_block_range(kv_start, kv_start + block_kv, cfg, block_q)
  dk_BkxH, dv_BkxH = lax.fori_loop(first_q, end_q, body, (zeros, zeros))
  dk_ref[...] = (dk_BkxH * cfg.sm_scale).astype(dk_ref.dtype)
  dv_ref[...] = dv_BkxH.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, bias_ref, do_ref, lse_ref,
               delta_ref,  # Inputs.
               dq_ref, dbias_ref,  # Outputs.
               *, cfg: Config):
  """q_ref, do_ref, dq_ref [bq, H]; k_ref, v_ref [Sp, H]; q_seg_ref, lse_ref,
  delta_ref [bq]; kv_seg_ref [Sp]; bias_ref, dbias_ref [bq, Sp]."""
  block_q, head_dim = q_ref.shape
  block_kv = cfg.blocks.block_kv_bwd
  precision = dot_precision(q_ref.dtype)
  q_start = pl.program_id(0) * block_q
  q_BqxH, do_BqxH = q_ref[...], do_ref[...]
  lse_Bqx1, delta_Bqx1 = lse_ref[...][:, None], delta_ref[...][:, None]
  q_seg_Bqx1 = None if q_seg_ref is None else q_seg_ref[...][:, None]

  def body(j, dq_BqxH):
    kv_start = j * block_kv
    kv_slice = pl.ds(kv_start, block_kv)
    k_BkxH = k_ref[kv_slice, :]
    kv_seg_1xBk = None if kv_seg_ref is None else kv_seg_ref[kv_slice][None, :]
    s_BqxBk, tanh_BqxBk = _scores(q_BqxH, k_BkxH, bias_ref, (slice(None), kv_slice), q_start,
                                  kv_start, cfg, q_seg_Bqx1, kv_seg_1xBk, precision)
    p_BqxBk = jnp.exp(s_BqxBk - lse_Bqx1)
    dp_BqxBk = dot(do_BqxH, v_ref[kv_slice, :], NT_DIMS, precision)
    ds_BqxBk = p_BqxBk * (dp_BqxBk - delta_Bqx1)
    if dbias_ref is not None:
      dbias_ref[:, kv_slice] = ds_BqxBk.astype(dbias_ref.dtype)
    ds_BqxBk = uncap_grad(ds_BqxBk, tanh_BqxBk)
    return dq_BqxH + dot(ds_BqxBk.astype(k_BkxH.dtype), k_BkxH, NN_DIMS, precision)

  first_kv, end_kv = kv_block_range(q_start, q_start + block_q, cfg, block_kv)
  dq_BqxH = lax.fori_loop(first_kv, end_kv, body, jnp.zeros((block_q, head_dim), jnp.float32))
  if dbias_ref is not None and cfg.causal:
    # Tiles the loop skipped (before the window, after the diagonal) still
    # need their (zero) bias gradient.
    def zero_tile(j, carry):
      dbias_ref[:, pl.ds(j * block_kv, block_kv)] = jnp.zeros(
          (block_q, block_kv), dbias_ref.dtype)
      return carry
    if cfg.window:
      lax.fori_loop(0, jnp.minimum(first_kv, end_kv), zero_tile, 0)
    lax.fori_loop(end_kv, cfg.kv_len_padded // block_kv, zero_tile, 0)
  dq_ref[...] = (dq_BqxH * cfg.sm_scale).astype(dq_ref.dtype)


def triton_backward(q_BxTpxNxH, k_BxSpxKxH, v_BxSpxKxH, q_seg_BxTp, kv_seg_BxSp,
                    bias, out_BxTpxNxH, lse_BxNxTp, do_BxTpxNxH, cfg: Config):
  """Returns (dq, dk, dv, dbias [B, N, Tp, Sp] float32 or None)."""
  b, tp, n, h = q_BxTpxNxH.shape
  sp, kv_heads = k_BxSpxKxH.shape[1], k_BxSpxKxH.shape[2]
  g = cfg.num_kv_groups
  bq, bk = cfg.blocks.block_q_bwd, cfg.blocks.block_kv_bwd
  delta_BxNxTp = jnp.einsum("btnh,btnh->bnt", out_BxTpxNxH.astype(jnp.float32),
                            do_BxTpxNxH.astype(jnp.float32))
  compiler_params = plgpu.CompilerParams(num_warps=4 if h <= 64 else 8, num_stages=2)
  args = (q_BxTpxNxH, k_BxSpxKxH, v_BxSpxKxH, q_seg_BxTp, kv_seg_BxSp, bias, do_BxTpxNxH,
          lse_BxNxTp, delta_BxNxTp)

  # dK/dV: grid (kv tiles, B, N). With grouped-query attention each query
  # head writes its own float32 partial dK/dV, summed over the group below:
  # simpler than looping over the group in-kernel, at G x the transient memory.
  whole_q = pl.BlockSpec((None, tp, None, h), lambda j, bi, ni: (bi, 0, ni, 0))
  kv_tile = pl.BlockSpec((None, bk, None, h), lambda j, bi, ni: (bi, j, lax.div(ni, g), 0))
  row_whole = pl.BlockSpec((None, None, tp), lambda j, bi, ni: (bi, ni, 0))
  dkv_dtype = jnp.float32 if g > 1 else k_BxSpxKxH.dtype
  dkv_out = pl.BlockSpec((None, bk, None, h), lambda j, bi, ni: (bi, j, ni, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg),
      grid=(sp // bk, b, n),
      in_specs=[
          whole_q, kv_tile, kv_tile,
          None if q_seg_BxTp is None else pl.BlockSpec((None, tp), lambda j, bi, ni: (bi, 0)),
          None if kv_seg_BxSp is None else pl.BlockSpec((None, bk), lambda j, bi, ni: (bi, j)),
          None if bias is None else pl.BlockSpec(
              (None, None, tp, bk), bias_index_map(bias.shape, lambda j, bi, ni: (bi, ni, 0, j))),
          whole_q, row_whole, row_whole],
      out_specs=[dkv_out, dkv_out],
      out_shape=[jax.ShapeDtypeStruct((b, sp, n, h), dkv_dtype)] * 2,
      compiler_params=compiler_params, interpret=cfg.interpret, name="flash_attention_dkv",
  )(*args)
  if g > 1:
    group_sum = lambda x: x.reshape(b, sp, kv_heads, g, h).sum(axis=3).astype(k_BxSpxKxH.dtype)
    dk, dv = group_sum(dk), group_sum(dv)

  # dQ (+ dBias): grid (q tiles, B, N).
  q_tile = pl.BlockSpec((None, bq, None, h), lambda i, bi, ni: (bi, i, ni, 0))
  whole_kv = pl.BlockSpec((None, sp, None, h), lambda i, bi, ni: (bi, 0, lax.div(ni, g), 0))
  row_tile = pl.BlockSpec((None, None, bq), lambda i, bi, ni: (bi, ni, i))
  out_specs = [q_tile]
  out_shape = [jax.ShapeDtypeStruct(q_BxTpxNxH.shape, q_BxTpxNxH.dtype)]
  if bias is not None:
    out_specs.append(pl.BlockSpec((None, None, bq, sp), lambda i, bi, ni: (bi, ni, i, 0)))
    out_shape.append(jax.ShapeDtypeStruct((b, n, tp, sp), jnp.float32))
  dq, *dbias = pl.pallas_call(
      functools.partial(_dq_kernel_maybe_bias, cfg=cfg, has_bias=bias is not None),
      grid=(tp // bq, b, n),
      in_specs=[
          q_tile, whole_kv, whole_kv,
          None if q_seg_BxTp is None else pl.BlockSpec((None, bq), lambda i, bi, ni: (bi, i)),
          None if kv_seg_BxSp is None else pl.BlockSpec((None, sp), lambda i, bi, ni: (bi, 0)),
          None if bias is None else pl.BlockSpec(
              (None, None, bq, sp), bias_index_map(bias.shape, lambda i, bi, ni: (bi, ni, i, 0))),
          q_tile, row_tile, row_tile],
      out_specs=out_specs, out_shape=out_shape,
      compiler_params=compiler_params, interpret=cfg.interpret, name="flash_attention_dq",
  )(*args)
  return dq, dk, dv, (dbias[0] if dbias else None)


def _dq_kernel_maybe_bias(*refs, cfg: Config, has_bias: bool):
  """Adapts the output list: without a bias there is no dBias output ref."""
  if has_bias:
    return _dq_kernel(*refs, cfg=cfg)
  return _dq_kernel(*refs, None, cfg=cfg)
