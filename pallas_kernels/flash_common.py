"""Pieces shared by the Triton (GPU) and Mosaic (TPU) flash-attention kernels.

Shapes in names: B batch, T query length, S key/value length, N query heads,
K key/value heads, G = N // K query heads per kv head, H head dim; a trailing
``p`` (``Tp``, ``Sp``) marks a length padded to a multiple of the block size.
"""
import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Same finite value as the reference: exp(MASK_VALUE - m) underflows to 0 and
# MASK_VALUE - MASK_VALUE stays 0 (never inf - inf = NaN).
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

# dot_general dimension numbers for 2-D tiles.
NN_DIMS = (((1,), (0,)), ((), ()))  # a @ b
NT_DIMS = (((1,), (1,)), ((), ()))  # a @ b.T
TN_DIMS = (((0,), (0,)), ((), ()))  # a.T @ b

BACKENDS = ("triton", "mosaic")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes (powers of two). Numerics do not depend on them, speed does.

  ``block_q`` x ``block_kv`` tile the forward pass; ``block_q_bwd`` x
  ``block_kv_bwd`` tile both backward kernels (dK/dV and dQ).
  """
  block_q: int
  block_kv: int
  block_q_bwd: int
  block_kv_bwd: int

  @classmethod
  def default(cls, backend: str) -> "BlockSizes":
    if backend == "mosaic":
      # TPU: large tiles amortise the ~0.35 us per grid step; f32 [512, 512]
      # scores are 1 MiB of VMEM, well inside every generation's budget.
      return cls(block_q=512, block_kv=512, block_q_bwd=256, block_kv_bwd=256)
    # GPU: the usual Triton flash-attention tiles for head_dim <= 128 and
    # 16-bit inputs (untuned here: no GPU was at hand; see benchmarks/).
    return cls(block_q=128, block_kv=64, block_q_bwd=64, block_kv_bwd=64)

  def __post_init__(self):
    for name, size in dataclasses.asdict(self).items():
      if size < 1 or size & (size - 1):
        raise ValueError(f"{name}={size} must be a power of two")


def min_block(backend: str) -> int:
  """Smallest legal tile: Triton's dot needs 16; Mosaic wants full 128 lanes."""
  return 128 if backend == "mosaic" else 16


def fit_block(block: int, length: int, backend: str) -> int:
  """Shrinks ``block`` for short sequences so padding stays under one tile."""
  needed = max(min_block(backend), next_power_of_2(length))
  return max(min_block(backend), min(block, needed))


def next_power_of_2(x: int) -> int:
  return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class Config:
  """Static (hashable) description of one padded attention call.

  ``q_len``/``kv_len`` are the true lengths; the arrays the kernels see are
  padded to ``q_len_padded``/``kv_len_padded``. ``causal_offset`` aligns the
  causal diagonal at the end (query i sees key j iff i + offset >= j), as in
  ``attention_reference``; ``window`` > 0 also requires i + offset - j <
  window (0: no window). ``softcap`` > 0 caps scores to
  softcap * tanh(s / softcap). ``mask_kv_tail`` is set when padded keys exist
  and no segment ids mask them already.
  """
  backend: str
  causal: bool
  window: int
  softcap: float
  sm_scale: float
  q_len: int
  kv_len: int
  q_len_padded: int
  kv_len_padded: int
  num_kv_groups: int  # G = N // K.
  blocks: BlockSizes
  mask_kv_tail: bool
  interpret: bool

  @property
  def causal_offset(self) -> int:
    return self.kv_len - self.q_len


def visible_mask(q_pos: jax.Array, kv_pos: jax.Array, cfg: Config,
                 q_seg: Optional[jax.Array] = None,
                 kv_seg: Optional[jax.Array] = None) -> Optional[jax.Array]:
  """True where a query may attend to a key; None when nothing is masked.

  Every argument is already shaped to broadcast to the score tile, so the
  same code serves [q, kv] tiles (forward, dQ) and [kv, q] tiles (TPU dK/dV).
  """
  mask = None

  def conj(a, b):
    return b if a is None else jnp.logical_and(a, b)

  if cfg.causal:
    mask = conj(mask, q_pos + cfg.causal_offset >= kv_pos)
  if cfg.window:
    mask = conj(mask, q_pos + cfg.causal_offset - kv_pos < cfg.window)
  if cfg.mask_kv_tail:
    mask = conj(mask, kv_pos < cfg.kv_len)
  if q_seg is not None:
    mask = conj(mask, jnp.logical_and(q_seg == kv_seg, kv_seg != 0))
  return mask


def scores_tile(qk, bias, mask, cfg: Config):
  """Attention scores of one tile from its raw ``q . k`` products (float32).

  In the reference's order: scale, soft-cap, add ``bias`` (a tile or None),
  then set masked entries to MASK_VALUE. Returns ``(scores, tanh)``, where
  ``tanh`` = tanh(scaled / softcap) is what the backward needs for the cap's
  derivative (None without a cap). Shared by every kernel: the backward's
  ``p = exp(s - lse)`` is only right if it recomputes the forward's scores.
  """
  s = qk * cfg.sm_scale
  tanh = None
  if cfg.softcap:
    tanh = jnp.tanh(s / cfg.softcap)
    s = cfg.softcap * tanh
  if bias is not None:
    s = s + bias.astype(jnp.float32)
  if mask is not None:
    s = jnp.where(mask, s, MASK_VALUE)
  return s, tanh


def uncap_grad(ds, tanh):
  """Chains a score gradient back through the soft cap: the gradient w.r.t.
  the scaled, uncapped scores (d/dx c * tanh(x / c) = 1 - tanh^2)."""
  return ds if tanh is None else ds * (1.0 - tanh * tanh)


def positions(start, shape, dim):
  """``start + index`` along ``dim`` of a 2-D tile (int32)."""
  return start + lax.broadcasted_iota(jnp.int32, shape, dim)


def dot(a, b, dims, precision):
  return lax.dot_general(a, b, dims, precision=precision,
                         preferred_element_type=jnp.float32)


def dot_precision(dtype) -> Optional[lax.Precision]:
  """float32 inputs get true f32 matmuls (Triton's default would be TF32)."""
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def kv_block_range(q_block_start, q_block_end, cfg: Config, block_kv: int):
  """``(first, end)``: the kv tiles a query tile [q_block_start, q_block_end)
  can see, the loop bounds that skip fully masked tiles.

  Causal: tiles after the one holding the last row's diagonal are hidden.
  Sliding window: so are tiles before the one holding the first row's oldest
  visible key. Works on Python ints and traced values (program ids) alike.
  """
  num_kv_blocks = cfg.kv_len_padded // block_kv
  if not cfg.causal:
    return 0, num_kv_blocks
  last_key = q_block_end - 1 + cfg.causal_offset  # Last key its last row sees.
  end = jnp.minimum(lax.div(jnp.maximum(last_key + 1, 0) + block_kv - 1, block_kv),
                    num_kv_blocks)
  first = 0
  if cfg.window:
    first_key = q_block_start + cfg.causal_offset - cfg.window + 1  # Oldest for its first row.
    first = lax.div(jnp.maximum(first_key, 0), block_kv)
  return first, end


def q_block_range(kv_block_start, kv_block_end, cfg: Config, block_q: int):
  """``(first, end)``: the query tiles that see any key of the kv tile
  [kv_block_start, kv_block_end); the dK/dV loop bounds (``kv_block_range``
  seen from the other side)."""
  num_q_blocks = cfg.q_len_padded // block_q
  if not cfg.causal:
    return 0, num_q_blocks
  first_query = jnp.maximum(kv_block_start - cfg.causal_offset, 0)
  first = lax.div(first_query, block_q)
  end = num_q_blocks
  if cfg.window:
    last_query = kv_block_end - 1 - cfg.causal_offset + cfg.window - 1  # Last that sees it.
    end = jnp.minimum(lax.div(jnp.maximum(last_query + 1, 0) + block_q - 1, block_q),
                      num_q_blocks)
  return first, end


def in_range(index, bounds):
  """``first <= index < end`` for ``bounds`` from ``kv_block_range`` /
  ``q_block_range`` (a traced bool)."""
  first, end = bounds
  return jnp.logical_and(index >= first, index < end)


def clamp_to_range(index, bounds):
  """``index`` clamped into [first, end - 1], so a skipped grid step re-reads
  a tile already in VMEM and Pallas TPU elides its copy. An empty range
  (a tile nothing sees) still yields a valid index, never ``end`` or beyond.
  """
  first, end = bounds
  return jnp.minimum(jnp.maximum(index, first), jnp.maximum(end - 1, 0))


def bias_index_map(bias_shape, index_map):
  """Wraps a (batch, head, row, col) index map so broadcast dims read block 0."""
  broadcast_b, broadcast_n = bias_shape[0] == 1, bias_shape[1] == 1

  def bias_map(*grid_ids):
    bi, ni, row, col = index_map(*grid_ids)
    return (0 if broadcast_b else bi, 0 if broadcast_n else ni, row, col)
  return bias_map
