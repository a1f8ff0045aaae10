"""Quantized training and weight-only post-training quantization, through Qwix.

Two uses of Qwix (Google's JAX quantization library, which swaps a Flax
module's ``dot_general`` for a quantized one by interception, as it does for
LoRA in ``bigmodel.models.lora``), both on every dense projection of every
family (``DENSE_LAYERS``: attention q/k/v/out, the MLP's wi/wi_linear/wo,
untied output heads, BERT's MLM and pooler/classifier layers). Embedding
tables (and so tied output logits) and attention's score and value products
stay in floating point.

**Quantized training (QAT)**, ``model.quantization`` = ``int8`` or ``fp8``
(float8_e4m3fn): ``qwix.QtProvider``. The forward matmul of each dense
layer runs on quantized operands: the kernel per output channel
(``model.quantize_activations``: and the input activations per token, both
Qwix's default channelwise axes: every axis that is not contracted), with
dynamic absmax scales computed in the step. The backward pass is Qwix's
straight-through estimator: gradients flow as if the quantization were the
identity, computed from the float operands unless ``model.quantize_gradients``
quantizes the incoming gradients too (then the quantized forward operands are
the residuals). Parameters and optimizer state stay float ("master
weights"): a QAT checkpoint is an ordinary one, and its parameters are what
``bigmodel.quantize`` quantizes for deployment.

**Weight-only post-training quantization (PTQ)**, ``model.weight_bits`` = 8
or 4 with ``model.weight_group_size`` (written by ``bigmodel.quantize``):
``qwix.PtqProvider``. Each dense kernel is stored as a Qwix ``WithAux``
holding a ``QArray`` (``qvalue`` int8/int4 with the kernel's shape and
logical axes, ``scale`` float32 per output channel, or per group of
``weight_group_size`` consecutive inputs) and dequantized inside the jitted
step by Qwix's ``dot_general`` (XLA fuses the dequantization into the
matmul). Activations stay float. Calibration-free: scales are the absmax of
each channel or group.
"""
import functools
import json
import os
import sys
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bigmodel.errors import UserError
from bigmodel.models.config import ModelConfig

# model.quantization -> the quantized type of QAT's matmul operands.
QAT_TYPES = {"none": None, "int8": jnp.int8, "fp8": jnp.float8_e4m3fn}
# model.weight_bits -> the storage type of PTQ's kernels.
WEIGHT_TYPES = {8: jnp.int8, 4: jnp.int4}
# The module names of every family's dense projections (``layers.DenseGeneral``);
# ``tests/test_quantization.py`` checks that they cover every kernel.
DENSE_LAYERS = ("query", "key", "value", "out", "wi", "wi_linear", "wo", "lm_head",
                "mlm_dense", "pooler", "classifier")
# Qwix full-matches module paths (``blocks/attn/query``, ``blocks_0/mlp/wo``).
_DENSE_PATH = rf"(?:.*/)?(?:{'|'.join(DENSE_LAYERS)})"
# The attention output projection contracts two axes, [N, H] of its [N, H, D]
# kernel; every other dense layer contracts one.
_OUT_PATH = r"(?:.*/)?out"


def qat_enabled(model_cfg) -> bool:
  """``model.quantization`` asks for quantized training."""
  return model_cfg.get("quantization", "none") != "none"


def weight_quantized(model_cfg) -> bool:
  """The config describes a weight-quantized model (``bigmodel.quantize``'s output)."""
  return bool(model_cfg.get("weight_bits", 0))


def describe(model_cfg) -> str:
  """``int8``, ``int4 (groups of 128)``: the weight format of a PTQ config."""
  bits, group = model_cfg.get("weight_bits", 0), model_cfg.get("weight_group_size", 0)
  if not bits:
    return str(model_cfg.get("param_dtype", "float32"))
  return f"int{bits}" + (f" (groups of {group})" if group else " (per channel)")


def qwix_module():
  """Qwix, imported on first use: its import (flax.nnx, treescope) took a
  second of every command's start, and most runs neither quantize nor adapt."""
  import qwix  # pylint: disable=g-import-not-at-top
  return qwix


def _qat_rule(model_cfg):
  qtype = QAT_TYPES[model_cfg.quantization]
  return qwix_module().QtRule(
      module_path=_DENSE_PATH, op_names=("dot_general",), weight_qtype=qtype,
      act_qtype=qtype if model_cfg.get("quantize_activations", True) else None,
      bwd_qtype=qtype if model_cfg.get("quantize_gradients", False) else None)


def _out_tile(c: ModelConfig, group_size: int) -> Any:
  """Qwix's ``tile_size`` for the [N, H, D] output projection: groups of
  ``group_size`` consecutive inputs of the flattened N x H, i.e. tiles of the
  head dim (g <= H), or of g / H whole heads (Qwix tiles one axis; the H axis
  is then reduced whole)."""
  if group_size <= c.head_dim:
    return group_size  # Qwix tiles the innermost contracted axis, H.
  return {0: group_size // c.head_dim}


def _ptq_rules(model_cfg, c: ModelConfig) -> list[Any]:
  qtype, group = WEIGHT_TYPES[model_cfg.weight_bits], model_cfg.get("weight_group_size", 0)
  rule = functools.partial(qwix_module().QuantizationRule, op_names=("dot_general",),
                           weight_qtype=qtype)
  return [rule(module_path=_OUT_PATH, tile_size=_out_tile(c, group) if group else None),
          rule(module_path=_DENSE_PATH, tile_size=group or None)]


def with_quantization(model: nn.Module, model_cfg, methods: tuple[str, ...]) -> nn.Module:
  """``model`` (a family's plain module) with QAT or PTQ per ``model_cfg``;
  unchanged when neither is asked for. ``methods``: those batches and decoding
  call (``Family.methods``)."""
  if qat_enabled(model_cfg):
    qwix = qwix_module()
    return qwix.quantize_model(model, qwix.QtProvider([_qat_rule(model_cfg)]), methods=methods)
  if weight_quantized(model_cfg):
    qwix = qwix_module()
    provider = qwix.PtqProvider(_ptq_rules(model_cfg, model.config))
    return qwix.quantize_model(model, provider, methods=methods)
  return model


def group_size_problem(c: ModelConfig, group_size: int) -> str:
  """Why ``group_size`` cannot tile every dense kernel's input; "" if it can.

  A group is ``group_size`` consecutive inputs of a kernel: it must divide the
  input dimension, D (``embed_dim``) for the projections of the residual
  stream, F (``mlp_dim``) for the MLP's output, N x H for the attention output
  without splitting a head unevenly (g divides H, or H divides g).
  """
  if group_size <= 0:
    return ""
  dims = [("embed_dim", c.embed_dim, "attention q/k/v, the MLP's input"),
          ("mlp_dim", c.mlp_dim, "the MLP's output projection wo")]
  for name, dim, layers in dims:
    if dim % group_size:
      return (f"--group_size={group_size} does not divide model.{name}={dim}, the input "
              f"dimension of {layers}; choose a divisor")
  heads_dim = c.num_heads * c.head_dim
  fits_heads = (c.head_dim % group_size == 0
                or (group_size % c.head_dim == 0 and heads_dim % group_size == 0))
  if not fits_heads:
    return (f"--group_size={group_size} does not tile the attention output's input "
            f"(num_heads x head_dim = {c.num_heads} x {c.head_dim}): it must divide the head "
            f"dim or be a multiple of it dividing {heads_dim}")
  return ""


def validate(config) -> None:
  """Config checks (one UserError line each), with ``config.lora``."""
  m = config.model
  quantization = m.get("quantization", "none")
  if quantization not in QAT_TYPES:
    raise UserError(f"--config.model.quantization={quantization!r} is not one of: "
                    f"{', '.join(QAT_TYPES)}")
  bits = m.get("weight_bits", 0)
  if bits not in (0, *WEIGHT_TYPES):
    raise UserError(f"model.weight_bits={bits} is not one of 0 (float), "
                    f"{', '.join(map(str, WEIGHT_TYPES))}")
  if m.get("weight_group_size", 0) < 0:
    raise UserError(f"model.weight_group_size must be >= 0, got {m.weight_group_size}")
  if bits:
    # A PTQ model's kernels are integers: no gradient reaches them.
    raise UserError(f"model.weight_bits={bits}: this config describes a weight-quantized model "
                    "(written by bigmodel.quantize), which generation and evaluation load but "
                    "nothing trains; train the float run it was made from")
  source_bits = saved_weight_bits(config.get("init_from", ""))
  if source_bits:  # Checked again where its checkpoint is read (run.restore_params).
    raise UserError(f"--config.init_from={config.init_from} holds int{source_bits} "
                    "weight-quantized parameters (bigmodel.quantize), which no run trains from; "
                    "start from the float run they were made from")
  if qat_enabled(m) and config.lora.get("rank", 0):
    # Qwix 0.1.8 cannot stack providers (quantize_model replaces an earlier
    # one) and its QLoRA is LoraProvider over PTQ: the frozen base must be
    # stored pre-quantized in the parameters, which the trainer's init_from,
    # base pointers and frozen/trainable partition keep as float arrays.
    raise UserError(f"model.quantization={quantization!r} with lora.rank={config.lora.rank}: "
                    "quantized training does not combine with LoRA adapters; train the "
                    "adapters in float and quantize the merged model with bigmodel.quantize")


def saved_weight_bits(workdir: str) -> int:
  """``model.weight_bits`` of the config a workdir holds (``WORKDIR/config.json``,
  ``bigmodel.run.RunDir``); 0 for a float run or no such file."""
  path = os.path.join(workdir, "config.json") if workdir else ""
  if not path or not os.path.isfile(path):
    return 0
  try:
    with open(path) as f:
      return int(json.load(f).get("model", {}).get("weight_bits", 0) or 0)
  except (OSError, ValueError, AttributeError):
    return 0  # Unreadable: whoever loads the run reports it.


def _loaded_class(module: str, name: str) -> Any:
  """A Qwix class if Qwix is loaded, else None (then nothing is an instance)."""
  return getattr(sys.modules.get(module), name, None)


def _is_aux(x: Any) -> bool:
  # WithAux (not exported): PTQ's kernel node.
  aux = _loaded_class("qwix._src.providers.ptq", "WithAux")
  return aux is not None and isinstance(x, aux)


def abstract_boxed_params(model: nn.Module, seq_len: int) -> Any:
  """``jax.eval_shape`` of ``model.init``: the parameters' shapes, dtypes and
  logical axes (boxed), Qwix ``WithAux`` nodes where a PTQ model quantizes."""
  from bigmodel.models.families import family_of  # pylint: disable=g-import-not-at-top
  inputs = family_of(model).example_inputs(model.config, seq_len)
  # Outside the logical-axis rules: Qwix reads a quantized kernel back
  # through a sharding constraint inside scan, where its box lacks the
  # stacked "layers" axis (lora.init_context's quirk).
  with nn.logical_axis_rules(()):
    return jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"]


def abstract_params(model: nn.Module, config, mesh: jax.sharding.Mesh) -> Any:
  """The parameters of ``model`` (a PTQ model) as ``jax.ShapeDtypeStruct``s
  placed by the trainer's logical-axis rules on ``mesh``: a restore target
  and the layout ``bigmodel.quantize`` writes. A quantized kernel's ``qvalue``
  is sharded like the float kernel; its scales like it along the axes they
  keep (a per-channel scale's size-1 contracted axes are replicated)."""
  from bigmodel import sharding  # pylint: disable=g-import-not-at-top
  boxed = abstract_boxed_params(model, config.data.seq_len)
  shardings = sharding.logical_to_shardings(boxed, mesh, sharding.logical_rules(config))
  return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                sharding.strip_boxes(boxed), shardings)


def _stacked(aux: Any) -> int:
  """Leading ``layers`` axes of a boxed quantized kernel (scanned stacks)."""
  names = getattr(aux.array.qvalue, "names", ()) or ()
  count = 0
  while count < len(names) and names[count] == "layers":
    count += 1
  return count


def quantize_params(params: Any, abstract: Any) -> Any:
  """``params`` (float, plain arrays) with each kernel that ``abstract``
  (``abstract_boxed_params`` of the PTQ model) holds as a ``WithAux``
  quantized the way it says.

  Not ``qwix.quantize_params``: in 0.1.8 it applies the per-layer ``how``
  (traced inside ``nn.scan``) to the stacked [layers, ...] kernel, so the
  axes are off by one. Here the layer axis is vmapped over and each layer is
  quantized by ``qwix.quantize`` with its own ``how``.
  """
  flat_abstract = flax.traverse_util.flatten_dict(abstract, is_leaf=lambda _, x: _is_aux(x))
  out = {}
  for path, value in flax.traverse_util.flatten_dict(params).items():
    target = flat_abstract.get(path)
    if not _is_aux(target):
      out[path] = value
      continue
    how = target.how
    quantize = functools.partial(qwix_module().quantize, qtype=how.qtype,
                                 channelwise_axes=how.channelwise_axes,
                                 tiled_axes=how.tiled_axes,
                                 calibration_method=how.calibration_method)
    for _ in range(_stacked(target)):
      quantize = jax.vmap(quantize)
    out[path] = target.replace(array=quantize(value))
  return flax.traverse_util.unflatten_dict(out)


def is_quantized(x: Any) -> bool:
  """A leaf-level node of a parameter tree is a quantized kernel."""
  qarray = _loaded_class("qwix", "QArray")
  return _is_aux(x) or (qarray is not None and isinstance(x, qarray))


def param_bytes(tree: Any, kernels_only: bool = False) -> int:
  """Bytes of a parameter tree's arrays (abstract or concrete, boxed or not),
  4-bit types at half a byte; ``kernels_only``: the dense kernels (quantized
  or not: paths ending in ``kernel``) only."""
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]:
    leaf = getattr(leaf, "value", leaf)
    if kernels_only and not any(getattr(k, "key", None) == "kernel" for k in path):
      continue
    bits = dtype_bits(leaf.dtype)
    total += (int(np.prod(leaf.shape)) * bits + 7) // 8
  return total


def dtype_bits(dtype: Any) -> int:
  """Bits per element (int4: 4; numpy reports its itemsize as 1 byte)."""
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.integer):
    return jnp.iinfo(dtype).bits
  if jnp.issubdtype(dtype, jnp.floating):
    return jnp.finfo(dtype).bits
  return dtype.itemsize * 8


__all__ = ["DENSE_LAYERS", "QAT_TYPES", "WEIGHT_TYPES", "abstract_boxed_params", "abstract_params",
           "describe", "dtype_bits", "group_size_problem", "is_quantized", "param_bytes",
           "qat_enabled", "quantize_params", "saved_weight_bits", "validate", "weight_quantized",
           "with_quantization"]
