"""A whole GPT train step with the Pallas kernel equals the XLA one.

On CPU the kernel runs in Pallas' interpreter, so this checks the plumbing
(custom VJP under scan and remat, GQA, packed segments, padding of the short
head dim) end to end, not speed.
"""
import jax
import numpy as np
import pytest

from bigmodel import sharding
from bigmodel.models import build_model
from bigmodel.optim import make_optimizer
from bigmodel.state import create_sharded_state
from bigmodel.train_step import make_train_step
from model_fixtures import random_batch, tiny_config


def _train(impl, overrides, batch, steps=3):
  """Per-step metrics and the final parameters (the learning rate is 0 at
  step 0 of the warmup, so several steps are needed to move the parameters)."""
  config = tiny_config(attention_impl=impl, **overrides)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  model = build_model(config.model)
  opt, schedule = make_optimizer(config.optim, 100)
  history = []
  with sharding.activate(mesh):
    state, _ = create_sharded_state(config, model, opt, mesh)
    step = jax.jit(make_train_step(model, opt, schedule, 1))
    for _ in range(steps):
      state, metrics = step(state, batch)
      history.append(jax.device_get(metrics))
  return history, jax.device_get(state.params)


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(num_kv_heads=2, position_embedding="rope", remat="full", scan=False),
], ids=["default", "gqa_rope_remat_unrolled"])
def test_pallas_train_step_equals_xla(overrides):
  batch = random_batch(4, 32, 128, seed=5, num_segments=3)
  batch["segment_ids"][1, 26:] = 0  # Trailing padding in one row.
  batch["loss_mask"][1, 26:] = 0.0
  xla_history, xla_params = _train("xla", overrides, batch)
  pallas_history, pallas_params = _train("pallas", overrides, batch)
  for xla_metrics, pallas_metrics in zip(xla_history, pallas_history):
    assert pallas_metrics["loss"] == pytest.approx(xla_metrics["loss"], rel=1e-5)
    assert pallas_metrics["grad_norm"] == pytest.approx(xla_metrics["grad_norm"], rel=1e-4)
  assert xla_history[-1]["learning_rate"] > 0
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                         pallas_params, xla_params)
