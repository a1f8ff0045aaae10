"""Runs int8 quantized-training (QAT) steps of tiny models on 1 and 8 devices; prints JSON.

Run in a subprocess so XLA_FLAGS can ask for 8 CPU devices before JAX
starts: ``python tests/quantized_steps.py FAMILY[@MESH] ...`` where MESH is
``single`` (one device, the default) or ``data,fsdp,tensor`` (e.g. ``2,2,2``).
Each run reports its losses and whether the step's program holds int8
matmuls (Qwix's quantized dot_general), so a passing comparison cannot come
from two unquantized runs.
"""
import json
import os
import sys

# The suite's flags and 8 devices, before JAX is imported (tests/commands.py).
from commands import simulate_devices  # pylint: disable=wrong-import-position
simulate_devices(8)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=wrong-import-position

from bigmodel import sharding  # pylint: disable=wrong-import-position
from bigmodel.models import build_model  # pylint: disable=wrong-import-position
from bigmodel.optim import make_optimizer  # pylint: disable=wrong-import-position
from bigmodel.state import create_sharded_state  # pylint: disable=wrong-import-position
from bigmodel.train_step import jit_train_step  # pylint: disable=wrong-import-position
from model_fixtures import random_family_batch, tiny_config  # pylint: disable=wrong-import-position


def run(name: str, steps: int = 2) -> dict:
  family, _, mesh_name = name.partition("@")
  # Scanned, rematerialised layers: the stack QAT must work through.
  config = tiny_config(family, quantization="int8", remat="full", scan=True)
  if mesh_name in ("", "single"):
    devices, config.mesh = jax.devices()[:1], dict(data=1, fsdp=1, tensor=1)
  else:
    data, fsdp, tensor = (int(x) for x in mesh_name.split(","))
    devices, config.mesh = None, dict(data=data, fsdp=fsdp, tensor=tensor)
  mesh = sharding.make_mesh(config.mesh, devices)
  model = build_model(config.model, training=True)
  optimizer, schedule = make_optimizer(config.optim, 100)
  losses = []
  with sharding.activate(mesh):
    state, shardings = create_sharded_state(config, model, optimizer, mesh)
    step_fn = jit_train_step(model, optimizer, schedule, 1, mesh, shardings)
    for i in range(steps):
      batch = sharding.global_batch(random_family_batch(
          family, 8, config.data.seq_len, config.model.vocab_size, seed=i), mesh)
      if i == 0:
        int8_matmuls = "xi8>" in step_fn.lower(state, batch).as_text()
      state, metrics = step_fn(state, batch)
      losses.append(float(metrics["loss"]))
  return {"losses": losses, "int8_matmuls": int8_matmuls}


if __name__ == "__main__":
  print(json.dumps({name: run(name) for name in sys.argv[1:]}))
