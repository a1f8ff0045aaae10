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
  ``attention_reference``. ``mask_kv_tail`` is set when padded keys exist and
  no segment ids mask them already.
  """
  backend: str
  causal: bool
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
  if cfg.mask_kv_tail:
    mask = conj(mask, kv_pos < cfg.kv_len)
  if q_seg is not None:
    mask = conj(mask, jnp.logical_and(q_seg == kv_seg, kv_seg != 0))
  return mask


def positions(start, shape, dim):
  """``start + index`` along ``dim`` of a 2-D tile (int32)."""
  return start + lax.broadcasted_iota(jnp.int32, shape, dim)


def dot(a, b, dims, precision):
  return lax.dot_general(a, b, dims, precision=precision,
                         preferred_element_type=jnp.float32)


def dot_precision(dtype) -> Optional[lax.Precision]:
  """float32 inputs get true f32 matmuls (Triton's default would be TF32)."""
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def kv_blocks_visible(q_block_end, cfg: Config, block_kv: int):
  """Number of kv tiles a query tile ending (exclusively) at ``q_block_end``
  can see under the causal mask: the loop bound that skips the upper triangle.
  """
  num_kv_blocks = cfg.kv_len_padded // block_kv
  if not cfg.causal:
    return num_kv_blocks
  last_key = q_block_end - 1 + cfg.causal_offset  # Last key its last row sees.
  visible = lax.div(jnp.maximum(last_key + 1, 0) + block_kv - 1, block_kv)
  return jnp.minimum(visible, num_kv_blocks)


def first_q_block_visible(kv_block_start, cfg: Config, block_q: int):
  """First query tile that sees any key of a kv tile starting at
  ``kv_block_start`` (0 without a causal mask)."""
  if not cfg.causal:
    return 0
  first_query = jnp.maximum(kv_block_start - cfg.causal_offset, 0)
  return lax.div(first_query, block_q)


def bias_index_map(bias_shape, index_map):
  """Wraps a (batch, head, row, col) index map so broadcast dims read block 0."""
  broadcast_b, broadcast_n = bias_shape[0] == 1, bias_shape[1] == 1

  def bias_map(*grid_ids):
    bi, ni, row, col = index_map(*grid_ids)
    return (0 if broadcast_b else bi, 0 if broadcast_n else ni, row, col)
  return bias_map
