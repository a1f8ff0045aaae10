"""The Mixture-of-Experts MLP block (routing, dropless vs capacity dispatch, auxiliary
losses) and decoders built with it (``model.num_experts``)."""
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigmodel import flops, objectives, sharding
from bigmodel.config import validate
from bigmodel.errors import UserError
from bigmodel.models import ModelConfig, build_model, families
from bigmodel.models.layers import ACTIVATIONS
from bigmodel.models.moe import MoeMlp
from bigmodel.optim import make_optimizer
from bigmodel.state import create_sharded_state
from bigmodel.train_step import jit_train_step
from model_fixtures import jit_objective, random_family_batch, tiny_config, unstack_layers

B, L, D, F, X = 2, 8, 16, 32, 4


def _setup(**kwargs):
  module = MoeMlp(num_experts=X, top_k=2, hidden_dim=F, **kwargs)
  x = jax.random.normal(jax.random.key(0), (B, L, D))
  params = flax.core.meta.unbox(module.init(jax.random.key(1), x)["params"])
  return module, params, x


def _apply(module, params, x):
  y, state = module.apply({"params": params}, x, mutable=["intermediates"])
  return y, {k: v[0] for k, v in state["intermediates"].items()}


@pytest.mark.parametrize("router, gated, shared", [("softmax", True, 0), ("sigmoid", False, 1)])
def test_dropless_equals_routing_each_token_by_hand(router, gated, shared):
  module, params, x = _setup(router=router, gated=gated, num_shared_experts=shared)
  y, _ = _apply(module, params, x)
  act = ACTIVATIONS["silu"]
  x_UxD = np.asarray(x.reshape(-1, D))
  logits = x_UxD @ np.asarray(params["router"])
  probs = np.asarray(jax.nn.softmax(logits) if router == "softmax" else jax.nn.sigmoid(logits))
  want = np.zeros_like(x_UxD)
  for u in range(len(x_UxD)):
    chosen = np.argsort(-probs[u], kind="stable")[:2]
    gates = probs[u, chosen] / probs[u, chosen].sum()
    for gate, e in zip(gates, chosen):
      h = np.asarray(act(x_UxD[u] @ params["wi"][e]))
      if gated:
        h = h * (x_UxD[u] @ params["wi_linear"][e])
      want[u] += gate * (h @ np.asarray(params["wo"][e]))
  if shared:
    shared_p = params["shared"]
    want += np.asarray(act(x_UxD @ shared_p["wi"]["kernel"])) @ shared_p["wo"]["kernel"]
  np.testing.assert_allclose(np.asarray(y).reshape(-1, D), want, rtol=1e-4, atol=1e-5)


def test_capacity_with_room_for_every_token_equals_dropless_with_gradients():
  dropless, params, x = _setup()
  capacity = MoeMlp(num_experts=X, top_k=2, hidden_dim=F, dispatch="capacity",
                    capacity_factor=float(X))  # Q = U * k: no expert can overflow.

  def loss(module, params):
    y, _ = _apply(module, params, x)
    return (y * jnp.arange(y.size).reshape(y.shape) / y.size).sum()
  want_loss, want_grads = jax.value_and_grad(lambda p: loss(dropless, p))(params)
  got_loss, got_grads = jax.value_and_grad(lambda p: loss(capacity, p))(params)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  for (path, got), want in zip(flax.traverse_util.flatten_dict(got_grads).items(),
                               flax.traverse_util.flatten_dict(want_grads).values()):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=str(path))
  assert _apply(capacity, params, x)[1]["moe_dropped"] == 0.0


def test_a_small_capacity_drops_the_overflow_and_reports_it():
  _, params, x = _setup()
  module = MoeMlp(num_experts=X, top_k=2, hidden_dim=F, dispatch="capacity",
                  capacity_factor=0.5)
  _, losses = _apply(module, params, x)
  logits = np.asarray(x.reshape(-1, D)) @ np.asarray(params["router"])
  chosen = np.argsort(-logits, axis=1, kind="stable")[:, :2]
  counts = np.bincount(chosen.ravel(), minlength=X)
  q = math.ceil(0.5 * chosen.size / X)
  np.testing.assert_allclose(losses["moe_dropped"],
                             np.maximum(counts - q, 0).sum() / chosen.size, rtol=1e-6)
  assert losses["moe_dropped"] > 0


def test_the_load_balancing_loss_is_smallest_for_uniform_routing():
  module, params, x = _setup()
  uniform = dict(params, router=jnp.zeros_like(params["router"]))
  assert _apply(module, uniform, x)[1]["moe_load_balance"] == pytest.approx(1.0)
  skewed = dict(params, router=params["router"].at[:, 0].add(
      10.0 * jnp.sign(x.reshape(-1, D).mean(0))))
  _, losses = _apply(module, skewed, x)
  assert losses["moe_load_balance"] > 1.2
  assert losses["moe_router_z"] > _apply(module, uniform, x)[1]["moe_router_z"]


# --- In a decoder (model.num_experts): Mixtral / Qwen-MoE-style layers. ---

def _moe_decoder(**overrides):
  """A tiny Llama-shaped decoder (gated SiLU, no biases) with 4 experts, top 2."""
  config = tiny_config("llama", num_experts=4, experts_per_token=2, **overrides)
  return config, build_model(config.model)


def _init(config, model):
  optimizer, _ = make_optimizer(config.optim, 10)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  with sharding.activate(mesh):
    state, _ = create_sharded_state(config, model, optimizer, mesh)
  return jax.device_get(state.params)


def test_the_auxiliary_losses_join_the_training_loss_not_evaluation():
  config, model = _moe_decoder()
  params = _init(config, model)
  batch = random_family_batch("llama", 4, 32, 128, num_segments=2)
  objective = objectives.for_config(config)
  train_sum, weights, extras = jit_objective(objective, model, params, batch, jax.random.key(0))
  eval_sum, _, eval_extras = jit_objective(objective, model, params, batch)
  value = lambda extras, name: float(np.ravel(extras[name])[0])  # Per token, all equal.
  balance, router_z = value(extras, "moe_load_balance"), value(extras, "moe_router_z")
  np.testing.assert_allclose(value(eval_extras, "moe_load_balance"), balance, rtol=1e-6)
  np.testing.assert_allclose(train_sum - eval_sum,
                             (0.01 * balance + 0.001 * router_z) * weights.sum(), rtol=1e-4)
  # A router that starts near uniform: balanced use, logits near 0 (so the
  # z-loss is near log(4)^2).
  assert 0.95 < balance < 1.2 and abs(router_z - math.log(4) ** 2) < 0.1
  assert value(extras, "moe_dropped") == 0.0  # Dropless.
  # The same model unrolled sows per layer; the averages agree.
  unrolled_config, unrolled = _moe_decoder(scan=False)
  unrolled_sum, _, unrolled_extras = jit_objective(
      objectives.for_config(unrolled_config), unrolled, unstack_layers(params, 2), batch,
      jax.random.key(0))
  np.testing.assert_allclose(unrolled_sum, train_sum, rtol=1e-5)
  np.testing.assert_allclose(value(unrolled_extras, "moe_router_z"), router_z, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_a_train_step_logs_the_router_and_lowers_the_loss(family):
  """A decoder with 4 experts, top 2, and a Switch T5 (top 1, every encoder and
  decoder MLP a mixture), both with capacity 1.0."""
  top_k = 1 if family == "t5" else 2
  config = tiny_config(family, num_experts=4, experts_per_token=top_k, moe_dispatch="capacity",
                       moe_capacity_factor=1.0)
  validate(config)
  model = build_model(config.model)
  config.optim.update(warmup_steps=0, learning_rate=1e-2)
  optimizer, schedule = make_optimizer(config.optim, 10)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  batch = random_family_batch(family, 4, 32, 128)
  with sharding.activate(mesh):
    state, shardings = create_sharded_state(config, model, optimizer, mesh)
    step = jit_train_step(model, optimizer, schedule, 1, mesh, shardings,
                          objectives.for_config(config))
    global_batch = sharding.global_batch(batch, mesh)
    losses = []
    for _ in range(4):
      state, metrics = step(state, global_batch)
      losses.append(float(metrics["loss"]))
  assert {"moe_load_balance", "moe_router_z", "moe_dropped"} <= set(metrics)
  assert 0.0 <= float(metrics["moe_dropped"]) < 0.5  # Capacity 1.0 drops some, not most.
  assert losses[-1] < losses[0]
  stacks = ([state.params["encoder"]["blocks"], state.params["decoder"]["blocks"]]
            if family == "t5" else [state.params["blocks"]])
  for blocks in stacks:  # [layers, experts, D, F] kernels where the MLP was.
    assert blocks["moe"]["wi"].shape == (2, 4, 64, 128) and "mlp" not in blocks
  c = ModelConfig.from_config(config.model)
  # FLOPs count the router and the k experts a token runs, not all 4.
  lengths = ({"encoder_inputs": 32, "decoder_inputs": 32} if family == "t5"
             else {"inputs": 32})
  dense = ModelConfig.from_config(tiny_config(family).model)
  f = families.get(c.family)
  layers = c.num_layers + (c.num_decoder_layers or c.num_layers if family == "t5" else 0)
  tokens_per_layer = 32
  extra = layers * tokens_per_layer * 2 * (
      c.embed_dim * 4 + (top_k - 1) * 3 * c.embed_dim * c.mlp_dim)
  assert f.forward_flops(c, lengths) == f.forward_flops(dense, lengths) + extra


def test_flops_count_the_experts_a_token_runs():
  """Top-1 of 4 experts as wide as the dense MLP costs the dense layer plus the router."""
  dense = ModelConfig.from_config(tiny_config("llama").model)
  top1 = ModelConfig.from_config(tiny_config("llama", num_experts=4, experts_per_token=1).model)
  lengths = {"inputs": 32}
  router = 32 * 2 * dense.embed_dim * 4 * dense.num_layers
  assert (families.get("gpt").forward_flops(top1, lengths)
          == families.get("gpt").forward_flops(dense, lengths) + router)
  # Parameters count every expert.
  model = build_model(tiny_config("llama", num_experts=4, experts_per_token=1).model)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  counted = sum(x.size for x in jax.tree_util.tree_leaves(flax.core.meta.unbox(shapes)))
  assert flops.param_count(top1) == counted


@pytest.mark.parametrize("overrides,message", [
    ({"experts_per_token": 5}, "experts_per_token"),
    ({"moe_router": "argmax"}, "moe_router"),
    ({"moe_dispatch": "sparse"}, "moe_dispatch"),
    ({"mlp_bias": True}, "mlp_bias=False"),
    ({"num_experts": -1}, "num_experts"),
])
def test_bad_moe_settings_are_refused(overrides, message):
  config = tiny_config("llama", **{"num_experts": 4, **overrides})
  with pytest.raises(UserError, match=message):
    validate(config)
