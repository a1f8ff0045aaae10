r"""Times the jitted train step: compile time, step time, throughput, MFU, memory.

    python -m benchmarks.train_step --config=configs/gpt.py:small \
        --config.data.seq_len=512 --config.train.batch_size=8 [--steps=10] [--warmup=2] \
        [--compile_only] [--results=benchmarks/results.jsonl]

In one process, on synthetic tokens: the device's matmul peak in the training
dtype (``flops.measured_matmul_tflops``); lower + compile time of the train
step, the trainer's own (``train_step.jit_train_step`` on the sharded state,
under ``sharding.activate``); the median step time over ``--steps`` steps after
``--warmup``; tokens/s, model TFLOP/s per device (``flops.train_flops_per_step``,
the trainer's ``mfu`` count) and MFU against the measured and the datasheet
peak, and step by step against a matmul timed just before each step (robust
to other processes on a shared machine); peak memory per device from the compiled executable
(``memory_analysis``), the device's allocator (``memory_stats``, where the
platform has one) and the planner (``bigmodel.memory``). Prints a table and
appends one JSON line to ``--results``. ``--compile_only`` lowers on abstract
state (no memory for parameters) and stops after compiling.
"""
import collections
import datetime
import glob
import json
import os
import re
import statistics
import subprocess
import tempfile
import time
from typing import Any, Optional

from absl import app
from absl import flags
import jax
import numpy as np

from bigmodel import flops
from bigmodel import memory
from bigmodel import objectives
from bigmodel import plan
from bigmodel import sharding
from bigmodel.config import validate
from bigmodel.data import train_batch_spec
from bigmodel.data.synthetic import SyntheticIterator
from bigmodel.errors import UserError
from bigmodel.models import ModelConfig, build_model, families
from bigmodel.optim import make_optimizer
from bigmodel.state import abstract_sharded_state, create_sharded_state
from bigmodel.train_step import jit_train_step

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def abstract_batch(config, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The train batch's shapes and placement: the task's BatchSpec (``bigmodel.data``)."""
  return train_batch_spec(config).abstract_batch(config.train.batch_size,
                                                 sharding.batch_sharding(mesh))


def build_train_step(config, mesh):
  """(jitted step, model, optimizer, abstract state, state shardings), as train.py builds them.

  Call under ``sharding.activate(mesh)``.
  """
  model = build_model(config.model, config.lora, training=True)
  optimizer, schedule = make_optimizer(config.optim, config.train.steps)
  abstract_state, state_shardings = abstract_sharded_state(config, model, optimizer, mesh)
  step_fn = jit_train_step(model, optimizer, schedule, config.optim.grad_accum, mesh,
                           state_shardings, objectives.for_config(config))
  return step_fn, model, optimizer, abstract_state, state_shardings


def compiled_memory(compiled) -> dict[str, int]:
  """Bytes per device from XLA's buffer assignment; ``peak`` = live at once, at most.

  Arguments and outputs are both live at the end of the step except where an
  output reuses a donated argument's buffer (``alias``).
  """
  stats = compiled.memory_analysis()
  if stats is None:
    return {}
  out = dict(argument=stats.argument_size_in_bytes, output=stats.output_size_in_bytes,
             alias=stats.alias_size_in_bytes, temp=stats.temp_size_in_bytes)
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def compile_step(config, mesh, compiler_options: Optional[dict[str, Any]] = None
                 ) -> tuple[Any, Any, dict[str, float]]:
  """(compiled step, jitted step pieces, seconds to lower and to compile);
  ``compiler_options``: XLA options for this compile (e.g. a CPU flag to A/B)."""
  pieces = build_train_step(config, mesh)
  step_fn, _, _, abstract_state, _ = pieces
  start = time.perf_counter()
  lowered = step_fn.lower(abstract_state, abstract_batch(config, mesh))
  lowered_at = time.perf_counter()
  compiled = lowered.compile(compiler_options or None)
  done = time.perf_counter()
  return compiled, pieces, {"lower_s": lowered_at - start, "compile_s": done - lowered_at}


def matmul_tflops_now(dtype_name: str) -> float:
  """Median TFLOP/s of a matmul right now (not cached: it tracks contention)."""
  return flops.time_matmul_tflops(dtype_name, repeats=3, reduce=statistics.median)


def time_steps(compiled, state, batches, steps: int, warmup: int,
               peak_dtype: Optional[str] = None) -> tuple[Any, list[float], list[float]]:
  """(state, seconds of each of ``steps`` steps after ``warmup``, matmul TFLOP/s by each).

  Each step is waited for. With ``peak_dtype`` a matmul is timed just before
  every timed step, so that MFU can be taken step by step against the peak of
  that moment: on a shared machine, other processes slow both alike.
  """
  times, peaks = [], []
  for i in range(warmup + steps):
    if peak_dtype and i >= warmup:
      peaks.append(matmul_tflops_now(peak_dtype))
    start = time.perf_counter()
    state, metrics = compiled(state, batches[i % len(batches)])
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      times.append(time.perf_counter() - start)
  if not np.isfinite(float(metrics["loss"])):
    raise RuntimeError(f"non-finite loss {float(metrics['loss'])} in the benchmark")
  return state, times, peaks


def _hlo_ops(hlo_text: str) -> dict[str, tuple[str, bool]]:
  """HLO instruction name -> (its JAX ``op_name``, whether it is or fuses a matmul)."""
  computations_with_dots, current = set(), None
  for line in hlo_text.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) ", line)
    if header and line.rstrip().endswith("{"):
      current = header.group(1)
    elif current and re.search(r" (dot|convolution)\(", line):
      computations_with_dots.add(current)
  ops = {}
  for line in hlo_text.splitlines():
    match = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_name=\"([^\"]*)\"", line)
    if match:
      calls = re.search(r"calls=%?([\w.\-]+)", line)
      is_dot = bool(re.search(r" (dot|convolution)\(", line)) or bool(
          calls and calls.group(1) in computations_with_dots)
      ops[match.group(1)] = (match.group(2), is_dot)
  return ops


# (part of the model, pattern in an op's JAX name), the first match wins.
_COMPONENTS = (
    ("attention projections", r"/attn/(query|key|value|out)/"),
    ("attention core", r"/attn/"),
    ("mlp", r"/mlp/"),
    ("layer norms", r"/ln_"),
    ("logits + loss", r"token_embed\.attend|lm_head|jvp\(\)|take_along_axis|log_softmax"),
    ("embeddings", r"token_embed|position_embed"),
    ("scan buffers", r"jvp\(Gpt\)/broadcast_in_dim|/while/"),
)


def _component(op_name: str) -> str:
  """Which part of the step an op belongs to, from its JAX name."""
  if _phase(op_name) == "update":
    return "optimizer update"
  for component, pattern in _COMPONENTS:
    if re.search(pattern, op_name):
      return component
  return "other"


def _phase(op_name: str) -> str:
  """forward / backward / update (optimizer, gradient norm, loss bookkeeping)."""
  if "transpose(jvp(" in op_name:
    return "backward"
  return "forward" if "jvp(" in op_name else "update"


def profile_steps(compiled, state, batch, steps: int = 2, top: int = 12):
  """Runs ``steps`` steps under ``jax.profiler``; returns (state, breakdown, top ops).

  Each op's time is the wall time of its thunk on the CPU runtime's (or a
  device's) timeline, attributed to forward / backward / update by the op's
  JAX name in the compiled HLO, and to matmul when it is or fuses a dot.
  """
  ops = _hlo_ops(compiled.as_text())
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    for _ in range(steps):
      state, metrics = compiled(state, batch)
      jax.block_until_ready((state, metrics))
    jax.profiler.stop_trace()
    path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
    profile = jax.profiler.ProfileData.from_file(path)
  per_op = collections.Counter()
  for plane in profile.planes:
    for line in plane.lines:
      for event in line.events:
        if event.name in ops:
          per_op[event.name] += event.duration_ns / 1e9 / steps
  breakdown = collections.Counter()
  for name, seconds in per_op.items():
    op_name, is_dot = ops[name]
    breakdown[(_component(op_name), _phase(op_name), "matmul" if is_dot else "other")] += seconds
  total = sum(per_op.values()) or 1.0
  rows = [dict(component=component, phase=phase, kind=kind, seconds=s, share=s / total)
          for (component, phase, kind), s in sorted(breakdown.items())]
  top_ops = [dict(op=name, source=ops[name][0].removeprefix("jit(step)/"), seconds=s,
                  share=s / total) for name, s in per_op.most_common(top)]
  return state, rows, top_ops


def _device_peak_bytes() -> Optional[int]:
  stats = jax.devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")


def _git_commit() -> str:
  try:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_ROOT, capture_output=True,
                         text=True, timeout=10)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_ROOT,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return ""


def benchmark(config, steps: int, warmup: int, compile_only: bool,
              profile: bool = False) -> dict[str, Any]:
  """Runs the measurements; returns the result record."""
  validate(config)
  if not families.get(config.model.family).analytic_memory:
    raise UserError(f"benchmarks.train_step times GPT configs; model.family="
                    f"{config.model.family!r} is not supported yet")
  if steps < 1 or warmup < 0:
    raise UserError(f"--steps={steps} must be positive and --warmup={warmup} not negative")
  mesh = sharding.make_mesh(config.mesh)
  mesh_shape = dict(mesh.shape)
  problems = plan.layout_problems(config, mesh_shape)
  if problems:
    raise UserError("; ".join(problems))
  c = ModelConfig.from_config(config.model)
  device = jax.devices()[0]
  record: dict[str, Any] = dict(
      time=datetime.datetime.now().isoformat(timespec="seconds"), git=_git_commit(),
      jax=jax.__version__, preset=config.get("preset", ""), platform=device.platform,
      device_kind=device.device_kind, device=flops.device_description(device),
      devices=jax.device_count(), mesh=mesh_shape,
      dtype=c.dtype.name, param_dtype=c.param_dtype.name, remat=c.remat, scan=c.scan,
      attention_impl=c.attention_impl, num_layers=c.num_layers, embed_dim=c.embed_dim,
      batch_size=config.train.batch_size, seq_len=config.data.seq_len,
      grad_accum=config.optim.grad_accum, optimizer=config.optim.name)
  # The peak first, while nothing else of ours occupies the device.
  if not compile_only:
    record["measured_peak_tflops"] = flops.measured_matmul_tflops(c.dtype.name)
  record["datasheet_peak_tflops"] = flops.datasheet_peak_tflops(device.device_kind)
  try:
    planned = memory.estimate(config, mesh_shape, jax.default_backend()).total
  except ValueError:  # Layers the memory model lacks (experts): no planned figure.
    planned = None
  record["num_params"] = memory.state_bytes(config, mesh_shape)[0]
  with sharding.activate(mesh):
    compiled, pieces, compile_times = compile_step(config, mesh)
    record.update(compile_times)
    record["memory"] = compiled_memory(compiled)
    record["memory"]["planned"] = planned
    if compile_only:
      return record
    _, model, optimizer, _, _ = pieces
    state, _ = create_sharded_state(config, model, optimizer, mesh)
    data = SyntheticIterator(vocab_size=config.model.vocab_size,
                             seq_len=config.data.seq_len, batch_size=config.train.batch_size,
                             seed=config.train.seed)
    # Batches are placed once: the step, not the host's data pipeline, is timed.
    batches = [sharding.global_batch(next(data), mesh) for _ in range(2)]
    state, times, peaks = time_steps(compiled, state, batches, steps, warmup, c.dtype.name)
    if profile:
      _, record["profile"], record["profile_top_ops"] = profile_steps(compiled, state, batches[0])
  record["memory"]["device_peak"] = _device_peak_bytes()
  step_s = statistics.median(times)
  tokens_per_s = config.train.batch_size * config.data.seq_len / step_s
  batch_shapes = {k: v.shape for k, v in batches[0].items()}
  step_flops = flops.train_flops_per_step(c, batch_shapes) + flops.trainable_flops_correction(
      c, state.params, state.frozen, batch_shapes)
  tflops = step_flops / step_s / jax.device_count() / 1e12
  step_tflops = tflops * step_s / np.array(times)
  # The best probe of the run (the start's or one before a step): a probe
  # taken while the machine is loaded comes out low (flops.DevicePeak).
  record["measured_peak_tflops"] = max(record["measured_peak_tflops"], *peaks)
  record.update(steps=len(times), step_s=step_s, step_s_min=min(times), step_s_max=max(times),
                tokens_per_s=tokens_per_s, tflops_per_device=tflops,
                mfu_measured=tflops / record["measured_peak_tflops"],
                mfu_interleaved=float(np.median(step_tflops / np.array(peaks))),
                peak_tflops_interleaved=float(np.median(peaks)))
  if record["datasheet_peak_tflops"]:
    record["mfu_datasheet"] = tflops / record["datasheet_peak_tflops"]
  return record


def format_table(record: dict[str, Any]) -> str:
  """Two columns: what, value."""
  def mib(key):
    value = record["memory"].get(key)
    return "n/a" if value is None else f"{value / 2**20:,.1f} MiB"

  rows = [
      ("config", f"{record['preset']} ({record['num_params'] / 1e6:,.1f}M parameters, "
                 f"{record['num_layers']} layers, {record['dtype']}, remat={record['remat']}, "
                 f"scan={record['scan']})"),
      ("devices", f"{record['devices']} x {record['device']}, mesh "
                  + ", ".join(f"{k}={v}" for k, v in record["mesh"].items())),
      ("batch", f"{record['batch_size']} x {record['seq_len']} tokens, "
                f"grad_accum={record['grad_accum']}"),
      ("lower + compile", f"{record['lower_s']:.2f} s + {record['compile_s']:.2f} s"),
  ]
  if "step_s" in record:
    datasheet = record.get("mfu_datasheet")
    rows += [
        ("step time (median)", f"{record['step_s'] * 1e3:,.1f} ms over {record['steps']} steps "
                               f"(min {record['step_s_min'] * 1e3:,.1f}, "
                               f"max {record['step_s_max'] * 1e3:,.1f})"),
        ("tokens/s", f"{record['tokens_per_s']:,.0f}"),
        ("TFLOP/s per device", f"{record['tflops_per_device']:.4g} (model FLOPs)"),
        ("matmul peak (measured)", f"{record['measured_peak_tflops']:.4g} TFLOP/s {record['dtype']}"),
        ("MFU vs measured peak", f"{record['mfu_measured']:.1%}"),
        ("MFU, step by step", f"{record['mfu_interleaved']:.1%} (median; each step against a "
                              f"matmul timed just before it: median "
                              f"{record['peak_tflops_interleaved']:.4g} TFLOP/s)"),
        ("MFU vs datasheet", "n/a (unknown device)" if datasheet is None
         else f"{datasheet:.1%} of {record['datasheet_peak_tflops']:g} TFLOP/s"),
    ]
  rows += [
      ("memory: compiled peak", f"{mib('peak')} (arguments {mib('argument')}, "
                                f"temporaries {mib('temp')})"),
      ("memory: planned", mib("planned")),
      ("memory: device peak", mib("device_peak")),
  ]
  width = max(len(name) for name, _ in rows)
  lines = [f"{name.ljust(width)}  {value}" for name, value in rows]
  if "profile" in record:
    lines += ["", f"{'profile (per step)':50s} seconds   share"]
    for key in ("phase", "kind", "component"):
      totals = collections.Counter()
      for r in record["profile"]:
        totals[r[key]] += r["seconds"]
      whole = sum(totals.values()) or 1.0
      lines += [f"  {key + ': ' + name:48s} {s:7.3f} {s / whole:7.1%}"
                for name, s in sorted(totals.items(), key=lambda kv: -kv[1])]
    lines.append(f"  {'matmul share by component':48s}")
    matmul = collections.Counter()
    for r in record["profile"]:
      matmul[(r["component"], r["kind"])] += r["seconds"]
    for component in sorted({r["component"] for r in record["profile"]}):
      whole = matmul[(component, "matmul")] + matmul[(component, "other")]
      lines.append(f"    {component:46s} {whole:7.3f}  matmul {matmul[(component, 'matmul')] / whole:4.0%}")
    lines += ["", "top ops                  seconds   share  source"]
    lines += [f"  {r['op'][:22]:22s} {r['seconds']:8.3f} {r['share']:7.1%}  {r['source'][:90]}"
              for r in record["profile_top_ops"]]
  return "\n".join(lines)


def append_result(path: str, record: dict[str, Any]) -> None:
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a") as f:
    f.write(json.dumps(record, sort_keys=True, default=str) + "\n")


def _define_flags():
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config = config_flags.DEFINE_config_file(
      "config", None, "Config file and preset, e.g. configs/gpt.py:small.", lock_config=True)
  flags.DEFINE_integer("steps", 10, "Timed steps (the median is reported).")
  flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
  flags.DEFINE_bool("compile_only", False, "Lower and compile only (abstract state).")
  flags.DEFINE_bool("profile", False, "Also profile two steps: time by forward / backward / "
                    "update and matmul / other, and the slowest ops.")
  flags.DEFINE_string("results", os.path.join("benchmarks", "results.jsonl"),
                      "JSON lines file the result is appended to ('' = none).")
  return config


def main(argv, config_flag):
  from bigmodel import cli  # pylint: disable=g-import-not-at-top
  from bigmodel.errors import fail, user_errors_exit  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.require_flags("config")
  f = flags.FLAGS
  with user_errors_exit():
    record = benchmark(config_flag.value, f.steps, f.warmup, f.compile_only, f.profile)
  print(format_table(record), flush=True)
  if f.results:
    append_result(f.results, record)


if __name__ == "__main__":
  _config = _define_flags()
  from bigmodel import cli as _cli  # pylint: disable=g-import-not-at-top
  app.run(lambda argv: main(argv, _config), flags_parser=_cli.parse_flags)
