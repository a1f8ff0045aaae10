"""Optimizers and learning-rate schedules from ``config.optim`` (optax chains),
and which parameters train (``optim.freeze``, LoRA)."""
import re
from typing import Any

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


# apply_if_finite applies a non-finite update after this many in a row; the
# trainer's `train.nonfinite` policy decides what happens instead.
_NEVER_GIVE_UP = 2**30


def make_optimizer(optim_cfg, total_steps: int, prune_cfg=None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Clip by global norm, then AdamW / Adafactor / SGD with masked decay, then
  (``prune_cfg``, ``config.prune``, on) the pruning masks.

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
  if pruning.enabled(prune_cfg):
    # Last: it sees the whole update (weight decay included) and makes it leave
    # the pruned weights at exactly zero; inside apply_if_finite, so a skipped
    # update leaves the masks as they were too.
    base = optax.chain(base, pruning.prune_masks(prune_cfg, total_steps))
  # A non-finite gradient skips the update (and is counted in the state's
  # `total_notfinite`) instead of poisoning the parameters.
  return optax.apply_if_finite(base, max_consecutive_errors=_NEVER_GIVE_UP), schedule


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
