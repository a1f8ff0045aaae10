"""Runs a few train steps of a tiny GPT on several meshes; prints JSON results.

Run as a script in a subprocess so XLA_FLAGS can ask for 8 CPU devices
before JAX starts: ``python tests/sharded_steps.py MESH [MESH ...]`` where
MESH is ``data,fsdp,tensor`` (e.g. ``8,1,1``), ``data,fsdp,context,tensor``
(``1,1,4,2``: the sequence split in 4), ``data,fsdp,expert,context,tensor``
(``2,1,4,1,1``: experts split in 4) or ``single`` (one device),
optionally followed by ``@IMPL`` for the attention implementation (``2,2,2@pallas``)
or the context-parallel attention (``1,1,4,2@all_gather``; default ring),
``~N`` for the chunked loss in chunks of N positions (``2,2,2~8``; default full
logits) and ``#FAMILY`` for the model family (``2,2,2#t5``; default gpt;
``#moe``: a Llama-shaped decoder with 4 experts, top 2, capacity dispatch
with room for every token, or with ``@dropless`` dropless dispatch). A
causal decoder whose sequences split over a context axis gets its rows in
the causal-balanced order, as the trainer gives them; ``%`` after the
mesh (``single%``, ``1,1,4,2%``) turns dropout off, whose masks follow the
rows' order.
"""
import json
import os
import sys

# The suite's flags and 8 devices, before JAX is imported (tests/commands.py).
from commands import simulate_devices  # pylint: disable=wrong-import-position
simulate_devices(8)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from bigmodel import objectives, sharding  # pylint: disable=wrong-import-position
from bigmodel.models import build_model, context_parallel, families  # pylint: disable=wrong-import-position
from bigmodel.optim import make_optimizer  # pylint: disable=wrong-import-position
from bigmodel.state import create_sharded_state  # pylint: disable=wrong-import-position
from bigmodel.train_step import jit_train_step  # pylint: disable=wrong-import-position
from model_fixtures import random_family_batch, tiny_config  # pylint: disable=wrong-import-position


def run(mesh_name: str, steps: int = 3) -> dict:
  """Losses and (a sample of) final parameters of ``steps`` train steps."""
  mesh_name, _, family = mesh_name.partition("#")
  mesh_name, _, chunk_len = mesh_name.partition("~")
  mesh_name, _, impl = mesh_name.partition("@")
  mesh_name, no_dropout, _ = mesh_name.partition("%")
  family = family or "gpt"
  moe = {}
  if family == "moe":
    family, moe = "llama", dict(num_experts=4, experts_per_token=2, moe_capacity_factor=4.0,
                                moe_dispatch="dropless" if impl == "dropless" else "capacity")
    impl = "" if impl == "dropless" else impl
  context_attention = impl if impl in ("ring", "all_gather") else "ring"
  config = tiny_config(family, num_heads=4, num_kv_heads=2, **moe,
                       attention_impl="xla" if impl in ("", context_attention) else impl,
                       context_attention=context_attention, loss_chunk_len=int(chunk_len or 0))
  config.optim.name = "adamw"
  # Dropout masks must not depend on the mesh either; but a row in the
  # causal-balanced order drops other tokens than in its own order (``%``:
  # no dropout, for those runs and their reference).
  config.model.dropout_rate = 0.0 if no_dropout else 0.1
  config.optim.grad_accum = 2
  if mesh_name == "single":
    devices = jax.devices()[:1]
    config.mesh.update(data=1, fsdp=1, context=1, tensor=1)
  else:
    devices = None
    sizes = [int(x) for x in mesh_name.split(",")]
    axes = {3: ("data", "fsdp", "tensor"), 4: ("data", "fsdp", "context", "tensor")}.get(
        len(sizes), sharding.MESH_AXES)
    config.mesh.update(dict(zip(axes, sizes)))
  mesh = sharding.make_mesh(config.mesh, devices)
  balanced = mesh.shape["context"] > 1 and families.get(config.model.family).is_causal_lm
  model = build_model(config.model)
  optimizer, schedule = make_optimizer(config.optim, 100)
  losses = []
  with sharding.activate(mesh):
    state, shardings = create_sharded_state(config, model, optimizer, mesh)
    step_fn = jit_train_step(model, optimizer, schedule, config.optim.grad_accum, mesh,
                             shardings, objectives.for_config(config))
    for i in range(steps):
      rows = random_family_batch(family, 16, config.data.seq_len, config.model.vocab_size,
                                 seed=i, num_segments=2)
      if balanced:  # As the trainer feeds a context-parallel causal decoder.
        rows = context_parallel.balance_rows(rows, mesh.shape["context"], config.data.seq_len)
      batch = sharding.global_batch(rows, mesh)
      if i == 0:
        jaxpr = str(jax.make_jaxpr(step_fn)(state, batch))
        uses_shard_map = "shard_map" in jaxpr
        all_to_all = moe and "all-to-all" in step_fn.lower(state, batch).compile().as_text()
      state, metrics = step_fn(state, batch)
      losses.append(float(metrics["loss"]))
  blocks = state.params["encoder"]["blocks"] if family == "t5" else state.params["blocks"]
  kernel = blocks["attn"]["query"]["kernel"]
  return {
      "losses": losses,
      "params": [np.asarray(x).ravel()[:64].tolist() for x in jax.tree_util.tree_leaves(state.params)],
      "query_kernel_spec": str(kernel.sharding.spec),
      "num_shards": len({str(s.index) for s in kernel.addressable_shards}),
      "uses_shard_map": uses_shard_map,
      "context": mesh.shape["context"],
      "context_ring": "ppermute" in jaxpr,
      "balanced": balanced,
      "expert": mesh.shape["expert"],
      "expert_kernel_spec": str(blocks["moe"]["wi"].sharding.spec) if moe else "",
      "all_to_all": bool(all_to_all),
  }


if __name__ == "__main__":
  print(json.dumps({name: run(name) for name in sys.argv[1:]}))
