r"""One call on an accelerator: attention kernels, train-step MFU, decode speed.

    python -m benchmarks.accelerator_suite --out=/tmp/accelerator_suite.json
    python -m benchmarks.accelerator_suite --smoke --out=/tmp/accelerator_suite_smoke.json

Tables (docs/performance.md, "Accelerator suite"): ``attention``, Pallas vs
cuDNN vs XLA forward and forward+backward TFLOP/s (``benchmarks/attention.py``)
over head dims, lengths 2k .. 32k, masks and packed rows; ``train``, the
trainer's compiled step (``benchmarks/train_step.py``) in bfloat16 for GPT-2
small and xl, Llama 3.2 1B, BERT base and T5 v1.1 base: tokens/s, TFLOP/s
(``bigmodel.flops``) and MFU against ``flops.peak_tflops_per_device``;
``decode``, tokens/s at batch 1 and 64 (``benchmarks/generate.py``). Rows are
printed as they finish and the JSON record (``--out``; its header has
XLA_FLAGS, versions, device, commit, the peak's source) is rewritten after
each. Sections share ``--budget_s``: a row that would start too late is a
skipped row, and ``--hard_limit_s`` ends the process mid-row (the JSON says
``aborted``). A failure is an error row, never the end of the suite.
``--smoke``: tiny shapes, about a minute on CPU (Pallas interpreted, cuDNN
rows "unavailable").
"""
import datetime
import importlib
import importlib.metadata
import json
import math
import os
import statistics
import sys
import threading
import time
from typing import Any, Callable, Optional

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import attention as attention_bench
from benchmarks import generate as generate_bench
from benchmarks import train_step as train_bench
from bigmodel import flops
from bigmodel import memory
from bigmodel import sharding
from bigmodel.config import validate
from bigmodel.data import train_batch_spec
from bigmodel.errors import fail
from bigmodel.models import ModelConfig, families
from bigmodel.state import create_sharded_state

# Share of --budget_s per section: attention has the most rows (66, each two
# compilations); a train row is one large compilation and a few long steps.
SHARES = {"attention": 0.4, "train": 0.45, "decode": 0.15}
FILL = 0.85  # Fraction of device memory a train step may use.
# bigmodel.memory models decoder-only families only: BERT and T5 take 128 rows,
# 64k tokens (the planner puts GPT-2 small, as wide, at 37 GiB for as many);
# the compiled step's own peak is still checked against FILL.
FIXED_BATCH = {"bert": 128, "t5": 128}


def settings(smoke: bool, platform: str, max_tokens: int = 131072, decode_tokens: int = 128,
             device_memory_gib: float = 0.0) -> dict[str, Any]:
  """What each section runs: the full sweep, or tiny shapes under ``smoke``.

  ``device_memory_gib`` > 0 replaces the device's memory limit (without one
  under ``smoke``: 1 GiB, so that the planner still chooses the batch).
  """
  memory_limit = device_memory_gib * 2**30 or (jax.devices()[0].memory_stats() or {}).get(
      "bytes_limit") or (2**30 if smoke else None)
  if smoke:
    return dict(
        memory_limit=memory_limit, attention_iters=2, train_steps=2, train_warmup=1,
        # Causal, and bidirectional over packed rows (BERT's case): every mask.
        attention_cases=[((1, 128, 2, 64), True, 1), ((1, 128, 2, 64), False, 2)],
        # CPUs emulate bfloat16 matmuls, and compile them slower.
        train_dtype="float32" if platform == "cpu" else "bfloat16",
        train_presets=[("gpt", "tiny"), ("bert", "tiny"), ("t5", "tiny")],
        train_overrides=dict(seq_len=32, target_len=8), max_tokens=128,
        decode_presets=["tiny"], decode_batches=[1, 64], decode_tokens=8, decode_repeats=2,
        min_row_s=dict(attention=0.0, train=0.0, decode=0.0))
  sweep = attention_bench.default_sweep(platform, lengths=(2048, 4096, 8192, 16384, 32768),
                                        tokens=32768)
  return dict(
      memory_limit=memory_limit, attention_iters=10, train_steps=5, train_warmup=1,
      # Packed: causal LM rows of 4 and 8 documents.
      attention_cases=[(shape, causal, 1) for shape, causal in sweep]
      + [((4, 8192, 16, 128), True, 4), ((1, 32768, 16, 128), True, 8)],
      train_dtype="bfloat16", train_overrides={}, max_tokens=max_tokens,
      train_presets=[("gpt", "small"), ("gpt", "xl"), ("llama", "llama3_1b"),
                     ("bert", "base"), ("t5", "base")],
      decode_presets=["small", "xl"], decode_batches=[1, 64], decode_tokens=decode_tokens,
      decode_repeats=3,
      # No row starts with less time left than a typical row of its section.
      min_row_s=dict(attention=3.0, train=30.0, decode=10.0))


class Suite:
  """The record: header, rows by section; the JSON file is rewritten after every row."""

  def __init__(self, path: str, header: dict[str, Any]):
    self.path, self.lock = path, threading.Lock()
    self.record: dict[str, Any] = dict(header=header, sections={}, attention=[], train=[],
                                       decode=[], complete=False, aborted=None)
    self._write()

  def _write(self):
    if os.path.dirname(self.path):
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
    with open(self.path + ".tmp", "w") as f:  # Then renamed: never a half-written file.
      json.dump(self.record, f, indent=1, sort_keys=True, default=str)
    os.replace(self.path + ".tmp", self.path)

  def update(self, section: Optional[str] = None, row: Optional[dict] = None, **fields):
    """Appends ``row`` to ``section`` and/or sets top-level ``fields``; writes."""
    with self.lock:  # The hard-limit timer writes from another thread.
      if row is not None:  # NaN (no reference, no timing) as null: standard JSON.
        self.record[section].append({k: None if isinstance(v, float) and not math.isfinite(v)
                                     else v for k, v in row.items()})
      self.record.update(fields)
      self._write()


def run_rows(suite: Suite, section: str, deadline: float, min_row_s: float, cases: list[dict],
             measure: Callable[[dict], dict], head: Callable[[dict], str],
             body: Callable[[dict], str]):
  """Each case plus ``measure(case)``'s fields is a row of ``section``, printed
  as ``head(row) body(row)`` (or the status and reason). A case with less than
  ``min_row_s`` (or the last row's time) left before ``deadline`` is a skipped
  row; an exception, an error row."""
  needed = min_row_s
  for case in cases:
    start = time.monotonic()
    if deadline - start < needed:
      row = dict(case, status="skipped", reason=f"section budget spent ("
                 f"{max(deadline - start, 0):.0f} s left, a row takes ~{needed:.0f} s)")
    else:
      try:
        row = {**case, "status": "ok", **measure(case)}
      except Exception as e:  # pylint: disable=broad-except  # One row fails, not the suite.
        first = (str(e).strip().splitlines() or [""])[0][:300]
        row = dict(case, status="error", reason=f"{type(e).__name__}: {first}")
      needed = max(min_row_s, time.monotonic() - start)
    row["seconds"] = time.monotonic() - start
    suite.update(section, row)
    tail = body(row) if row["status"] == "ok" else f"{row['status']}: {row.get('reason', '')}"
    print(f"{head(row)} {tail}", flush=True)


def attention_section(suite: Suite, deadline: float, s: dict[str, Any]):
  """Pallas, cuDNN and XLA attention, forward and forward+backward, per case."""
  platform = jax.default_backend()
  dtype = jnp.float32 if platform == "cpu" else jnp.bfloat16
  limit, cache = s["memory_limit"], {}

  def scores_fit(shape, copies):  # ``copies`` [B, N, L, L] float32 arrays at once.
    b, length, n, _ = shape
    return limit is None or copies * 4 * b * n * length * length <= FILL * limit

  def measure(case):
    shape, causal, documents = tuple(case["shape"]), case["causal"], case["documents"]
    if case["impl"] == "cudnn" and platform != "gpu":
      return dict(status="unavailable",
                  reason=f"unavailable on {platform}: cuDNN attention needs an NVIDIA GPU")
    if case["impl"] == "xla" and not scores_fit(shape, 4):
      return dict(status="skipped", reason="XLA's float32 scores, probabilities and their "
                                           "gradients would not fit in device memory")
    if (shape, causal, documents) not in cache:
      cache.clear()  # Frees the last case's arrays first.
      segments = (attention_bench.packed_segment_ids(shape[0], shape[1], documents)
                  if documents > 1 else None)
      cache[(shape, causal, documents)] = (*attention_bench.make_case(
          shape, dtype, causal, segments, reference=scores_fit(shape, 2)), segments)
    inputs, exact, segments = cache[(shape, causal, documents)]
    r = attention_bench.measure(case["impl"], inputs, exact, causal, s["attention_iters"],
                                segments)
    flops_fwd, flops_fwd_bwd = attention_bench.attention_flops(shape, causal)
    return dict(fwd_ms=r["fwd_s"] * 1e3, fwd_tflops=flops_fwd / r["fwd_s"] / 1e12,
                fwd_bwd_ms=r["fwd_bwd_s"] * 1e3, max_error=r["error"],
                fwd_bwd_tflops=flops_fwd_bwd / r["fwd_bwd_s"] / 1e12)

  def head(r):
    return (f"{'x'.join(map(str, r['shape'])):>16} {str(r['causal']):>6} {r['documents']:>4} "
            f"{r['impl']:>7}")

  def body(r):
    error = "n/a" if r["max_error"] is None else f"{r['max_error']:.2e}"
    return (f"{r['fwd_ms']:9.3f} {r['fwd_tflops']:8.2f} {r['fwd_bwd_ms']:9.3f} "
            f"{r['fwd_bwd_tflops']:8.2f} {error:>9}")

  print(f"\n== attention ({jnp.dtype(dtype).name}, medians of {s['attention_iters']}; packed "
        f"rows count whole rows' FLOPs)\n{'BxLxNxH':>16} {'causal':>6} {'docs':>4} {'impl':>7} "
        f"{'fwd ms':>9} {'fwd TF/s':>8} {'f+b ms':>9} {'f+b TF/s':>8} {'max err':>9}", flush=True)
  cases = [dict(shape=list(shape), causal=causal, documents=documents, impl=impl,
                dtype=jnp.dtype(dtype).name)
           for shape, causal, documents in s["attention_cases"]
           for impl in ("pallas", "cudnn", "xla")]
  run_rows(suite, "attention", deadline, s["min_row_s"]["attention"], cases, measure, head,
           body)


def synthetic_batch(spec, batch_size: int, vocab_size: int, seed: int) -> dict[str, np.ndarray]:
  """Random tokens in every token key of ``spec`` (a ``BatchSpec``), one
  document per row, every position weighted: a valid batch of any family."""
  rng, batch = np.random.default_rng(seed), {}
  for key, (row, dtype) in spec.fields.items():
    shape = (batch_size, *row)
    if dtype == np.float32:
      batch[key] = np.ones(shape, np.float32)
    elif key.endswith("segment_ids"):
      batch[key] = np.ones(shape, np.int32)
    elif key.endswith("positions"):
      batch[key] = np.ascontiguousarray(np.broadcast_to(np.arange(row[-1], dtype=np.int32), shape))
    elif key == "type_ids":
      batch[key] = np.zeros(shape, np.int32)
    else:
      batch[key] = rng.integers(3, vocab_size, shape).astype(np.int32)
  return batch


def choose_batch(config, mesh_shape, limit: Optional[float], max_tokens: int) -> tuple[int, str]:
  """(batch size, why): the largest power of two that the planner
  (``memory.estimate``) fits in FILL of ``limit``, at most ``max_tokens`` per
  step; ``FIXED_BATCH`` for families the planner has no model of."""
  row_tokens = config.data.seq_len + (config.data.get("target_len", 0)
                                      if config.model.family == "t5" else 0)
  cap = 2 ** int(math.log2(max(1, max_tokens // row_tokens)))
  family = config.model.family
  if not families.get(family).analytic_memory:
    return min(FIXED_BATCH.get(family, cap), cap), "fixed (no memory model for the family)"
  if limit is None:
    return cap, "--max_tokens cap (device memory unknown)"
  batch = 1
  while batch < cap:
    config.train.batch_size = batch * 2
    if memory.estimate(config, mesh_shape, jax.default_backend()).total > FILL * limit:
      break
    batch *= 2
  why = "planner" if batch < cap else "--max_tokens cap (planner: fits)"
  return batch, f"{why}, {FILL:.0%} of {limit / 2**30:.1f} GiB"


def train_row(config, s: dict[str, Any]) -> dict[str, Any]:
  """Compiles the trainer's step for ``config`` and times it: tokens/s, TFLOP/s, MFU."""
  validate(config)
  mesh, limit = sharding.make_mesh(config.mesh), s["memory_limit"]
  config.train.batch_size, why = choose_batch(config, dict(mesh.shape), limit, s["max_tokens"])
  with sharding.activate(mesh):
    while True:  # The compiled step's own peak has the last word on fitting.
      compiled, pieces, compile_times = train_bench.compile_step(config, mesh)
      peak = train_bench.compiled_memory(compiled).get("peak")
      if limit is None or peak is None or peak <= FILL * limit or config.train.batch_size == 1:
        break
      config.train.batch_size //= 2
      why = f"halved: the compiled step needed {peak / 2**30:.1f} GiB"
    _, model, optimizer, _, _ = pieces
    state, _ = create_sharded_state(config, model, optimizer, mesh)
    spec, batch_size = train_batch_spec(config), config.train.batch_size
    batches = [sharding.global_batch(synthetic_batch(spec, batch_size, config.data.vocab_size,
                                                     seed), mesh) for seed in range(2)]
    state, times, _ = train_bench.time_steps(compiled, state, batches, s["train_steps"],
                                             s["train_warmup"])
  c, shapes = ModelConfig.from_config(config.model), spec.shapes(batch_size)
  step_s = statistics.median(times)
  step_flops = flops.train_flops_per_step(c, shapes) + flops.trainable_flops_correction(
      c, state.params, state.frozen, shapes)
  tflops = step_flops / step_s / jax.device_count() / 1e12
  peak_tflops, source = flops.peak_tflops_per_device(0.0, c.dtype.name)
  tokens = flops.tokens_per_batch(shapes)
  return dict(batch_size=batch_size, batch_choice=why, seq_len=config.data.seq_len,
              tokens_per_step=tokens, params=sum(x.size for x in jax.tree.leaves(state.params)),
              remat=c.remat, attention_impl=c.attention_impl, step_ms=step_s * 1e3,
              step_ms_all=[t * 1e3 for t in times], tokens_per_s=tokens / step_s,
              tflops_per_device=tflops, mfu=tflops / peak_tflops, peak_tflops=peak_tflops,
              peak_source=source, compiled_peak_gib=peak and peak / 2**30, **compile_times)


def train_section(suite: Suite, deadline: float, s: dict[str, Any]):
  """The trainer's step of each of ``s["train_presets"]``."""
  def measure(case):
    config = importlib.import_module(f"configs.{case['config']}").get_config(case["preset"])
    config.model.dtype = s["train_dtype"]
    overrides = s["train_overrides"]
    if "seq_len" in overrides:
      config.data.seq_len = overrides["seq_len"]
      config.model.max_len = max(config.model.max_len, overrides["seq_len"])
    if "target_len" in overrides and config.model.family == "t5":
      config.data.target_len = overrides["target_len"]
    return train_row(config, s)

  def body(r):
    return (f"{r['batch_size']:>5} {r['seq_len']:>6} {r['step_ms']:>9.1f} "
            f"{r['tokens_per_s']:>11,.0f} {r['tflops_per_device']:>8.2f} {r['mfu']:>6.1%}  "
            f"{r['compile_s']:>6.1f}  {r['batch_choice']}")

  print(f"\n== train step ({s['train_dtype']}, median of {s['train_steps']} steps after "
        f"{s['train_warmup']}; MFU against the header's peak)\n{'config':>16} {'batch':>5} "
        f"{'seq':>6} {'step ms':>9} {'tokens/s':>11} {'TF/s':>8} {'MFU':>6}  {'comp s':>6}  "
        f"batch choice", flush=True)
  cases = [dict(config=name, preset=preset, dtype=s["train_dtype"])
           for name, preset in s["train_presets"]]
  run_rows(suite, "train", deadline, s["min_row_s"]["train"], cases, measure,
           lambda r: f"{r['config'] + ':' + r['preset']:>16}", body)


def decode_section(suite: Suite, deadline: float, s: dict[str, Any]):
  """Cached greedy decoding (``benchmarks.generate.bench``) per preset and batch size."""
  def measure(case):
    r = generate_bench.bench(case["preset"], case["batch"], s["decode_tokens"],
                             s["decode_repeats"], baseline=False)
    r = {k: v for k, v in r.items() if k not in case}
    if not (math.isfinite(r["decode_tok_s"]) and r["decode_tok_s"] > 0):
      return dict(r, status="error", reason="decoding time within the noise: raise "
                                            "--decode_tokens")
    return r

  def body(r):
    return f"{r['ttft_ms']:>9.1f} {r['decode_tok_s']:>12,.1f} {r['cached_s']:>9.3f} {r['dtype']}"

  print(f"\n== decode (GPT presets in their configured dtype; {s['decode_tokens']} new tokens "
        f"after a {generate_bench.PROMPT_LEN}-token prompt; medians of {s['decode_repeats']})\n"
        f"{'preset':>8} {'batch':>5} {'TTFT ms':>9} {'decode tok/s':>12} {'run s':>9} dtype",
        flush=True)
  cases = [dict(preset=preset, batch=batch, new_tokens=s["decode_tokens"],
                dtype=generate_bench.gpt_configs.get_config(preset).model.dtype)
           for preset in s["decode_presets"] for batch in s["decode_batches"]]
  run_rows(suite, "decode", deadline, s["min_row_s"]["decode"], cases, measure,
           lambda r: f"{r['preset']:>8} {r['batch']:>5}", body)


SECTIONS = {"attention": attention_section, "train": train_section, "decode": decode_section}


def header(s: dict[str, Any], **run) -> dict[str, Any]:
  """What the numbers depend on: versions, device, XLA flags, commit, the peak's source."""
  device = jax.devices()[0]

  def version(package):
    try:
      return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      return None

  peak, source = flops.peak_tflops_per_device(0.0, s["train_dtype"])
  return dict(time=datetime.datetime.now().isoformat(timespec="seconds"),
              git=train_bench._git_commit(),  # pylint: disable=protected-access
              jax=jax.__version__, jaxlib=version("jaxlib"),
              jax_cuda_plugin=version("jax-cuda12-plugin"), platform=device.platform,
              device_kind=device.device_kind, device=flops.device_description(device),
              devices=jax.device_count(),
              xla_flags=os.environ.get("XLA_FLAGS", ""),
              libtpu_init_args=os.environ.get("LIBTPU_INIT_ARGS", ""),
              # The GPU allocator's share of memory (75% by default) is the limit used.
              allocator_env={k: v for k, v in os.environ.items()
                             if k.startswith("XLA_PYTHON_CLIENT_")},
              matmul_precision=str(jax.config.jax_default_matmul_precision),
              device_memory_gib=s["memory_limit"] and s["memory_limit"] / 2**30,
              peak_tflops=peak, peak_source=source, command=" ".join(sys.argv), **run)


def process_age_s() -> float:
  """Seconds since this process started (imports and device start-up count
  against the time limit); 0 where /proc cannot tell."""
  try:
    with open("/proc/self/stat") as f:
      start_ticks = float(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
      return max(0.0, float(f.read().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK"))
  except (OSError, ValueError, IndexError):
    return 0.0


def _define_flags():
  flags.DEFINE_string("out", "/tmp/accelerator_suite.json", "JSON file, rewritten per row.")
  flags.DEFINE_bool("smoke", False, "Tiny shapes: checks on CPU that every section runs.")
  flags.DEFINE_float("budget_s", 450.0, "Seconds from process start for all sections.")
  flags.DEFINE_float("hard_limit_s", 470.0, "Seconds from process start to exit at, mid-row.")
  flags.DEFINE_list("sections", list(SECTIONS), "Sections to run, in order.")
  flags.DEFINE_integer("max_tokens", 131072, "Train: at most this many tokens per step.")
  flags.DEFINE_float("device_memory_gib", 0.0, "Train batch choice: GiB per device (0: its own).")
  flags.DEFINE_integer("decode_tokens", 128, "Decode: new tokens per run.")


def main(argv):
  f = flags.FLAGS
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if not f.sections or set(f.sections) - set(SECTIONS):
    fail(f"--sections={','.join(f.sections)}: choose from {', '.join(SECTIONS)}")
  start = time.monotonic() - process_age_s()
  s = settings(f.smoke, jax.default_backend(), f.max_tokens, f.decode_tokens,
               f.device_memory_gib)
  suite = Suite(f.out, header(s, smoke=f.smoke, budget_s=f.budget_s))
  h = suite.record["header"]
  print(f"{h['device']} x {h['devices']} ({h['platform']}), jax {h['jax']}, jaxlib "
        f"{h['jaxlib']}, git {h['git']}\nXLA_FLAGS={h['xla_flags'] or '(none)'}\npeak "
        f"{h['peak_tflops']:.4g} TFLOP/s {s['train_dtype']} ({h['peak_source']}); budget "
        f"{f.budget_s:.0f} s; results: {f.out}", flush=True)

  def expire():  # A row overran everything: keep the rows so far and stop.
    suite.update(aborted=f"--hard_limit_s={f.hard_limit_s:g} reached mid-row")
    print(f"\naborted: --hard_limit_s={f.hard_limit_s:g} reached", file=sys.stderr, flush=True)
    os._exit(3)  # pylint: disable=protected-access  # The main thread may be inside XLA.

  timer = threading.Timer(max(0.0, start + f.hard_limit_s - time.monotonic()), expire)
  timer.daemon = True
  timer.start()
  share, shares = 0.0, sum(SHARES[name] for name in f.sections)
  for name in f.sections:
    share += SHARES[name] / shares
    deadline = start + f.budget_s * share  # Its share plus what earlier sections left.
    began = time.monotonic()
    SECTIONS[name](suite, deadline, s)
    suite.update(sections={**suite.record["sections"], name: dict(
        budget_end_s=deadline - start, seconds=time.monotonic() - began)})
  timer.cancel()
  suite.update(complete=True)
  print(f"\ndone in {time.monotonic() - start:.0f} s: {f.out}", flush=True)


if __name__ == "__main__":
  _define_flags()
  from bigmodel import cli  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=cli.parse_flags)
