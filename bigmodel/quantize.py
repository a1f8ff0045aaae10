r"""Weight-only post-training quantization of a run: a workdir that generation and evaluation load.

    python -m bigmodel.quantize --workdir=W --out=Q --bits=8|4 [--group_size=128] [--step=S]

Writes ``Q`` as a bigmodel workdir: ``config.json`` and a parameters-only
checkpoint at the source step whose dense kernels (``bigmodel.models.
quantization.DENSE_LAYERS``) are Qwix quantized arrays, int8 or int4 with
absmax scales per output channel (``--group_size`` 0, the default for 8 bits)
or per group of ``--group_size`` consecutive inputs (4 bits defaults to 128);
embeddings, norms and biases stay as they were. No calibration data is read.
The config records the format (``model.weight_bits``,
``model.weight_group_size``), so ``bigmodel.run.load_run`` rebuilds the
quantized model: ``python -m bigmodel.generate --workdir=Q`` and
``python -m bigmodel.evaluate --workdir=Q`` load it directly and dequantize
inside their jitted steps. The tokenizer comes along: the one W trained
(``tokenizer.model``) or converted (``tokenizer/``) is copied, one elsewhere
is referred to; ``data.data_dir`` points at W's prepared data, so evaluating
Q prepares nothing anew. A LoRA run's adapters are merged first; a QAT run
(``model.quantization``) becomes a plain weight-quantized one (activations
stay float at inference). Training refuses Q (resumed or as ``init_from``).

Bad input is one ``error:`` line (exit 2) before anything is written and,
where possible, before the checkpoint is read: ``--bits`` other than 8 or 4,
a negative ``--group_size`` or one that does not tile every quantized
kernel's input dimension, an existing ``--out``, an already quantized W. The
output is written next to ``Q`` under a temporary name and renamed when
complete.
"""
import os
import shutil
from typing import Any, Optional

from absl import app
from absl import flags
import jax
import ml_collections

from bigmodel import cli
from bigmodel import run as run_lib
from bigmodel.errors import UserError, fail, user_errors_exit

BITS = (8, 4)
DEFAULT_GROUP_SIZE = {8: 0, 4: 128}


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "A training run's directory.")
  flags.DEFINE_string("out", None, "The quantized workdir to write (must not exist).")
  flags.DEFINE_integer("bits", None, "Bits per kernel weight: 8 or 4.")
  flags.DEFINE_integer("group_size", None, "Inputs per scale (0 = one scale per output "
                       "channel); default 0 for 8 bits, 128 for 4.")
  flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")


def check_args(bits: int, group_size: Optional[int]) -> int:
  """The group size to use; UserError for bits or a group size that cannot work."""
  if bits not in BITS:
    raise UserError(f"--bits={bits}: weight-only quantization stores 8 or 4 bits per weight")
  group_size = DEFAULT_GROUP_SIZE[bits] if group_size is None else group_size
  if group_size < 0:
    raise UserError(f"--group_size={group_size} must be >= 0 (0 = per output channel)")
  return group_size


def quantized_config(config: ml_collections.ConfigDict, bits: int,
                     group_size: int) -> ml_collections.ConfigDict:
  """The source run's (LoRA-merged) config describing its weight-quantized model."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.quantization = "none"  # QAT trains; its deployment is this PTQ model.
  config.model.weight_bits, config.model.weight_group_size = bits, group_size
  return config


def _check_source(config: ml_collections.ConfigDict, workdir: str, group_size: int) -> None:
  """UserError for a source that cannot be quantized so (reads no array)."""
  from bigmodel.models import ModelConfig, quantization  # pylint: disable=g-import-not-at-top
  if quantization.weight_quantized(config.model):
    raise UserError(f"{workdir} is already weight-quantized ({quantization.describe(config.model)});"
                    " quantize its float source run instead")
  problem = quantization.group_size_problem(ModelConfig.from_config(config.model), group_size)
  if problem:
    raise UserError(problem)


def _tokenizer(config: ml_collections.ConfigDict, workdir: str, partial: str, out: str) -> None:
  """Copies W's own tokenizer into ``partial`` (the output ``out`` being
  written) and points ``config`` at it there; a tokenizer elsewhere is
  referred to by absolute path. ``data.data_dir``: W's prepared data."""
  source = run_lib.RunDir(workdir)
  if config.data.get("tokenizer"):
    path = os.path.abspath(config.data.tokenizer)
    inside = os.path.commonpath([path, os.path.abspath(workdir)]) == os.path.abspath(workdir)
    if inside and os.path.exists(path):
      relative = os.path.relpath(path, os.path.abspath(workdir))
      target = os.path.join(partial, relative)
      os.makedirs(os.path.dirname(target), exist_ok=True)
      (shutil.copytree if os.path.isdir(path) else shutil.copy2)(path, target)
      path = os.path.join(out, relative)  # Where it is once ``partial`` is renamed.
    config.data.tokenizer = path
  elif os.path.isfile(source.tokenizer_model):
    shutil.copy2(source.tokenizer_model, run_lib.RunDir(partial).tokenizer_model)
  if not config.data.get("data_dir") and os.path.isdir(source.data):
    config.data.data_dir = os.path.abspath(source.data)


def write_workdir(out: str, step: int, config: ml_collections.ConfigDict, params: Any,
                  workdir: str) -> None:
  """Writes ``out`` as a workdir of ``params`` (a parameters-only checkpoint at
  ``step``), ``config`` and ``workdir``'s tokenizer (``_tokenizer``),
  atomically: into a temporary folder next to it, renamed when complete."""
  out = os.path.abspath(out)
  with cli.new_folder(out) as partial:
    _tokenizer(config, workdir, partial, out)
    # Orbax copies arrays to the host to write them: the largest at a time.
    largest = max(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
    ckpt = run_lib.checkpointer(partial, keep=1, async_save=False,
                                save_concurrent_gb=largest / 1e9 * 1.01 + 1e-3)
    try:
      ckpt.save_params(step, params, config)
      ckpt.wait()
    finally:
      ckpt.close()
    run_lib.write_config(config, run_lib.RunDir(partial).config)

def quantize_run(workdir: str, out: str, bits: int, group_size: Optional[int] = None,
                 step: Optional[int] = None) -> tuple[int, dict[str, int]]:
  """Writes ``out``, the weight-quantized copy of checkpoint ``step`` (default:
  the latest) of ``workdir``. Returns (the step, {"float": bytes, "quantized":
  bytes} of the parameters)."""
  from bigmodel import sharding  # pylint: disable=g-import-not-at-top
  from bigmodel.models import build_model, quantization  # pylint: disable=g-import-not-at-top
  group_size = check_args(bits, group_size)
  cli.check_new_folder(out, "--out")  # Orbax retries an uncreatable path for minutes.
  config, step = run_lib.saved_config(workdir, step)  # Reads no array.
  _check_source(config, workdir, group_size)
  run = run_lib.load_run(workdir, step)  # LoRA adapters merged.
  config = quantized_config(run.config, bits, group_size)
  model = build_model(config.model)
  with sharding.activate(run.mesh):
    abstract = quantization.abstract_params(model, config, run.mesh)
    boxed = quantization.abstract_boxed_params(model, config.data.seq_len)
    # Quantized where the float kernels live, straight into the sharded layout.
    params = jax.jit(lambda p: quantization.quantize_params(p, boxed),
                     out_shardings=jax.tree_util.tree_map(lambda x: x.sharding, abstract)
                     )(run.params)
  write_workdir(out, step, config, params, workdir)
  return step, {"float": quantization.param_bytes(run.params),
                "quantized": quantization.param_bytes(params)}


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.require_flags("workdir", "out", "bits")
  f = flags.FLAGS
  with user_errors_exit():
    step, sizes = quantize_run(f.workdir, f.out, f.bits, f.group_size, f.step)
  print(f"wrote {f.out}: step {step} of {f.workdir}, dense kernels as int{f.bits}; parameters "
        f"{sizes['float'] / 2**20:.2f} MiB -> {sizes['quantized'] / 2**20:.2f} MiB")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
