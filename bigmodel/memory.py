"""Per-device memory of one training step, from the config alone (no devices).

The estimate has five parts, each per device in bytes:

- **parameters** and **optimizer state** (with ``config.prune``, its masks:
  one bool per targeted weight): exact. Shapes come from
  ``jax.eval_shape`` of the real initialisation (``state.init_train_state``),
  placement from ``sharding.logical_to_shardings`` on an ``AbstractMesh`` --
  the trainer's own rules, so a dimension the mesh does not divide is
  replicated here exactly as it is there.
- **gradients**: one copy of the trainable parameters (all but those LoRA or
  ``optim.freeze`` freezes); two with ``optim.grad_accum`` > 1 (the running
  sum and the current micro-batch's).
- **activations**: the residuals the forward pass saves for the backward pass,
  per layer times the layers, plus the final norm and the softmax of the
  logits (``bigmodel.activations``: its tables, checked against what JAX
  saves), and LoRA's adapters' (``lora_residual_bytes``).
- **working set**: the transient peak on top of those. Either the backward of
  one layer (what the policy did not save is recomputed, plus the score
  gradients and, under FSDP, the layer's gathered weights and their unreduced
  gradients), the backward of the logits, or the optimizer update (measured:
  one more parameter-sized buffer for AdamW/SGD, 1.8 for Adafactor).

The activation tables model a decoder-only family's layers (a family with
``analytic_memory``; ``estimate`` refuses the others).

Quantized training (``model.quantization``) is counted as float training: its
parameters and optimizer state are the float ones (exact, as above), Qwix
keeps the float operands as the backward pass's residuals (unless
``model.quantize_gradients``, which saves the smaller quantized ones), and its
quantized copies of one matmul's operands are transient: XLA's peak of a GPT
step measured the same with and without int8 QAT. ``inference_param_bytes``
gives what generation and evaluation hold: the parameters, with
``bigmodel.quantize``'s int8/int4 kernels and their scales.

Shape letters as in ``bigmodel.models`` (B global batch, L sequence length, D
width, N heads, K kv heads, H head dim, F mlp width, V vocabulary), plus b
sequences per device per micro-batch, t the ``tensor`` mesh axis and c the
``context`` axis (context parallelism: L / c positions per device).
"""
import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import AbstractMesh, AxisType

from bigmodel import distill, objectives, optim, sharding
from bigmodel.activations import LAYER_RESIDUALS, activation_bytes, split
from bigmodel.models import ModelConfig, build_model, families, lora, quantization
from bigmodel.models.attention import resolve_impl
from bigmodel.state import init_train_state

# Parameter-sized temporaries of the optimizer update, beyond the gradients
# (measured with XLA's buffer assignment on `small`, 1 x 64 tokens: AdamW and
# SGD update in place (``optim.SkippingOptimizer``) but for one leaf staged by
# the finite check, a stacked MLP kernel, about a quarter of the parameters;
# Adafactor also its factored second moments' updates).
OPTIMIZER_TEMPORARIES = {"adamw": 0.25, "sgd": 0.25, "adafactor": 1.55}


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Bytes per device of one training step; ``total`` is the peak."""
  mesh: dict[str, int]
  num_params: int              # The whole model's, not per device.
  micro_batch: int             # b: sequences per device per micro-batch.
  params: int
  grads: int
  opt_state: int
  batch: int                   # The input batch arrays.
  activations: int             # Saved residuals of all layers and the head.
  working: int                 # Transient peak beyond the above.

  @property
  def total(self) -> int:
    return (self.params + self.grads + self.opt_state + self.batch + self.activations
            + self.working)


def abstract_mesh(mesh_shape: Mapping[str, int]) -> AbstractMesh:
  """A device-free mesh with the trainer's axes (``sharding.MESH_AXES``)."""
  sizes = sharding.mesh_sizes(mesh_shape)
  return AbstractMesh(sizes, sharding.MESH_AXES,
                      axis_types=(AxisType.Auto,) * len(sizes))


def _state_key(config) -> tuple:
  """What the train state's shapes depend on (not the batch or grad_accum)."""
  optim = {k: v for k, v in config.optim.items() if k != "grad_accum"}
  # Pruning's masks (one bool per targeted weight) are optimizer state.
  prune = config.get("prune") or {}
  # A distillation teacher sits in the state's reference: its model's shapes.
  teacher = (tuple(sorted(distill.teacher_config(config).model.items()))
             if distill.enabled(config) else None)
  return (tuple(sorted(config.model.items())), tuple(sorted(optim.items())),
          tuple(sorted(config.lora.items())), config.data.seq_len,
          objectives.needs_reference(config), tuple(sorted(prune.items())), teacher)


@functools.lru_cache(maxsize=4)
def _boxed_state(key: tuple) -> Any:
  model_items, optim_items, lora_items, seq_len, with_reference, prune_items, teacher_items = key
  optim_cfg, lora_cfg, prune_cfg = (ml_collections.ConfigDict(dict(items))
                                    for items in (optim_items, lora_items, prune_items))
  model = build_model(ml_collections.ConfigDict(dict(model_items)), lora_cfg)
  optimizer, _ = optim.make_optimizer(optim_cfg, 1000, prune_cfg)
  init_fn = functools.partial(init_train_state, model=model, optimizer=optimizer,
                              seq_len=seq_len, freeze=optim_cfg.freeze, lora_cfg=lora_cfg,
                              with_reference=with_reference,
                              teacher=teacher_items and build_model(
                                  ml_collections.ConfigDict(dict(teacher_items))))
  return jax.eval_shape(init_fn, jax.random.key(0))


def boxed_state(config) -> Any:
  """``jax.eval_shape`` of the trainer's initial state for ``config`` (logically boxed)."""
  return _boxed_state(_state_key(config))


def _tree_bytes(tree: Any, shardings: Any) -> int:
  """Bytes per device of abstract arrays placed by ``shardings``."""
  leaves = jax.tree_util.tree_leaves(sharding.strip_boxes(tree))
  total = 0
  for leaf, leaf_sharding in zip(leaves, jax.tree_util.tree_leaves(shardings)):
    total += math.prod(leaf_sharding.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
  return total


@functools.lru_cache(maxsize=256)
def _state_bytes(key: tuple, mesh_sizes: tuple, rules: tuple) -> tuple[int, int, int, int]:
  boxed = _boxed_state(key)
  shardings = sharding.logical_to_shardings(
      boxed, abstract_mesh(dict(zip(sharding.MESH_AXES, mesh_sizes))), rules)
  num_params = sum(x.size for x in jax.tree_util.tree_leaves(sharding.strip_boxes(boxed.params)))
  trainable, _ = optim.partition(sharding.strip_boxes(boxed.params), boxed.frozen)
  trainable_shardings, _ = optim.partition(shardings.params, boxed.frozen)
  reference = (0 if boxed.reference is None
               else _tree_bytes(boxed.reference, shardings.reference))
  return (num_params, _tree_bytes(boxed.params, shardings.params) + reference,
          _tree_bytes(boxed.opt_state, shardings.opt_state),
          _tree_bytes(trainable, trainable_shardings))


def _state_sizes(config, mesh_shape: Mapping[str, int]) -> tuple[int, int, int, int]:
  """(parameter count, parameter bytes, optimizer-state bytes, trainable
  parameter bytes) per device."""
  return _state_bytes(_state_key(config), sharding.mesh_sizes(mesh_shape),
                      _rules(config, mesh_shape))


def _rules(config, mesh_shape: Mapping[str, int]) -> tuple:
  """The trainer's rules for ``config`` on a mesh of ``mesh_shape`` (they
  depend on its context size)."""
  return sharding.logical_rules({**dict(config.mesh.items()), **mesh_shape})


def state_bytes(config, mesh_shape: Mapping[str, int]) -> tuple[int, int, int]:
  """(parameter count, parameter bytes, optimizer-state bytes) per device;
  the bytes include the frozen ``TrainState.reference`` (DPO's copy, a
  distillation teacher).

  Exact: the trainer's state shapes placed by the trainer's sharding rules
  (``mesh.rules`` included); frozen parameters (LoRA, ``optim.freeze``) have
  no optimizer state.
  """
  return _state_sizes(config, mesh_shape)[:3]


def lora_residual_bytes(config, c: ModelConfig, b: int, seq_len: int,
                        mesh_shape: Mapping[str, int]) -> int:
  """What LoRA adapters add to the saved residuals, per device (measured with
  ``saved_residuals``): per adapted kernel and token, the [r] input-side
  product, and under the dot-saving policies also the [out] adapter output
  where the backward rebuilds the layer's output from the two saved matmul
  outputs: all but the MLP's last projection, whose sum with the residual is
  the next layer's input (saved as such) unless a post-norm reads it."""
  if not lora.enabled(config.lora) or c.remat == "full":
    return 0
  feeds_next_layer = () if c.post_norms else ("wo",)
  total = 0
  for path, x in jax.tree_util.tree_flatten_with_path(
      sharding.strip_boxes(boxed_state(config).params))[0]:
    name = sharding.path_name(path)
    if name.endswith(lora.ADAPTER_SUFFIXES[1]):
      rank, out = x.shape[-2:]  # [layers, r, out] when scanned.
      saves_out = c.remat != "none" and name.split("/")[-2] not in feeds_next_layer
      per_token = rank + (split(out, mesh_shape["tensor"]) if saves_out else 0)
      total += math.prod(x.shape[:-2]) * b * seq_len * per_token
  return total * jnp.dtype(c.dtype).itemsize


def inference_param_bytes(config, mesh_shape: Mapping[str, int], weight_bits: int = 0,
                          group_size: int = 0) -> int:
  """Bytes per device of the parameters generation and evaluation load for
  ``config``'s model, its dense kernels stored as ``bigmodel.quantize`` writes
  them with ``weight_bits`` (8 or 4; 0: as trained) and ``group_size``:
  qvalues at 1 or 1/2 byte, float32 scales, the rest as ``param_dtype``.
  Exact: the quantized model's abstract parameters placed by the trainer's
  rules on ``mesh_shape`` (LoRA adapters merged, as loading merges them)."""
  model_cfg = ml_collections.ConfigDict(config.model.to_dict())
  model_cfg.quantization = "none"
  if weight_bits:
    model_cfg.weight_bits, model_cfg.weight_group_size = weight_bits, group_size
  boxed = quantization.abstract_boxed_params(build_model(model_cfg), config.data.seq_len)
  shardings = sharding.logical_to_shardings(
      boxed, abstract_mesh(mesh_shape), _rules(config, mesh_shape))
  leaves = jax.tree_util.tree_leaves(sharding.strip_boxes(boxed))
  return sum(-(-math.prod(s.shard_shape(x.shape)) * quantization.dtype_bits(x.dtype) // 8)
             for x, s in zip(leaves, jax.tree_util.tree_leaves(shardings)))


def uses_fused_attention(attention_impl: str, platform: str) -> bool:
  """Whether ``attention_impl`` is a fused kernel on ``platform`` (cpu, gpu, tpu)."""
  return resolve_impl(attention_impl, platform) in ("pallas", "cudnn")


def estimate(config, mesh_shape: Mapping[str, int], platform: str = "gpu") -> MemoryEstimate:
  """Per-device memory of ``config``'s training step on a mesh of ``mesh_shape``.

  ``mesh_shape`` maps every axis of ``sharding.MESH_AXES`` to its size;
  ``platform`` (cpu, gpu, tpu) decides what ``attention_impl=auto`` runs. The
  micro-batch per device is ``train.batch_size / optim.grad_accum / (data *
  fsdp * expert)``, rounded up when that does not divide (the trainer refuses such a
  layout; ``plan`` reports it).
  """
  c = ModelConfig.from_config(config.model)
  if not families.get(c.family).analytic_memory:
    raise ValueError(f"the memory model covers decoder-only families; model.family="
                     f"{c.family!r} has none yet")
  if c.remat not in LAYER_RESIDUALS:
    raise ValueError(f"no activation model for remat policy {c.remat!r}")
  num_params, params, opt_state, trainable = _state_sizes(config, mesh_shape)
  dp = sharding.data_parallel_size(mesh_shape)
  grad_accum = config.optim.grad_accum
  b = -(-config.train.batch_size // (grad_accum * dp))
  seq_len = config.data.seq_len
  if platform == "cpu" and not c.scan:
    # Measured: XLA:CPU schedules an unrolled stack's recomputation right
    # after the forward pass, so remat saves nothing there (with scan it does).
    c = dataclasses.replace(c, remat="none")
  saved, layer_work = activation_bytes(
      c, b, seq_len, mesh_shape, flash=uses_fused_attention(c.attention_impl, platform),
      trained_share=trainable / params, loss_chunk_len=objectives.loss_chunk_len(config))
  saved += lora_residual_bytes(config, c, b, seq_len, mesh_shape)
  # Gradients and the update's temporaries cover the trainable parameters only.
  grads = trainable * (2 if grad_accum > 1 else 1)
  backward_phase = grads + saved + layer_work
  optimizer_phase = trainable + OPTIMIZER_TEMPORARIES[config.optim.name] * trainable
  peak = max(backward_phase, int(optimizer_phase))
  # inputs, targets, segment ids, positions (int32) and the loss mask (float32).
  batch = 5 * 4 * (-(-config.train.batch_size // dp)) * seq_len
  return MemoryEstimate(mesh=dict(mesh_shape), num_params=num_params, micro_batch=b,
                        params=params, grads=grads, opt_state=opt_state, batch=batch,
                        activations=saved, working=peak - grads - saved)
