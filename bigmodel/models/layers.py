"""Building blocks shared by GPT, BERT and T5: norms, embeddings, MLP, attention.

Every parameter carries logical axis names (``vocab``, ``embed``, ``mlp``,
``heads``, ``kv``, ``layers``) and the main activations are constrained with
``batch``, ``length`` and ``act_*`` names; ``bigmodel.sharding`` maps both onto
mesh axes. Shape letters in names: see ``bigmodel.models`` (B batch, T query
length, S key length, D model width, F mlp width, N query heads, K kv heads,
H head dim, V vocabulary, R relative-position buckets).
"""
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from bigmodel.models.attention import dot_product_attention

Dtype = Any
Initializer = Callable[..., jax.Array]


def logical_init(init: Initializer, axes: tuple) -> Initializer:
  """Wraps a parameter initializer so the parameter carries logical axes."""
  return nn.with_logical_partitioning(init, axes)


def constrain(x: jax.Array, axes: tuple) -> jax.Array:
  """Shards an activation by logical axes (a no-op outside a mesh)."""
  return nn.with_logical_constraint(x, axes)


def make_norm(kind: str, *, epsilon: float, dtype: Dtype, param_dtype: Dtype,
              name: Optional[str] = None) -> nn.Module:
  """``layernorm`` (scale and bias, GPT/BERT) or ``rmsnorm`` (scale only, T5)."""
  scale_init = logical_init(nn.initializers.ones, ("embed",))
  if kind == "layernorm":
    return nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
                        scale_init=scale_init,
                        bias_init=logical_init(nn.initializers.zeros, ("embed",)),
                        name=name)
  if kind == "rmsnorm":
    return nn.RMSNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
                      scale_init=scale_init, name=name)
  raise ValueError(f"unknown norm {kind!r}")


def make_embed(num_embeddings: int, features: int, *, axes: tuple, dtype: Dtype,
               param_dtype: Dtype, stddev: float = 0.02,
               name: Optional[str] = None) -> nn.Embed:
  """A table [num_embeddings, features]; ``attend`` gives tied output logits."""
  return nn.Embed(num_embeddings, features, dtype=dtype, param_dtype=param_dtype,
                  embedding_init=logical_init(nn.initializers.normal(stddev), axes),
                  name=name)


class DenseGeneral(nn.Module):
  """A linear map contracting ``x``'s trailing ``len(axis)`` dims into ``features``.

  Written here rather than using ``nn.DenseGeneral`` because Linen initialises
  multi-dimensional kernels flattened to 2D, which breaks their logical-axis
  sharding constraints (e.g. a [D, N, H] query kernel).
  """
  features: tuple[int, ...]
  kernel_axes: tuple
  axis: tuple[int, ...] = (-1,)
  use_bias: bool = True
  stddev: float = 0.02
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    axis = tuple(a % x.ndim for a in self.axis)
    kernel = self.param(
        "kernel", logical_init(nn.initializers.normal(self.stddev), self.kernel_axes),
        tuple(x.shape[a] for a in axis) + tuple(self.features), self.param_dtype)
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                            ((axis, tuple(range(len(axis)))), ((), ())))
    if self.use_bias:
      bias = self.param("bias", logical_init(nn.initializers.zeros,
                                             self.kernel_axes[len(axis):]),
                        tuple(self.features), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def apply_rope(x_BxLxNxH: jax.Array, positions_BxL: jax.Array,
               theta: float) -> jax.Array:
  """Rotary position embedding (rotate-half convention) in float32."""
  half = x_BxLxNxH.shape[-1] // 2
  inv_freq_H2 = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BxLx1xH2 = (positions_BxL[..., None].astype(jnp.float32) * inv_freq_H2)[:, :, None, :]
  sin, cos = jnp.sin(angle_BxLx1xH2), jnp.cos(angle_BxLx1xH2)
  x1, x2 = jnp.split(x_BxLxNxH.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BxLxNxH.dtype)


# MLP activations by config name (``model.mlp_activation``). Both GELUs exist
# because published weights were trained with one or the other: GPT-2 and T5
# v1.1 use the tanh approximation, BERT the exact (erf) form.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


class Mlp(nn.Module):
  """Position-wise MLP: D -> F -> D, optionally gated (T5 v1.1's gated-GELU)."""
  hidden_dim: int
  activation: str = "gelu_tanh"  # A name in ACTIVATIONS.
  gated: bool = False
  use_bias: bool = True
  dropout_rate: float = 0.0
  out_init_stddev: float = 0.02
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, deterministic: bool = True) -> jax.Array:
    dense = lambda features, axes, stddev, name: DenseGeneral(  # pylint: disable=g-long-lambda
        (features,), axes, use_bias=self.use_bias, stddev=stddev, dtype=self.dtype,
        param_dtype=self.param_dtype, name=name)
    act = ACTIVATIONS[self.activation]
    h_BxLxF = act(dense(self.hidden_dim, ("embed", "mlp"), 0.02, "wi")(x_BxLxD))
    if self.gated:
      h_BxLxF = h_BxLxF * dense(self.hidden_dim, ("embed", "mlp"), 0.02, "wi_linear")(x_BxLxD)
    h_BxLxF = constrain(h_BxLxF, ("batch", "length", "act_mlp"))
    h_BxLxF = nn.Dropout(self.dropout_rate)(h_BxLxF, deterministic=deterministic)
    d = x_BxLxD.shape[-1]
    return dense(d, ("mlp", "embed"), self.out_init_stddev, "wo")(h_BxLxF)


@flax.struct.dataclass
class KVCache:
  """One attention layer's keys and values for incremental decoding.

  ``index`` is how many slots are filled: the next keys go there. Stacked
  over a layer scan every leaf gains a leading [layers] axis.
  """
  k_BxSxKxH: jax.Array
  v_BxSxKxH: jax.Array
  index: jax.Array  # int32 scalar.

  def padded(self, num_slots: int) -> "KVCache":
    """The same cache with room for ``num_slots`` keys (zeros after ``index``)."""
    pad = [(0, 0)] * self.k_BxSxKxH.ndim
    pad[-3] = (0, num_slots - self.k_BxSxKxH.shape[-3])
    return KVCache(jnp.pad(self.k_BxSxKxH, pad), jnp.pad(self.v_BxSxKxH, pad), self.index)


# Model modes (MaxText's "model modes"): what a forward pass is for. Every
# block and attention layer takes one, and returns (output, cache) in all of
# them, the cache being None in training.
TRAIN = "train"      # The whole sequence; no cache.
PREFILL = "prefill"  # The whole prompt; also return its keys/values as a cache.
DECODE = "decode"    # A few new tokens against a cache; return the updated cache.
MODES = (TRAIN, PREFILL, DECODE)


def check_mode(mode: str) -> str:
  if mode not in MODES:
    raise ValueError(f"unknown model mode {mode!r}; choose from {MODES}")
  return mode


class MultiHeadAttention(nn.Module):
  """Self- or cross-attention with optional rotary positions and bias.

  Dropout applies to the output, not the attention probabilities, so fused
  kernels (which never materialise the probabilities) stay exact.

  ``mode`` (``TRAIN``, ``PREFILL``, ``DECODE``) says what the call is for;
  every call returns ``(out_BxTxD, cache)``:

  - ``TRAIN``: cache None.
  - ``PREFILL``: this call's keys/values as a ``KVCache`` (the prompt's
    cache, self- or cross-attention).
  - ``DECODE``, self-attention: write this call's keys/values into ``cache``
    at ``cache.index`` and attend to every slot, masked by
    ``kv_segment_ids_BxS`` (the caller marks filled slots, the new ones
    included); returns the updated cache. No causal mask is needed: the
    slots after the new keys are empty, hence masked.
  - ``DECODE``, ``cross``: attend to ``cache``'s precomputed keys/values
    (``kv_BxSxD`` is not used) and return it unchanged.
  """
  num_heads: int
  head_dim: int
  num_kv_heads: Optional[int] = None  # None = num_heads; fewer = grouped-query.
  use_bias: bool = True
  rope_theta: Optional[float] = None  # None = no rotary positions.
  # None = the usual 1/sqrt(head_dim) score scale; T5 uses 1 (the scale is
  # folded into its initialisation).
  score_scale: Optional[float] = None
  query_init_stddev: float = 0.02
  attention_impl: str = "auto"
  out_init_stddev: float = 0.02
  cross: bool = False  # Keys/values come from another sequence (kv_BxSxD).
  mode: str = TRAIN
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self,
      x_BxTxD: jax.Array,
      kv_BxSxD: Optional[jax.Array] = None,
      *,
      causal: bool = False,
      q_segment_ids_BxT: Optional[jax.Array] = None,
      kv_segment_ids_BxS: Optional[jax.Array] = None,
      q_positions_BxT: Optional[jax.Array] = None,
      kv_positions_BxS: Optional[jax.Array] = None,
      bias_BxNxTxS: Optional[jax.Array] = None,
      cache: Optional[KVCache] = None,
  ) -> tuple[jax.Array, Optional[KVCache]]:
    """Returns ([B, T, D], cache); ``kv_BxSxD`` None means self-attention."""
    decoding = check_mode(self.mode) == DECODE
    if decoding and cache is None:
      raise ValueError("mode='decode' needs a cache")
    if kv_BxSxD is None:
      kv_BxSxD, kv_positions_BxS = x_BxTxD, q_positions_BxT
    kv_heads = self.num_kv_heads or self.num_heads

    def project(x, heads, name, stddev=0.02):
      return DenseGeneral((heads, self.head_dim), ("embed", "heads", "kv"),
                          use_bias=self.use_bias, stddev=stddev, dtype=self.dtype,
                          param_dtype=self.param_dtype, name=name)(x)

    q_BxTxNxH = project(x_BxTxD, self.num_heads, "query", self.query_init_stddev)
    if self.score_scale is not None:
      # The attention functions scale scores by 1/sqrt(H); undo that here.
      q_BxTxNxH = q_BxTxNxH * jnp.asarray(self.score_scale * self.head_dim ** 0.5,
                                          q_BxTxNxH.dtype)
    head_axes = ("batch", "length", "act_heads", "act_kv")
    fixed_kv = decoding and self.cross  # The encoder's keys, cached at prefill.
    if fixed_kv:
      k_BxSxKxH, v_BxSxKxH = cache.k_BxSxKxH, cache.v_BxSxKxH
    else:
      k_BxSxKxH = project(kv_BxSxD, kv_heads, "key")
      v_BxSxKxH = project(kv_BxSxD, kv_heads, "value")
    if self.rope_theta is not None:
      q_BxTxNxH = apply_rope(q_BxTxNxH, q_positions_BxT, self.rope_theta)
      if not fixed_kv:
        k_BxSxKxH = apply_rope(k_BxSxKxH, kv_positions_BxS, self.rope_theta)
    q_BxTxNxH = constrain(q_BxTxNxH, head_axes)
    k_BxSxKxH = constrain(k_BxSxKxH, head_axes)
    v_BxSxKxH = constrain(v_BxSxKxH, head_axes)
    new_cache = None
    if self.mode == PREFILL:
      new_cache = KVCache(k_BxSxKxH, v_BxSxKxH, jnp.asarray(k_BxSxKxH.shape[1], jnp.int32))
    elif fixed_kv:
      new_cache = cache
    elif decoding:
      # Write the new keys at the cache's index; the cache keeps the
      # activations' sharding (batch over data x fsdp, heads over tensor).
      write = lambda buf, new: constrain(jax.lax.dynamic_update_slice_in_dim(  # pylint: disable=g-long-lambda
          buf, new.astype(buf.dtype), cache.index, axis=1), head_axes)
      new_cache = KVCache(write(cache.k_BxSxKxH, k_BxSxKxH), write(cache.v_BxSxKxH, v_BxSxKxH),
                          cache.index + k_BxSxKxH.shape[1])
      k_BxSxKxH, v_BxSxKxH = new_cache.k_BxSxKxH, new_cache.v_BxSxKxH
    # A few query rows against the cache: fused kernels gain nothing (and
    # want block-sized lengths), the plain einsum is the fast path.
    impl = "xla" if decoding else self.attention_impl
    out_BxTxNxH = dot_product_attention(
        q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, impl=impl, causal=causal,
        q_segment_ids_BxT=q_segment_ids_BxT, kv_segment_ids_BxS=kv_segment_ids_BxS,
        bias_BxNxTxS=bias_BxNxTxS)
    out_BxTxNxH = constrain(out_BxTxNxH, head_axes)
    out_BxTxD = DenseGeneral((x_BxTxD.shape[-1],), ("heads", "kv", "embed"), axis=(-2, -1),
                             use_bias=self.use_bias, stddev=self.out_init_stddev,
                             dtype=self.dtype, param_dtype=self.param_dtype,
                             name="out")(out_BxTxNxH)
    return out_BxTxD, new_cache


class RelativePositionBias(nn.Module):
  """T5's bucketed relative position bias: [1, N, T, S], added to attention scores.

  Relative distances are put in ``num_buckets`` buckets, exact for small
  distances and logarithmic up to ``max_distance``; each bucket has a learned
  scalar per head. Bidirectional (encoder) buckets split by sign.
  """
  num_buckets: int
  max_distance: int
  num_heads: int
  bidirectional: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def bucket(self, relative_TxS: jax.Array) -> jax.Array:
    """Bucket ids for relative positions (key position - query position)."""
    num_buckets, bucket_TxS = self.num_buckets, jnp.zeros_like(relative_TxS)
    if self.bidirectional:
      num_buckets //= 2
      bucket_TxS += (relative_TxS > 0).astype(jnp.int32) * num_buckets
      distance_TxS = jnp.abs(relative_TxS)
    else:
      distance_TxS = jnp.maximum(-relative_TxS, 0)
    max_exact = num_buckets // 2
    log_ratio = (jnp.log(jnp.maximum(distance_TxS, 1).astype(jnp.float32) / max_exact)
                 / jnp.log(self.max_distance / max_exact))
    large_TxS = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
    large_TxS = jnp.minimum(large_TxS, num_buckets - 1)
    return bucket_TxS + jnp.where(distance_TxS < max_exact, distance_TxS, large_TxS)

  @nn.compact
  def __call__(self, q_len: int, kv_len: int, q_offset: int = 0) -> jax.Array:
    """Bias [1, N, T, S]; ``q_offset`` places the queries later (decoding)."""
    relative_TxS = (jnp.arange(kv_len)[None, :]
                    - (jnp.arange(q_len)[:, None] + q_offset))
    table_RxN = self.param(
        "rel_embedding", logical_init(nn.initializers.normal(1.0), (None, "heads")),
        (self.num_buckets, self.num_heads), self.param_dtype)
    bias_TxSxN = jnp.take(table_RxN, self.bucket(relative_TxS), axis=0)
    return jnp.transpose(bias_TxSxN, (2, 0, 1))[None].astype(self.dtype)
