"""LoRA adapters on any family's dense layers, through Qwix (``config.lora``).

``with_lora(model, lora_cfg)`` returns the same family's module with low-rank
adapters on every dense projection whose module path (``blocks/attn/query``,
``decoder/blocks/mlp/wo``, ...) matches ``lora.targets`` (a regular
expression, searched): next to each targeted ``kernel`` [in..., out...] sit
``kernel_lora_a`` [in, r] and ``kernel_lora_b`` [r, out] (the in and out
dimensions flattened), initialised He-uniform and zero, so a fresh adapter
changes nothing. The layer computes ``x W + (alpha / r) x A B``. Qwix
(Google's JAX quantization library, which also does LoRA and QLoRA by
intercepting the layers' ``dot_general``) adds them, so the families' modules
stay free of adapter code, scanned stacks get one adapter per layer and the
adapters carry their kernels' logical axes (sharded like them).

``merge(params, lora_cfg)`` folds the adapters into their kernels: the plain
model's parameters, for export and inference.
"""
import contextlib
import re
from typing import Any

import flax
import flax.linen as nn
import jax.numpy as jnp

from bigmodel.errors import UserError

# Qwix names a kernel's adapters after it: ``kernel_lora_a``, ``kernel_lora_b``.
ADAPTER_SUFFIXES = ("_lora_a", "_lora_b")


def enabled(lora_cfg) -> bool:
  return bool(lora_cfg is not None and lora_cfg.get("rank", 0))


def is_adapter(path_name: str) -> bool:
  """A parameter path (``a/b/kernel_lora_a``) names a LoRA adapter."""
  return path_name.endswith(ADAPTER_SUFFIXES)


def with_lora(model: nn.Module, lora_cfg, methods: tuple[str, ...],
              training: bool = False) -> nn.Module:
  """``model`` with adapters per ``lora_cfg`` (rank, alpha, targets, dropout).

  Qwix applies the dropout whenever the adapter runs, so only a training
  model (``training``: its batches always bring a dropout key) gets it.
  """
  if not enabled(lora_cfg):
    return model
  from bigmodel.models.quantization import qwix_module  # pylint: disable=g-import-not-at-top
  qwix = qwix_module()
  rule = qwix.LoraRule(
      module_path=module_pattern(lora_cfg), rank=lora_cfg.rank, alpha=lora_cfg.alpha,
      dropout=lora_cfg.dropout if training else 0.0)
  return qwix.apply_lora_to_model(model, qwix.LoraProvider([rule]), methods=methods)


def module_pattern(lora_cfg) -> str:
  """The module paths ``lora.targets`` adapts, as a full-match regular
  expression (Qwix full-matches module paths; the config's pattern is searched)."""
  return f".*(?:{lora_cfg.targets}).*"


def init_context(lora_cfg) -> Any:
  """Where ``model.init`` of a LoRA model must run: outside the logical-axis
  rules. Qwix 0.1.8 boxes a new adapter with its kernel's axis names and reads
  it back through a sharding constraint of the kernel's rank, which fails
  under active rules; creating parameters needs no activation constraints
  (the jit's output shardings place them)."""
  return nn.logical_axis_rules(()) if enabled(lora_cfg) else contextlib.nullcontext()


def check_adapters(params: Any, lora_cfg) -> None:
  """UserError unless ``lora.targets`` matched at least one layer and the rank
  fits every targeted layer (a rank at least a side of the kernel saves nothing)."""
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  adapters = [name for name in flat if name.endswith(ADAPTER_SUFFIXES[0])]
  if not adapters:
    kernels = sorted({name.rsplit("/", 1)[0] for name in flat if name.endswith("kernel")})
    raise UserError(f"lora.targets={lora_cfg.targets!r} matches no dense layer; layers: "
                    f"{', '.join(kernels[:12])}{' ...' if len(kernels) > 12 else ''}")
  tables = [name for name in adapters if not name.endswith("kernel" + ADAPTER_SUFFIXES[0])]
  if tables:
    # A tied table's adapter would act on the logits' matmul ([D, V]) but be
    # merged into the lookup's [V, D] table: refused rather than merged wrong.
    raise UserError(f"lora.targets={lora_cfg.targets!r} matches "
                    f"{tables[0][:-len(ADAPTER_SUFFIXES[0])]}: adapters go on dense "
                    "layers' kernels, not on embedding tables")
  for name in adapters:
    a_shape = _value(flat[name]).shape  # [layers..., in, r]
    b_shape = _value(flat[name[:-1] + "b"]).shape  # [layers..., r, out]
    if lora_cfg.rank >= min(a_shape[-2], b_shape[-1]):
      raise UserError(f"lora.rank={lora_cfg.rank} is not below the dimensions of "
                      f"{name[:-len(ADAPTER_SUFFIXES[0])]} ({a_shape[-2]} in, "
                      f"{b_shape[-1]} out): such an adapter saves nothing")


def scale(lora_cfg) -> float:
  """What an adapter's output is multiplied by: alpha / rank."""
  return lora_cfg.alpha / lora_cfg.rank


def without_adapters(params: Any) -> Any:
  """``params`` (a nested dict) less its adapters."""
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  return flax.traverse_util.unflatten_dict(
      {name: x for name, x in flat.items() if not is_adapter(name)}, sep="/")


def merge(params: Any, adapter_scale: float) -> Any:
  """The parameters with every adapter folded into its kernel and removed:
  ``W + adapter_scale A B`` (``scale(lora_cfg)``), reshaped to W's [in...,
  out...] (stacked layers keep their leading axis), in W's dtype."""
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  merged = {}
  for name, value in flat.items():
    if is_adapter(name):
      continue
    a = flat.get(name + ADAPTER_SUFFIXES[0])
    if a is not None:
      b = flat[name + ADAPTER_SUFFIXES[1]]
      delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
      value = (value.astype(jnp.float32) + adapter_scale * delta.reshape(value.shape)
               ).astype(value.dtype)
    merged[name] = value
  return flax.traverse_util.unflatten_dict(merged, sep="/")


def _value(x: Any) -> Any:
  return getattr(x, "value", x)


def validate(lora_cfg) -> None:
  """Config checks that need no model: one UserError line each."""
  if lora_cfg.rank < 0:
    raise UserError(f"lora.rank must be >= 0 (0 = no adapters), got {lora_cfg.rank}")
  if not enabled(lora_cfg):
    return
  if lora_cfg.alpha <= 0:
    raise UserError(f"lora.alpha must be positive, got {lora_cfg.alpha}")
  if not 0.0 <= lora_cfg.dropout < 1.0:
    raise UserError(f"lora.dropout must be in [0, 1), got {lora_cfg.dropout}")
  try:
    re.compile(lora_cfg.targets)
  except re.error as e:
    raise UserError(f"lora.targets={lora_cfg.targets!r} is not a regular expression: {e}") from e


__all__ = ["ADAPTER_SUFFIXES", "check_adapters", "enabled", "init_context", "is_adapter", "merge",
           "scale",
           "validate", "with_lora", "without_adapters"]
