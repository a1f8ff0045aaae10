"""A stack of identical layers, scanned or unrolled, with a named remat policy.

Shared by every family. A block follows the scan carry convention in every
model mode: ``block(x, *args) -> (x, cache)`` where ``args`` are broadcast to
every layer and the last one is the static ``deterministic`` flag; the cache
is None in training. Decoding adds one per-layer input after the broadcast
ones (each layer's key/value cache); the per-layer caches come back stacked.
"""
from typing import Any, Callable

import flax.linen as nn
import jax

# Named rematerialisation policies (MaxText's naming): what the backward pass
# may keep from the forward pass instead of recomputing it.
REMAT_POLICIES: dict[str, Any] = {
    "none": None,  # No remat: keep every activation.
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable":
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def apply_layer_stack(
    block_cls: Callable[..., nn.Module],
    x: jax.Array,
    *args: Any,
    num_layers: int,
    scan: bool,
    remat: str,
    name: str,
    layer_inputs: Any = None,
    **block_kwargs: Any,
) -> tuple[jax.Array, Any]:
  """Applies ``num_layers`` blocks to ``x``; must be called inside ``nn.compact``.

  With ``scan`` the parameters get a leading ``layers`` axis and the layer is
  compiled once, so compile time stays flat in depth. ``layer_inputs`` (a
  pytree with a leading [layers] axis, e.g. stacked ``KVCache``s) is passed
  to layer i as its slice i, after ``args``. Returns ``(x, caches)``: the
  blocks' second outputs stacked over layers (None in training).
  """
  if remat not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {remat!r}; choose from {tuple(REMAT_POLICIES)}")
  extra = () if layer_inputs is None else (layer_inputs,)
  if remat != "none":
    # `deterministic` (the last broadcast argument) selects Python branches: keep it static.
    block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[remat],
                         prevent_cse=not scan, static_argnums=(-1 - len(extra),))
  if scan:
    stack = nn.scan(
        block_cls,
        # Values a layer sows (MoE auxiliary losses) stack over layers too.
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * len(args) + (0,) * len(extra),
        length=num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(name=name, **block_kwargs)
    return stack(x, *args, *extra)
  outputs = []
  for i in range(num_layers):
    layer_extra = tuple(jax.tree_util.tree_map(lambda a, i=i: a[i], e) for e in extra)
    x, y = block_cls(name=f"{name}_{i}", **block_kwargs)(x, *args, *layer_extra)
    outputs.append(y)
  return x, jax.tree_util.tree_map(lambda *ys: jax.numpy.stack(ys), *outputs)
