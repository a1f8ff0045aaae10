"""A stack of identical layers, scanned or unrolled, with a named remat policy.

Shared by every family. A block follows the scan carry convention:
``block(x, *args) -> (x, None)`` where ``args`` are broadcast to every layer and
the last one is the static ``deterministic`` flag.
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
    **block_kwargs: Any,
) -> jax.Array:
  """Applies ``num_layers`` blocks to ``x``; must be called inside ``nn.compact``.

  With ``scan`` the parameters get a leading ``layers`` axis and the layer is
  compiled once, so compile time stays flat in depth.
  """
  if remat not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {remat!r}; choose from {tuple(REMAT_POLICIES)}")
  if remat != "none":
    # `deterministic` (the last argument) selects Python branches: keep it static.
    block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[remat],
                         prevent_cse=not scan, static_argnums=(-1,))
  if scan:
    stack = nn.scan(
        block_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * len(args),
        length=num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(name=name, **block_kwargs)
    x, _ = stack(x, *args)
    return x
  for i in range(num_layers):
    x, _ = block_cls(name=f"{name}_{i}", **block_kwargs)(x, *args)
  return x
