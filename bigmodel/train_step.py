"""Pure train and eval steps over an explicit ``TrainState`` pytree.

A batch is a dict of [B, L] arrays: ``inputs``, ``targets``, ``segment_ids``,
``positions`` and ``loss_mask`` (see ``bigmodel.data``).
"""
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import optax

from bigmodel import objectives, optim, pruning, sharding
from bigmodel.state import TrainState


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
               optimizer: optim.SkippingOptimizer, schedule: optax.Schedule,
               grad_accum: int = 1, objective: Any = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update on the global batch; returns the new state and metrics.

  ``objective`` (``bigmodel.objectives``; default cross-entropy) gives the
  losses, and its ``train_metrics`` join the metrics (DPO's reward margin
  and preference accuracy). With ``grad_accum`` > 1 the batch is split into
  that many micro-batches whose gradients are summed in a scan, so
  activations are held for one micro-batch at a time and the update equals
  the full-batch one.
  """
  objective = objective or objectives.CrossEntropy()
  rng, step_rng = jax.random.split(state.rng)
  total_weight = jnp.maximum(objective.weights(model, batch).sum(), 1.0)
  # Gradients, optimizer state and updates cover the trainable parameters only.
  trainable, frozen = optim.partition(state.params, state.frozen)

  def micro_loss(trainable, micro_batch, micro_rng):
    params = optim.combine(trainable, frozen)
    loss_sum, weights, extras = objective(model, params, micro_batch, micro_rng,
                                          state.reference)
    metrics = {name: (extras[key] * weights).sum() / total_weight
               for key, name in objective.train_metrics.items() if key in extras}
    return loss_sum / total_weight, metrics

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
  if grad_accum == 1:
    (loss, extras), grads = grad_fn(trainable, batch, step_rng)
  else:
    micro_batches = jax.tree_util.tree_map(
        lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

    def accumulate(carry, inputs):
      micro_batch, micro_rng = inputs
      return jax.tree_util.tree_map(jnp.add, carry, grad_fn(trainable, micro_batch,
                                                            micro_rng)), None

    first = jax.tree_util.tree_map(lambda x: x[0], micro_batches)
    zeros = jax.tree_util.tree_map(jnp.zeros_like,
                                   jax.eval_shape(grad_fn, trainable, first, step_rng))
    ((loss, extras), grads), _ = jax.lax.scan(
        accumulate, zeros, (micro_batches, jax.random.split(step_rng, grad_accum)))

  new_trainable, opt_state, grad_norm = optimizer.apply(grads, state.opt_state, trainable)
  params = optim.combine(new_trainable, frozen)
  metrics = {
      **extras,
      "loss": loss,
      "grad_norm": grad_norm,
      "learning_rate": schedule(state.step),
      # Updates skipped so far, and in a row up to this one.
      "nonfinite_steps": opt_state.total_notfinite,
      "nonfinite_in_a_row": opt_state.notfinite_count,
      # With config.prune on, the targeted kernels' pruned fraction (a scalar
      # of the optimizer state, counted when the masks change: free here).
      **pruning.step_metrics(opt_state),
  }
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
  return new_state, metrics


def eval_step(params: Any, batch: dict[str, jax.Array], reference: Any = None, *,
              model: nn.Module, objective: Any = None) -> dict[str, jax.Array]:
  """Sums over the batch, so batches of any fill combine exactly.

  ``loss_sum`` and ``correct_sum`` (the objective's accuracy: argmax
  next-token, MLM or class; DPO's preference accuracy) over ``weight_sum``
  units; DPO adds ``reward_margin_sum``. Classification batches (with
  ``label``) also return each example's ``predictions`` ([B], or [B, Ld]
  teacher-forced tokens for text-to-text), ``labels`` and ``example_mask``.
  """
  objective = objective or objectives.CrossEntropy()
  loss_sum, weights, extras = objective(model, params, batch, None, reference)
  out = {"loss_sum": loss_sum, "weight_sum": weights.sum(),
         "correct_sum": (extras["correct"] * weights).sum()}
  if "reward_margin" in extras:
    out["reward_margin_sum"] = (extras["reward_margin"] * weights).sum()
  if "label" in batch:
    out.update(predictions=extras["predictions"], labels=batch["label"],
               example_mask=batch["example_mask"], target_mask=weights)
  return out


def make_train_step(model, optimizer, schedule, grad_accum, objective=None
                    ) -> Callable[..., Any]:
  """``train_step`` with its static arguments bound, ready for ``jax.jit``."""
  def step(state, batch):
    return train_step(state, batch, model=model, optimizer=optimizer, schedule=schedule,
                      grad_accum=grad_accum, objective=objective)
  return step


# The one place the steps are compiled: the trainer, `bigmodel.evaluate`,
# `benchmarks/train_step.py` and the sharding tests all use these, so what is
# benchmarked and tested is what trains.
def jit_train_step(model: nn.Module, optimizer: optim.SkippingOptimizer,
                   schedule: optax.Schedule, grad_accum: int, mesh: Mesh,
                   state_shardings: Any, objective: Any = None) -> Any:
  """The jitted ``train_step``: (state, global batch) -> (state, replicated metrics).

  The state keeps ``state_shardings`` and is donated (updated in place); the
  batch is split over the data-parallel axes. Call it under
  ``sharding.activate(mesh)``.
  """
  return jax.jit(make_train_step(model, optimizer, schedule, grad_accum, objective),
                 in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, NamedSharding(mesh, P())),
                 donate_argnums=(0,))


def jit_eval_step(model: nn.Module, mesh: Mesh, params_shardings: Any, objective: Any = None,
                  reference_shardings: Any = None) -> Any:
  """The jitted ``eval_step``: (params, global batch, reference) -> replicated
  sums; ``reference`` is DPO's frozen reference (None for every other objective)."""
  return jax.jit(functools.partial(eval_step, model=model, objective=objective),
                 in_shardings=(params_shardings, sharding.batch_sharding(mesh),
                               reference_shardings),
                 out_shardings=NamedSharding(mesh, P()))
