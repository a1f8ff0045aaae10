"""Ring and all-gather attention on 8 CPU devices against one-device attention.

Run as a script in a subprocess (XLA_FLAGS must ask for 8 devices before JAX
starts): ``python tests/context_parallel_check.py`` prints one JSON object:
case -> the largest absolute difference of the output and of the gradients
of q, k and v from ``pallas_kernels.attention_reference`` on the whole
sequence.
"""
import json
import os
import sys

# The suite's flags and 8 devices, before JAX is imported (tests/commands.py).
from commands import simulate_devices  # pylint: disable=wrong-import-position
simulate_devices(8)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from jax.sharding import PartitionSpec as P  # pylint: disable=wrong-import-position

from bigmodel.models import context_parallel as cp  # pylint: disable=wrong-import-position
from pallas_kernels import attention_reference  # pylint: disable=wrong-import-position

B, L, N, K, H = 4, 32, 4, 2, 8


def _inputs(seed: int):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (B, L, N, H), jnp.float32)
  k = jax.random.normal(keys[1], (B, L, K, H), jnp.float32)
  v = jax.random.normal(keys[2], (B, L, K, H), jnp.float32)
  cotangent = jax.random.normal(keys[3], (B, L, N, H), jnp.float32)
  # Packed rows: documents of 11, 13 and 5 tokens, then 3 padding tokens.
  segments = np.repeat([1, 2, 3, 0], [11, 13, 5, 3])[None].repeat(B, 0).astype(np.int32)
  return q, k, v, cotangent, jnp.asarray(segments)


def run_case(mesh_shape, names, context_axis, batch_axes, heads_axes, *, impl, causal, window,
             packed, softcap=0.0, query_chunk=cp.QUERY_CHUNK):
  mesh = jax.make_mesh(mesh_shape, names, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  c = dict(zip(names, mesh_shape))[context_axis]
  q, k, v, cotangent, segments = _inputs(len(names) + c + window)
  order = cp.balanced_order(L, c) if causal else np.arange(L)
  index = jnp.asarray(np.broadcast_to(order, (B, L)).astype(np.int32))
  seg = segments if packed else None
  kwargs = dict(causal=causal, window=window, softcap=softcap)

  def reference(q, k, v):
    return attention_reference(q, k, v, q_segment_ids_BxT=seg, kv_segment_ids_BxS=seg,
                               **kwargs)
  want, vjp = jax.vjp(reference, q, k, v)
  want_grads = vjp(cotangent)

  attend = cp.ring_attention if impl == "ring" else cp.all_gather_attention
  token_spec = P(batch_axes, context_axis, heads_axes, None)
  index_spec = P(batch_axes, context_axis)

  def sharded(q, k, v, index, seg):
    return attend(q, k, v, axis=context_axis, q_index_BxT=index, kv_index_BxS=index,
                  q_segment_ids_BxT=seg, kv_segment_ids_BxS=seg, query_chunk=query_chunk,
                  **kwargs)
  mapped = jax.shard_map(sharded, mesh=mesh,
                         in_specs=(token_spec, token_spec, token_spec, index_spec,
                                   None if seg is None else index_spec),
                         out_specs=token_spec, check_vma=False)

  @jax.jit
  def permuted(q, k, v):
    # The balanced layout: slot j of the row holds token order[j].
    take = lambda x: x[:, order]  # noqa: E731
    out = mapped(take(q), take(k), take(v), index, None if seg is None else take(seg))
    return jnp.zeros_like(out).at[:, order].set(out)  # Back to token order.
  got, vjp = jax.vjp(permuted, q, k, v)
  got_grads = vjp(cotangent)
  diffs = [float(jnp.abs(got - want).max())]
  diffs += [float(jnp.abs(g - w).max()) for g, w in zip(got_grads, want_grads)]
  return diffs


def main():
  cases = {}
  for impl in ("ring", "all_gather"):
    for causal, window, packed in ((True, 0, False), (True, 0, True), (True, 6, True),
                                   (False, 0, True)):
      name = f"{impl} context=4 causal={causal} window={window} packed={packed}"
      cases[name] = run_case((2, 4, 1), ("data", "context", "tensor"), "context", "data",
                             None, impl=impl, causal=causal, window=window, packed=packed)
    # 16 queries per device in pieces of 4 (a long sequence's memory-bounded blocks).
    name = f"{impl} context=2 fsdp=2 tensor=2 causal packed window=6 softcap query_chunk=4"
    cases[name] = run_case((2, 2, 2), ("context", "fsdp", "tensor"), "context", "fsdp",
                           "tensor", impl=impl, causal=True, window=6, packed=True, softcap=5.0,
                           query_chunk=4)
  print(json.dumps(cases))


if __name__ == "__main__":
  main()
