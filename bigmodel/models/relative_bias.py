"""T5's bucketed relative position bias, as a function of query and key indices.

``layers.RelativePositionBias`` owns the learned table [R buckets, N heads];
most attention adds its whole [1, N, T, S] bias at once. Context-parallel
attention never holds that (T and S are the whole sequence): it takes a
``RelativeBias`` (the table and the bucketing) and builds each block's bias
from the block's global token indices (``context_parallel``). Both go
through ``relative_bucket``, so they agree exactly.
"""
import flax
import jax
import jax.numpy as jnp


def relative_bucket(relative: jax.Array, num_buckets: int, max_distance: int,
                    bidirectional: bool) -> jax.Array:
  """Bucket ids of relative positions (key position - query position): exact
  for small distances, logarithmic up to ``max_distance``; bidirectional
  buckets split by sign."""
  bucket = jnp.zeros_like(relative)
  if bidirectional:
    num_buckets //= 2
    bucket += (relative > 0).astype(jnp.int32) * num_buckets
    distance = jnp.abs(relative)
  else:
    distance = jnp.maximum(-relative, 0)
  max_exact = num_buckets // 2
  log_ratio = (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
               / jnp.log(max_distance / max_exact))
  large = jnp.minimum(max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32),
                      num_buckets - 1)
  return bucket + jnp.where(distance < max_exact, distance, large)


@flax.struct.dataclass
class RelativeBias:
  """The bias of any block of queries and keys, from its learned table."""
  table_RxN: jax.Array
  num_buckets: int = flax.struct.field(pytree_node=False)
  max_distance: int = flax.struct.field(pytree_node=False)
  bidirectional: bool = flax.struct.field(pytree_node=False)

  def block(self, q_index_BxT: jax.Array, kv_index_BxS: jax.Array) -> jax.Array:
    """[B, N, T, S] float32 for queries and keys at these global indices."""
    relative_BxTxS = kv_index_BxS[:, None, :] - q_index_BxT[:, :, None]
    buckets_BxTxS = relative_bucket(relative_BxTxS, self.num_buckets, self.max_distance,
                                    self.bidirectional)
    bias_BxTxSxN = jnp.take(self.table_RxN.astype(jnp.float32), buckets_BxTxS, axis=0)
    return jnp.moveaxis(bias_BxTxSxN, -1, 1)
