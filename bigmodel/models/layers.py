"""Building blocks shared by every family: norms, embeddings, MLP, attention.

Every parameter carries logical axis names (``vocab``, ``embed``, ``mlp``,
``heads``, ``kv``, ``layers``) and the main activations are constrained with
``batch``, ``length`` and ``act_*`` names; ``bigmodel.sharding`` maps both onto
mesh axes. Shape letters in names: see ``bigmodel.models`` (B batch, T query
length, S key length, D model width, F mlp width, N query heads, K kv heads,
H head dim, V vocabulary, R relative-position buckets).
"""
import dataclasses
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from bigmodel.models.attention import dot_product_attention
from bigmodel.models.relative_bias import RelativeBias, relative_bucket
from bigmodel.models.rope import RopeSpec, apply_rope

Dtype = Any
Initializer = Callable[..., jax.Array]


def logical_init(init: Initializer, axes: tuple) -> Initializer:
  """Wraps a parameter initializer so the parameter carries logical axes."""
  return nn.with_logical_partitioning(init, axes)


def constrain(x: jax.Array, axes: tuple) -> jax.Array:
  """Shards an activation by logical axes (a no-op outside a mesh)."""
  return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
  """x / rms(x) * (scale_offset + scale), computed in float32.

  ``scale_offset`` 1 is Gemma's convention (weights stored as ``scale - 1``,
  initialised to 0); 0 is everyone else's (T5, Llama, Qwen, Mistral).
  """
  epsilon: float = 1e-6
  scale_offset: float = 0.0
  scale_axis: str = "embed"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.zeros if self.scale_offset else nn.initializers.ones
    scale = self.param("scale", logical_init(init, (self.scale_axis,)), (x.shape[-1],),
                       self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return (y * (self.scale_offset + scale.astype(jnp.float32))).astype(self.dtype)


def make_norm(kind: str, *, epsilon: float, dtype: Dtype, param_dtype: Dtype,
              scale_offset: float = 0.0, axis: str = "embed",
              name: Optional[str] = None) -> nn.Module:
  """``layernorm`` (scale and bias: GPT-2, BERT) or ``rmsnorm`` (scale only: T5,
  Llama and later; ``scale_offset`` 1 for Gemma) over the last axis, whose
  logical name is ``axis``."""
  scale_init = logical_init(nn.initializers.ones, (axis,))
  if kind == "layernorm":
    if scale_offset:
      raise ValueError("a scale offset applies to rmsnorm only")
    return nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
                        scale_init=scale_init,
                        bias_init=logical_init(nn.initializers.zeros, (axis,)),
                        name=name)
  if kind == "rmsnorm":
    return RMSNorm(epsilon=epsilon, scale_offset=scale_offset, scale_axis=axis, dtype=dtype,
                   param_dtype=param_dtype, name=name)
  raise ValueError(f"unknown norm {kind!r}")


@dataclasses.dataclass(frozen=True)
class NormSpec:
  """A norm kind with its settings, so modules can build several alike."""
  kind: str = "layernorm"
  epsilon: float = 1e-5
  scale_offset: float = 0.0

  def make(self, name: str, dtype: Dtype, param_dtype: Dtype, axis: str = "embed") -> nn.Module:
    return make_norm(self.kind, epsilon=self.epsilon, scale_offset=self.scale_offset, axis=axis,
                     dtype=dtype, param_dtype=param_dtype, name=name)


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
    # promote_dtype rather than astype: Qwix's PTQ model (bigmodel.models.
    # quantization) intercepts it to pass a quantized kernel through as it is,
    # and dequantizes it to its scales' dtype (param_dtype): the astype keeps
    # the output in the compute dtype (a no-op for float kernels).
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    y = jax.lax.dot_general(x, kernel, ((axis, tuple(range(len(axis)))), ((), ())))
    y = y.astype(self.dtype)
    if self.use_bias:
      bias = self.param("bias", logical_init(nn.initializers.zeros,
                                             self.kernel_axes[len(axis):]),
                        tuple(self.features), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


# MLP activations by config name (``model.mlp_activation``). Both GELUs exist
# because published weights were trained with one or the other: GPT-2, T5
# v1.1 and Gemma use the tanh approximation, BERT the exact (erf) form. SiLU
# (swish) gates Llama's, Qwen's and Mistral's SwiGLU.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


class Mlp(nn.Module):
  """Position-wise MLP: D -> F -> D, optionally gated: act(x wi) * (x wi_linear).

  Gated is T5 v1.1's gated-GELU, Llama's SwiGLU (``silu``), Gemma's GeGLU.
  """
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
    return KVCache(pad_slots(self.k_BxSxKxH, num_slots, axis=-3),
                   pad_slots(self.v_BxSxKxH, num_slots, axis=-3), self.index)

  def ring(self, num_slots: int) -> "KVCache":
    """A ring of ``num_slots`` holding the latest keys: slot ``a % num_slots``
    holds key ``a`` (``index`` keys so far). A sliding-window model decodes
    with a ring as long as its window; decoding writes at ``index % slots``."""
    return KVCache(ring_slots(self.k_BxSxKxH, num_slots, axis=-3),
                   ring_slots(self.v_BxSxKxH, num_slots, axis=-3), self.index)


def pad_slots(x: jax.Array, num_slots: int, axis: int = -1) -> jax.Array:
  """Zeros appended along the slot ``axis`` (-3 of keys, -1 of slot ids) up to ``num_slots``."""
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, num_slots - x.shape[axis])
  return jnp.pad(x, pad)


def ring_slots(x: jax.Array, num_slots: int, axis: int = -1) -> jax.Array:
  """The last ``num_slots`` of ``x``'s slots along ``axis``, as a ring: slot
  ``a`` at ``a % num_slots``."""
  filled = x.shape[axis]
  if filled <= num_slots:
    return pad_slots(x, num_slots, axis)
  latest = jax.lax.slice_in_dim(x, filled - num_slots, filled, axis=axis % x.ndim)
  return jnp.roll(latest, (filled - num_slots) % num_slots, axis=axis)


def ring_segment_ids(kv_segment_ids_BxS: jax.Array, index: jax.Array,
                     num_slots: int) -> jax.Array:
  """[B, num_slots]: the segment ids of the keys a ring holds once key ``index``
  is written (slot s holds the latest key a <= index with a % num_slots = s;
  none yet, a < 0, is empty), from the ids of all S keys [B, S]."""
  slots_W = jnp.arange(num_slots)
  keys_W = index - (index - slots_W) % num_slots
  held_BxW = jnp.take(kv_segment_ids_BxS, jnp.maximum(keys_W, 0), axis=1)
  return jnp.where(keys_W[None, :] >= 0, held_BxW, 0)


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
  """Self- or cross-attention with optional rotary positions, bias, window, soft-cap.

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

  A layer is *local* (the ``local`` call argument: a Python bool, or a traced
  bool scalar when scanned layers alternate, as Gemma's do) when it attends
  within ``window`` only and rotates by ``local_rope``.
  """
  num_heads: int
  head_dim: int
  num_kv_heads: Optional[int] = None  # None = num_heads; fewer = grouped-query.
  use_bias: bool = True               # On the q, k and v projections ...
  out_bias: Optional[bool] = None     # ... and on the output (None = use_bias).
  rope: Optional[RopeSpec] = None     # None = no rotary positions.
  local_rope: Optional[RopeSpec] = None  # Local layers' rotary embedding (None = rope).
  window: int = 0                     # Local layers' sliding window (0 = none).
  softcap: float = 0.0                # Attention-logit soft-cap (0 = none; Gemma 2).
  qk_norm: Optional[NormSpec] = None  # Per-head norm of q and k (Qwen3, Gemma 3).
  # None = the usual 1/sqrt(head_dim) score scale; T5 uses 1 (the scale is
  # folded into its initialisation), Gemma query_pre_attn_scalar^-0.5.
  score_scale: Optional[float] = None
  query_init_stddev: float = 0.02
  attention_impl: str = "auto"
  context_attention: str = "ring"     # ring | all_gather, under context parallelism.
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
      local: Any = True,
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

    def norm(x, name):
      if self.qk_norm is None:
        return x
      return self.qk_norm.make(name, self.dtype, self.param_dtype, axis="kv")(x)

    q_BxTxNxH = norm(project(x_BxTxD, self.num_heads, "query", self.query_init_stddev),
                     "query_norm")
    head_axes = ("batch", "length", "act_heads", "act_kv")
    fixed_kv = decoding and self.cross  # The encoder's keys, cached at prefill.
    if fixed_kv:
      k_BxSxKxH, v_BxSxKxH = cache.k_BxSxKxH, cache.v_BxSxKxH
    else:
      k_BxSxKxH = norm(project(kv_BxSxD, kv_heads, "key"), "key_norm")
      v_BxSxKxH = project(kv_BxSxD, kv_heads, "value")
    if self.rope is not None:
      inv_freq_H2, factor = self._rope_frequencies(local)
      q_BxTxNxH = apply_rope(q_BxTxNxH, q_positions_BxT, inv_freq_H2, factor)
      if not fixed_kv:
        k_BxSxKxH = apply_rope(k_BxSxKxH, kv_positions_BxS, inv_freq_H2, factor)
    if self.score_scale is not None:
      # The attention functions scale scores by 1/sqrt(H); undo that here.
      q_BxTxNxH = q_BxTxNxH * jnp.asarray(self.score_scale * self.head_dim ** 0.5,
                                          q_BxTxNxH.dtype)
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
      # A cache shorter than the sequence is a ring (a windowed model's:
      # ``KVCache.ring``): slot index % S, attention is order-free.
      num_slots = cache.k_BxSxKxH.shape[1]
      slot = cache.index % num_slots
      write = lambda buf, new: constrain(jax.lax.dynamic_update_slice_in_dim(  # pylint: disable=g-long-lambda
          buf, new.astype(buf.dtype), slot, axis=1), head_axes)
      new_cache = KVCache(write(cache.k_BxSxKxH, k_BxSxKxH), write(cache.v_BxSxKxH, v_BxSxKxH),
                          cache.index + k_BxSxKxH.shape[1])
      k_BxSxKxH, v_BxSxKxH = new_cache.k_BxSxKxH, new_cache.v_BxSxKxH
      if num_slots < kv_segment_ids_BxS.shape[1]:  # A ring of the window's keys.
        kv_segment_ids_BxS = ring_segment_ids(kv_segment_ids_BxS, cache.index, num_slots)
      elif self.window and num_slots > self.window:  # Every key cached: hide the old ones.
        kv_segment_ids_BxS = self._decode_window(kv_segment_ids_BxS, cache.index,
                                                 x_BxTxD.shape[1], local)

    def attend(window: int) -> jax.Array:
      # A few query rows against the cache: fused kernels gain nothing (and
      # want block-sized lengths), the plain einsum is the fast path.
      return dot_product_attention(
          q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, impl="xla" if decoding else self.attention_impl,
          causal=causal, window=window, softcap=self.softcap,
          q_segment_ids_BxT=q_segment_ids_BxT, kv_segment_ids_BxS=kv_segment_ids_BxS,
          bias_BxNxTxS=bias_BxNxTxS, context_attention=self.context_attention,
          positions_BxT=None if self.cross else q_positions_BxT)

    if not self.window or decoding:  # Decoding masks the window in the slot ids.
      out_BxTxNxH = attend(0)
    elif isinstance(local, bool):
      out_BxTxNxH = attend(self.window if local else 0)
    else:  # Kernels take static windows: pick one of two at run time.
      out_BxTxNxH = jax.lax.cond(local, lambda: attend(self.window), lambda: attend(0))
    out_BxTxNxH = constrain(out_BxTxNxH, head_axes)
    out_bias = self.use_bias if self.out_bias is None else self.out_bias
    out_BxTxD = DenseGeneral((x_BxTxD.shape[-1],), ("heads", "kv", "embed"), axis=(-2, -1),
                             use_bias=out_bias, stddev=self.out_init_stddev,
                             dtype=self.dtype, param_dtype=self.param_dtype,
                             name="out")(out_BxTxNxH)
    return out_BxTxD, new_cache

  def _rope_frequencies(self, local: Any) -> tuple[Any, Any]:
    """(inverse frequencies [H/2], cos/sin factor) of a global or local layer."""
    global_freq = self.rope.frequencies(self.head_dim)
    if self.local_rope is None:
      return global_freq
    local_freq = self.local_rope.frequencies(self.head_dim)
    if isinstance(local, bool):
      return local_freq if local else global_freq
    return (jnp.where(local, local_freq[0], global_freq[0]),
            jnp.where(local, local_freq[1], global_freq[1]))

  def _decode_window(self, kv_segment_ids_BxS: jax.Array, first_new_slot: jax.Array,
                     num_new: int, local: Any) -> jax.Array:
    """Slot ids with keys outside a local layer's window marked empty (0).

    Prompts are left-padded, so a row's tokens fill consecutive slots and
    slot distance is position distance.
    """
    if num_new != 1:
      raise ValueError("decoding a windowed layer takes one token per step")
    slots_S = jnp.arange(kv_segment_ids_BxS.shape[1])
    outside_S = (first_new_slot - slots_S >= self.window) & local
    return jnp.where(outside_S[None, :], 0, kv_segment_ids_BxS)


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
    return relative_bucket(relative_TxS, self.num_buckets, self.max_distance,
                           self.bidirectional)

  @nn.compact
  def __call__(self, q_len: int, kv_len: int, q_offset: int = 0, per_block: bool = False):
    """Bias [1, N, T, S]; ``q_offset`` places the queries later (decoding).
    ``per_block``: instead, a ``RelativeBias`` that context-parallel attention
    builds per block (never [T, S] at once)."""
    table_RxN = self.param(
        "rel_embedding", logical_init(nn.initializers.normal(1.0), (None, "heads")),
        (self.num_buckets, self.num_heads), self.param_dtype)
    if per_block:
      return RelativeBias(table_RxN, self.num_buckets, self.max_distance, self.bidirectional)
    relative_TxS = (jnp.arange(kv_len)[None, :]
                    - (jnp.arange(q_len)[:, None] + q_offset))
    bias_TxSxN = jnp.take(table_RxN, self.bucket(relative_TxS), axis=0)
    return jnp.transpose(bias_TxSxN, (2, 0, 1))[None].astype(self.dtype)
