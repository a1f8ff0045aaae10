"""A run's directory (the workdir) and loading a run back from it.

Everything a run writes lives under its workdir, at the names of
:class:`RunDir`; everything that reads a run (``evaluate``, ``generate``,
``export``, ``convert --to_hf``, ``init_from``, the Python API) goes through
:func:`load_run` or :func:`restore_params`, which rebuild the model from the
checkpoint's own config. ``bigmodel.checkpoint`` is orbax mechanics only.

Layout::

    WORKDIR/config.json            the resolved config of the last run that started
    WORKDIR/metrics.jsonl          one JSON record per logged step
    WORKDIR/tensorboard/           TensorBoard event files
    WORKDIR/train.log              every library's log lines (train.process_N.log on others)
    WORKDIR/run.lock               the live trainer (bigmodel.run_lock)
    WORKDIR/tokenizer.model        a sentencepiece tokenizer trained by the run
    WORKDIR/tokenizer/             a Hugging Face tokenizer kept by ``convert --from_hf``
    WORKDIR/data/                  prepared datasets (data.data_dir = "")
    WORKDIR/checkpoints/STEP/      orbax checkpoints
    WORKDIR/checkpoints_unusable/  corrupt checkpoints set aside, never deleted
    WORKDIR/eval_SPLIT_stepS.json  ``bigmodel.evaluate``'s records
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Optional

import jax
import ml_collections

from bigmodel import sharding
from bigmodel.checkpoint import Checkpointer
from bigmodel.errors import UserError


@dataclasses.dataclass(frozen=True)
class RunDir:
  """The paths of a workdir's contents."""
  path: str

  def _join(self, name: str) -> str:
    return os.path.join(self.path, name)

  @property
  def config(self) -> str:
    return self._join("config.json")

  @property
  def metrics(self) -> str:
    return self._join("metrics.jsonl")

  @property
  def tensorboard(self) -> str:
    return self._join("tensorboard")

  @property
  def lock(self) -> str:
    return self._join("run.lock")

  @property
  def tokenizer_model(self) -> str:
    return self._join("tokenizer.model")

  @property
  def hf_tokenizer(self) -> str:
    return self._join("tokenizer")

  @property
  def data(self) -> str:
    return self._join("data")

  @property
  def checkpoints(self) -> str:
    return os.path.join(os.path.abspath(self.path), "checkpoints")

  @property
  def unusable_checkpoints(self) -> str:
    return self._join("checkpoints_unusable")

  def log(self, process_index: int = 0) -> str:
    return self._join("train.log" if process_index == 0
                      else f"train.process_{process_index}.log")

  def eval_record(self, split: str, step: int) -> str:
    return self._join(f"eval_{split}_step{step}.json")


def write_config(config: ml_collections.ConfigDict, path: str) -> None:
  """Writes a resolved config as JSON, atomically (never a half file)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(config.to_dict(), f, indent=2, sort_keys=True, default=str)
    f.write("\n")
  os.replace(tmp, path)


def checkpointer(workdir: str, **options) -> Checkpointer:
  """The run's :class:`Checkpointer` (``options``: keep, keep_best, async_save, read_only)."""
  run_dir = RunDir(workdir)
  return Checkpointer(run_dir.checkpoints, run_dir.unusable_checkpoints, **options)


@dataclasses.dataclass
class LoadedRun:
  """A run's checkpoint, ready to use.

  Attributes:
    workdir: The run's directory.
    config: The config the checkpoint was saved with.
    step: The checkpoint's step.
    mesh: The mesh ``params`` are sharded over.
    model: The Flax module the config builds.
    params: The parameters, placed on ``mesh``.
    tokenizer: The run's tokenizer; None for synthetic data.
  """
  workdir: str
  config: ml_collections.ConfigDict
  step: int
  mesh: jax.sharding.Mesh
  model: Any
  params: Any
  tokenizer: Any


def _saved_config(ckpt: Checkpointer, step: Optional[int]) -> tuple[ml_collections.ConfigDict, int]:
  steps = ckpt.all_steps()
  if not steps:
    raise UserError(f"no checkpoints in {ckpt.directory}")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise UserError(f"no checkpoint at step {step} in {ckpt.directory}; "
                    f"steps: {', '.join(map(str, steps))}")
  return ml_collections.ConfigDict(ckpt.restore_config(step)), step


def _open(workdir: str) -> Checkpointer:
  if not os.path.isdir(workdir):
    raise UserError(f"workdir {workdir} does not exist")
  if not os.path.isdir(RunDir(workdir).checkpoints):
    raise UserError(f"no checkpoints in {RunDir(workdir).checkpoints}")
  return checkpointer(workdir, keep=1, read_only=True)


def _restore(ckpt: Checkpointer, config: ml_collections.ConfigDict, step: int, mesh,
             merge_lora: bool) -> tuple[Any, ml_collections.ConfigDict]:
  """(parameters, config); with ``merge_lora`` a LoRA run's adapters are folded
  into their kernels and the config says so (``lora.rank`` 0): the plain model."""
  # Imported here: these build models, which the layout does not need.
  from bigmodel.models import build_model, lora  # pylint: disable=g-import-not-at-top
  from bigmodel.optim import make_optimizer  # pylint: disable=g-import-not-at-top
  from bigmodel.state import abstract_sharded_state  # pylint: disable=g-import-not-at-top
  optimizer, _ = make_optimizer(config.optim, config.train.steps)
  with sharding.activate(mesh):
    abstract_state, _ = abstract_sharded_state(config, build_model(config.model, config.lora),
                                               optimizer, mesh)
    params = ckpt.restore_params(step, abstract_state.params)
  if merge_lora and lora.enabled(config.lora):
    kernel_shardings = jax.tree_util.tree_map(lambda x: x.sharding,
                                              lora.without_adapters(params))
    params = jax.jit(lora.merge, out_shardings=kernel_shardings)(params,
                                                                 lora.scale(config.lora))
    config = ml_collections.ConfigDict(config.to_dict())
    config.lora.rank = 0
  return params, config


def restore_params(workdir: str, mesh, step: Optional[int] = None,
                   merge_lora: bool = True) -> tuple[Any, dict, int]:
  """Parameters of a run's checkpoint (default: the latest), sharded over ``mesh``;
  a LoRA run's adapters merged (``merge_lora``).

  Returns (params, the run's config as a dict, step). The run's own config
  rebuilds the abstract state, so this works from any other run.
  """
  ckpt = _open(workdir)
  try:
    config, step = _saved_config(ckpt, step)
    params, config = _restore(ckpt, config, step, mesh, merge_lora)
  finally:
    ckpt.close()
  return params, config.to_dict(), step


def run_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  """The run's own mesh on the devices here; where it does not fit them, the
  same fsdp and tensor sizes with data filling the rest, else data parallelism
  alone (said on stderr)."""
  fallbacks = (dict(mesh_config), dict(mesh_config, data=-1), dict(data=-1, fsdp=1, tensor=1))
  for i, shape in enumerate(fallbacks):
    try:
      mesh = sharding.make_mesh(ml_collections.ConfigDict(shape), devices)
    except UserError:
      continue
    if i:
      print(f"the run's mesh {dict(mesh_config)} does not fit the {mesh.devices.size} "
            f"device(s) here; using {dict(mesh.shape)}", file=sys.stderr, flush=True)
    return mesh
  raise UserError(f"no mesh fits the run's mesh {dict(mesh_config)} on these devices")


def find_tokenizer(config: ml_collections.ConfigDict, workdir: str):
  """``data.tokenizer``, else the one training saved in the workdir; None if neither."""
  from bigmodel.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  if config.data.get("source") == "synthetic":
    return None
  if config.data.get("tokenizer"):
    return Tokenizer.load(config.data.tokenizer)
  path = RunDir(workdir).tokenizer_model
  return Tokenizer.load(path) if os.path.isfile(path) else None


def load_run(workdir: str, step: Optional[int] = None,
             mesh: Optional[jax.sharding.Mesh] = None, merge_lora: bool = True) -> LoadedRun:
  """Checkpoint ``step`` (default: the latest) of the run in ``workdir``.

  The parameters go onto ``mesh``, by default the run's own mesh (see
  :func:`run_mesh`): a model that needed fsdp or tensor parallelism to train
  is evaluated and sampled the same way. A LoRA run's adapters are merged
  into its kernels unless ``merge_lora`` is False.

  Raises:
    UserError: a missing workdir, checkpoint or step.
  """
  from bigmodel.models import build_model  # pylint: disable=g-import-not-at-top
  ckpt = _open(workdir)
  try:
    config, step = _saved_config(ckpt, step)
    mesh = mesh if mesh is not None else run_mesh(config.mesh)
    params, config = _restore(ckpt, config, step, mesh, merge_lora)
  finally:
    ckpt.close()
  return LoadedRun(workdir=workdir, config=config, step=step, mesh=mesh,
                   model=build_model(config.model, config.lora), params=params,
                   tokenizer=find_tokenizer(config, workdir))
