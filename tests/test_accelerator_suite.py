"""``benchmarks/accelerator_suite.py`` on CPU: its ``--smoke`` run writes every
section; rows past the budget are skipped, a failure is a row, and the hard
time limit still leaves a valid record."""
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import accelerator_suite  # pylint: disable=wrong-import-position

# Optimisation level 0: the tiny steps compile 2-3x faster on CPU; the record
# must show the flags exactly as they were set.
XLA_FLAGS = "--xla_backend_optimization_level=0"


def _run(out, *args, timeout=300) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS=XLA_FLAGS, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "benchmarks.accelerator_suite", "--smoke",
                         f"--out={out}", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


def _positive(row, *keys):
  for key in keys:
    assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, (key, row)


def test_smoke_run_writes_every_section(tmp_path):
  out = tmp_path / "suite.json"
  result = _run(out)
  assert result.returncode == 0, result.stderr[-3000:]
  record = json.loads(out.read_text())
  assert record["complete"] and record["aborted"] is None
  header = record["header"]
  assert header["xla_flags"] == XLA_FLAGS and header["platform"] == "cpu"
  for key in ("jax", "jaxlib", "device_kind", "git", "peak_source", "matmul_precision"):
    assert header[key], key
  assert header["peak_tflops"] > 0 and header["peak_source"].startswith("measured")
  # A CPU figure names its host: processor and cores, in the record and the printed header.
  assert header["device"].startswith("cpu (") and " cores" in header["device"]
  assert header["device"] in result.stdout and header["device"] in header["peak_source"]
  assert f"XLA_FLAGS={XLA_FLAGS}" in result.stdout
  assert set(record["sections"]) == {"attention", "train", "decode"}

  attention = record["attention"]
  assert {r["impl"] for r in attention} == {"pallas", "cudnn", "xla"}
  assert {r["causal"] for r in attention} == {True, False}
  assert any(r["documents"] > 1 for r in attention)  # A packed case.
  for r in attention:
    if r["impl"] == "cudnn":
      assert r["status"] == "unavailable" and "unavailable on cpu" in r["reason"], r
    else:
      assert r["status"] == "ok", r
      _positive(r, "fwd_tflops", "fwd_bwd_tflops", "fwd_ms", "fwd_bwd_ms")
      assert r["max_error"] < 1e-4, r  # Pallas (interpreted) agrees with the reference.

  train = record["train"]
  assert [r["config"] for r in train] == ["gpt", "bert", "t5"]
  for r in train:
    assert r["status"] == "ok", r
    _positive(r, "tokens_per_s", "tflops_per_device", "mfu", "peak_tflops", "step_ms")
    assert r["peak_source"] == header["peak_source"] and r["batch_size"] >= 1
  assert train[0]["batch_choice"].startswith("--max_tokens cap (planner")  # GPT: the planner.

  decode = record["decode"]
  assert sorted(r["batch"] for r in decode) == [1, 64]
  for r in decode:
    assert r["status"] == "ok", r
    _positive(r, "decode_tok_s", "ttft_ms")


def test_rows_past_the_budget_are_skipped_and_failures_are_rows(tmp_path):
  path = str(tmp_path / "rows.json")
  suite = accelerator_suite.Suite(path, dict(xla_flags=""))
  def measure(case):
    if case["n"] == 1:
      raise ValueError("refused\nsecond line")
    return dict(value=float("nan") if case["n"] == 2 else 1.0)
  cases = [dict(n=n) for n in range(3)]
  accelerator_suite.run_rows(suite, "train", time.monotonic() + 60, 0.0, cases, measure,
                             lambda r: str(r["n"]), lambda r: "ok")
  accelerator_suite.run_rows(suite, "decode", time.monotonic() - 1, 0.0, cases, measure,
                             lambda r: str(r["n"]), lambda r: "ok")
  rows = json.loads(open(path).read())
  assert [r["status"] for r in rows["train"]] == ["ok", "error", "ok"]
  assert rows["train"][1]["reason"] == "ValueError: refused"
  assert rows["train"][2]["value"] is None  # NaN is written as null: standard JSON.
  assert all(r["status"] == "skipped" and "budget spent" in r["reason"] for r in rows["decode"])
  assert not rows["complete"]


def test_the_hard_limit_leaves_a_record_marked_aborted(tmp_path):
  out = tmp_path / "aborted.json"
  result = _run(out, "--hard_limit_s=0", "--sections=decode")
  assert result.returncode == 3, result.stderr[-3000:]
  record = json.loads(out.read_text())
  assert not record["complete"] and "hard_limit_s" in record["aborted"]
  assert record["header"]["xla_flags"] == XLA_FLAGS
