r"""Exports parameters only, for inference and fine-tuning.

``python -m bigmodel.export --workdir=DIR [--step=S] --out=PATH [--dtype=bfloat16] [--merge_lora]``
writes ``PATH/params`` (an orbax checkpoint of the parameter tree, cast to
``dtype``) and ``PATH/config.json`` (the run's config). A LoRA run's adapters
are exported as they are, or with ``--merge_lora`` folded into their kernels
(the plain model; its config says ``lora.rank`` 0). A pruned run's zeros are
in its parameters already, so they are exported as they are.
``python -m bigmodel.export --workdir=DIR [--step=S] --sparsity_report`` instead
prints each pruned kernel's sparsity (``config.prune.targets``; the layer
stacks' dense kernels for a run that did not prune) and, for an N:M run, the
groups that break the pattern; it writes nothing. ``PATH`` must not exist
and its folder must; both are checked before the checkpoint is read. The export
is written next to ``PATH`` under a temporary name and renamed when complete:
a failed export leaves nothing at ``PATH``.
"""
import os

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from bigmodel import cli
from bigmodel import pruning
from bigmodel import run as run_lib
from bigmodel.errors import fail, user_errors_exit

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
_OUT = flags.DEFINE_string("out", None, "Output directory (must not exist).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.")
_MERGE_LORA = flags.DEFINE_bool("merge_lora", False,
                                "Fold a LoRA run's adapters into their kernels.")
_SPARSITY_REPORT = flags.DEFINE_bool(
    "sparsity_report", False, "Print each pruned kernel's sparsity (and N:M check) instead "
    "of exporting; --out is not needed.")


def export_params(workdir: str, out: str, step: int | None = None,
                  dtype: str = "float32", merge_lora: bool = False) -> int:
  """Writes the parameters of checkpoint ``step`` to ``out``; returns the step."""
  # Before reading the checkpoint: orbax retries an uncreatable path for minutes.
  cli.check_new_folder(out, "--out")
  run = run_lib.load_run(workdir, step, merge_lora=merge_lora)
  run_lib.refuse_quantized(run, "bigmodel.export")
  config, step = run.config, run.step
  params = jax.tree_util.tree_map(lambda x: x.astype(jnp.dtype(dtype)), run.params)
  with cli.new_folder(out) as partial:
    exporter = ocp.StandardCheckpointer()
    exporter.save(os.path.join(partial, "params"), params)
    exporter.wait_until_finished()
    run_lib.write_config(config, os.path.join(partial, "config.json"))
  return step


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if _SPARSITY_REPORT.value:
    cli.require_flags("workdir")
    with user_errors_exit():
      print(pruning.run_report(_WORKDIR.value, _STEP.value))
    return
  cli.require_flags("workdir", "out")
  with user_errors_exit():
    step = export_params(_WORKDIR.value, _OUT.value, _STEP.value, _DTYPE.value,
                         _MERGE_LORA.value)
  print(f"exported the parameters of step {step} as {_DTYPE.value} to {_OUT.value}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
