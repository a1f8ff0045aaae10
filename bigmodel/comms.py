"""Per-device communication of one training step, from the config alone.

``step_collectives`` lists the collectives the trainer's step runs on a
mesh, each with the bytes one device sends per optimizer step over the
in-slice network (ICI, NVLink) and over the data-centre network between
slices (DCN, ``mesh.dcn_data`` / ``mesh.dcn_fsdp``):

- **gradient all-reduce** over the replicas (``data`` x ``expert``), once
  per step, of the trainable parameters each device holds;
- **FSDP** over ``fsdp`` (x ``context``, which also splits the weights): per
  layer and micro-batch, the layer's weights gathered for the forward and
  again for the backward pass, and its gradients reduce-scattered; the
  embedding and head count as one more layer;
- **tensor parallelism** over ``tensor``: per layer and micro-batch, the
  attention's and the MLP's output activations all-reduced in the forward
  and their gradients in the backward pass (again in a recomputed forward
  with ``remat=full``);
- **context parallelism** over ``context``: per layer and micro-batch, the
  ring's c - 1 passes of a key/value chunk in the forward pass, again in the
  recomputed forward and with their gradients in the backward pass (or the
  all-gather's gather, regather and reduce-scatter);
- **expert all-to-all** over ``expert``: per layer and micro-batch, the
  expert inputs sent and outputs returned, forward and backward.

Bytes on the wire per device follow the bandwidth-optimal algorithms: an
all-reduce of S bytes over n devices sends 2 S (n - 1) / n, an all-gather,
reduce-scatter or all-to-all S (n - 1) / n, a ring pass S. A collective over
an axis that spans slices runs hierarchically: within each slice first, then
across slices on the 1 / n_in_slice share each device holds, which is what
crosses the DCN. These are estimates to compare layouts with (XLA may
overlap, fuse or reorder them); ``bigmodel.plan`` prices them with
``--ici_bandwidth`` and ``--dcn_bandwidth``.

Shape letters as in ``bigmodel.memory``.
"""
import dataclasses
import math
from typing import Mapping

import jax.numpy as jnp

from bigmodel.activations import gathered_layer_weights, split
from bigmodel.memory import MemoryEstimate
from bigmodel.models import ModelConfig


@dataclasses.dataclass(frozen=True)
class Collective:
  """One kind of collective of a step: what it moves, over which mesh axes,
  and the bytes each device sends per optimizer step within and across
  slices."""
  what: str
  axes: tuple[str, ...]
  ici_bytes: float
  dcn_bytes: float

  @property
  def crosses_slices(self) -> bool:
    return self.dcn_bytes > 0


def _split(wire_factor: float, payload: float, n_ici: int, n_dcn: int) -> tuple[float, float]:
  """(ICI bytes, DCN bytes) per device of a collective whose wire bytes over n
  devices are ``wire_factor`` x payload x (n - 1) / n, run within slices over
  ``n_ici`` devices, then across ``n_dcn`` slices on a 1 / n_ici share."""
  ici = wire_factor * payload * (n_ici - 1) / n_ici
  dcn = wire_factor * payload / n_ici * (n_dcn - 1) / n_dcn
  return ici, dcn


def step_collectives(config, mesh_shape: Mapping[str, int], estimate: MemoryEstimate,
                     dcn: Mapping[str, int] = None) -> list[Collective]:
  """The collectives of ``config``'s train step on ``mesh_shape`` (global axis
  sizes; ``dcn`` the slices along ``data`` and ``fsdp``, {} on one slice)
  with ``estimate`` (``memory.estimate``'s, for the micro-batch and the
  trainable bytes). Kinds that do not occur (an axis of size 1) are left out."""
  dcn = dict(dcn or {})
  c = ModelConfig.from_config(config.model)
  size = lambda axis: int(mesh_shape.get(axis, 1))  # pylint: disable=g-long-lambda
  dcn_data, dcn_fsdp = int(dcn.get("data", 1)), int(dcn.get("fsdp", 1))
  accum = config.optim.grad_accum
  act = jnp.dtype(c.dtype).itemsize
  param = jnp.dtype(c.param_dtype).itemsize
  b, t, context = estimate.micro_batch, size("tensor"), size("context")
  tokens = b * config.data.seq_len // context  # Per device per micro-batch.
  trainable = estimate.grads / (2 if accum > 1 else 1)
  trained_share = trainable / estimate.params if estimate.params else 0.0
  out = []

  def add(what, axes, wire_factor, payload, times, n_dcn=1):
    n = math.prod(size(a) for a in axes)
    if n == 1 or not payload:
      return
    ici, cross = _split(wire_factor, payload * times, n // n_dcn, n_dcn)
    out.append(Collective(what, tuple(a for a in axes if size(a) > 1), ici, cross))

  add("gradient all-reduce", ("data", "expert"), 2, trainable, 1, dcn_data)
  layer = gathered_layer_weights(c, mesh_shape) * param
  table = split(c.vocab_size, t) * c.embed_dim * (1 if c.tie_embeddings else 2) * param
  per_step = accum * (c.num_layers * layer + table)
  add("FSDP gathers (forward, backward)", ("fsdp", "context"), 1, per_step, 2,
      dcn_fsdp)
  add("FSDP reduce-scatters", ("fsdp", "context"), 1, per_step * trained_share, 1,
      dcn_fsdp)
  forward_passes = 2 if c.remat == "full" else 1  # The recomputed forward talks again.
  activations = tokens * c.embed_dim * act
  add("tensor-parallel all-reduces", ("tensor",), 2, activations,
      accum * c.num_layers * 2 * (forward_passes + 1))
  if context > 1:
    kv_chunk = 2 * tokens * split(c.num_kv_heads or c.num_heads, t) * c.head_dim * act
    if c.context_attention == "ring":  # c - 1 passes, forward, recomputed, and gradients.
      add("context ring passes", ("context",), context / (context - 1), kv_chunk,
          accum * c.num_layers * 3 * (context - 1))
    else:  # Gather, regather, reduce-scatter the whole sequence's keys and values.
      add("context all-gathers", ("context",), 1, kv_chunk * context,
          accum * c.num_layers * 3)
  if c.num_experts and c.moe_dispatch == "capacity":
    slots = c.num_experts * max(1, math.ceil(
        c.moe_capacity_factor * tokens * c.experts_per_token / c.num_experts))
    add("expert all-to-alls", ("expert",), 1, slots * c.embed_dim * act,
        accum * c.num_layers * 2 * (forward_passes + 1))
  return out

