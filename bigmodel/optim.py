"""Optimizers and learning-rate schedules from ``config.optim`` (optax chains)."""
from typing import Any

import jax
import jax.numpy as jnp
import optax

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


# apply_if_finite applies a non-finite update after this many in a row; the
# trainer's `train.nonfinite` policy decides what happens instead.
_NEVER_GIVE_UP = 2**30


def make_optimizer(optim_cfg, total_steps: int) -> tuple[optax.GradientTransformation,
                                                         optax.Schedule]:
  """Clip by global norm, then AdamW / Adafactor / SGD with masked decay.

  Returns (optimizer, schedule). Updates with a non-finite gradient are skipped.
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
    base = optax.chain(optax.clip_by_global_norm(optim_cfg.clip), base)
  # A non-finite gradient skips the update (and is counted in the state's
  # `total_notfinite`) instead of poisoning the parameters.
  return optax.apply_if_finite(base, max_consecutive_errors=_NEVER_GIVE_UP), schedule
