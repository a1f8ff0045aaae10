"""Mixture-of-Experts MLP: top-k routing to X expert MLPs (building block).

``MoeMlp`` replaces a dense ``layers.Mlp``: a router scores each token
against the X experts (softmax, as Mixtral and Switch, or sigmoid, as
DeepSeek-V3), the token goes to its top k, and its output is the gate-
weighted sum of those experts' (gated) MLPs, plus optional always-on shared
experts (Qwen-MoE, DeepSeek). Two ways to run the experts, equal when no
token is dropped:

* ``dropless`` (default): the U x k assignments are sorted by expert and
  each expert multiplies exactly its tokens, through ``jax.lax.ragged_dot``
  (grouped matmul: MegaBlocks, MaxText's sparse matmul);
* ``capacity``: the tokens split into G groups, one per batch shard of the
  mesh (1 on one device); in each group an expert takes at most
  Q = ceil(capacity_factor x T x k / X) of the group's T tokens'
  assignments, in token order (Switch Transformer, GShard); the rest are
  dropped (their share is reported), and experts run as one batched matmul
  [G, X, Q, D] x [X, D, F]. With an ``expert`` mesh axis (``mesh.expert``)
  the experts' weights split over it and the [G, X, Q, D] inputs move from
  their groups' devices to their experts' by all-to-all, and back.

Auxiliary losses, sown into the ``intermediates`` collection as
``moe_load_balance`` (Switch: X * sum_x f_x * P_x, f the share of
assignments, P the mean router probability; 1 when routing is uniform, its
minimum for balanced use) and ``moe_router_z`` (ST-MoE: the mean squared
log-sum-exp of the router logits), with ``moe_dropped`` (share of
assignments dropped). Shape letters as in ``bigmodel.models``, plus
U tokens (B x L), X experts, A assignments (U x k, or T x k in a group),
G token groups, T tokens in a group (U / G), Q expert capacity.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from bigmodel.errors import UserError
from bigmodel.models.layers import ACTIVATIONS, Dtype, Mlp, constrain, logical_init
from bigmodel.sharding import axes_size, split_axes

# The model.* options of a mixture of experts, and their defaults (options of
# every family with expert layers: gpt and t5).
OPTIONS = {
    "num_experts": 0, "experts_per_token": 2, "moe_mlp_dim": 0, "moe_router": "softmax",
    "moe_normalize_top_k": True, "moe_dispatch": "dropless", "moe_capacity_factor": 1.25,
    "moe_shared_experts": 0, "moe_load_balance_weight": 0.01, "moe_router_z_weight": 0.001,
}
ROUTERS = ("softmax", "sigmoid")
DISPATCHES = ("dropless", "capacity")
# What a layer sows, by name (the training loss adds the first two, weighted
# by model.moe_load_balance_weight and model.moe_router_z_weight).
AUX_NAMES = ("moe_load_balance", "moe_router_z", "moe_dropped")


def validate(m: Mapping[str, Any]) -> None:
  """UserError (one line) for a bad ``model.num_experts`` > 0 setting (``m``: the
  family's options)."""
  if not 1 <= m["experts_per_token"] <= m["num_experts"]:
    raise UserError(f"model.experts_per_token={m['experts_per_token']} must be in [1, "
                    f"model.num_experts={m['num_experts']}]")
  if m["moe_router"] not in ROUTERS:
    raise UserError(f"model.moe_router={m['moe_router']!r} is not one of: {', '.join(ROUTERS)}")
  if m["moe_dispatch"] not in DISPATCHES:
    raise UserError(f"model.moe_dispatch={m['moe_dispatch']!r} is not one of: "
                    f"{', '.join(DISPATCHES)}")
  if m.get("mlp_bias"):
    raise UserError("model.num_experts > 0 needs model.mlp_bias=False (experts have no biases)")
  if m["moe_capacity_factor"] <= 0:
    raise UserError(f"model.moe_capacity_factor must be positive, got "
                    f"{m['moe_capacity_factor']}")


def from_config(c, gated: bool, name: str = "moe") -> "MoeMlp":
  """The MoE MLP of a ``ModelConfig`` with ``num_experts`` > 0, its experts
  ``gated`` as the family's dense MLP would be, with its activation."""
  return MoeMlp(num_experts=c.num_experts, top_k=c.experts_per_token,
                hidden_dim=c.moe_mlp_dim or c.mlp_dim, activation=c.mlp_activation,
                gated=gated, router=c.moe_router, normalize_top_k=c.moe_normalize_top_k,
                dispatch=c.moe_dispatch, capacity_factor=c.moe_capacity_factor,
                num_shared_experts=c.moe_shared_experts, dtype=c.dtype,
                param_dtype=c.param_dtype, name=name)


def layer_weights(c, matrices: int, active: bool = True) -> int:
  """Weights of one MoE layer of experts with ``matrices`` D x F matrices
  each: the router, then with ``active`` the ``experts_per_token`` experts a
  token runs (what FLOPs and MFU count), else all experts; and the shared
  experts."""
  experts = (c.experts_per_token if active else c.num_experts) + c.moe_shared_experts
  return c.embed_dim * c.num_experts + experts * matrices * c.embed_dim * (c.moe_mlp_dim
                                                                          or c.mlp_dim)


def aux_losses(intermediates: Mapping[str, Any]) -> dict[str, jax.Array]:
  """The sown ``AUX_NAMES`` values averaged over layers (scanned layers sow
  one [layers] array, unrolled ones one scalar each): {name: scalar}."""
  flat = jax.tree_util.tree_flatten_with_path(intermediates)[0]
  out = {}
  for name in AUX_NAMES:
    values = [jnp.ravel(x) for path, x in flat
              if any(getattr(p, "key", None) == name for p in path)]
    if values:
      out[name] = jnp.concatenate(values).mean()
  return out


class MoeMlp(nn.Module):
  """Top-k mixture of (gated) MLP experts; see the module docstring."""
  num_experts: int
  top_k: int
  hidden_dim: int            # F of each expert.
  activation: str = "silu"
  gated: bool = True         # SwiGLU experts (Mixtral, Qwen-MoE); False: Switch's plain MLP.
  router: str = "softmax"
  normalize_top_k: bool = True  # Gates of the chosen k sum to 1 (Mixtral; Qwen3 norm_topk_prob).
  dispatch: str = "dropless"
  capacity_factor: float = 1.25
  num_shared_experts: int = 0   # Always-on experts of width hidden_dim (as one wider MLP).
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _kernel(self, name: str, shape: tuple[int, ...], axes: tuple) -> jax.Array:
    kernel = self.param(name, logical_init(nn.initializers.normal(0.02), axes), shape,
                        self.param_dtype)
    return kernel.astype(self.dtype)

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, deterministic: bool = True) -> jax.Array:
    del deterministic  # No dropout inside experts (as Mixtral, Qwen-MoE).
    if self.router not in ROUTERS or self.dispatch not in DISPATCHES:
      raise ValueError(f"router {self.router!r} / dispatch {self.dispatch!r} not in "
                       f"{ROUTERS} / {DISPATCHES}")
    if not 0 < self.top_k <= self.num_experts:
      raise ValueError(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
    b, length, d = x_BxLxD.shape
    x_UxD = x_BxLxD.reshape(b * length, d).astype(self.dtype)
    router_DxX = self.param("router", logical_init(nn.initializers.normal(0.02),
                                                   ("embed", None)),
                            (d, self.num_experts), self.param_dtype)
    logits_UxX = jnp.dot(x_UxD.astype(jnp.float32), router_DxX.astype(jnp.float32))
    probs_UxX = (jax.nn.softmax(logits_UxX) if self.router == "softmax"
                 else jax.nn.sigmoid(logits_UxX))
    gates_Uxk, experts_Uxk = jax.lax.top_k(probs_UxX, self.top_k)
    if self.normalize_top_k:
      gates_Uxk = gates_Uxk / gates_Uxk.sum(-1, keepdims=True)
    self._sow_losses(logits_UxX, probs_UxX, experts_Uxk)

    wi_XxDxF = self._kernel("wi", (self.num_experts, d, self.hidden_dim),
                            ("exp", "embed", "mlp"))
    wi_lin_XxDxF = (self._kernel("wi_linear", (self.num_experts, d, self.hidden_dim),
                                 ("exp", "embed", "mlp")) if self.gated else None)
    wo_XxFxD = self._kernel("wo", (self.num_experts, self.hidden_dim, d),
                            ("exp", "mlp", "embed"))
    experts = (wi_XxDxF, wi_lin_XxDxF, wo_XxFxD)
    if self.dispatch == "dropless":
      y_UxD = self._dropless(x_UxD, gates_Uxk, experts_Uxk, *experts,
                             token_axes=_token_axes(b, length))
    else:
      y_UxD = self._capacity(x_UxD, gates_Uxk, experts_Uxk, *experts,
                             groups=_token_groups(b))
    if self.num_shared_experts:
      y_UxD = y_UxD + Mlp(self.hidden_dim * self.num_shared_experts, self.activation,
                          self.gated, use_bias=False, dtype=self.dtype,
                          param_dtype=self.param_dtype, name="shared")(x_UxD[None])[0]
    return y_UxD.reshape(b, length, d).astype(self.dtype)

  def _sow_losses(self, logits_UxX, probs_UxX, experts_Uxk) -> None:
    num_assignments = experts_Uxk.size
    share_X = jnp.zeros(self.num_experts).at[experts_Uxk.ravel()].add(1.0) / num_assignments
    router_probs_X = probs_UxX.mean(0)
    if self.router == "sigmoid":  # Probabilities per expert are independent: normalise.
      router_probs_X = router_probs_X / router_probs_X.sum()
    self.sow("intermediates", "moe_load_balance",
             self.num_experts * jnp.sum(share_X * router_probs_X))
    self.sow("intermediates", "moe_router_z",
             jnp.mean(jax.nn.logsumexp(logits_UxX, axis=-1) ** 2))

  def _expert_mlp(self, h_in, wi, wi_lin, wo, matmul):
    act = ACTIVATIONS[self.activation]
    h = act(matmul(h_in, wi))
    if wi_lin is not None:
      h = h * matmul(h_in, wi_lin)
    return matmul(h, wo)

  def _dropless(self, x_UxD, gates_Uxk, experts_Uxk, wi, wi_lin, wo, token_axes) -> jax.Array:
    """Every assignment computed: sorted by expert, grouped matmuls.

    On a mesh each device sorts and runs its own tokens (``shard_map`` over
    the ``token_axes`` that split them): XLA cannot split a sort or a grouped
    matmul over tokens and would run every token on every device. Inside,
    the experts' model width is gathered (rematerialised in the backward
    pass, whose gradients reduce-scatter: FSDP), their hidden width stays
    split over the tensor axis (the outputs summed over it: Megatron).
    """
    k = experts_Uxk.shape[1]
    weights = (wi, wi_lin, wo)
    names = (("exp", "embed", "mlp"), ("exp", "embed", "mlp"), ("exp", "mlp", "embed"))
    specs = [_split_spec(w.shape, n) if w is not None else None
             for w, n in zip(weights, names)] if token_axes else [None] * 3

    def local(x_TxD, gates_Txk, experts_Txk, *weights):
      if token_axes:
        weights = [None if w is None else _gather(w, tuple(spec), ("mlp",), n)
                   for w, spec, n in zip(weights, specs, names)]
      experts_A = experts_Txk.ravel()
      order_A = jnp.argsort(experts_A, stable=True)
      tokens_A = order_A // k  # The token of each sorted assignment.
      sizes_X = jnp.bincount(experts_A, length=self.num_experts).astype(jnp.int32)

      def matmul(lhs, rhs):
        return jax.lax.ragged_dot(lhs, rhs, sizes_X, preferred_element_type=jnp.float32
                                  ).astype(self.dtype)
      out_AxD = self._expert_mlp(x_TxD[tokens_A], *weights, matmul)
      gate_A = gates_Txk.ravel()[order_A].astype(out_AxD.dtype)
      y_TxD = jnp.zeros(x_TxD.shape, out_AxD.dtype).at[tokens_A].add(out_AxD * gate_A[:, None])
      hidden_axes = specs[0][2] if token_axes else None  # wi's mlp dimension: tensor.
      return jax.lax.psum(y_TxD, hidden_axes) if hidden_axes else y_TxD

    self.sow("intermediates", "moe_dropped", jnp.float32(0.0))
    if not token_axes:
      return local(x_UxD, gates_Uxk, experts_Uxk, *weights)
    tokens = P(token_axes)
    return jax.shard_map(
        local, mesh=jax.sharding.get_abstract_mesh(),
        in_specs=(tokens, tokens, tokens, *(None if s is None else P(*s) for s in specs)),
        out_specs=tokens)(x_UxD, gates_Uxk, experts_Uxk, *weights)

  def _capacity(self, x_UxD, gates_Uxk, experts_Uxk, wi, wi_lin, wo, groups) -> jax.Array:
    """At most Q assignments per expert and token group, in token order; the
    rest dropped. Experts split over the ``expert`` mesh axis get their
    inputs by all-to-all (the sharding constraints below; GShard)."""
    u, k = experts_Uxk.shape
    # One group has nothing to place: no constraints (nor could 1 row split).
    shard = constrain if groups > 1 else lambda x, axes: x
    tokens = u // groups  # T: tokens per group.
    capacity = max(1, math.ceil(self.capacity_factor * tokens * k / self.num_experts))
    onehot_GxAxX = jax.nn.one_hot(experts_Uxk.reshape(groups, tokens * k), self.num_experts,
                                  dtype=jnp.int32)
    # Place in its expert's queue, counted within the group (no cross-device scan).
    slot_GxA = (jnp.cumsum(onehot_GxAxX, axis=1) * onehot_GxAxX - 1).max(-1)
    kept_GxA = slot_GxA < capacity
    self.sow("intermediates", "moe_dropped", 1.0 - kept_GxA.mean())
    # dispatch [G, A, X, Q]: 1 where assignment a sits in slot q of expert x.
    dispatch_GxAxXxQ = (onehot_GxAxX[..., None] * jax.nn.one_hot(
        jnp.where(kept_GxA, slot_GxA, capacity), capacity, dtype=jnp.int32)[:, :, None, :])
    dispatch_GxAxXxQ = shard(dispatch_GxAxXxQ.astype(self.dtype), ("batch", None, None, None))
    x_GxAxD = jnp.repeat(x_UxD, k, axis=0).reshape(groups, tokens * k, -1)
    expert_in_GxXxQxD = jnp.einsum("gaxq,gad->gxqd", dispatch_GxAxXxQ, x_GxAxD)
    # The all-to-all: from each batch shard's groups to each expert's devices.
    expert_in_GxXxQxD = shard(expert_in_GxXxQxD, ("moe_group", "exp", None, "act_embed"))

    def matmul(lhs, rhs):
      return jnp.einsum("gxqd,xdf->gxqf", lhs, rhs)
    expert_out_GxXxQxD = self._expert_mlp(expert_in_GxXxQxD, wi, wi_lin, wo, matmul)
    expert_out_GxXxQxD = shard(expert_out_GxXxQxD, ("moe_group", "exp", None, "act_embed"))
    # And back: the outputs to their tokens' batch shards.
    expert_out_GxXxQxD = shard(expert_out_GxXxQxD, ("batch", None, None, "act_embed"))
    out_GxAxD = jnp.einsum("gaxq,gxqd->gad", dispatch_GxAxXxQ, expert_out_GxXxQxD)
    out_AxD = out_GxAxD.reshape(u * k, -1) * gates_Uxk.ravel()[:, None].astype(out_GxAxD.dtype)
    return out_AxD.reshape(u, k, -1).sum(1)


def _split_spec(shape: tuple[int, ...], names: tuple[str, ...]) -> list:
  """The mesh axes of more than one device (or None) that split each
  dimension of a parameter of ``shape`` with logical ``names``, as
  ``sharding.logical_to_shardings`` places it (a dimension they do not
  divide stays whole)."""
  mesh = jax.sharding.get_abstract_mesh()
  spec = []
  for dim, axes in zip(shape, nn.logical_to_mesh_axes(names)):
    axes = split_axes(mesh, axes)
    spec.append(axes if axes and dim % axes_size(mesh, axes) == 0 else None)
  return spec


@functools.partial(jax.checkpoint, static_argnums=(1, 2, 3))
def _gather(w: jax.Array, spec: tuple, keep: tuple, names: tuple) -> jax.Array:
  """Inside ``shard_map``: the whole of ``w`` but the dimensions whose logical
  name is in ``keep``, all-gathered (recomputed in the backward pass, not kept)."""
  for dim, (axes, name) in enumerate(zip(spec, names)):
    if axes and name not in keep:
      w = jax.lax.all_gather(w, axes, axis=dim, tiled=True)
  return w


def _token_axes(batch_size: int, length: int) -> tuple[str, ...]:
  """The mesh axes (of more than one device) that split the U = B x L tokens
  as the rules split batch and length (those that divide them), in the
  order that flattening [B, L] keeps; () outside a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  token_axes = []
  for name, size in (("batch", batch_size), ("length", length)):
    axes = split_axes(mesh, nn.logical_to_mesh_axes((name,))[0])
    if size % axes_size(mesh, axes) == 0:
      token_axes += axes
  return tuple(token_axes)


def _token_groups(batch_size: int) -> int:
  """G, the token groups the capacity path routes in: one per batch shard of
  the mesh in use (so each device places its own tokens, and only the
  experts' all-to-all crosses devices), 1 outside a mesh or when the shards
  do not divide the batch. Capacity counts per group, as in GShard."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  groups = axes_size(mesh, nn.logical_to_mesh_axes(("batch",))[0])
  return groups if batch_size % groups == 0 else 1
