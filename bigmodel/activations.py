"""Activation memory of one training step per device, from the config alone.

The residuals the forward pass saves for the backward pass, per layer
(``LAYER_RESIDUALS``, or ``FLASH_LAYER_RESIDUALS`` when attention is a fused
kernel, by remat policy, adjusted by ``layer_residuals`` for the decoder
options, context-parallel attention and mixtures of experts), times the
layers, plus the final norm and the softmax of the logits; and the transient
working set of the backward pass (``activation_bytes``). The tables list
what JAX saves for ``models.gpt.GptBlock`` (``tests/test_plan.py`` checks
them against ``saved_residuals`` of the real model); XLA on GPU/TPU may fuse
a few elementwise ones (GELU's) away, so they are an upper bound there.
``bigmodel.memory`` adds parameters, gradients and optimizer state.

Shape letters as in ``bigmodel.memory``.
"""
import functools
import math
from typing import Mapping

import jax.numpy as jnp

from bigmodel import flops
from bigmodel.models import ModelConfig, context_parallel
from bigmodel.models.family import mlp_matrices

_F32 = 4

# What one GPT layer saves for the backward pass, by remat policy:
# (what, kind, dtype, count). Kinds are sized by `_elements`; dtype "act" is
# model.dtype, "f32" stays float32 whatever the compute dtype (norm statistics,
# attention scores, the probabilities' weighted sum).
LAYER_RESIDUALS: dict[str, tuple[tuple[str, str, str, int], ...]] = {
    "none": (
        ("layer norm internals (x, x - mean, normalised)", "embed", "f32", 6),
        ("layer norm outputs", "embed", "act", 2),
        ("q and attention output", "q_heads", "act", 2),
        ("k and v", "kv_heads", "act", 2),
        ("attention scores", "scores", "f32", 1),
        ("attention probabilities", "scores", "act", 1),
        ("GELU input, internals and output", "mlp", "act", 6),
        ("norm statistics", "token", "f32", 8),
        ("softmax statistics", "head_token", "f32", 2),
        ("norm scales, broadcast", "width", "f32", 2),
        ("weights cast to model.dtype", "weights", "act", 1),
    ),
    # Only the layer input; everything else is recomputed in the backward pass.
    "full": (
        ("layer input", "embed", "act", 1),
    ),
    # Every matmul output: q, k, v, scores, weighted sum, out, wi, wo.
    "dots_saveable": (
        ("q", "q_heads", "act", 1),
        ("k and v", "kv_heads", "act", 2),
        ("attention scores", "scores", "f32", 1),
        ("attention weighted sum", "q_heads", "f32", 1),
        ("attention and MLP output projections", "embed", "act", 2),
        ("MLP input projection", "mlp", "act", 1),
    ),
    # Matmuls with weights only (the attention einsums have batch dims).
    "dots_with_no_batch_dims_saveable": (
        ("q", "q_heads", "act", 1),
        ("k and v", "kv_heads", "act", 2),
        ("attention and MLP output projections", "embed", "act", 2),
        ("MLP input projection", "mlp", "act", 1),
    ),
}

# The same with a fused attention kernel (``attention_impl`` pallas or cudnn,
# which ``auto`` picks on GPU and TPU): it saves q, k, v, its output and the
# softmax log-sum-exp instead of the [L, L] scores and probabilities, and the
# ``dots_*`` policies cannot save inside it (it is recomputed).
FLASH_LAYER_RESIDUALS: dict[str, tuple[tuple[str, str, str, int], ...]] = {
    "none": (
        ("layer norm internals (x, x - mean, normalised)", "embed", "f32", 6),
        ("layer norm outputs", "embed", "act", 2),
        ("q and attention output", "q_heads", "act", 2),
        ("k and v", "kv_heads", "act", 2),
        ("softmax log-sum-exp", "head_token", "f32", 1),
        ("GELU input, internals and output", "mlp", "act", 6),
        ("norm statistics", "token", "f32", 8),
        ("norm scales, broadcast", "width", "f32", 2),
        ("weights cast to model.dtype", "weights", "act", 1),
    ),
    "full": LAYER_RESIDUALS["full"],
    "dots_saveable": LAYER_RESIDUALS["dots_with_no_batch_dims_saveable"],
    "dots_with_no_batch_dims_saveable": LAYER_RESIDUALS["dots_with_no_batch_dims_saveable"],
}

def param_shards(mesh_shape: Mapping[str, int]) -> int:
  """Ways the parameters' model width splits: fsdp (x context, by default)."""
  return mesh_shape["fsdp"] * mesh_shape.get("context", 1)


def split(size: int, ways: int) -> int:
  """Per-device share of a dimension: split if ``ways`` divides it, else whole."""
  return size // ways if size % ways == 0 else size


def _elements(kind: str, c: ModelConfig, b: int, seq_len: int,
              mesh_shape: Mapping[str, int]) -> int:
  """Elements per device of one residual of ``kind`` (see ``LAYER_RESIDUALS``);
  under context parallelism a device holds L / c of each sequence."""
  t = mesh_shape["tensor"]
  context = mesh_shape.get("context", 1)
  local_len = seq_len // context
  tokens = b * local_len
  heads = split(c.num_heads, t)
  if kind == "embed":       # [b, L, D]: activations are replicated over tensor.
    return tokens * c.embed_dim
  if kind == "q_heads":     # [b, L, N/t, H]
    return tokens * heads * c.head_dim
  if kind == "kv_heads":    # [b, L, K/t, H]
    return tokens * split(c.num_kv_heads or c.num_heads, t) * c.head_dim
  if kind == "scores":      # [b, N/t, L, L]
    if context == 1:
      return b * heads * seq_len * seq_len
    # Context parallelism: a block's piece of queries against a ring's chunk
    # of keys or all of them gathered.
    kv_len = local_len if c.context_attention == "ring" else seq_len
    return b * heads * min(local_len, context_parallel.QUERY_CHUNK) * kv_len
  if kind == "mlp":         # [b, L, F/t]
    return tokens * split(c.mlp_dim, t)
  if kind == "token":       # [b, L]
    return tokens
  if kind == "head_token":  # [b, N/t, L]
    return b * heads * local_len
  if kind == "width":       # [D]
    return c.embed_dim
  if kind == "weights":     # The layer's matmul kernels, sharded like parameters.
    return (gathered_layer_weights(c, mesh_shape)
            // _split_ways(c.embed_dim, param_shards(mesh_shape)))
  # Mixture-of-experts layers (``moe_residuals``): U = b x L/c tokens per device.
  k, expert_width = c.experts_per_token, split(c.moe_mlp_dim or c.mlp_dim, t)
  if kind == "router":      # [U, X]
    return tokens * c.num_experts
  if kind == "experts":     # [X]
    return c.num_experts
  if kind == "assignment":  # [U x k]
    return tokens * k
  if kind == "assignment_embed":  # [U x k, D]
    return tokens * k * c.embed_dim
  if kind == "assignment_mlp":    # [U x k, F/t]
    return tokens * k * expert_width
  if kind == "shared_mlp":  # [U, S x F/t]
    return tokens * split((c.moe_mlp_dim or c.mlp_dim) * c.moe_shared_experts, t)
  # Capacity dispatch: one token group per device (moe._token_groups), X x Q
  # slots; with mesh.expert its [X, Q, .] buffers hold e groups' slots of X/e experts.
  slots = c.num_experts * max(1, math.ceil(c.moe_capacity_factor * tokens * k / c.num_experts))
  if kind == "dispatch":    # [U x k, X, Q]
    return tokens * k * slots
  if kind == "expert_embed":  # [X, Q, D]
    return slots * c.embed_dim
  if kind == "expert_mlp":  # [X, Q, F/t]
    return slots * expert_width
  raise ValueError(f"unknown residual kind {kind!r}")


def gathered_layer_weights(c: ModelConfig, mesh_shape: Mapping[str, int]) -> int:
  """Elements per device of one layer's matmul kernels once FSDP has gathered
  them: the tensor axis still splits them (by heads), the expert axis a
  mixture's experts (all of them: each device holds its share of every
  expert, not only those a token runs). Routers are not counted."""
  t = _split_ways(c.num_heads, mesh_shape["tensor"])
  if not c.num_experts:
    return flops.matmul_params_per_layer(c) // t
  per_expert = mlp_matrices(c) * c.embed_dim * (c.moe_mlp_dim or c.mlp_dim)
  others = (flops.matmul_params_per_layer(c, active=False) - c.embed_dim * c.num_experts
            - c.num_experts * per_expert)
  experts = c.num_experts * per_expert
  return others // t + experts // (t * _split_ways(c.num_experts, mesh_shape.get("expert", 1)))


def _split_ways(size: int, ways: int) -> int:
  return ways if size % ways == 0 else 1


def layer_residual_bytes(c: ModelConfig, policy: str, b: int, seq_len: int,
                         mesh_shape: Mapping[str, int], flash: bool = False) -> int:
  """Bytes per device one layer saves for the backward pass under ``policy``.

  ``flash``: attention runs as a fused kernel (``FLASH_LAYER_RESIDUALS``).
  """
  return residual_bytes(layer_residuals(c, policy, flash, mesh_shape.get("context", 1)),
                        c, b, seq_len, mesh_shape)


def residual_bytes(rows, c: ModelConfig, b: int, seq_len: int,
                   mesh_shape: Mapping[str, int]) -> int:
  """Bytes per device of residual table ``rows`` ((what, kind, dtype, count))."""
  act = jnp.dtype(c.dtype).itemsize
  total = 0
  for _, kind, dtype, count in rows:
    if kind == "weights" and jnp.dtype(c.dtype) == jnp.dtype(c.param_dtype):
      continue  # Nothing is cast: the backward pass reads the parameters.
    total += (count * _elements(kind, c, b, seq_len, mesh_shape)
              * {"f32": _F32, "i32": 4}.get(dtype, act))
  return total


def context_residuals(c: ModelConfig, context: int) -> tuple[tuple[str, str, str, int], ...]:
  """What context-parallel attention over ``context`` devices saves per layer
  beyond q, k, v and its output (no remat; measured with ``saved_residuals``).

  Both ways rematerialise their blocks (no [L, L] scores are kept). The ring
  keeps, per step, the chunk of keys and values it received and the running
  output and log-sum-exp; the all-gather the gathered keys and values.
  """
  if context == 1:
    return ()
  if c.context_attention == "ring":
    steps = context - 1
    return (("ring: received key and value chunks", "kv_heads", "act", 2 * steps),
            ("ring: running output", "q_heads", "f32", steps),
            ("ring: running log-sum-exp", "head_token", "f32", steps),
            ("ring: global token indices", "token", "i32", context))
  return (("gathered keys and values", "kv_heads", "act", 2 * context),
          ("global token indices", "token", "i32", 1 + context))


def layer_residuals(c: ModelConfig, policy: str, flash: bool = False,
                    context: int = 1) -> tuple[tuple[str, str, str, int], ...]:
  """The residual table of ``c``'s layers: GPT-2's, adjusted for the decoder options.

  Measured with ``saved_residuals`` per option: RMSNorm keeps half
  LayerNorm's statistics; a gated MLP's second input projection is one more
  matmul output the ``dots_*`` policies save (SiLU gating saves as many [L, F]
  buffers as GELU without a gate, GELU gating two more); without remat, q/k
  norms and post-norms save their internals, soft-capped scores their tanh,
  and alternating local/global layers (``lax.cond`` between two attention
  calls) the untaken branch's residuals too. ``tests/test_plan.py`` checks
  GPT-2's and Llama's block exactly; the rest is within a few per cent.
  Context-parallel attention (``context`` > 1) keeps no scores, as a fused
  kernel, plus ``context_residuals`` without remat (with the ``dots_*``
  policies its steps are recomputed: no dot products are saved inside).
  """
  flash = flash or context > 1
  table = list((FLASH_LAYER_RESIDUALS if flash else LAYER_RESIDUALS)[policy])
  if policy == "none":
    table += context_residuals(c, context)
  adjusted = []
  for what, kind, dtype, count in table:
    if what == "norm statistics" and c.norm == "rmsnorm":
      count //= 2
    if what == "MLP input projection" and c.mlp_gated:
      count += 1
    adjusted.append((what, kind, dtype, count))
  local = c.local_layers()
  if policy == "none":
    if c.mlp_gated and c.mlp_activation.startswith("gelu"):
      adjusted.append(("GELU gate internals", "mlp", "act", 2))
    if c.qk_norm:
      adjusted += [("q/k norm internals", "q_heads", "f32", 3),
                   ("q/k norm internals", "kv_heads", "f32", 3),
                   ("q/k norm statistics", "head_token", "f32", 4)]
    if c.post_norms:
      adjusted += [("post-norm internals", "embed", "f32", 6),
                   ("post-norm statistics", "token", "f32", 4)]
    if c.attn_softcap and not flash:
      adjusted.append(("soft-capped scores", "scores", "f32", 2))
    if 0 < local.sum() < len(local):  # Both branches of the cond keep residuals.
      adjusted += ([("untaken attention branch", "q_heads", "act", 1),
                    ("untaken attention branch", "token", "f32", 1)] if flash else
                   [("untaken attention branch", "scores", "f32", 2),
                    ("untaken attention branch", "q_heads", "act", 1)])
  elif policy != "full" and c.post_norms:
    adjusted.append(("post-norm output", "embed", "act", 1))
  if c.num_experts:  # The MLP's norm output is the router's input, a row of its own.
    adjusted = [(what, kind, dtype, count - (what == "layer norm outputs"))
                for what, kind, dtype, count in adjusted if what not in _DENSE_MLP_ROWS]
    adjusted += moe_residuals(c, policy)
  return tuple(adjusted)


# The rows of the dense MLP, which a mixture of experts replaces by ``moe_residuals``.
_DENSE_MLP_ROWS = ("GELU input, internals and output", "MLP input projection",
                   "GELU gate internals")


def moe_residuals(c: ModelConfig, policy: str) -> tuple[tuple[str, str, str, int], ...]:
  """What a mixture-of-experts MLP (``models.moe``) saves per layer instead of
  the dense MLP's rows, by remat policy and ``model.moe_dispatch`` (measured
  with ``saved_residuals``; ``tests/test_plan.py`` checks them exactly).

  Dropless dispatch sorts the assignments and its grouped matmuls
  (``ragged_dot``) are no dot products to the ``dots_*`` policies; capacity
  dispatch keeps its [U x k, X, Q] one-hot dispatch tensor and runs experts
  as batched einsums, which ``dots_saveable`` saves and
  ``dots_with_no_batch_dims_saveable`` does not (the expert dimension is a
  batch dimension).
  """
  if policy == "full":
    return ()
  capacity = c.moe_dispatch == "capacity"
  projections = 2 if c.mlp_gated else 1
  internals = 6 + (2 if c.mlp_gated and c.mlp_activation.startswith("gelu") else 0)
  rows = [("router logits", "router", "f32", 1)]
  if policy == "none":
    rows += [("router input", "embed", "f32", 1),
             ("routing statistics", "token", "f32", 4),
             ("chosen experts' probabilities", "assignment", "f32", 1),
             ("chosen experts", "assignment", "i32", 1),
             ("gates per assignment", "assignment", "act", 1)]
    if capacity:
      rows += [("dispatch one-hots", "dispatch", "act", 1),
               ("expert inputs", "expert_embed", "act", 1),
               ("expert MLP internals", "expert_mlp", "act", internals),
               ("outputs per assignment", "assignment_embed", "act", 1)]
    else:
      rows += [("sorted assignment indices", "assignment", "i32", 3),
               ("tokens per expert", "experts", "i32", 1),
               ("sorted inputs and outputs", "assignment_embed", "act", 2),
               ("expert MLP internals", "assignment_mlp", "act", internals)]
  elif policy == "dots_saveable" and capacity:
    rows += [("expert inputs", "expert_embed", "act", 1),
             ("expert input projections", "expert_mlp", "act", projections),
             ("outputs per assignment", "assignment_embed", "act", 1)]
  if c.moe_shared_experts:
    rows += ([("shared experts' input", "embed", "act", 1),
              ("shared experts' MLP internals", "shared_mlp", "act", internals)]
             if policy == "none" else
             [("shared experts' input projections", "shared_mlp", "act", projections)])
  return tuple(rows)


def activation_bytes(c: ModelConfig, b: int, seq_len: int, mesh_shape: Mapping[str, int],
                     flash: bool = False, trained_share: float = 1.0,
                     loss_chunk_len: int = 0) -> tuple[int, int]:
  """(saved residuals, peak transient beyond them) of the backward pass, per device.

  ``b`` is the micro-batch per device; ``trained_share`` the share of the
  parameters that train (frozen ones get no weight gradients). Parameter-sized
  buffers (gradients, optimizer temporaries) are not included. The backward pass first runs
  through the head (logits, final norm) while every residual is alive, then
  through the layers, by which time the head's residuals are freed; the peak
  is the larger of the two phases. ``loss_chunk_len``: the head runs in
  chunks of that many positions (``bigmodel.models.chunked_loss``).
  """
  act = jnp.dtype(c.dtype).itemsize
  embed = _elements("embed", c, b, seq_len, mesh_shape)
  vocab = split(c.vocab_size, mesh_shape["tensor"])
  residuals = functools.partial(layer_residual_bytes, c, b=b, seq_len=seq_len,
                                mesh_shape=mesh_shape, flash=flash)
  saved_layers = c.num_layers * residuals(c.remat)
  if loss_chunk_len:
    # The final norm's internals and output; the gradients of the final
    # activations and of the head kernel, made during the forward pass; one
    # chunk's logits, softmax and logit gradient at a time.
    saved_head = embed * (3 * _F32 + 2 * act) + c.embed_dim * vocab * _F32
    head_work = saved_head + 3 * b * min(loss_chunk_len, seq_len) * vocab * _F32
  else:
    logits = b * (seq_len // mesh_shape.get("context", 1)) * vocab * _F32
    # The final layer norm's internals and output, and exp(logits) for the loss.
    saved_head = embed * (3 * _F32 + act) + logits
    # Backward of the head: the logits' gradient and the final activations'.
    head_work = saved_head + logits + embed * _F32
  # Backward of one layer: it recomputes what the policy did not save and
  # needs the score gradients (a fused kernel works in blocks: none); under
  # FSDP the layer's weights are gathered and (those that train) its weight
  # gradients exist unreduced.
  layer_work = residuals("none") - residuals(c.remat)
  if mesh_shape.get("context", 1) > 1:
    # A context-parallel block (jnp, rematerialised): its scores, masked
    # scores, probabilities and their gradients, measured 6 at once in XLA's
    # buffer assignment.
    layer_work += 6 * _elements("scores", c, b, seq_len, mesh_shape) * _F32
  elif not flash:
    layer_work += _elements("scores", c, b, seq_len, mesh_shape) * _F32
  if param_shards(mesh_shape) > 1:
    layer_work += int((1 + trained_share) * gathered_layer_weights(c, mesh_shape)
                      * jnp.dtype(c.param_dtype).itemsize)
  saved = saved_layers + saved_head
  return saved, saved_layers + max(head_work, layer_work) - saved
