"""Hugging Face PEFT LoRA adapters <-> bigmodel LoRA runs (``config.lora``).

A PEFT adapter directory holds ``adapter_config.json`` and
``adapter_model.safetensors``: per adapted HF linear module ``M``,
``base_model.model.M.lora_A.weight`` [r, in] and ``...lora_B.weight`` [out, r],
and PEFT adds ``lora_B @ lora_A * (lora_alpha / r)`` to ``M``'s weight [out, in].
bigmodel adds ``(alpha / r) A B`` to a kernel [in..., out...] with
``kernel_lora_a`` [in, r] and ``kernel_lora_b`` [r, out], in and out flattened
as ``mapping.to_hf_part`` flattens the kernel, so ``lora_A = A^T`` and
``lora_B = B^T``; a ``Rule.scale`` (bigmodel = scale x HF) scales the deltas
too. The family's name map (``bigmodel.hf.FAMILIES``) names the modules.

Fused tensors (GPT-2's ``c_attn``: q, k, v along the output axis): the adapted
parts of one module become one adapter of rank r x (parts adapted), ``lora_A``
the parts' A^T stacked, ``lora_B`` each part's B^T in its own rows and columns
(zeros elsewhere), ``rank_pattern`` / ``alpha_pattern`` keeping alpha / r.
Import splits ``lora_B``'s rows by part: that block structure gives each part
its block back; any other adapter (a PEFT-trained one) gives each part whose
rows are non-zero the whole ``lora_A``. Both are exact.

bigmodel has one rank and one alpha. Import takes the largest module rank
(smaller adapters zero-padded: exact) and the scale ``lora_alpha / r`` (rsLoRA:
``/ sqrt(r)``); a module whose patterns give another scale has the ratio folded
into its B (the merged model is exact; further training sees that B rescaled).
"""
import json
import math
import os
import re
from typing import Any, Iterator, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from bigmodel import cli
from bigmodel import run as run_lib
from bigmodel import sharding
from bigmodel.config import validate
from bigmodel.errors import UserError
from bigmodel.hf import exporter, interop
from bigmodel.hf.files import TensorReader, load_json, read_json
from bigmodel.hf.mapping import Rule, hf_number, hf_size, to_param
from bigmodel.models import ModelConfig, lora

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PeftModel holds the HF model as base_model (a LoraModel), which holds it as model.
PREFIX = "base_model.model."
# PEFT's task_type by the HF class --to_hf writes; any other is a causal LM.
_TASK_TYPES = {"T5ForConditionalGeneration": "SEQ_2_SEQ_LM",
               "BertForSequenceClassification": "SEQ_CLS", "BertForMaskedLM": None}
# adapter_config.json options beyond plain A, B adapters on linear layers: refused when set.
_UNSUPPORTED = ("use_dora", "lora_bias", "layer_replication", "target_parameters",
                "trainable_token_indices", "use_qalora", "alora_invocation_tokens",
                "megatron_config", "use_bdlora", "arrow_config")
# Initialisations that change the base weights the adapter was trained against.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def _io_sizes(rule: Rule) -> tuple[int, int]:
  """(in, out) of a dense rule's whole HF tensor (``linear``: [out, in]; ``conv1d``: [in, out])."""
  return rule.hf_shape[::-1] if rule.layout == "linear" else rule.hf_shape


# Export.

def export_peft(workdir: str, out: str, step: Optional[int] = None) -> dict[str, Any]:
  """Writes the adapters of checkpoint ``step`` (default: the latest) of the LoRA
  run in ``workdir`` as a PEFT adapter directory ``out`` for the model
  ``--to_hf`` writes. A failed export leaves nothing at ``out``."""
  out = os.path.abspath(out)
  if os.path.lexists(out) and not (os.path.isdir(out) and not os.listdir(out)):
    raise UserError(f"--to_peft={out} already exists and is not an empty directory; "
                    "choose a new one")
  if not os.path.isdir(os.path.dirname(out)):
    raise UserError(f"--to_peft={out}: the folder {os.path.dirname(out)} does not exist")
  run = run_lib.load_run(workdir, step, merge_lora=False)
  run_lib.refuse_quantized(run, "--to_peft")
  if not lora.enabled(run.config.lora):
    raise UserError(f"{workdir} (step {run.step}) has no LoRA adapters (lora.rank is 0); "
                    "--to_hf exports the whole model")
  m = ModelConfig.from_config(run.config.model)
  family, name_map = exporter(m)
  architecture = name_map.hf_config(m)["architectures"][0]  # UserError if HF cannot express m.
  r, alpha = run.config.lora.rank, run.config.lora.alpha
  flat = flax.traverse_util.flatten_dict(sharding.strip_boxes(run.params), sep="/")
  modules = _adapted_modules(name_map.rules(m), {k: np.asarray(jax.device_get(v), np.float32)
                                                 for k, v in flat.items()}, m.scan)
  if _TASK_TYPES.get(architecture) == "SEQ_CLS" and "classifier" in modules:
    # PeftModelForSequenceClassification trains the classifier whole (modules_to_save),
    # and leaves an adapter there out.
    raise UserError("the adapter on classifier has no PEFT form: PEFT's sequence classifiers "
                    "never adapt the classifier")
  tensors, ranks = {}, {}
  for module, (rule, parts) in modules.items():
    order, out_size = sorted(parts), _io_sizes(rule)[1]
    rows = out_size // rule.part[1]
    b_OxR = np.zeros((out_size, r * len(order)), np.float32)
    for k, p in enumerate(order):  # Part p's rows, its own r columns.
      b_OxR[p * rows:(p + 1) * rows, k * r:(k + 1) * r] = parts[p][1].T
    tensors[f"{PREFIX}{module}.lora_A.weight"] = np.concatenate([parts[p][0].T for p in order])
    tensors[f"{PREFIX}{module}.lora_B.weight"] = b_OxR
    ranks[module] = b_OxR.shape[1]
  names = {n.rsplit(".", 1)[0] for rule in name_map.rules(m)
           for i in range(max(rule.layers, 1)) for n in rule.hf_names(i)[:1]}
  short = _short_names(sorted(ranks), names - set(ranks))
  rank_pattern = {}
  for suffix in sorted(set(short.values())):
    group = {module: rank for module, rank in ranks.items() if short[module] == suffix}
    if len(set(group.values())) == 1:
      rank_pattern[suffix] = next(iter(group.values()))
    else:  # Modules of one short name with different ranks: each by its whole name.
      rank_pattern.update({re.escape(module): rank for module, rank in group.items()})
  rank_pattern = {k: v for k, v in rank_pattern.items() if v != r}
  config = {
      "peft_type": "LORA", "task_type": _TASK_TYPES.get(architecture, "CAUSAL_LM"),
      "r": r, "lora_alpha": alpha, "target_modules": sorted(set(short.values())),
      # A fused module's rank grows with its adapted parts; its alpha with it keeps alpha / r.
      "rank_pattern": rank_pattern,
      "alpha_pattern": {k: alpha * v / r for k, v in rank_pattern.items()},
      "lora_dropout": float(run.config.lora.dropout), "bias": "none", "inference_mode": True,
      "fan_in_fan_out": any(rule.layout == "conv1d" for rule, _ in modules.values()),
      "base_model_name_or_path": _hf_model_dir(run.config.get("init_from")),
      "modules_to_save": None, "use_dora": False, "use_rslora": False}
  _write_adapter(out, config, tensors)
  return {"family": family, "step": run.step, "modules": len(ranks), "rank": r,
          "targets": config["target_modules"]}


def _adapted_modules(rules: list[Rule], flat: dict[str, np.ndarray], scan: bool
                     ) -> dict[str, tuple[Rule, dict[int, tuple[np.ndarray, np.ndarray]]]]:
  """HF module name -> (a rule of it, {part: (A [in, r], B [r, out] of the HF delta)})."""
  located = {}  # Kernel path -> (rule, layer; None: every layer of a stacked parameter).
  for rule in rules:
    for layer in range(max(rule.layers, 1)):
      located[rule.param_path(layer, scan)] = (rule, None if rule.layers and scan else layer)
  modules: dict[str, tuple[Rule, dict[int, tuple[np.ndarray, np.ndarray]]]] = {}
  suffix_a, suffix_b = lora.ADAPTER_SUFFIXES
  for name in sorted(n for n in flat if n.endswith(suffix_a)):
    kernel = name[:-len(suffix_a)]
    rule, layer = located.get(kernel, (None, None))
    if rule is None or rule.layout == "same":
      # E.g. a tied embedding's output projection: PEFT adapts modules, not tensors.
      raise UserError(f"the adapter on {kernel} has no PEFT form: its Hugging Face tensor is "
                      "not a linear layer's weight")
    a, b = flat[name], flat[kernel + suffix_b]
    for i, (a_IxR, b_RxO) in (enumerate(zip(a, b)) if layer is None else [(layer, (a, b))]):
      module = rule.hf_names(i)[0].removesuffix(".weight")
      modules.setdefault(module, (rule, {}))[1][rule.part[0]] = (a_IxR, b_RxO / rule.scale)
  return modules


def _hf_model_dir(init_from: Optional[str]) -> str:
  """``init_from`` if it is a Hugging Face model directory, else "": PEFT reads
  ``base_model_name_or_path/config.json`` as a transformers config, and a
  bigmodel workdir's reads as a resized vocabulary (or fails)."""
  config = os.path.join(init_from or "", "config.json")
  try:
    return init_from if init_from and "model_type" in load_json(config) else ""
  except UserError:
    return ""


def _short_names(adapted: list[str], others: set[str]) -> dict[str, str]:
  """Each adapted module -> the shortest dotted suffix of its name no other
  module's name ends with: PEFT matches ``target_modules`` as suffixes, and
  GPT-2's attention ``c_proj`` must not catch the MLP's, BERT's
  ``output.dense`` not ``attention.output.dense``."""
  short = {}
  for module in adapted:
    parts = module.split(".")
    for k in range(1, len(parts) + 1):
      suffix = ".".join(parts[-k:])
      if not any(o == suffix or o.endswith("." + suffix) for o in others):
        break
    short[module] = suffix  # At worst the whole name.
  return short


def _write_adapter(out: str, config: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
  """Writes the adapter next to ``out`` and renames it ``out`` (which replaces an
  empty directory; one filled meanwhile makes the rename fail)."""
  with cli.new_folder(out, replace_empty=True) as partial:
    files = [os.path.join(partial, name) for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG)]
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, files[0],
              metadata={"format": "pt"})
    with open(files[1], "w") as f:
      f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(files[0], 0o666 & ~umask)  # safetensors' 0600 would stay: follow the umask.

# Import.

def import_peft(hf_dir: str, peft_dir: str, workdir: str,
                family: Optional[str] = None) -> dict[str, Any]:
  """Imports the HF model in ``hf_dir`` (as ``import_hf``) with the PEFT LoRA
  adapter in ``peft_dir`` as bigmodel adapters: a LoRA workdir whose merged
  model is base + adapter; ``modules_to_save`` tensors replace the base's.
  Everything is read and checked before the first write."""
  adapter = _read_adapter_config(peft_dir)
  reader, where = TensorReader(peft_dir, ADAPTER_WEIGHTS), os.path.join(peft_dir, ADAPTER_WEIGHTS)
  pairs, full = _adapter_tensors(reader, where, bool(adapter.get("modules_to_save")))
  base = interop.read_hf(hf_dir, family, workdir)
  scan, dense = base.config.model.scan, _dense_modules(base.rules)
  adapters: dict[tuple[str, Optional[int]], tuple[np.ndarray, np.ndarray, float]] = {}
  for module, names in sorted(pairs.items()):
    if module not in dense:
      raise UserError(f"{where}: tensor {names[0]} adapts {module}, which is no dense layer of "
                      f"this {base.family} model")
    in_size, out_size = _io_sizes(dense[module][0][0])
    module_rank, scaling = _module_scaling(adapter, module)
    shapes = dict(zip(names, ((module_rank, in_size), (out_size, module_rank))))
    a_RxI, b_OxR = [reader.get(n, _checked(reader, n, shape, where, hf_dir))
                    for n, shape in shapes.items()]
    for (rule, layer), a_IxR, b_RxO in _split(dense[module], a_RxI, b_OxR):
      key = (rule.param_path(layer, scan), layer if rule.layers and scan else None)
      if key in adapters:
        raise UserError(f"{where}: two adapters for layer {layer} of {key[0]} ({module})")
      adapters[key] = (a_IxR, b_RxO * np.float32(rule.scale), scaling)
  if not adapters:
    raise UserError(f"{where} holds no LoRA weights")
  replaced = _replace_saved_modules(base, reader, full, where, hf_dir)
  config = base.config
  reference = _scale(adapter, adapter["lora_alpha"], adapter["r"])  # Unpatterned modules'.
  rank = max(a.shape[1] for a, _, _ in adapters.values())
  config.lora.update(rank=rank, alpha=reference * rank, dropout=float(adapter["lora_dropout"]),
                     # Exactly the adapted modules (Qwix matches module paths).
                     targets="^(?:" + "|".join(sorted({re.escape(path.rsplit("/", 1)[0])
                                                      for path, _ in adapters})) + ")$")
  validate(config)
  abstract = interop.abstract_params(config)  # UserError if the rank is too big for a layer.
  filled: dict[str, np.ndarray] = {}
  for (path, layer), (a_IxR, b_RxO, scaling) in adapters.items():
    pad = rank - a_IxR.shape[1]  # Zero columns of A, rows of B: the same delta.
    b_RxO = b_RxO * np.float32(scaling / reference)
    for suffix, x in zip(lora.ADAPTER_SUFFIXES, (np.pad(a_IxR, ((0, 0), (0, pad))),
                                                  np.pad(b_RxO, ((0, pad), (0, 0))))):
      target = filled.setdefault(path + suffix, np.zeros(abstract[path + suffix].shape, np.float32))
      target[... if layer is None else layer] = x
  dtype = jnp.dtype(config.model.param_dtype)
  for name, value in abstract.items():
    if lora.is_adapter(name):  # Layers of a stack the adapter leaves alone: zero adapters.
      array = filled.get(name, np.zeros(value.shape, np.float32))
      base.params[name] = jax.device_put(array.astype(dtype), value.sharding)
  interop.write_import(hf_dir, workdir, base)
  return {**base.summary(), "rank": rank, "alpha": config.lora.alpha, "adapted": len(adapters),
          "replaced": replaced}


def _read_adapter_config(peft_dir: str) -> dict[str, Any]:
  """``adapter_config.json``, checked: a LoRA adapter bigmodel's adapters express."""
  path = os.path.join(peft_dir, ADAPTER_CONFIG)
  if not os.path.isfile(path):
    raise UserError(f"{path} does not exist; --from_peft needs a PEFT adapter directory")
  adapter, name = read_json(peft_dir, ADAPTER_CONFIG), ADAPTER_CONFIG
  if adapter.get("peft_type") != "LORA":
    raise UserError(f"{name} peft_type={adapter.get('peft_type')!r} is not supported: only LORA "
                    "adapters import")
  for key in _UNSUPPORTED:
    if adapter.get(key):
      raise UserError(f"{name} {key}={adapter[key]!r} is not supported (bigmodel's LoRA is "
                      "plain A and B on dense layers)")
  if adapter.get("bias", "none") != "none":
    raise UserError(f"{name} bias={adapter['bias']!r} is not supported (only none)")
  init = adapter.get("init_lora_weights", True)
  if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
    raise UserError(f"{name} init_lora_weights={init!r} is not supported: it changes the base "
                    "weights the adapter applies to")
  hf_size(adapter, "r", where=name)
  hf_number(adapter, "lora_alpha", where=name)
  dropout = adapter["lora_dropout"] = adapter.get("lora_dropout") or 0.0
  if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
    raise UserError(f"{name} lora_dropout={dropout!r} is not a number in [0, 1)")
  for key in ("rank_pattern", "alpha_pattern"):
    pattern = adapter[key] = adapter.get(key) or {}
    if not isinstance(pattern, dict):
      raise UserError(f"{name} {key}={pattern!r} is not a JSON object")
    for regex in pattern:
      hf_number(pattern, regex, where=f"{name} {key}")
      try:
        re.compile(regex)
      except re.error as e:
        raise UserError(f"{name} {key} key {regex!r} is not a regular expression") from e
  return adapter


def _module_scaling(adapter: dict[str, Any], module: str) -> tuple[int, float]:
  """(rank, scale) PEFT gives ``module``: ``rank_pattern`` / ``alpha_pattern``
  keys matched as PEFT's ``get_pattern_key`` matches them."""
  def pick(key: str, default: Any) -> Any:
    return next((v for k, v in adapter[key].items() if re.match(rf"(.*\.)?({k})$", module)),
                default)
  rank = pick("rank_pattern", adapter["r"])
  return rank, _scale(adapter, pick("alpha_pattern", adapter["lora_alpha"]), rank)


def _scale(adapter: dict[str, Any], alpha: float, rank: int) -> float:
  return alpha / (math.sqrt(rank) if adapter.get("use_rslora") else rank)


def _adapter_tensors(reader: TensorReader, where: str,
                     saved_modules: bool) -> tuple[dict[str, tuple[str, str]], set[str]]:
  """(HF module -> its (lora_A, lora_B) tensor names; the other tensors:
  ``modules_to_save``'s whole weights)."""
  found: dict[str, dict[str, str]] = {}
  full = set()
  for name in reader.names():
    rest = name[len(PREFIX):] if name.startswith(PREFIX) else ""
    kind = next((k for k in ("lora_A", "lora_B") if rest.endswith(f".{k}.weight")), None)
    if kind:
      found.setdefault(rest[:-len(f".{kind}.weight")], {})[kind] = name
    elif rest and saved_modules:
      full.add(name)
    else:
      raise UserError(f"{where}: tensor {name} is not a LoRA weight ({PREFIX}MODULE.lora_A."
                      "weight / lora_B.weight)")
  for module, pair in found.items():
    if len(pair) != 2:
      raise UserError(f"{where}: {module} has {next(iter(pair.values()))} but no "
                      f"{'lora_B' if 'lora_A' in pair else 'lora_A'}")
  return {module: (pair["lora_A"], pair["lora_B"]) for module, pair in found.items()}, full


def _checked(reader: TensorReader, name: str, shape: tuple[int, ...], where: str,
             hf_dir: str) -> tuple[int, ...]:
  """``shape``; UserError unless the adapter's tensor ``name`` has it."""
  if reader.shape(name) != tuple(shape):
    raise UserError(f"{where}: tensor {name} has shape {reader.shape(name)}, but the base "
                    f"model in {hf_dir} implies {tuple(shape)}: an adapter for another model?")
  return shape


def _dense_modules(rules: list[Rule]) -> dict[str, dict[int, tuple[Rule, int]]]:
  """HF module name (every alias) -> {part: (rule, layer)} of the kernels its
  weight holds. A name a non-dense rule reads too is none (T5 may read its head
  from ``shared.weight``, the embedding)."""
  others = {n for rule in rules if rule.layout == "same"
            for i in range(max(rule.layers, 1)) for n in rule.hf_names(i)}
  modules: dict[str, dict[int, tuple[Rule, int]]] = {}
  for rule in (rule for rule in rules if rule.layout != "same"):
    for layer in range(max(rule.layers, 1)):
      for name in rule.hf_names(layer):
        if name not in others and name.endswith(".weight"):
          modules.setdefault(name.removesuffix(".weight"), {})[rule.part[0]] = (rule, layer)
  return modules


def _split(parts: dict[int, tuple[Rule, int]], a_RxI: np.ndarray, b_OxR: np.ndarray
           ) -> Iterator[tuple[tuple[Rule, int], np.ndarray, np.ndarray]]:
  """((rule, layer), A [in, r'], B [r', out]) of each kernel a module's adapter
  adapts (module doc: a fused tensor's parts)."""
  rows = b_OxR.shape[0] // len(parts)
  b_parts = [b_OxR[p * rows:(p + 1) * rows] for p in range(len(parts))]
  adapted = [p for p, b in enumerate(b_parts) if b.any()] or list(range(len(parts)))
  width = a_RxI.shape[0] // len(adapted)
  blocks = len(adapted) > 1 and width * len(adapted) == a_RxI.shape[0] and not any(
      np.delete(b_parts[p], np.s_[k * width:(k + 1) * width], axis=1).any()
      for k, p in enumerate(adapted))
  for k, p in enumerate(adapted):
    cols = slice(k * width, (k + 1) * width) if blocks else slice(None)
    yield parts[p], a_RxI[cols].T, b_parts[p][:, cols].T


def _replace_saved_modules(base: interop.Imported, reader: TensorReader, full: set[str],
                           where: str, hf_dir: str) -> list[str]:
  """Puts the adapter's ``modules_to_save`` weights (e.g. a classifier) in
  place of the base's; returns their names."""
  scan, used = base.config.model.scan, set()
  for rule in base.rules:
    for layer in range(max(rule.layers, 1)):
      name = next((PREFIX + n for n in rule.hf_names(layer) if PREFIX + n in full), None)
      if name is None:
        continue
      path, stacked = rule.param_path(layer, scan), bool(rule.layers and scan)
      old = base.params[path]
      new = to_param(rule, reader.get(name, _checked(reader, name, rule.hf_shape, where, hf_dir)),
                     old.shape[1:] if stacked else old.shape)
      new = old.at[layer].set(new) if stacked else jnp.asarray(new, old.dtype)
      base.params[path], used = jax.device_put(new, old.sharding), used | {name}
  if full - used:
    raise UserError(f"{where}: tensor {sorted(full - used)[0]} is no weight of this "
                    f"{base.family} model")
  return sorted(used)
