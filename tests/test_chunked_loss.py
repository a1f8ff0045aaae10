"""The chunked output projection + cross-entropy (``model.loss_chunk_len``):
the same losses, gradients and updates as full logits, without holding them."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bigmodel import objectives, sharding
from bigmodel.config import validate
from bigmodel.errors import UserError
from bigmodel.models import build_model
from bigmodel.models.chunked_loss import OutputHead, cross_entropy
from bigmodel.optim import make_optimizer
from bigmodel.state import create_sharded_state
from bigmodel.train_step import jit_eval_step, jit_train_step
from model_fixtures import random_family_batch, tiny_config


@pytest.mark.parametrize("softcap", [0.0, 5.0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_losses_and_gradients_equal_full_logits(softcap, with_bias):
  keys = jax.random.split(jax.random.key(0), 5)
  x_BxLxD = jax.random.normal(keys[0], (2, 10, 8))  # 10 positions: chunks of 4 pad 2.
  kernel_DxV = jax.random.normal(keys[1], (8, 37))
  bias_V = jax.random.normal(keys[2], (37,)) if with_bias else None
  targets_BxL = jax.random.randint(keys[3], (2, 10), 0, 37)
  weights_BxL = (jax.random.uniform(keys[4], (2, 10)) > 0.3).astype(jnp.float32)

  def full(x, kernel, bias):
    z = x @ kernel + (0.0 if bias is None else bias)
    if softcap:
      z = softcap * jnp.tanh(z / softcap)
    losses = optax.softmax_cross_entropy_with_integer_labels(z, targets_BxL)
    return (losses * weights_BxL).sum(), (losses, jnp.argmax(z, -1))

  def chunked(x, kernel, bias):
    loss_sum, losses, predictions = cross_entropy(
        x, OutputHead(kernel, bias, softcap), targets_BxL, weights_BxL, 4)
    return loss_sum, (losses, predictions)

  argnums = (0, 1, 2) if with_bias else (0, 1)
  (want, (want_losses, want_predictions)), want_grads = jax.value_and_grad(
      full, argnums, has_aux=True)(x_BxLxD, kernel_DxV, bias_V)
  (got, (got_losses, got_predictions)), got_grads = jax.jit(jax.value_and_grad(
      chunked, argnums, has_aux=True))(x_BxLxD, kernel_DxV, bias_V)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got_predictions, want_predictions)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  # Without differentiation: the same sum.
  np.testing.assert_allclose(jax.jit(chunked)(x_BxLxD, kernel_DxV, bias_V)[0], want, rtol=1e-6)


def _step_and_eval(config, batch):
  model = build_model(config.model)
  optimizer, schedule = make_optimizer(config.optim, 10)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  with sharding.activate(mesh):
    state, shardings = create_sharded_state(config, model, optimizer, mesh)
    objective = objectives.for_config(config)
    global_batch = sharding.global_batch(batch, mesh)
    sums = jit_eval_step(model, mesh, shardings.params, objective)(state.params, global_batch,
                                                                  None)
    step = jit_train_step(model, optimizer, schedule, 1, mesh, shardings, objective)
    state, metrics = step(state, global_batch)
  return objective, jax.device_get(sums), jax.device_get(metrics), jax.device_get(state.params)


# Heads: GPT tied, GPT untied with a final soft cap (Gemma 2), BERT's MLM
# (tied, with a bias), T5's untied decoder head.
@pytest.mark.parametrize("family,overrides", [
    ("gpt", {}), ("gpt", {"tie_embeddings": False, "final_softcap": 3.0}),
    ("bert", {}), ("t5", {})], ids=["gpt", "gpt-untied-softcap", "bert-mlm", "t5"])
def test_a_train_step_and_evaluation_equal_full_logits(family, overrides):
  batch = random_family_batch(family, 4, 32, 128, seed=0, num_segments=2)
  full = tiny_config(family, **overrides)
  chunked = tiny_config(family, **overrides, loss_chunk_len=5)  # 32 = 6 x 5 + 2 padded.
  objective, sums, metrics, params = _step_and_eval(chunked, batch)
  assert objective.chunk_len == 5
  _, want_sums, want_metrics, want_params = _step_and_eval(full, batch)
  for key in ("loss_sum", "weight_sum", "correct_sum"):
    np.testing.assert_allclose(sums[key], want_sums[key], rtol=1e-6, err_msg=key)
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=1e-5, err_msg=key)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         params, want_params)


def test_compiled_step_holds_less_than_the_logits():
  """What the option is for: XLA's compiled temporaries shrink by about the
  [B, L, V] logits and their gradient when they are never materialised."""
  overrides = dict(vocab_size=4096)
  batch = random_family_batch("gpt", 8, 32, 4096)

  def temp_bytes(config):
    model = build_model(config.model)
    optimizer, schedule = make_optimizer(config.optim, 10)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    with sharding.activate(mesh):
      state, shardings = create_sharded_state(config, model, optimizer, mesh)
      step = jit_train_step(model, optimizer, schedule, 1, mesh, shardings,
                            objectives.for_config(config))
      compiled = step.lower(state, sharding.global_batch(batch, mesh)).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  full = temp_bytes(tiny_config("gpt", **overrides))
  chunked = temp_bytes(tiny_config("gpt", **overrides, loss_chunk_len=4))
  logits_bytes = 8 * 32 * 4096 * 4
  assert full - chunked > logits_bytes, (full, chunked)


def test_falls_back_to_full_logits_where_a_provider_owns_the_head():
  config = tiny_config("gpt", loss_chunk_len=8)
  assert objectives.loss_chunk_len(config) == 8
  config.lora.update(rank=4, targets="attn/(query|value)")
  assert objectives.loss_chunk_len(config) == 8
  config.lora.targets = "lm_head|attn"
  assert objectives.loss_chunk_len(config) == 0
  quantized = tiny_config("gpt", loss_chunk_len=8, quantization="int8")
  assert objectives.loss_chunk_len(quantized) == 0
  classifier = tiny_config("bert", loss_chunk_len=8, num_classes=3)
  assert objectives.loss_chunk_len(classifier) == 0


def test_a_negative_chunk_is_refused():
  with pytest.raises(UserError, match="loss_chunk_len"):
    validate(tiny_config("gpt", loss_chunk_len=-1))
