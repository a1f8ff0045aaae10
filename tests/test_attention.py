"""Flash attention (Pallas, interpreted on CPU) against the jnp reference.

Both kernel families run here: ``triton`` (the GPU kernels) and ``mosaic``
(the TPU kernels), each in Pallas' interpreter. Errors are judged against a
float32 reference: float32 within 1e-5 (forward) / 1e-4 (gradients), relative
to the largest reference value; bfloat16 within about twice the error of the
reference itself run in bfloat16.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigmodel.models.attention import (ATTENTION_IMPLS, causal_query_blocks, dot_product_attention,
                                       resolve_impl)
from pallas_kernels import BlockSizes, attention_reference, flash_attention

# Small tiles so a short sequence still spans several of them (Mosaic's
# minimum is 128); unequal sizes exercise the loop bounds.
TEST_BLOCKS = {"triton": BlockSizes(block_q=64, block_kv=32, block_q_bwd=32, block_kv_bwd=64),
               "mosaic": BlockSizes(block_q=128, block_kv=128, block_q_bwd=128, block_kv_bwd=128)}
F32_TOL = {"out": 1e-5, "grads": 1e-4}
BF16_FACTOR, BF16_FLOOR = 2.0, 1e-3  # kernel error <= 2 x reference's own + floor x scale.


def _segments(rng, batch, length, num_segments, pad):
  """Packed rows: ``num_segments`` runs of ids 1.., then ``pad`` zeros."""
  ids = np.zeros((batch, length), np.int32)
  for row in range(batch):
    cuts = np.sort(rng.choice(np.arange(1, length - pad), num_segments - 1, replace=False))
    for seg, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, length - pad])):
      ids[row, lo:hi] = seg + 1
  return jnp.asarray(ids)


def _case(mask, *, b=2, t=200, s=200, n=4, kv_heads=2, h=64, seed=0):
  """Inputs and keyword arguments for one mask kind (float32)."""
  keys = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(keys[0], (b, t, n, h))
  k = jax.random.normal(keys[1], (b, s, kv_heads, h))
  v = jax.random.normal(keys[2], (b, s, kv_heads, h))
  rng = np.random.default_rng(seed)
  kwargs = {}
  if mask == "causal":
    kwargs["causal"] = True
  elif mask == "segments":  # Packed + causal, with padding tokens (id 0).
    q_ids = _segments(rng, b, t, 3, pad=t // 10)
    kv_ids = q_ids if s == t else _segments(rng, b, s, 3, pad=s // 10)
    kwargs.update(causal=True, q_segment_ids_BxT=q_ids, kv_segment_ids_BxS=kv_ids)
  elif mask == "kv_padding":  # Only kv ids: masks padding keys, nothing else.
    kwargs["kv_segment_ids_BxS"] = _segments(rng, b, s, 2, pad=s // 4)
  elif mask == "bias":  # T5-style: per-head bias shared over the batch.
    kwargs["bias_BxNxTxS"] = jax.random.normal(keys[3], (1, n, t, s))
  elif mask == "bias_causal_batched":
    kwargs.update(causal=True, bias_BxNxTxS=jax.random.normal(keys[3], (b, n, t, s)))
  elif mask != "none":
    raise ValueError(mask)
  cotangent = jax.random.normal(keys[4], (b, t, n, h))
  return (q, k, v), kwargs, cotangent


def _value_and_grads(attention, qkv, kwargs, cotangent, dtype):
  """Output and grads w.r.t. q, k, v (and bias) of <attention(...), cotangent>."""
  bias = kwargs.get("bias_BxNxTxS")
  rest = {key: val for key, val in kwargs.items() if key != "bias_BxNxTxS"}

  def loss(q, k, v, bias):
    out = attention(q, k, v, bias_BxNxTxS=bias, **rest)
    return jnp.vdot(out.astype(jnp.float32), cotangent), out

  argnums = (0, 1, 2, 3) if bias is not None else (0, 1, 2)
  cast = lambda x: None if x is None else x.astype(dtype)
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))(
      *map(cast, qkv), cast(bias))
  return [np.asarray(x, np.float32) for x in (out, *grads)]


def _max_err(a, b):
  return float(np.max(np.abs(a - b)))


def check_against_reference(backend, mask, dtype, blocks=None, sm_scale=None, **shape):
  """Asserts the kernel matches the reference; returns the measured errors."""
  qkv, kwargs, cotangent = _case(mask, **shape)
  if sm_scale is not None:
    kwargs["sm_scale"] = sm_scale
  kernel = functools.partial(flash_attention, backend=backend, interpret=True,
                             block_sizes=blocks or TEST_BLOCKS[backend])
  got = _value_and_grads(kernel, qkv, kwargs, cotangent, dtype)
  oracle = _value_and_grads(attention_reference, qkv, kwargs, cotangent, jnp.float32)
  for x in got:
    assert np.isfinite(x).all()
  names = ["out", "dq", "dk", "dv", "dbias"][:len(got)]
  errors = {}
  if dtype == jnp.float32:
    for name, g, o in zip(names, got, oracle):
      tol = F32_TOL["out" if name == "out" else "grads"] * max(1.0, np.abs(o).max())
      errors[name] = _max_err(g, o)
      assert errors[name] <= tol, (name, errors[name], tol)
  else:
    own = _value_and_grads(attention_reference, qkv, kwargs, cotangent, dtype)
    for name, g, o, r in zip(names, got, oracle, own):
      ref_err = _max_err(r, o)
      tol = BF16_FACTOR * ref_err + BF16_FLOOR * np.abs(o).max()
      errors[name] = (_max_err(g, o), ref_err)
      assert errors[name][0] <= tol, (name, errors[name], tol)
  return errors


MASKS = ["none", "causal", "segments", "kv_padding", "bias", "bias_causal_batched"]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("backend", ["triton", "mosaic"])
def test_matches_reference(backend, mask, dtype):
  """Every mask kind x dtype, T = S = 200 (padded), GQA 4 -> 2 heads."""
  check_against_reference(backend, mask, dtype)


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
@pytest.mark.parametrize("name,mask,dtype,shape", [
    ("head_dim_128", "causal", jnp.bfloat16, dict(t=256, s=256, h=128, n=2, kv_heads=2)),
    ("exact_tiles_128", "none", jnp.float32, dict(t=128, s=128, b=1)),
    ("cross_odd_lengths", "segments", jnp.float32, dict(t=77, s=133, n=2, kv_heads=2)),
    ("cross_causal_bias", "bias_causal_batched", jnp.float32, dict(t=100, s=260, n=2)),
    ("multi_query", "causal", jnp.float32, dict(t=130, s=130, n=4, kv_heads=1)),
    ("head_dim_48", "none", jnp.float32, dict(t=64, s=96, h=48, n=2, kv_heads=2)),
])
def test_shapes(backend, name, mask, dtype, shape):
  del name
  check_against_reference(backend, mask, dtype, **shape)


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
def test_default_blocks_and_scale(backend):
  """The default (large) tiles, shrunk to a 300-token sequence, and a custom sm_scale."""
  check_against_reference(backend, "causal", jnp.float32, blocks=BlockSizes.default(backend),
                          sm_scale=0.3, t=300, s=300, n=2, kv_heads=2, b=1)


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
def test_fully_masked_rows_are_zero_not_nan(backend):
  """Causal with T > S leaves the first rows without keys; a query whose
  segment has no key and padding queries (id 0) see nothing either."""
  b, t, s, n, h = 1, 96, 40, 2, 64
  keys = jax.random.split(jax.random.key(3), 3)
  q = jax.random.normal(keys[0], (b, t, n, h))
  k = jax.random.normal(keys[1], (b, s, n, h))
  v = jax.random.normal(keys[2], (b, s, n, h))
  q_seg = jnp.asarray([[1] * 50 + [3] * 30 + [0] * 16], jnp.int32)   # 3: not among keys.
  kv_seg = jnp.asarray([[1] * 20 + [2] * 20], jnp.int32)
  kernel = functools.partial(flash_attention, backend=backend, interpret=True,
                             block_sizes=TEST_BLOCKS[backend])
  for kwargs, empty_rows in [(dict(causal=True), np.arange(t - s)),
                             (dict(q_segment_ids_BxT=q_seg, kv_segment_ids_BxS=kv_seg),
                              np.arange(50, t))]:
    def loss(q, k, v):
      out = kernel(q, k, v, **kwargs)  # pylint: disable=cell-var-from-loop
      return out.sum(), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    ref = attention_reference(q, k, v, **kwargs)
    assert np.isfinite(out).all() and all(np.isfinite(g).all() for g in grads)
    np.testing.assert_array_equal(out[:, empty_rows], 0.0)
    np.testing.assert_array_equal(grads[0][:, empty_rows], 0.0)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_invalid_arguments_raise():
  q = jnp.zeros((1, 8, 4, 16))
  with pytest.raises(ValueError, match="multiple of kv heads"):
    flash_attention(q, jnp.zeros((1, 8, 3, 16)), jnp.zeros((1, 8, 3, 16)))
  with pytest.raises(ValueError, match="bias shape"):
    flash_attention(q, q, q, bias_BxNxTxS=jnp.zeros((1, 4, 8, 9)))
  with pytest.raises(ValueError, match="power of two"):
    BlockSizes(block_q=96, block_kv=64, block_q_bwd=64, block_kv_bwd=64)
  with pytest.raises(ValueError, match="unknown backend"):
    flash_attention(q, q, q, backend="cuda")


@pytest.mark.parametrize("options", [{}, dict(window=100, softcap=30.0)],
                         ids=["plain", "window_softcap"])
@pytest.mark.parametrize("backend,platform", [("triton", "cuda"), ("mosaic", "tpu")])
def test_kernels_lower_for_accelerators(backend, platform, options):
  """Without the hardware, at least lower forward + backward (all masks, GQA,
  bf16; with and without a sliding window and soft-capping) to the real
  Triton / Mosaic kernels: this catches ops or block shapes the compiler
  front ends reject, which interpret mode does not. (The kernels' index maps
  use ``lax.div``: ``//`` lowers through a Mosaic rule that asks for the TPU
  generation, which a CPU host cannot answer.)"""
  b, t, n, kv_heads, h = 2, 300, 4, 2, 128
  q = jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((b, t, kv_heads, h), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32)
  bias = jax.ShapeDtypeStruct((1, n, t, t), jnp.float32)

  def grads(q, k, v, seg, bias):
    def loss(q, k, v, bias):
      out = flash_attention(q, k, v, bias_BxNxTxS=bias, causal=True, q_segment_ids_BxT=seg,
                            kv_segment_ids_BxS=seg, backend=backend, interpret=False,
                            **options)
      return out.astype(jnp.float32).sum()
    return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)

  text = jax.jit(grads).trace(q, kv, kv, seg, bias).lower(
      lowering_platforms=(platform,)).as_text()
  target = "triton" if backend == "triton" else "tpu_custom_call"
  assert text.count(target) >= 3  # Forward, dK/dV, dQ.


# ---------------------------------------------------------------------------
# Dispatch.


def test_dispatch_choices():
  assert set(ATTENTION_IMPLS) == {"auto", "xla", "pallas", "cudnn"}
  assert resolve_impl("auto", "cpu") == "xla"
  assert resolve_impl("auto", "gpu") == resolve_impl("auto", "tpu") == "pallas"
  assert resolve_impl("cudnn", "gpu") == "cudnn"
  with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
    resolve_impl("cudnn", "tpu")
  with pytest.raises(ValueError, match="unknown attention_impl"):
    resolve_impl("flash", "cpu")


def test_dispatch_pallas_equals_xla_on_cpu():
  (q, k, v), kwargs, _ = _case("segments", t=64, s=64, b=1)
  outs = {impl: jax.jit(functools.partial(dot_product_attention, impl=impl, **kwargs))(q, k, v)
          for impl in ("auto", "xla", "pallas")}
  np.testing.assert_array_equal(outs["auto"], outs["xla"])
  np.testing.assert_allclose(outs["pallas"], outs["xla"], atol=1e-5)
  if jax.default_backend() == "cpu":
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
      dot_product_attention(q, k, v, impl="cudnn")


# ---------------------------------------------------------------------------
# The XLA path's causal query blocks.


def test_causal_query_blocks_choice():
  assert causal_query_blocks(512, 512, causal=True) == 8
  assert causal_query_blocks(8192, 8192, causal=True) == 16
  assert causal_query_blocks(200, 200, causal=True) == 2   # Blocks of 100: 50 is too short.
  assert causal_query_blocks(100, 100, causal=True) == 1
  assert causal_query_blocks(96, 96, causal=True) == 1     # 48-row blocks are too short.
  assert causal_query_blocks(512, 512, causal=False) == 1
  assert causal_query_blocks(1, 512, causal=True) == 1     # Decoding against a cache.


@pytest.mark.parametrize("mask,extra", [("causal", {}), ("segments", {}),
                                         ("bias_causal_batched", {}),
                                         ("causal", {"window": 50, "softcap": 20.0})])
def test_xla_causal_blocks_equal_the_whole_and_skip_work(mask, extra):
  """The XLA path's blocked causal self-attention gives the reference's values
  and gradients, while compiling to fewer FLOPs (keys after a block are skipped)."""
  (q, k, v), kwargs, cotangent = _case(mask, t=256, s=256)
  kwargs.update(extra)
  assert causal_query_blocks(256, 256, causal=True) == 4

  def loss(attention):
    return lambda q, k, v: jnp.sum(attention(q, k, v, **kwargs) * cotangent)

  blocked = jax.jit(jax.value_and_grad(loss(functools.partial(dot_product_attention,
                                                              impl="xla")), (0, 1, 2)))
  whole = jax.jit(jax.value_and_grad(loss(attention_reference), (0, 1, 2)))
  (value, grads), (want_value, want_grads) = blocked(q, k, v), whole(q, k, v)
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  for got, want in zip(grads, want_grads):
    np.testing.assert_allclose(got, want, atol=F32_TOL["grads"] * float(jnp.max(jnp.abs(want))))

  def compiled_flops(fn):
    return fn.lower(q, k, v).compile().cost_analysis()["flops"]
  # 4 blocks compute 10 of 16 score tiles: 62.5% of the attention matmuls.
  assert compiled_flops(blocked) < 0.8 * compiled_flops(whole)
