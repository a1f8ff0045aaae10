r"""Plans a training run without hardware: memory per device, FLOPs and step time.

    python -m bigmodel.plan --config=configs/gpt.py:gpt3_175b --devices=1024 \
        --device_memory=95GB --peak_tflops=459 --mfu=0.5 [--mesh=data=16,fsdp=32,tensor=2]

Pure arithmetic from the config (``bigmodel.memory`` for bytes,
``bigmodel.flops`` for FLOPs): JAX only traces shapes, no device is used.
Reports, per device, the parameters, gradients, optimizer state, saved
activations and transient working set against ``--device_memory``, the FLOPs
of a step and the step time at ``--mfu`` of ``--peak_tflops``, for
``--platform`` (gpu by default: ``attention_impl=auto`` is a fused kernel that
keeps no [L, L] scores; cpu runs XLA attention). Then suggests
the least model parallelism that fits: the smallest ``context`` (sequences
split over devices), then ``tensor``, then ``fsdp``, then the smallest
``optim.grad_accum`` (the largest micro-batch); when nothing fits on
``--devices``, the fewest devices that do.
Overrides such as ``--config.model.remat=full`` apply as in training.
"""
import dataclasses
import json
import math
import re
from typing import Any, Optional

from absl import app
from absl import flags
import ml_collections

from bigmodel import comms
from bigmodel import flops
from bigmodel import memory
from bigmodel import sharding
from bigmodel.config import validate
from bigmodel.errors import UserError
from bigmodel.models import ModelConfig, families
from bigmodel.models.attention import resolve_impl

_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
# Devices searched when nothing fits: at most this many doublings.
_MAX_DOUBLINGS = 24


@dataclasses.dataclass(frozen=True)
class Plan:
  """One layout of a config on a mesh, and what it costs per device."""
  mesh: dict[str, int]
  devices: int
  grad_accum: int
  memory: memory.MemoryEstimate
  device_memory: Optional[float]     # Bytes; None = not checked.
  flops_per_step: float              # Model FLOPs of one optimizer step, all devices.
  recompute_flops_per_step: float    # Extra forward FLOPs rematerialisation adds.
  step_seconds: Optional[float]      # At the given MFU; None without a peak.
  problems: tuple[str, ...]          # Why the trainer would refuse this layout.
  attention: str                     # The attention implementation it runs.
  dcn: dict[str, int] = dataclasses.field(default_factory=dict)  # Slices along data / fsdp.
  collectives: tuple[comms.Collective, ...] = ()
  # Seconds on the wire per step, {"ici": ..., "dcn": ...}; None without bandwidths.
  comm_seconds: Optional[dict[str, float]] = None

  @property
  def bound_seconds(self) -> Optional[float]:
    """The step's lower bound: compute and each network fully overlapped."""
    if self.step_seconds is None or self.comm_seconds is None:
      return None
    return max(self.step_seconds, *self.comm_seconds.values())

  @property
  def fits(self) -> bool:
    return not self.problems and (self.device_memory is None
                                  or self.memory.total <= self.device_memory)


def parse_bytes(text: str, flag: str = "--device_memory") -> float:
  """"95GB", "80GiB", "1.5e11" -> bytes (GB = 1e9, GiB = 2**30); ``flag``
  names the option in the error."""
  match = re.fullmatch(r"\s*([0-9.]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", text)
  if not match or match.group(2).upper() not in _UNITS:
    raise UserError(f"{flag}={text!r}: expected a size such as 95GB or 80GiB")
  try:
    value = float(match.group(1)) * _UNITS[match.group(2).upper()]
  except ValueError:
    raise UserError(f"{flag}={text!r}: expected a size such as 95GB or 80GiB") from None
  if value <= 0:
    raise UserError(f"{flag}={text!r} must be positive")
  return value


def parse_peak(text: str) -> Optional[float]:
  """"459" or a device name from ``flops.KNOWN_PEAK_TFLOPS`` ("h100") -> TFLOP/s."""
  if not text:
    return None
  try:
    value = float(text)
  except ValueError:
    value = flops.datasheet_peak_tflops(text)
    if value is None:
      raise UserError(f"--peak_tflops={text!r}: give TFLOP/s or one of "
                      f"{', '.join(flops.KNOWN_PEAK_TFLOPS)}") from None
  if value <= 0:
    raise UserError(f"--peak_tflops={text!r} must be positive")
  return value


def parse_mesh(text: str, base: ml_collections.ConfigDict) -> dict[str, int]:
  """"data=2,fsdp=4" over ``base`` (the config's mesh); sizes may be -1."""
  sizes = dict(zip(sharding.MESH_AXES, sharding.mesh_sizes(base)))
  given = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, _, value = part.partition("=")
    if name.strip() not in sizes or not re.fullmatch(r"\s*-?\d+\s*", value):
      raise UserError(f"--mesh={text!r}: expected comma-separated AXIS=SIZE with AXIS in "
                      f"{', '.join(sharding.MESH_AXES)}, e.g. data=2,fsdp=4,tensor=1")
    given[name.strip()] = int(value)
  if -1 in given.values():  # The given open axis replaces the config's (data=-1).
    sizes = {axis: 1 if size == -1 else size for axis, size in sizes.items()}
  return {**sizes, **given}


def layout_problems(config, mesh_shape: dict[str, int]) -> tuple[str, ...]:
  """What ``train.py`` would reject about this batch layout (empty if none)."""
  batch, grad_accum = config.train.batch_size, config.optim.grad_accum
  dp = sharding.data_parallel_size(mesh_shape)
  problems = []
  context = mesh_shape.get("context", 1)
  if config.data.seq_len % context:
    problems.append(f"context={context} does not divide seq_len={config.data.seq_len}")
  if batch % grad_accum:
    problems.append(f"grad_accum={grad_accum} does not divide batch_size={batch}")
  elif (batch // grad_accum) % dp:
    problems.append(f"micro-batch {batch // grad_accum} is not divisible by the data-parallel "
                    f"size {dp} (data x fsdp x expert)")
  return tuple(problems)


@dataclasses.dataclass(frozen=True)
class Network:
  """What the step's collectives are priced with: slices and bandwidths
  (bytes/s per device; None: bytes only)."""
  slices: int = 1
  ici_bandwidth: Optional[float] = None
  dcn_bandwidth: Optional[float] = None


def make_plan(config, mesh_shape: dict[str, int], device_memory: Optional[float] = None,
              peak_tflops: Optional[float] = None, mfu: float = 0.5,
              platform: str = "gpu", dcn: Optional[dict[str, int]] = None,
              network: Network = Network()) -> Plan:
  """The plan of ``config`` (its batch and ``optim.grad_accum``) on ``mesh_shape``
  (global sizes), ``dcn`` the slices along ``data`` and ``fsdp``.

  ``platform`` (cpu, gpu, tpu) decides what ``model.attention_impl=auto`` runs.
  """
  c = ModelConfig.from_config(config.model)
  tokens = config.train.batch_size * config.data.seq_len
  devices = math.prod(mesh_shape.values())
  step_flops = flops.train_flops_per_token(c, config.data.seq_len) * tokens
  step_seconds = None
  if peak_tflops:
    step_seconds = step_flops / devices / (peak_tflops * 1e12 * mfu)
  estimate = memory.estimate(config, mesh_shape, platform)
  collectives = tuple(comms.step_collectives(config, mesh_shape, estimate, dcn))
  comm_seconds = None
  if network.ici_bandwidth:
    comm_seconds = {"ici": sum(x.ici_bytes for x in collectives) / network.ici_bandwidth,
                    "dcn": (sum(x.dcn_bytes for x in collectives) / network.dcn_bandwidth
                            if network.dcn_bandwidth else 0.0)}
  return Plan(mesh=dict(mesh_shape), devices=devices, grad_accum=config.optim.grad_accum,
              memory=estimate, device_memory=device_memory,
              flops_per_step=step_flops,
              recompute_flops_per_step=flops.recompute_flops_per_token(
                  c, config.data.seq_len) * tokens,
              step_seconds=step_seconds, problems=layout_problems(config, mesh_shape),
              attention=resolve_impl(c.attention_impl, platform), dcn=dict(dcn or {}),
              collectives=collectives, comm_seconds=comm_seconds)


def _divisors(n: int) -> list[int]:
  """Divisors of ``n``, ascending."""
  small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
  return sorted(set(small + [n // d for d in small]))


def candidate_layouts(config, devices: int, max_tensor: int):
  """(mesh, grad_accum) in the order of preference: least context, expert,
  tensor, fsdp, grad_accum.

  ``tensor`` must divide the heads and the MLP width (otherwise the trainer
  replicates those dimensions and tensor parallelism buys nothing);
  ``context`` (splitting sequences) the sequence length, for families with
  context-parallel attention; ``expert`` the experts of a mixture with
  capacity dispatch (what ``mesh.expert`` needs).
  """
  c = ModelConfig.from_config(config.model)
  batch, seq_len = config.train.batch_size, config.data.seq_len
  splits_sequences = families.get(c.family).context_parallel
  splits_experts = c.num_experts and c.moe_dispatch == "capacity"
  expert_width = c.moe_mlp_dim or c.mlp_dim if c.num_experts else c.mlp_dim
  for context in _divisors(devices):
    if context > 1 and (not splits_sequences or seq_len % context):
      continue
    for expert in _divisors(devices // context):
      if expert > 1 and (not splits_experts or c.num_experts % expert):
        continue
      for tensor in _divisors(devices // (context * expert)):
        if (tensor > max_tensor or c.num_heads % tensor or c.mlp_dim % tensor
            or expert_width % tensor):
          continue
        for fsdp in _divisors(devices // (context * expert * tensor)):
          mesh = dict(data=devices // (context * expert * tensor * fsdp), fsdp=fsdp,
                      expert=expert, context=context, tensor=tensor)
          dp = sharding.data_parallel_size(mesh)
          for grad_accum in _divisors(batch):
            if (batch // grad_accum) % dp == 0:
              yield mesh, grad_accum


def _slice_placements(mesh: dict[str, int], slices: int):
  """How ``slices`` can split over the mesh's data and fsdp axes, data first
  (one gradient all-reduce per step crosses slices, not every layer's FSDP
  gathers); none when neither axis divides into them."""
  if slices == 1:
    yield {}
    return
  for axis in sharding.DCN_AXES:
    axis = axis.removeprefix("dcn_")
    if mesh[axis] % slices == 0:
      yield {axis: slices}


def suggest(config, devices: int, device_memory: float, *, peak_tflops: Optional[float] = None,
            mfu: float = 0.5, max_tensor: int = 8, platform: str = "gpu",
            network: Network = Network()) -> Optional[Plan]:
  """The first layout of ``candidate_layouts`` that fits (on several slices,
  with the slices on data before fsdp), or None. With a peak and an ICI
  bandwidth the layouts are priced instead: of each mesh's first fitting
  grad_accum, the one with the shortest ``bound_seconds`` (compute, ICI and
  DCN time overlapped; the first of equals)."""
  best, priced_meshes = None, set()
  for mesh, grad_accum in candidate_layouts(config, devices, max_tensor):
    for dcn in _slice_placements(mesh, network.slices):
      key = (tuple(mesh.items()), tuple(dcn.items()))
      if key in priced_meshes:
        continue
      plan = make_plan(_with_grad_accum(config, grad_accum), mesh, device_memory, peak_tflops,
                       mfu, platform, dcn, network)
      if not plan.fits:
        continue
      if plan.bound_seconds is None:
        return plan
      priced_meshes.add(key)
      if best is None or plan.bound_seconds < best.bound_seconds:
        best = plan
  return best


def fewest_devices(config, devices: int, device_memory: float, **kwargs) -> Optional[Plan]:
  """The smallest power-of-two multiple of ``devices`` on which a layout fits."""
  # Parameters, gradients and optimizer state fully sharded: a lower bound.
  _, params, opt_state = memory.state_bytes(config, dict(data=1, fsdp=1, tensor=1))
  needed = (2 * params + opt_state) / device_memory
  while devices < needed:
    devices *= 2
  for _ in range(_MAX_DOUBLINGS):
    plan = suggest(config, devices, device_memory, **kwargs)
    if plan is not None:
      return plan
    devices *= 2
  return None


def _with_grad_accum(config, grad_accum: int) -> ml_collections.ConfigDict:
  trial = ml_collections.ConfigDict(config.to_dict())
  trial.optim.grad_accum = grad_accum
  return trial


def _gib(num_bytes: float) -> str:
  return f"{num_bytes / 2**30:9.2f}"


def _describe_layout(plan: Plan) -> str:
  mesh = ", ".join(f"{k}={v}" + (f" ({plan.dcn[k]} slices)" if k in plan.dcn else "")
                   for k, v in plan.mesh.items())
  return f"mesh {mesh}, optim.grad_accum={plan.grad_accum}"


def format_plan(config, plan: Plan, suggestion: Optional[Plan], mfu: float,
                peak_tflops: Optional[float], searched_devices: bool) -> str:
  """The human-readable report."""
  m, c = plan.memory, config.model
  b, seq_len = config.train.batch_size, config.data.seq_len
  lines = [
      f"{config.get('preset', c.family)}: {m.num_params / 1e9:.3f}B parameters "
      f"({c.param_dtype} parameters, {c.dtype} compute), remat={c.remat}, scan={c.scan}, "
      f"attention {plan.attention}, {config.optim.name}",
      f"{_describe_layout(plan)} on {plan.devices} device(s); batch {b} x {seq_len} tokens "
      f"-> {m.micro_batch} sequence(s) per device per micro-batch",
  ]
  lines += [f"  problem: {p}" for p in plan.problems]
  lines += ["", "per device                 GiB",
            f"  parameters         {_gib(m.params)}",
            f"  gradients          {_gib(m.grads)}",
            f"  optimizer state    {_gib(m.opt_state)}",
            f"  activations saved  {_gib(m.activations)}   (remat={c.remat})",
            f"  working set        {_gib(m.working)}   (peak transient buffers)",
            f"  batch              {_gib(m.batch)}",
            f"  total              {_gib(m.total)}"]
  if plan.device_memory:
    free = plan.device_memory - m.total
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(f"  device memory      {_gib(plan.device_memory)}   -> {verdict} "
                 f"({free / 2**30:+.2f} GiB free)")
  lines += ["", f"FLOPs per step     {plan.flops_per_step:.3e} model "
                f"({plan.flops_per_step / plan.devices:.3e} per device)"]
  if plan.recompute_flops_per_step:
    lines.append(f"  + {plan.recompute_flops_per_step:.3e} recomputed by remat={c.remat} "
                 f"(hardware FLOPs x{1 + plan.recompute_flops_per_step / plan.flops_per_step:.2f})")
  if plan.step_seconds is not None:
    tokens = b * seq_len
    lines.append(f"step time          {plan.step_seconds:.3f} s at {mfu:.0%} MFU of "
                 f"{peak_tflops:g} TFLOP/s ({tokens / plan.step_seconds:,.0f} tokens/s; "
                 f"{config.train.steps} steps in {plan.step_seconds * config.train.steps / 3600:.1f} h)")
  lines += _format_collectives(plan)
  if plan.device_memory:
    lines.append("")
    if suggestion is None:
      lines.append("suggestion: nothing fits (even on 2^24 times the devices)")
    elif (plan.fits and suggestion.mesh == plan.mesh and suggestion.dcn == plan.dcn
          and suggestion.grad_accum == plan.grad_accum):
      lines.append("suggestion: this layout is already " + (
          "the fastest priced layout that fits" if suggestion.bound_seconds is not None
          else "the least model parallelism that fits"))
    else:
      where = (f"needs at least {suggestion.devices} devices: " if searched_devices
               else "")
      priced = (f", step >= {suggestion.bound_seconds:.3f} s"
                if suggestion.bound_seconds is not None else "")
      lines.append(f"suggestion: {where}{_describe_layout(suggestion)} -> "
                   f"{suggestion.memory.total / 2**30:.2f} GiB per device, "
                   f"{suggestion.memory.micro_batch} sequence(s) per device per micro-batch"
                   f"{priced}")
      lines.append(f"  {' '.join(_mesh_flags(suggestion))} "
                   f"--config.optim.grad_accum={suggestion.grad_accum}")
  return "\n".join(lines)


def _mesh_flags(plan: Plan) -> list[str]:
  """The trainer's flags for ``plan``'s mesh: in-slice sizes, then the slices."""
  flags_text = [f"--config.mesh.{k}={v // plan.dcn.get(k, 1)}" for k, v in plan.mesh.items()]
  return flags_text + [f"--config.mesh.dcn_{k}={v}" for k, v in plan.dcn.items()]


def _format_collectives(plan: Plan) -> list[str]:
  """The communication section: each collective's bytes per device per step
  within and across slices, with seconds when bandwidths were given."""
  if not plan.collectives:
    return []
  priced = plan.comm_seconds is not None
  lines = ["", "communication per device per step  over            ICI GB     DCN GB"
           + ("  (* crosses slices)" if plan.dcn else "")]
  for x in plan.collectives:
    lines.append(f"  {x.what:32} {','.join(x.axes):12} {x.ici_bytes / 1e9:9.3f}  "
                 f"{x.dcn_bytes / 1e9:9.3f}" + ("  *" if x.crosses_slices else ""))
  ici = sum(x.ici_bytes for x in plan.collectives)
  dcn = sum(x.dcn_bytes for x in plan.collectives)
  lines.append(f"  {'total':32} {'':12} {ici / 1e9:9.3f}  {dcn / 1e9:9.3f}")
  if priced:
    bound = plan.bound_seconds
    lines.append(f"on the wire        ICI {plan.comm_seconds['ici']:.3f} s, DCN "
                 f"{plan.comm_seconds['dcn']:.3f} s per step"
                 + (f"; step >= {bound:.3f} s overlapped ("
                    f"{'compute' if bound == plan.step_seconds else 'communication'}-bound)"
                    if bound is not None else ""))
  return lines


def plan_to_dict(plan: Optional[Plan]) -> Optional[dict[str, Any]]:
  if plan is None:
    return None
  out = dataclasses.asdict(plan)
  out["memory"]["total"] = plan.memory.total
  out["fits"] = plan.fits
  return out


def inference_params(config, mesh_shape: dict[str, int], weight_bits: int,
                     group_size: int) -> dict[str, Any]:
  """What generation and evaluation hold per device for parameters, as trained
  and as ``bigmodel.quantize --bits=weight_bits`` would write them."""
  from bigmodel.models import quantization  # pylint: disable=g-import-not-at-top
  if weight_bits not in quantization.WEIGHT_TYPES:
    raise UserError(f"--weight_bits={weight_bits}: give 8 or 4 (or 0: no report)")
  if group_size < 0:
    raise UserError(f"--group_size={group_size} must be >= 0 (0 = per output channel)")
  problem = quantization.group_size_problem(ModelConfig.from_config(config.model), group_size)
  if problem:
    raise UserError(problem)
  return dict(weight_bits=weight_bits, group_size=group_size,
              float_bytes=memory.inference_param_bytes(config, mesh_shape),
              quantized_bytes=memory.inference_param_bytes(config, mesh_shape, weight_bits,
                                                           group_size))


def run(config, mesh_text: str, devices: int, device_memory_text: str, peak_text: str,
        mfu: float, max_tensor: int, output_format: str, platform: str = "gpu",
        weight_bits: int = 0, group_size: int = 0, slices: int = 1,
        ici_bandwidth_text: str = "", dcn_bandwidth_text: str = "") -> str:
  """The whole command, returning its output; raises ``UserError`` for bad input.

  ``weight_bits`` (8 or 4; 0: none): also report the parameter bytes per
  device that generation and evaluation hold for the model quantized so.
  ``slices``: the devices form that many slices (``mesh.dcn_*`` place them;
  all on data unless the config says otherwise); the bandwidths (bytes/s
  per device, e.g. 400GB) price the step's collectives.
  """
  validate(config)
  try:
    memory.uses_fused_attention(config.model.attention_impl, platform)
  except ValueError as e:
    raise UserError(str(e)) from None
  if not families.get(config.model.family).analytic_memory:
    raise UserError(f"bigmodel.plan models GPT decoders; model.family={config.model.family!r} "
                    "is not supported yet")
  if not 0 < mfu <= 1:
    raise UserError(f"--mfu={mfu} must be in (0, 1]")
  if max_tensor < 1:
    raise UserError(f"--max_tensor={max_tensor} must be positive")
  if devices < 0:
    raise UserError(f"--devices={devices} must be positive")
  if slices < 1:
    raise UserError(f"--slices={slices} must be positive")
  network = Network(slices, parse_bytes(ici_bandwidth_text, "--ici_bandwidth")
                    if ici_bandwidth_text else None,
                    parse_bytes(dcn_bandwidth_text, "--dcn_bandwidth")
                    if dcn_bandwidth_text else None)
  if slices > 1 and network.ici_bandwidth and not network.dcn_bandwidth:
    raise UserError("--slices > 1 with --ici_bandwidth needs --dcn_bandwidth too (the "
                    "network between slices)")
  sizes = parse_mesh(mesh_text, config.mesh)
  if not devices:  # The mesh's own product (times the slices); an open (-1) axis gets 1.
    devices = math.prod(s for s in sizes.values() if s > 0) * slices
  dcn_cfg = {k: int(config.mesh.get(k, 1)) for k in sharding.DCN_AXES}
  if slices > 1 and math.prod(dcn_cfg.values()) == 1:
    dcn_cfg["dcn_data"] = -1  # The usual layout: data parallel across slices.
  mesh_cfg = ml_collections.ConfigDict({**sizes, **dcn_cfg})
  mesh_shape = dict(zip(sharding.MESH_AXES, sharding.resolve_mesh_shape(
      mesh_cfg, devices, slices)))
  dcn = {axis.removeprefix("dcn_"): n for axis, n in zip(
      sharding.DCN_AXES, sharding.dcn_shape(mesh_cfg, slices)) if n > 1}
  device_memory = parse_bytes(device_memory_text) if device_memory_text else None
  peak_tflops = parse_peak(peak_text)
  plan = make_plan(config, mesh_shape, device_memory, peak_tflops, mfu, platform, dcn, network)
  suggestion, searched_devices = None, False
  if device_memory:
    kwargs = dict(peak_tflops=peak_tflops, mfu=mfu, max_tensor=max_tensor, platform=platform,
                  network=network)
    suggestion = suggest(config, devices, device_memory, **kwargs)
    if suggestion is None:
      suggestion, searched_devices = fewest_devices(config, devices * 2, device_memory,
                                                    **kwargs), True
  inference = (inference_params(config, mesh_shape, weight_bits, group_size) if weight_bits
               else None)
  if output_format == "json":
    return json.dumps({"plan": plan_to_dict(plan), "suggestion": plan_to_dict(suggestion),
                       "suggestion_needs_more_devices": searched_devices,
                       "inference_params": inference}, indent=2)
  text = format_plan(config, plan, suggestion, mfu, peak_tflops, searched_devices)
  if inference:
    group = f"groups of {group_size}" if group_size else "per channel"
    text += (f"\n\ngeneration/evaluation parameters per device: "
             f"{inference['float_bytes'] / 2**30:.3f} GiB as trained, "
             f"{inference['quantized_bytes'] / 2**30:.3f} GiB as int{weight_bits} ({group}; "
             f"bigmodel.quantize --bits={weight_bits})")
  return text


def _define_flags():
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config = config_flags.DEFINE_config_file(
      "config", None, "Config file and preset, e.g. configs/gpt.py:gpt3_175b.", lock_config=True)
  flags.DEFINE_string("mesh", "", "Mesh sizes, e.g. data=16,fsdp=32,tensor=2 (default: the "
                      "config's mesh).")
  flags.DEFINE_integer("devices", 0, "Devices to plan for (default: the mesh's product).")
  flags.DEFINE_string("device_memory", "", "Memory per device, e.g. 95GB or 80GiB; "
                      "enables the fit check and the suggestion.")
  flags.DEFINE_string("peak_tflops", "", "Peak TFLOP/s per device, or a device name (h100, "
                      "tpu v5p, ...); enables the step time.")
  flags.DEFINE_float("mfu", 0.5, "Model FLOPs utilisation assumed for the step time.")
  flags.DEFINE_integer("max_tensor", 8, "Largest tensor-parallel size the suggestion uses.")
  flags.DEFINE_enum("platform", "gpu", ["cpu", "gpu", "tpu"], "The devices planned for: "
                    "decides what model.attention_impl=auto runs (a fused kernel on gpu/tpu).")
  flags.DEFINE_enum("format", "text", ["text", "json"], "Output format.")
  flags.DEFINE_integer("weight_bits", 0, "8 or 4: also report the parameter bytes per device "
                       "generation/evaluation hold for the model weight-quantized so "
                       "(bigmodel.quantize); 0: no report.")
  flags.DEFINE_integer("group_size", 0, "With --weight_bits: inputs per scale (0 = per "
                       "output channel).")
  flags.DEFINE_integer("slices", 1, "Slices the devices form (multi-slice TPU, or hosts "
                       "joined by the data-centre network); --devices counts all of them.")
  flags.DEFINE_string("ici_bandwidth", "", "Bytes/s per device within a slice (e.g. 400GB; "
                      "NVLink, ICI): prices the step's collectives.")
  flags.DEFINE_string("dcn_bandwidth", "", "Bytes/s per device between slices (e.g. 12.5GB).")
  return config


def main(argv, config_flag=None):
  from bigmodel import cli  # pylint: disable=g-import-not-at-top
  from bigmodel.errors import fail, user_errors_exit  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.require_flags("config")
  f = flags.FLAGS
  with user_errors_exit():
    print(run(config_flag.value, f.mesh, f.devices, f.device_memory, f.peak_tflops, f.mfu,
              f.max_tensor, f.format, f.platform, f.weight_bits, f.group_size, f.slices,
              f.ici_bandwidth, f.dcn_bandwidth))


if __name__ == "__main__":
  # Shapes are traced on the CPU: planning never takes an accelerator.
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_platforms", "cpu")
  _config = _define_flags()
  from bigmodel import cli as _cli  # pylint: disable=g-import-not-at-top
  app.run(lambda argv: main(argv, _config), flags_parser=_cli.parse_flags)
