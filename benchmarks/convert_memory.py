r"""Peak host memory of a Hugging Face import: streaming, not two copies of the model.

    python -m benchmarks.convert_memory [--preset=llama3_1b] [--dtype=float16] [--keep=DIR]

Writes a random ``LlamaForCausalLM`` of ``configs/llama.py:PRESET``'s shape
(safetensors shards of at most 2 GB in ``--dtype``; numpy only, nothing
downloaded), then runs ``python -m bigmodel.convert --from_hf`` on it in a
child process and prints a table: the converted parameters' bytes in the
target dtype (``model.param_dtype``, float32), the child's peak resident
memory (``ru_maxrss``, median of ``--runs``), their ratio (the goal: at most
1.3) and the wall time.
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
from safetensors.numpy import save_file

from bigmodel.hf import exporter
from bigmodel.models import ModelConfig
from configs import llama as llama_presets

_PRESET = flags.DEFINE_string("preset", "llama3_1b", "A configs/llama.py preset.")
_DTYPE = flags.DEFINE_enum("dtype", "float16", ["float16", "float32"],
                           "Stored dtype of the random checkpoint.")
_RUNS = flags.DEFINE_integer("runs", 3, "Conversions measured (the median is reported).")
_KEEP = flags.DEFINE_string("keep", None, "Write the model and workdir here and keep them.")
_SHARD_BYTES = 2 << 30


def write_random_llama(out: str, preset: str, dtype: str) -> int:
  """A random HF Llama directory of ``preset``'s shape; returns its parameter count."""
  m = ModelConfig.from_config(llama_presets.get_config(preset).model)
  _, name_map = exporter(m)
  config = dict(name_map.hf_config(m), torch_dtype=dtype)
  rng = np.random.default_rng(0)
  shards, current, size, written = [], {}, 0, set()
  for rule in name_map.rules(m):
    for layer in range(max(rule.layers, 1)):
      name = rule.hf_names(layer)[0]
      if name in written:
        continue  # A fused tensor (several rules) is written once.
      written.add(name)
      tensor = (rng.standard_normal(rule.hf_shape, dtype=np.float32) * 0.02).astype(dtype)
      if size + tensor.nbytes > _SHARD_BYTES and current:
        shards.append(current)
        current, size = {}, 0
      current[name], size = tensor, size + tensor.nbytes
  shards.append(current)
  os.makedirs(out, exist_ok=True)
  weight_map = {}
  for i, shard in enumerate(shards):
    file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(out, file_name), metadata={"format": "pt"})
    weight_map.update({name: file_name for name in shard})
  with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(config, f)
  return sum(t.size for shard in shards for t in shard.values())


def main(argv):
  del argv
  root = _KEEP.value or tempfile.mkdtemp(prefix="convert_memory_")
  hf_dir, workdir = os.path.join(root, "hf"), os.path.join(root, "workdir")
  try:
    start = time.perf_counter()
    num_params = write_random_llama(hf_dir, _PRESET.value, _DTYPE.value)
    made = time.perf_counter() - start
    peaks, seconds = [], []
    for run in range(_RUNS.value):
      start = time.perf_counter()
      child = subprocess.Popen(  # pylint: disable=consider-using-with
          [sys.executable, "-m", "bigmodel.convert", f"--from_hf={hf_dir}",
           f"--workdir={workdir}{run}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
      _, status, usage = os.wait4(child.pid, 0)  # This child's own peak, not all children's.
      seconds.append(time.perf_counter() - start)
      if status:
        sys.exit(f"conversion failed:\n{child.stderr.read().decode()[-3000:]}")
      peaks.append(usage.ru_maxrss * 1024)  # KiB on Linux.
      shutil.rmtree(f"{workdir}{run}")
    peak, seconds = statistics.median(peaks), statistics.median(seconds)
    target = num_params * 4  # model.param_dtype float32.
    rows = [("preset", _PRESET.value), ("parameters", f"{num_params / 1e9:.3f} B"),
            ("stored as", f"{_DTYPE.value} safetensors (written in {made:.0f} s)"),
            ("converted (float32)", f"{target / 2**30:.2f} GiB"),
            ("peak RSS of the conversion", f"{peak / 2**30:.2f} GiB (median of {len(peaks)}; "
                                           f"{min(peaks) / 2**30:.2f}-{max(peaks) / 2**30:.2f})"),
            ("peak RSS / converted bytes", f"{peak / target:.2f} (goal <= 1.3)"),
            ("conversion wall time", f"{seconds:.0f} s")]
    for name, value in rows:
      print(f"{name:<28}{value}")
  finally:
    if not _KEEP.value:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
