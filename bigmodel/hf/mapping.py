"""Name maps between Hugging Face tensors and bigmodel parameters, both ways.

A family (``bigmodel/hf/{gpt2,bert,t5,llama}.py``) lists :class:`Rule`s, one per
bigmodel parameter: which HF tensor holds it, its HF shape and layout. The
same rules import (HF -> bigmodel) and export (bigmodel -> HF), so a
round trip is the identity by construction.

Layouts of a HF tensor:

* ``same``: the bigmodel parameter reshaped (embeddings, norms, biases);
* ``linear``: torch ``nn.Linear`` weight ``[out, in]``: transposed;
* ``conv1d``: GPT-2's ``Conv1D`` weight, already ``[in, out]``.

bigmodel kernels are ``[in..., out...]`` (e.g. a query kernel ``[D, N, H]``),
so after the transpose only a reshape remains. ``part`` picks one of several
projections fused along the output axis (GPT-2's ``c_attn`` holds q, k, v).
``experts`` stacks one HF tensor per expert (Mixtral's
``experts.{e}.w1.weight``) into a parameter's expert axis.
"""
import dataclasses
from typing import Any, Iterator, Optional

import numpy as np

from bigmodel.errors import UserError
from bigmodel.hf.files import TensorReader


@dataclasses.dataclass(frozen=True)
class Rule:
  """One bigmodel parameter and the HF tensor that holds it.

  Attributes:
    param: bigmodel path as in a scanned model, e.g. ``blocks/attn/query/kernel``.
    hf: HF names; ``{i}`` is the layer. Import reads the first present, export
      writes the first (later ones are aliases, e.g. T5's tied embedding names).
    hf_shape: Shape of the whole HF tensor (all parts of a fused one).
    layout: ``same`` | ``linear`` | ``conv1d`` (see the module doc).
    part: (index, count): this parameter is part ``index`` of ``count`` equal
      slices of the HF tensor's output axis.
    layers: > 0: a per-layer tensor of a stack this deep (``blocks`` in ``param``).
    experts: > 0: the parameter stacks this many experts (its axis after the
      layers'), one HF tensor each: ``{e}`` in ``hf`` is the expert.
    scale: bigmodel value = ``scale`` x HF value (folds a constant into a weight).
    fresh: The checkpoint may lack the tensor (a head its class has not, e.g. a
      ``BertModel``'s MLM head); then import reads nothing and the parameter
      starts from the model's initialisation.
  """
  param: str
  hf: tuple[str, ...]
  hf_shape: tuple[int, ...]
  layout: str = "same"
  part: tuple[int, int] = (0, 1)
  layers: int = 0
  experts: int = 0
  scale: float = 1.0
  fresh: bool = False

  def hf_names(self, layer: int, expert: int = 0) -> list[str]:
    return [name.format(i=layer, e=expert) for name in self.hf]

  def param_path(self, layer: int, scan: bool) -> str:
    """The parameter's path in an unscanned model (``blocks_3/...``) or a scanned one."""
    if not self.layers or scan:
      return self.param
    parts = self.param.split("/")
    stack = next(k for k, p in enumerate(parts) if p == "blocks")
    parts[stack] = f"blocks_{layer}"
    return "/".join(parts)


def _out_axis(layout: str) -> int:
  return 0 if layout == "linear" else -1


def to_param(rule: Rule, hf_array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """The HF tensor (whole, as stored) -> this rule's bigmodel parameter of ``shape``."""
  index, count = rule.part
  x = np.split(hf_array, count, axis=_out_axis(rule.layout))[index]
  if rule.layout == "linear":
    x = x.T  # [out, in] -> [in, out].
  if rule.scale != 1.0:  # Else no copy: import holds one parameter at a time.
    x = x * np.float32(rule.scale)
  return x.reshape(shape)


def to_hf_part(rule: Rule, param: np.ndarray) -> np.ndarray:
  """A bigmodel parameter -> its part of the HF tensor (the inverse of ``to_param``)."""
  x = np.asarray(param, np.float32) / np.float32(rule.scale)
  if rule.layout == "same":
    return x.reshape(rule.hf_shape[:-1] + (rule.hf_shape[-1] // rule.part[1],))
  in_size = rule.hf_shape[1] if rule.layout == "linear" else rule.hf_shape[0]
  x = x.reshape(in_size, -1)
  return x.T if rule.layout == "linear" else x


def _check_coverage(rules: list[Rule], shapes: dict[str, tuple[int, ...]], scan: bool) -> None:
  covered = {r.param_path(i, scan) for r in rules for i in range(max(r.layers, 1))}
  if covered != set(shapes):
    # A family's rules and its model disagree: a bug here, not bad input.
    raise RuntimeError(f"rules cover {sorted(covered - set(shapes))} not in the model; model "
                       f"parameters without a rule: {sorted(set(shapes) - covered)}")


def iter_params(rules: list[Rule], reader: TensorReader, shapes: dict[str, tuple[int, ...]],
                scan: bool, dtype: Any = np.float32
                ) -> Iterator[tuple[str, Optional[int], np.ndarray]]:
  """Bigmodel parameters read through ``rules``, one tensor at a time.

  Yields ``(path, layer, array of dtype)``: ``layer`` None for a whole
  parameter, else the index of ``array`` in the stacked parameter ``path``
  (a scanned model's, leading layer axis; ``shapes`` has the whole stack). A
  caller that moves each array to its devices before taking the next holds
  one layer's tensor on the host at a time, not the model. A ``fresh`` rule
  whose tensor is absent yields nothing.
  """
  _check_coverage(rules, shapes, scan)
  for rule in rules:
    if rule.fresh and not any(reader.has(n) for n in rule.hf_names(0)):
      continue
    stacked = rule.layers and scan
    for layer in range(max(rule.layers, 1)):
      path = rule.param_path(layer, scan)
      shape = shapes[path][1:] if stacked else shapes[path]
      if rule.experts:  # One layer's experts at a time, stacked.
        array = np.stack([_read(rule, reader, layer, shape[1:], dtype, e)
                          for e in range(rule.experts)])
      else:
        array = _read(rule, reader, layer, shape, dtype)
      yield path, layer if stacked else None, array


def _read(rule: Rule, reader: TensorReader, layer: int, shape: tuple[int, ...], dtype: Any,
          expert: int = 0) -> np.ndarray:
  """One HF tensor of ``rule`` (its first present name) as a parameter of ``shape``."""
  names = rule.hf_names(layer, expert)
  name = next((n for n in names if reader.has(n)), None)
  if name is None:
    raise UserError(f"tensor {names[0]} is missing from {reader.directory}")
  array = to_param(rule, reader.get(name, rule.hf_shape), shape).astype(dtype, copy=False)
  reader.mark_used(names)  # Aliases of a tied tensor are accounted for too.
  return array


def export_tensors(rules: list[Rule], params: dict[str, np.ndarray],
                   scan: bool) -> dict[str, np.ndarray]:
  """HF tensors (name -> float32 array) from flat bigmodel parameters."""
  _check_coverage(rules, {k: v.shape for k, v in params.items()}, scan)
  parts: dict[str, dict[int, np.ndarray]] = {}
  axis_of: dict[str, int] = {}
  for rule in rules:
    for layer in range(max(rule.layers, 1)):
      param = params[rule.param_path(layer, scan)]
      if rule.layers and scan:
        param = param[layer]
      for expert in range(max(rule.experts, 1)):
        name = rule.hf_names(layer, expert)[0]
        parts.setdefault(name, {})[rule.part[0]] = to_hf_part(
            rule, param[expert] if rule.experts else param)
        axis_of[name] = _out_axis(rule.layout)
  return {name: np.concatenate([p[k] for k in sorted(p)], axis=axis_of[name])
          for name, p in parts.items()}


# HF activation names (``activation_function``, ``hidden_act``, T5's
# ``feed_forward_proj`` suffix) <-> ``model.mlp_activation``. HF's "gelu" is
# the exact erf form; "gelu_new" and "gelu_pytorch_tanh" the tanh approximation;
# "swish" another name of "silu" (Llama's, Qwen's and Mistral's SwiGLU).
FROM_HF_ACTIVATION = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                      "gelu": "gelu_exact", "relu": "relu", "silu": "silu", "swish": "silu"}
TO_HF_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu_exact": "gelu", "relu": "relu", "silu": "silu"}


def hf_value(hf_config: dict[str, Any], key: str, default: Any = None,
             where: str = "config.json") -> Any:
  """``hf_config[key]`` (``default`` if missing or null); UserError if both are missing.

  ``where`` names ``hf_config`` in messages (a nested dict: ``config.json rope_parameters``).
  """
  value = hf_config.get(key)
  value = default if value is None else value
  if value is None:
    raise UserError(f"{where} has no {key!r}")
  return value


def hf_size(hf_config: dict[str, Any], key: str, default: Any = None,
            where: str = "config.json") -> int:
  """``hf_value``, which must be a positive integer (a width, a count of layers)."""
  value = hf_value(hf_config, key, default, where)
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise UserError(f"{where} {key}={value!r} is not a positive integer")
  return value


def hf_number(hf_config: dict[str, Any], key: str, default: Any = None,
              where: str = "config.json") -> float:
  """``hf_value``, which must be a positive number (an epsilon, a rotary base, a factor)."""
  value = hf_value(hf_config, key, default, where)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
    raise UserError(f"{where} {key}={value!r} is not a positive number")
  return float(value)


def hf_bool(hf_config: dict[str, Any], key: str, default: bool) -> bool:
  """``hf_config[key]`` (``default`` if missing), which must be true or false.

  A string "false" must not turn an option on silently.
  """
  value = hf_config.get(key, default)
  if not isinstance(value, bool):
    raise UserError(f"config.json {key}={value!r} is not true or false")
  return value


def hf_heads_and_width(hf_config: dict[str, Any], heads: str, width: str) -> tuple[int, int]:
  """The head count and model width, which the heads must split evenly."""
  num_heads, embed_dim = hf_size(hf_config, heads), hf_size(hf_config, width)
  if embed_dim % num_heads:
    raise UserError(f"config.json {heads}={num_heads} does not divide {width}={embed_dim}")
  return num_heads, embed_dim


def mlp_activation(hf_name: str, key: str) -> str:
  if not isinstance(hf_name, str) or hf_name not in FROM_HF_ACTIVATION:
    raise UserError(f"config.json {key}={hf_name!r} is not supported; supported: "
                    f"{', '.join(FROM_HF_ACTIVATION)}")
  return FROM_HF_ACTIVATION[hf_name]
