"""Planned vs compiled memory per device of the train step; prints JSON results.

Run as a script in a subprocess so XLA_FLAGS can ask for 8 CPU devices
before JAX starts: ``python tests/plan_vs_compiled.py VARIANT [VARIANT ...]``
where VARIANT is a JSON object of ``{"mesh": [data, fsdp, tensor], [data,
fsdp, context, tensor] or [data, fsdp, expert, context, tensor],
"context_attention": ..., "remat": ..., "grad_accum": ..., "batch_size": ...,
"seq_len": ..., "dtype": ..., "lora": {"rank": ...}, "freeze": ..., "model":
{other model.* options}}`` applied to the GPT ``tiny`` preset, or to
``"config": "FILE:PRESET"`` (e.g. ``llama:llama3_8b``).
The step is compiled exactly as the trainer builds it
(``benchmarks.train_step.compile_step``); nothing runs.
"""
import importlib
import json
import math
import os
import sys

# The suite's flags and 8 devices, before JAX is imported (tests/commands.py).
from commands import simulate_devices  # pylint: disable=wrong-import-position
simulate_devices(8)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

import jax  # pylint: disable=wrong-import-position

from benchmarks.train_step import compile_step, compiled_memory  # pylint: disable=wrong-import-position
from bigmodel import memory, sharding  # pylint: disable=wrong-import-position


def compare(variant: dict) -> dict:
  config_file, _, preset = variant.get("config", "gpt:tiny").partition(":")
  config = importlib.import_module(f"configs.{config_file}").get_config(preset)
  sizes = variant.get("mesh", (1, 1, 1))
  axes = {3: ("data", "fsdp", "tensor"), 4: ("data", "fsdp", "context", "tensor")}.get(
      len(sizes), sharding.MESH_AXES)
  config.mesh.update(dict(zip(axes, sizes)))
  config.model.update(variant.get("model", {}))
  config.model.context_attention = variant.get("context_attention", "ring")
  config.model.remat = variant.get("remat", config.model.remat)
  config.data.seq_len = variant.get("seq_len", config.data.seq_len)
  config.model.dtype = variant.get("dtype", config.model.dtype)
  config.optim.grad_accum = variant.get("grad_accum", 1)
  config.train.batch_size = variant.get("batch_size", config.train.batch_size)
  config.lora.update(variant.get("lora", {}))
  config.optim.freeze = variant.get("freeze", "")
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:math.prod(sizes)])
  with sharding.activate(mesh):
    compiled, _, _ = compile_step(config, mesh)
  compiled_bytes = compiled_memory(compiled)["peak"]
  planned = memory.estimate(config, dict(mesh.shape), platform="cpu")
  return {"compiled": compiled_bytes, "planned": planned.total,
          "error": planned.total / compiled_bytes - 1}


if __name__ == "__main__":
  print(json.dumps([dict(variant=json.loads(v), **compare(json.loads(v))) for v in sys.argv[1:]]))
