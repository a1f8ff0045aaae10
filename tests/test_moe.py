"""The Mixture-of-Experts MLP block: routing, dropless vs capacity dispatch, auxiliary losses."""
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigmodel.models.layers import ACTIVATIONS
from bigmodel.models.moe import MoeMlp

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
