"""Saves a train state sharded fsdp=8, restores it on 4 and on 1 device; prints JSON.

Run as a script so XLA_FLAGS can ask for 8 CPU devices before JAX starts.
"""
import json
import os
import sys
import tempfile

# The suite's flags and 8 devices, before JAX is imported (tests/commands.py).
from commands import simulate_devices  # pylint: disable=wrong-import-position
simulate_devices(8)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from bigmodel import sharding  # pylint: disable=wrong-import-position
from bigmodel import run as run_lib  # pylint: disable=wrong-import-position
from bigmodel.models import build_model  # pylint: disable=wrong-import-position
from bigmodel.optim import make_optimizer  # pylint: disable=wrong-import-position
from bigmodel.state import abstract_sharded_state, create_sharded_state  # pylint: disable=wrong-import-position
from model_fixtures import tiny_config  # pylint: disable=wrong-import-position


def main():
  config = tiny_config()
  model = build_model(config.model)
  optimizer, _ = make_optimizer(config.optim, 100)
  workdir = tempfile.mkdtemp()
  config.mesh.update(data=1, fsdp=8, tensor=1)
  mesh8 = sharding.make_mesh(config.mesh)
  with sharding.activate(mesh8):
    state, _ = create_sharded_state(config, model, optimizer, mesh8)
  kernel = state.params["blocks"]["mlp"]["wi"]["kernel"]
  saved_shards = len({str(s.index) for s in kernel.addressable_shards})
  checkpointer = run_lib.checkpointer(workdir, keep=2)
  checkpointer.save(1, state, {"position": 0}, config)
  checkpointer.wait()
  expected = [np.asarray(x) for x in jax.tree_util.tree_leaves(state.params)]
  restored_shards, max_diff = {}, 0.0
  for devices, mesh_sizes in ((4, dict(data=2, fsdp=1, tensor=2)),
                              (1, dict(data=1, fsdp=1, tensor=1))):
    config.mesh.update(**mesh_sizes)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:devices])
    with sharding.activate(mesh):
      abstract, _ = abstract_sharded_state(config, model, optimizer, mesh)
      restored, data_state = checkpointer.restore(1, abstract)
    assert data_state == {"position": 0}
    kernel = restored.params["blocks"]["mlp"]["wi"]["kernel"]
    assert kernel.sharding.mesh.devices.size == devices
    restored_shards[str(devices)] = len({str(s.index) for s in kernel.addressable_shards})
    for got, want in zip(jax.tree_util.tree_leaves(restored.params), expected):
      max_diff = max(max_diff, float(np.abs(np.asarray(got) - want).max()))
  checkpointer.close()
  print(json.dumps({"saved_shards": saved_shards, "restored_shards": restored_shards,
                    "max_abs_difference": max_diff}))


if __name__ == "__main__":
  main()
