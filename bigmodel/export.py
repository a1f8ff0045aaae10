r"""Exports parameters only, for inference and fine-tuning.

``python -m bigmodel.export --workdir=DIR [--step=S] --out=PATH [--dtype=bfloat16]``
writes ``PATH/params`` (an orbax checkpoint of the parameter tree, cast to
``dtype``) and ``PATH/config.json`` (the run's config). ``PATH`` must not exist.
"""
import os

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from bigmodel import cli
from bigmodel import sharding
from bigmodel.checkpoint import restore_params
from bigmodel.errors import UserError, fail, user_errors_exit

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
_OUT = flags.DEFINE_string("out", None, "Output directory (must not exist).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.")


def export_params(workdir: str, out: str, step: int | None = None,
                  dtype: str = "float32") -> int:
  """Writes the parameters of checkpoint ``step`` to ``out``; returns the step."""
  if os.path.exists(out):
    raise UserError(f"--out={out} already exists; choose a new path")
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
  with sharding.activate(mesh):
    params, config, step = restore_params(workdir, mesh, step)
  params = jax.tree_util.tree_map(lambda x: x.astype(jnp.dtype(dtype)), params)
  exporter = ocp.StandardCheckpointer()
  exporter.save(os.path.join(os.path.abspath(out), "params"), params)
  exporter.wait_until_finished()
  cli.write_config(ml_collections.ConfigDict(config), os.path.join(out, "config.json"))
  return step


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.require_flags("workdir", "out")
  with user_errors_exit():
    step = export_params(_WORKDIR.value, _OUT.value, _STEP.value, _DTYPE.value)
  print(f"exported the parameters of step {step} as {_DTYPE.value} to {_OUT.value}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
