"""optim.SkippingOptimizer: optax's update, skipped when not finite, written in place;
benchmarks/optimizer_update.py."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import optimizer_update
from bigmodel import optim
from model_fixtures import tiny_config


def _tree(rng, scale=1.0):
  """Eight equal leaves (no one dominates the memory figures) and a bias."""
  leaves = {f"layer{i}": {"kernel": rng.normal(size=(128, 128)) * scale} for i in range(8)}
  leaves["layer0"]["bias"] = rng.normal(size=(128,)) * scale
  return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), leaves)


@pytest.mark.parametrize("name", ["adamw", "adafactor", "sgd"])
def test_updates_equal_optax_clip_and_apply_if_finite(name):
  config = tiny_config()
  config.optim.update(name=name, clip=1.0, warmup_steps=2, momentum=0.9)
  optimizer, _ = optim.make_optimizer(config.optim, 10)
  reference = optimizer_update.optax_reference(config.optim, 10)
  rng = np.random.default_rng(0)
  params = _tree(rng)
  ours, theirs = (params, optimizer.init(params)), (params, reference.init(params))
  assert jax.tree_util.tree_structure(ours[1]) == jax.tree_util.tree_structure(theirs[1])
  apply = jax.jit(optimizer.apply)
  reference_apply = jax.jit(lambda *args: reference.apply(*args)[:2])
  # Gradient norms around 0.01 (not clipped) and 10 (clipped).
  for step, scale in enumerate([1e-2 / 34, 10.0 / 34, 1e-2 / 34, 10.0 / 34]):
    grads = _tree(rng, scale)
    new_params, new_state, grad_norm = apply(grads, ours[1], ours[0])
    ours = (new_params, new_state)
    theirs = reference_apply(grads, theirs[1], theirs[0])
    assert float(grad_norm) == pytest.approx(float(optax.tree.norm(grads)), rel=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7, err_msg=f"{name} step {step}")
  assert int(ours[1].total_notfinite) == 0


def test_non_finite_gradients_and_updates_are_skipped_and_counted():
  config = tiny_config()
  config.optim.update(name="adamw", warmup_steps=0)
  optimizer, _ = optim.make_optimizer(config.optim, 10)
  apply = jax.jit(optimizer.apply)
  rng = np.random.default_rng(1)
  params = _tree(rng)
  state = optimizer.init(params)
  bad = _tree(rng)
  bad["layer3"]["kernel"] = bad["layer3"]["kernel"].at[5, 7].set(jnp.nan)
  for skipped in (1, 2):
    new_params, state, _ = apply(bad, state, params)
    assert (int(state.notfinite_count), int(state.total_notfinite)) == (skipped, skipped)
    assert not bool(state.last_finite)
    jax.tree_util.tree_map(np.testing.assert_array_equal, new_params, params)
  assert int(state.inner_state[1][0].count) == 0  # Adam's moments untouched.
  params, state, _ = apply(_tree(rng), state, params)
  assert (int(state.notfinite_count), int(state.total_notfinite)) == (0, 2)

  # Finite gradients, non-finite update: Adam with eps=0 on an all-zero gradient.
  config.optim.eps = 0.0
  optimizer, _ = optim.make_optimizer(config.optim, 10)
  state = optimizer.init(params)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  new_params, state, grad_norm = jax.jit(optimizer.apply)(zeros, state, params)
  assert float(grad_norm) == 0.0 and int(state.total_notfinite) == 1
  jax.tree_util.tree_map(np.testing.assert_array_equal, new_params, params)


def test_the_update_is_written_in_place():
  """Donated parameters and state are overwritten, not copied: XLA's buffer
  assignment holds no parameter-sized temporaries. (Before: optax's clip wrote
  a clipped copy of the gradients, apply_if_finite's cond its updates, and the
  finite check after the update kept the old and new state alive at once:
  temporaries of about the parameters plus the state.)"""
  config = tiny_config()
  config.optim.update(name="adamw", clip=1.0)
  optimizer, _ = optim.make_optimizer(config.optim, 10)
  params = _tree(np.random.default_rng(2))
  state = optimizer.init(params)
  # In and out in the same order, as the train step's TrainState has them
  # (donated buffers are paired with outputs of the same shape in order).
  update = lambda params, state, grads: optimizer.apply(grads, state, params)[:2]
  compiled = jax.jit(update, donate_argnums=(0, 1)).lower(params, state, params).compile()
  stats = compiled.memory_analysis()
  leaf = 128 * 128 * 4
  param_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
  assert stats.alias_size_in_bytes >= 3 * param_bytes  # Parameters and both moments.
  # A few leaves' worth at most (XLA stages some leaves' finite check); before,
  # about twice the parameters.
  assert stats.temp_size_in_bytes <= 3 * leaf, stats.temp_size_in_bytes


def test_the_update_benchmark_compares_both_in_turns():
  config = tiny_config()
  config.optim.update(name="adamw", clip=1.0, warmup_steps=0)
  rows = optimizer_update.measure(config, rounds=2)
  assert [r["name"] for r in rows] == ["optax", "bigmodel", "bigmodel", "optax"]
  assert rows[0]["ratio"] == 1.0 and all(r["median_s"] > 0 for r in rows)
  # The same update (the gradients' norm is 10: clipped), less memory.
  for a, b in zip(jax.tree_util.tree_leaves(rows[0]["params"]),
                  jax.tree_util.tree_leaves(rows[1]["params"])):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)
  assert rows[1]["temp"] < rows[0]["temp"] / 2
  assert "| bigmodel |" in optimizer_update.format_table(rows)
