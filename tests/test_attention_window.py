"""Sliding-window attention and attention-logit soft-capping (Mistral, Gemma 2).

The reference is first checked against a brute-force numpy loop, then both
kernel families (``triton`` and ``mosaic``, in Pallas' interpreter) against
the reference, forward and gradients. Block skipping is checked twice: the
loop bounds are tight (no visible tile skipped, no hidden one visited), and
the kernels really skip: NaNs planted in tiles the window hides never reach
the rows that must not see them, whereas any computation on those tiles
(even fully masked: 0 * NaN = NaN) would spread them.
"""
import dataclasses
import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigmodel.models.attention import _cudnn_attention, dot_product_attention
from pallas_kernels import BlockSizes, attention_mask, attention_reference, flash_attention
from pallas_kernels.flash_common import Config, kv_block_range, q_block_range
from test_attention import F32_TOL, _max_err, _segments, _value_and_grads

BACKENDS = ["triton", "mosaic"]
# Per backend: a length that is not a multiple of the tiles, a window several
# tiles shorter than it (so whole tiles are skipped), and small unequal tiles
# (Mosaic's minimum is 128).
SETUPS = {
    "triton": dict(length=90, window=20, blocks=BlockSizes(block_q=32, block_kv=16,
                                                           block_q_bwd=16, block_kv_bwd=32)),
    "mosaic": dict(length=300, window=100, blocks=BlockSizes(block_q=128, block_kv=128,
                                                             block_q_bwd=128, block_kv_bwd=128)),
}
SOFTCAP = 2.0  # Scores here are ~N(0, 1): a cap of 2 bends them noticeably.


def _normal(seed, *shape):
  # numpy, not jax.random: eager jax.random compiles anew for every shape.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _qkv(b, t, s, n, kv_heads, h, seed=0):
  """q [B, T, N, H], k and v [B, S, K, H], and an output cotangent [B, T, N, H]."""
  return (_normal(seed, b, t, n, h), _normal(seed + 100, b, s, kv_heads, h),
          _normal(seed + 200, b, s, kv_heads, h), _normal(seed + 300, b, t, n, h))


def _kernel(backend):
  return functools.partial(flash_attention, backend=backend, interpret=True,
                           block_sizes=SETUPS[backend]["blocks"])


def _impl(name):
  return attention_reference if name == "reference" else _kernel(name)


# ---------------------------------------------------------------------------
# The oracle itself.


def _brute_force(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, *, window, softcap, bias_BxNxTxS,
                 q_seg_BxT, kv_seg_BxS):
  """float64 attention one query at a time, over the keys it may see:
  j <= i + o and (i + o) - j < window (Hugging Face's q_idx - kv_idx <
  sliding_window, with the causal offset o = S - T), in the same segment."""
  q, k, v = (np.asarray(x, np.float64) for x in (q_BxTxNxH, k_BxSxKxH, v_BxSxKxH))
  bias = np.asarray(bias_BxNxTxS, np.float64)
  b, t, n, h = q.shape
  s, group = k.shape[1], n // k.shape[2]
  out = np.zeros_like(q)
  for bi in range(b):
    for i in range(t):
      pos = i + s - t
      keys = [j for j in range(s) if j <= pos and pos - j < window
              and kv_seg_BxS[bi, j] != 0 and kv_seg_BxS[bi, j] == q_seg_BxT[bi, i]]
      if not keys:
        continue  # No visible key: zeros.
      for ni in range(n):
        scores = k[bi, keys, ni // group] @ q[bi, i, ni] * h ** -0.5
        if softcap:
          scores = softcap * np.tanh(scores / softcap)
        scores = scores + bias[0, ni, i, keys]
        p = np.exp(scores - scores.max())
        out[bi, i, ni] = p @ v[bi, keys, ni // group] / p.sum()
  return out


@pytest.mark.parametrize("t,s,window", [(16, 16, 1), (16, 16, 5), (10, 24, 4), (24, 10, 3)],
                         ids=["w1", "w5", "decode_t_lt_s", "t_gt_s"])
@pytest.mark.parametrize("softcap", [0.0, SOFTCAP], ids=["nocap", "cap"])
def test_reference_matches_brute_force(t, s, window, softcap):
  q, k, v, _ = _qkv(2, t, s, 4, 2, 8, seed=1)
  rng = np.random.default_rng(1)
  q_seg = np.asarray(_segments(rng, 2, t, 2, pad=2))
  kv_seg = q_seg if t == s else np.asarray(_segments(rng, 2, s, 2, pad=2))
  bias = _normal(2, 1, 4, t, s)
  reference = jax.jit(functools.partial(attention_reference, causal=True, window=window,
                                        softcap=softcap))
  got = reference(q, k, v, bias_BxNxTxS=bias, q_segment_ids_BxT=jnp.asarray(q_seg),
                  kv_segment_ids_BxS=jnp.asarray(kv_seg))
  want = _brute_force(q, k, v, window=window, softcap=softcap, bias_BxNxTxS=bias,
                      q_seg_BxT=q_seg, kv_seg_BxS=kv_seg)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_mask_is_hugging_face_sliding_window():
  """T == S: exactly q_idx - kv_idx < window together with kv_idx <= q_idx."""
  q_idx, kv_idx = np.arange(12)[:, None], np.arange(12)[None, :]
  for window in (1, 3, 11, 12, 40):
    want = (kv_idx <= q_idx) & (q_idx - kv_idx < window)
    np.testing.assert_array_equal(attention_mask(12, 12, causal=True, window=window)[0, 0], want)


# ---------------------------------------------------------------------------
# Kernels against the reference.


def _case(backend, name):
  """(q, k, v), keyword arguments and output cotangent of one named case."""
  length, window = SETUPS[backend]["length"], SETUPS[backend]["window"]
  t = s = length
  if name == "window_decoding":
    t = length // 3  # The query block sits at the end: offset S - T > 0.
  elif name == "window_q_longer":
    s = length // 2  # Offset < 0: the first T - S queries see nothing.
  q, k, v, cotangent = _qkv(2, t, s, 4, 2, 16)
  kwargs = dict(causal=True, window=window)
  if name == "softcap":
    kwargs = dict(softcap=SOFTCAP)  # Not causal: the cap alone.
  elif name == "window_softcap_segments_bias":
    # Packed rows with padding, and a per-batch bias (its gradient includes
    # the zero tiles the window skips).
    ids = _segments(np.random.default_rng(0), 2, t, 3, pad=t // 10)
    kwargs.update(softcap=SOFTCAP, q_segment_ids_BxT=ids, kv_segment_ids_BxS=ids,
                  bias_BxNxTxS=_normal(7, 2, 4, t, s))
  return (q, k, v), kwargs, cotangent


CASES = ["window", "softcap", "window_softcap_segments_bias", "window_decoding",
         "window_q_longer"]


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_matches_reference(backend, name):
  """Output and dq, dk, dv (and dbias) in float32; GQA 4 -> 2 heads throughout."""
  qkv, kwargs, cotangent = _case(backend, name)
  got = _value_and_grads(_kernel(backend), qkv, kwargs, cotangent, jnp.float32)
  want = _value_and_grads(attention_reference, qkv, kwargs, cotangent, jnp.float32)
  for what, g, w in zip(["out", "dq", "dk", "dv", "dbias"], got, want):
    tol = F32_TOL["out" if what == "out" else "grads"] * max(1.0, np.abs(w).max())
    assert _max_err(g, w) <= tol, (what, _max_err(g, w), tol)


@pytest.mark.parametrize("impl", ["reference", *BACKENDS])
def test_keys_beyond_the_window_change_nothing(impl):
  """Rewriting k and v wherever the window hides them from queries i >= i0
  leaves those rows' outputs and dq bit-for-bit unchanged."""
  setup = SETUPS["triton" if impl == "reference" else impl]
  length, window = setup["length"], setup["window"]
  i0 = 2 * length // 3  # Mid-tile: its tile also holds rows that see the change.
  hidden = i0 - window + 1  # Keys [0, hidden) are out of reach for every i >= i0.
  q, k, v, cotangent = _qkv(1, length, length, 4, 2, 16, seed=3)
  noise_k, noise_v = (10.0 * _normal(seed, *k.shape) for seed in (4, 5))
  k2 = k.at[:, :hidden].add(noise_k[:, :hidden])
  v2 = v.at[:, :hidden].add(noise_v[:, :hidden])
  attention = functools.partial(_impl(impl), causal=True, window=window, softcap=SOFTCAP)

  @jax.jit
  def out_and_dq(k, v):
    out, vjp = jax.vjp(lambda q: attention(q, k, v), q)
    return out, vjp(cotangent)[0]

  (out, dq), (out2, dq2) = out_and_dq(k, v), out_and_dq(k2, v2)
  np.testing.assert_array_equal(out[:, i0:], out2[:, i0:])
  np.testing.assert_array_equal(dq[:, i0:], dq2[:, i0:])
  assert not np.allclose(out[:, :i0], out2[:, :i0])  # The rewrite is visible before i0.


@pytest.mark.parametrize("impl", ["reference", *BACKENDS])
def test_wide_window_and_huge_cap_change_nothing(impl):
  """window = S (no query is S keys past another) is no window, exactly;
  softcap >> |scores| is no cap, nearly."""
  length = SETUPS["triton" if impl == "reference" else impl]["length"]
  q, k, v, _ = _qkv(1, length, length, 4, 2, 16, seed=6)
  attention = jax.jit(_impl(impl), static_argnames=("causal", "window", "softcap"))
  plain = attention(q, k, v, causal=True)
  np.testing.assert_array_equal(attention(q, k, v, causal=True, window=length), plain)
  np.testing.assert_allclose(attention(q, k, v, causal=True, softcap=1e4), plain, atol=1e-5)


# ---------------------------------------------------------------------------
# Block skipping.


def _config(t, s, window, block_q, block_kv):
  blocks = BlockSizes(block_q=block_q, block_kv=block_kv, block_q_bwd=block_q,
                      block_kv_bwd=block_kv)
  return Config(backend="triton", causal=True, window=window, softcap=0.0, sm_scale=1.0,
                q_len=t, kv_len=s, q_len_padded=t, kv_len_padded=s, num_kv_groups=1,
                blocks=blocks, mask_kv_tail=False, interpret=True)


@pytest.mark.parametrize("t,s,window,block_q,block_kv", [
    (256, 256, 40, 32, 32), (256, 256, 1, 16, 32), (256, 256, 100, 64, 16),
    (64, 256, 40, 32, 16), (256, 128, 20, 32, 64)])
def test_block_ranges_are_tight(t, s, window, block_q, block_kv):
  """``kv_block_range`` / ``q_block_range`` give exactly the tiles holding a
  visible (query, key) pair under the reference mask: none missed, none extra."""
  cfg = _config(t, s, window, block_q, block_kv)
  visible = np.asarray(attention_mask(t, s, causal=True, window=window)[0, 0])
  tiles = visible.reshape(t // block_q, block_q, s // block_kv, block_kv).any(axis=(1, 3))
  skipped_before_window = 0
  for i, row in enumerate(tiles):
    first, end = (int(x) for x in kv_block_range(i * block_q, (i + 1) * block_q, cfg, block_kv))
    seen = np.flatnonzero(row)
    assert (first, end) == (seen[0], seen[-1] + 1) if seen.size else first >= end
    skipped_before_window += first if seen.size else 0
  for j, col in enumerate(tiles.T):
    first, end = (int(x) for x in q_block_range(j * block_kv, (j + 1) * block_kv, cfg, block_q))
    seen = np.flatnonzero(col)
    assert (first, end) == (seen[0], seen[-1] + 1) if seen.size else first >= end
  assert skipped_before_window > 0  # The window, not just causality, skipped tiles.


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernels_skip_tiles_outside_the_window(backend):
  """NaN in tiles no late (early) query may see stays out of those rows'
  output and dq (those keys' dk and dv): the forward, dQ and dK/dV kernels
  never touch the hidden tiles. The reference, which computes every tile,
  shows the NaNs would spread (p = 0 but 0 * NaN = NaN)."""
  blocks = SETUPS[backend]["blocks"]
  tile = max(dataclasses.astuple(blocks))  # Larger than every forward and backward tile.
  length, window = 4 * tile, tile - 3  # Each query tile sees at most two kv tiles.
  q, k, v, cotangent = _qkv(1, length, length, 2, 1, 16, seed=8)

  def out_and_grads(attention):
    """(q, k, v) -> (out, dq, dk, dv), compiled once."""
    attention = functools.partial(attention, causal=True, window=window, softcap=SOFTCAP)

    @jax.jit
    def run(q, k, v):
      out, vjp = jax.vjp(attention, q, k, v)
      return (out, *vjp(cotangent))
    return run
  kernel = out_and_grads(_kernel(backend))

  # NaN keys and values in the first tile: queries from 2 tiles on never see them.
  poisoned_kv = [x.at[:, :tile].set(jnp.nan) for x in (k, v)]
  out, dq, _, _ = kernel(q, *poisoned_kv)
  assert np.isfinite(out[:, 2 * tile:]).all() and np.isfinite(dq[:, 2 * tile:]).all()
  assert np.isnan(out[:, :tile]).any()  # The poison is live where the tile is visible.
  ref_out, ref_dq, _, _ = out_and_grads(attention_reference)(q, *poisoned_kv)
  assert np.isnan(ref_out[:, 2 * tile:]).all() and np.isnan(ref_dq[:, 2 * tile:]).all()

  # NaN queries in the last tile: keys in the first two tiles are out of their reach.
  _, _, dk, dv = kernel(q.at[:, -tile:].set(jnp.nan), k, v)
  assert np.isfinite(dk[:, :2 * tile]).all() and np.isfinite(dv[:, :2 * tile]).all()
  assert np.isnan(dk[:, -tile:]).any()


# ---------------------------------------------------------------------------
# Arguments and dispatch.


def test_invalid_window_and_softcap_raise():
  q = jnp.zeros((1, 8, 4, 16))
  dispatch = {impl: functools.partial(dot_product_attention, impl=impl)
              for impl in ("xla", "pallas")}
  for attention in (attention_reference, flash_attention, *dispatch.values()):
    with pytest.raises(ValueError, match="must be >= 0"):
      attention(q, q, q, causal=True, window=-1)
    with pytest.raises(ValueError, match="needs causal=True"):
      attention(q, q, q, window=4)
    with pytest.raises(ValueError, match="softcap=-1.0 must be >= 0"):
      attention(q, q, q, softcap=-1.0)
  with pytest.raises(ValueError, match="needs causal=True"):
    attention_mask(8, 8, window=4)
  bf16 = q.astype(jnp.bfloat16)
  with pytest.raises(ValueError, match="does not support logit soft-capping"):
    _cudnn_attention(bf16, bf16, bf16, causal=True, window=0, softcap=30.0,
                     q_segment_ids_BxT=None, kv_segment_ids_BxS=None, bias_BxNxTxS=None)


@pytest.mark.parametrize("t,s", [(48, 48), (24, 48)], ids=["native_window", "folded_window"])
def test_cudnn_path_window(monkeypatch, t, s):
  """``_cudnn_attention``'s window handling, run through jax.nn's XLA
  implementation (same mask semantics as cuDNN's; no GPU here): T == S uses
  ``local_window_size``, T != S folds the window into the explicit mask."""
  cudnn_call = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *args, implementation, **kw: (
      cudnn_call(*args, implementation="xla", **kw)))
  q, k, v, _ = (x.astype(jnp.bfloat16) for x in _qkv(2, t, s, 4, 2, 16, seed=9))
  ids = _segments(np.random.default_rng(9), 2, s, 2, pad=4)
  kwargs = dict(causal=True, window=10, kv_segment_ids_BxS=ids)
  got = jax.jit(functools.partial(_cudnn_attention, softcap=0.0, q_segment_ids_BxT=None,
                                  bias_BxNxTxS=None, **kwargs))(q, k, v)
  want = attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), **kwargs)
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=3e-2)


def test_dispatch_passes_window_and_softcap():
  (q, k, v), kwargs, _ = _case("triton", "window_softcap_segments_bias")
  outs = {impl: jax.jit(functools.partial(dot_product_attention, impl=impl, **kwargs))(q, k, v)
          for impl in ("xla", "pallas")}
  np.testing.assert_allclose(outs["pallas"], outs["xla"], atol=1e-5)
  plain = dict(kwargs, window=0, softcap=0.0)
  plain_out = jax.jit(functools.partial(dot_product_attention, impl="xla", **plain))(q, k, v)
  assert not np.allclose(plain_out, outs["xla"])  # Window and cap did arrive.


_SHARDED_CHECK = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    import functools, jax, ml_collections, numpy as np
    from bigmodel import sharding
    from bigmodel.models.attention import dot_product_attention
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=1, tensor=2)))
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, 40, 4, 16))
    k, v = (jax.random.normal(key, (2, 40, 2, 16)) for key in keys[1:])
    outs = {}
    for impl in ("xla", "pallas"):
      fn = jax.jit(functools.partial(dot_product_attention, impl=impl, causal=True, window=7,
                                     softcap=2.0))
      with sharding.activate(mesh):
        outs[impl] = fn(q, k, v)
        jaxpr = str(jax.make_jaxpr(fn)(q, k, v))
      assert ("shard_map" in jaxpr) == (impl == "pallas"), impl
    np.testing.assert_allclose(outs["pallas"], outs["xla"], atol=1e-5)
    print("ok")
""")


def test_sharded_pallas_passes_window_and_softcap():
  """On a 2 x 2 (batch x heads) mesh the kernel runs per device under
  shard_map, with the same window and cap."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", _SHARDED_CHECK], capture_output=True, text=True,
                       timeout=300, cwd=root, check=False)
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
