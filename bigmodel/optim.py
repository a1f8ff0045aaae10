"""Optimizers and learning-rate schedules from ``config.optim`` (optax chains),
and which parameters train (``optim.freeze``, LoRA)."""
import re
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from bigmodel import pruning
from bigmodel.errors import UserError
from bigmodel.models import lora
from bigmodel.sharding import path_name

OPTIMIZERS = ("adamw", "adafactor", "sgd")
SCHEDULES = ("cosine", "linear", "rsqrt", "constant")

# Parameters named like this are never decayed: biases, norm scales and
# embedding tables (decaying them hurts quality; GPT-2/BERT practice).
_NO_DECAY_NAMES = ("bias", "scale", "embedding")


def make_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to ``learning_rate``, then the named decay."""
  peak = optim_cfg.learning_rate
  warmup = optim_cfg.warmup_steps
  decay_steps = optim_cfg.decay_steps or total_steps
  end = peak * optim_cfg.end_lr_fraction
  name = optim_cfg.schedule
  if name == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, warmup, max(decay_steps, warmup + 1), end_value=end)
  warmup_fn = optax.linear_schedule(0.0, peak, max(warmup, 1))
  if name == "linear":
    after = optax.linear_schedule(peak, end, max(decay_steps - warmup, 1))
  elif name == "rsqrt":
    after = lambda step: peak * jnp.sqrt(max(warmup, 1) / (step + max(warmup, 1)))
  elif name == "constant":
    after = optax.constant_schedule(peak)
  else:
    raise ValueError(f"unknown schedule {name!r}; choose from {SCHEDULES}")
  return optax.join_schedules([warmup_fn, after], [warmup])


def decay_mask(params: Any) -> Any:
  """True for parameters that get weight decay (matmul kernels only)."""
  def decays(path, _):
    return not any(getattr(k, "key", None) in _NO_DECAY_NAMES for k in path)
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim_cfg, total_steps: int, prune_cfg=None
                   ) -> tuple["SkippingOptimizer", optax.Schedule]:
  """Clip by global norm, then AdamW / Adafactor / SGD with masked decay, then
  (``prune_cfg``, ``config.prune``, on) the pruning masks.

  Returns (optimizer, schedule). Updates that are not finite are skipped
  (``SkippingOptimizer``).
  """
  schedule = make_schedule(optim_cfg, total_steps)
  name = optim_cfg.name
  if name == "adamw":
    base = optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                       weight_decay=optim_cfg.weight_decay, mask=decay_mask)
  elif name == "adafactor":
    base = optax.adafactor(schedule, clipping_threshold=None,
                           weight_decay_rate=optim_cfg.weight_decay or None,
                           weight_decay_mask=decay_mask)
  elif name == "sgd":
    base = optax.chain(optax.add_decayed_weights(optim_cfg.weight_decay, mask=decay_mask),
                       optax.sgd(schedule, momentum=optim_cfg.momentum or None))
  else:
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")
  if optim_cfg.clip > 0:
    base = optax.chain(clip_by_global_norm(optim_cfg.clip), base)
  if pruning.enabled(prune_cfg):
    # Last: it sees the whole update (weight decay included) and makes it leave
    # the pruned weights at exactly zero; inside the skipping, so a skipped
    # update leaves the masks as they were too.
    base = optax.chain(base, pruning.prune_masks(prune_cfg, total_steps))
  return SkippingOptimizer(optax.with_extra_args_support(base)), schedule


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """``optax.clip_by_global_norm`` as one scalar factor: g * min(1, max_norm / |g|).

  Ours because optax's divides every element by the norm, and XLA:CPU does not
  duplicate a divide into its two consumers (Adam's two moments): it writes a
  clipped copy of every gradient and reads it back, 0.11 s of a 0.2 s update
  of `small`'s 111M parameters (docs/performance.md). A multiply by a scalar
  fuses into the moments' update. Takes the norm as the extra argument
  ``grad_norm`` where the caller has it (``SkippingOptimizer.apply``).
  """
  def update(updates, state, params=None, *, grad_norm=None, **unused_extra_args):
    del params
    norm = optax.tree.norm(updates) if grad_norm is None else grad_norm
    scale = jnp.minimum(1.0, max_norm / norm)  # A zero norm: max_norm / 0 = inf, so 1.
    return jax.tree_util.tree_map(lambda g: g * scale.astype(g.dtype), updates), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def all_finite(tree: Any) -> jax.Array:
  """A bool scalar: every element of every leaf is finite."""
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree_util.tree_leaves(tree)]))


def count_skipped(state: optax.ApplyIfFiniteState) -> optax.ApplyIfFiniteState:
  """``state`` unchanged but for one more skipped update in its counters."""
  return state._replace(notfinite_count=state.notfinite_count + 1,
                        last_finite=jnp.array(False),
                        total_notfinite=state.total_notfinite + 1)


class SkippingOptimizer(NamedTuple):
  """An optax transformation (``base``) whose non-finite updates are skipped.

  An update is skipped, and counted, when the gradients are not finite (or
  their norm overflows) or when they are but the update would leave a
  parameter that is not (Adam with ``eps=0`` divides 0 by 0 for rows no
  example reached). The trainer's ``train.max_nonfinite`` decides when a run
  has diverged. The state is ``optax.ApplyIfFiniteState`` (its counters and
  the base's state), as ``optax.apply_if_finite`` keeps it, so checkpoints
  keep their layout.

  Ours rather than ``optax.apply_if_finite`` + ``optax.apply_updates`` for
  speed: that wraps the base in a ``lax.cond`` whose outputs (the updates)
  must be written out and read back to be added, and checking the new
  parameters after the update keeps the old and new state alive at once;
  here the decision comes first, from a read-only pass, and the update is
  applied in place inside the cond, fused with the moments. Measured on
  `small`'s update alone: 0.51-0.87 s before, 0.08-0.24 s after
  (``benchmarks/optimizer_update.py``).
  """
  base: optax.GradientTransformationExtraArgs

  def init(self, params: Any) -> optax.ApplyIfFiniteState:
    return optax.ApplyIfFiniteState(
        notfinite_count=jnp.zeros([], jnp.int32), last_finite=jnp.array(True),
        total_notfinite=jnp.zeros([], jnp.int32), inner_state=self.base.init(params))

  def apply(self, grads: Any, state: optax.ApplyIfFiniteState, params: Any
            ) -> tuple[Any, optax.ApplyIfFiniteState, jax.Array]:
    """(new params, new state, the gradients' global norm) for one update."""
    grad_norm = optax.tree.norm(grads)

    def updated():
      updates, inner_state = self.base.update(grads, state.inner_state, params,
                                              grad_norm=grad_norm)
      return optax.apply_updates(params, updates), inner_state

    # The same update computed twice: here only reduced to a flag (nothing
    # written), and in the branch below, where it can overwrite the state.
    finite = jnp.isfinite(grad_norm) & all_finite(updated()[0])

    def apply():
      new_params, inner_state = updated()
      return new_params, optax.ApplyIfFiniteState(
          notfinite_count=jnp.zeros([], jnp.int32), last_finite=jnp.array(True),
          total_notfinite=state.total_notfinite, inner_state=inner_state)

    new_params, new_state = jax.lax.cond(finite, apply, lambda: (params, count_skipped(state)))
    return new_params, new_state, grad_norm


def frozen_paths(params: Any, freeze: str = "", lora_cfg=None) -> tuple[str, ...]:
  """The paths (``a/b/kernel``) of the parameters that do not train.

  With LoRA adapters every other parameter is frozen; ``freeze`` (a regular
  expression searched in each path) freezes more. UserError when ``freeze``
  finds no parameter or nothing would train.
  """
  names = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(
      params, is_leaf=_is_box)[0]]
  frozen = {n for n in names if lora.enabled(lora_cfg) and not lora.is_adapter(n)}
  if freeze:
    matched = {n for n in names if re.search(freeze, n)}
    if not matched:
      raise UserError(f"optim.freeze={freeze!r} matches no parameter; parameters: "
                      f"{', '.join(names[:12])}{' ...' if len(names) > 12 else ''}")
    frozen |= matched
  if len(frozen) == len(names):
    raise UserError("every parameter is frozen (optim.freeze, lora): nothing would train")
  return tuple(n for n in names if n in frozen)


# Frozen parameters are split off before `jax.grad` rather than masked in the
# optimizer (optax.multi_transform with set_to_zero): then no gradient is ever
# computed for them, the optimizer holds no state for them, and they pass
# through an update bit for bit (a zero update would still turn -0.0 into 0.0).
def partition(params: Any, frozen: tuple[str, ...]) -> tuple[Any, Any]:
  """(trainable, frozen) trees of ``params``' structure, None in the other's places."""
  frozen = set(frozen)
  pick = lambda keep: jax.tree_util.tree_map_with_path(  # pylint: disable=g-long-lambda
      lambda p, x: x if (path_name(p) in frozen) == keep else None, params, is_leaf=_is_box)
  return pick(False), pick(True)


def _is_box(x: Any) -> bool:
  """A parameter boxed with its logical axes (at init): one parameter, one name."""
  return isinstance(x, nn.Partitioned)


def combine(trainable: Any, frozen: Any) -> Any:
  """The inverse of ``partition``."""
  return jax.tree_util.tree_map(lambda t, f: f if t is None else t, trainable, frozen,
                                is_leaf=lambda x: x is None)
