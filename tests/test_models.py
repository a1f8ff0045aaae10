"""GPT model: shapes, causality, packing isolation, and learning."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigmodel import sharding
from bigmodel.models import build_model
from bigmodel.optim import make_optimizer
from bigmodel.state import create_sharded_state
from bigmodel.train_step import make_train_step
from model_fixtures import random_batch, tiny_config


def _init(config, seq_len=32):
  model = build_model(config.model)
  params = model.init(jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32))["params"]
  return model, params


@pytest.mark.parametrize("overrides", [
    dict(), dict(scan=False), dict(position_embedding="rope"), dict(tie_embeddings=False),
    dict(remat="full"), dict(num_kv_heads=2), dict(dtype="bfloat16"),
])
def test_logits_shape_and_causality(overrides):
  config = tiny_config(**overrides)
  model, params = _init(config)
  tokens = jax.random.randint(jax.random.key(1), (2, 32), 3, 128)
  logits = model.apply({"params": params}, tokens)
  assert logits.shape == (2, 32, 128) and logits.dtype == jnp.float32
  # Changing token 20 must leave every earlier logit unchanged and change a later one.
  changed = tokens.at[:, 20].set((tokens[:, 20] + 1) % 128)
  logits_changed = model.apply({"params": params}, changed)
  tol = 1e-2 if overrides.get("dtype") == "bfloat16" else 1e-5
  np.testing.assert_allclose(logits[:, :20], logits_changed[:, :20], atol=tol)
  assert np.abs(np.asarray(logits[:, 20:] - logits_changed[:, 20:])).max() > tol


def test_scan_and_unrolled_stacks_compute_the_same_function():
  config = tiny_config()
  model_scan, params = _init(config)
  model_loop = build_model(tiny_config(scan=False).model)
  # Unstack the scanned [layers, ...] parameters into blocks_0, blocks_1.
  loop_params = {k: v for k, v in params.items() if k != "blocks"}
  for i in range(config.model.num_layers):
    loop_params[f"blocks_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], params["blocks"])
  tokens = jax.random.randint(jax.random.key(2), (2, 32), 3, 128)
  np.testing.assert_allclose(model_scan.apply({"params": params}, tokens),
                             model_loop.apply({"params": loop_params}, tokens), atol=2e-5)


def test_packed_documents_do_not_see_each_other():
  config = tiny_config(position_embedding="learned")
  model, params = _init(config)
  batch = random_batch(2, 32, 128, num_segments=2)  # Documents at [0, 16) and [16, 32).
  def logits(inputs):
    return model.apply({"params": params}, inputs, segment_ids_BxL=batch["segment_ids"],
                       positions_BxL=batch["positions"])
  base = logits(batch["inputs"])
  # Rewriting the first document must not change the second document's logits.
  other = batch["inputs"].copy()
  other[:, :16] = (other[:, :16] + 7) % 128
  np.testing.assert_allclose(base[:, 16:], logits(other)[:, 16:], atol=1e-5)
  # The second document alone (positions restarted) gives the same logits.
  alone = model.apply({"params": params}, batch["inputs"][:, 16:])
  np.testing.assert_allclose(base[:, 16:], alone, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor", "sgd"])
def test_tiny_model_overfits_a_batch(optimizer):
  config = tiny_config()
  config.optim.update(name=optimizer, warmup_steps=5, learning_rate=
                      {"adamw": 3e-3, "adafactor": 5e-2, "sgd": 0.5}[optimizer])
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  model = build_model(config.model)
  opt, schedule = make_optimizer(config.optim, 100)
  batch = random_batch(8, 32, 128, seed=3)
  with sharding.activate(mesh):
    state, _ = create_sharded_state(config, model, opt, mesh)
    step = jax.jit(make_train_step(model, opt, schedule, 1), donate_argnums=(0,))
    losses = []
    for _ in range(80):
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
  assert losses[0] > 4.0  # ~ log(128) at init.
  assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_grad_accumulation_equals_full_batch():
  config = tiny_config()
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  model = build_model(config.model)
  opt, schedule = make_optimizer(config.optim, 100)
  batch = random_batch(8, 32, 128, seed=4, num_segments=3)
  batch["loss_mask"][:4, 20:] = 0.0  # Uneven token counts across micro-batches.
  results = []
  with sharding.activate(mesh):
    for accum in (1, 4):
      state, _ = create_sharded_state(config, model, opt, mesh)
      state, metrics = jax.jit(make_train_step(model, opt, schedule, accum))(state, batch)
      results.append((float(metrics["loss"]), float(metrics["grad_norm"]), state.params))
  assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
  assert results[0][1] == pytest.approx(results[1][1], rel=1e-4)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                         results[0][2], results[1][2])
