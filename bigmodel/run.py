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
import hashlib
import json
import os
import sys
from typing import Any, Optional

from etils import epath
import jax
import ml_collections

from bigmodel import remote_workdir
from bigmodel import sharding
from bigmodel import storage
from bigmodel.checkpoint import Checkpointer
from bigmodel.config import config_from_dict
from bigmodel.errors import UserError


@dataclasses.dataclass(frozen=True)
class RunDir:
  """The paths of a workdir's contents (a folder, or a URL's objects)."""
  path: str

  def _join(self, name: str) -> str:
    if storage.is_url(self.path):
      return f"{self.path.rstrip('/')}/{name}"
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
    if storage.is_url(self.path):
      return self._join("checkpoints")
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
    bases: The checkpoint's base sources (see :func:`base_source`): [] if it
      holds every array itself.
    local_dir: The run's files on this machine: ``workdir``, or a URL's local
      mirror (``bigmodel.remote_workdir``).
  """
  workdir: str
  config: ml_collections.ConfigDict
  step: int
  mesh: jax.sharding.Mesh
  model: Any
  params: Any
  tokenizer: Any
  bases: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  local_dir: str = ""


def _saved_config(ckpt: Checkpointer, step: Optional[int]) -> tuple[ml_collections.ConfigDict, int]:
  steps = ckpt.all_steps()
  if not steps:
    raise UserError(f"no checkpoints in {ckpt.directory}")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise UserError(f"no checkpoint at step {step} in {ckpt.directory}; "
                    f"steps: {', '.join(map(str, steps))}")
  # Keys added since the checkpoint was written take their defaults.
  return config_from_dict(ckpt.restore_config(step)), step


def saved_config(workdir: str, step: Optional[int] = None) -> tuple[ml_collections.ConfigDict,
                                                                      int]:
  """(the config saved with checkpoint ``step`` of the run in ``workdir``
  (default: the latest), that step); reads no array."""
  ckpt = _open(workdir, step)
  try:
    return _saved_config(ckpt, step)
  finally:
    ckpt.close()


def _open_with_files(workdir: str, step: Optional[int] = None) -> tuple[Checkpointer, str]:
  """(a read-only Checkpointer of the run ``workdir``, the folder of its other
  files). A URL's files are read from a local mirror (``bigmodel.remote_workdir``)
  and so are its checkpoints (``step`` copied down), except a ``gs://`` run's,
  which orbax reads from the bucket."""
  local, checkpoint_root = remote_workdir.readable(workdir, step)
  if not os.path.isdir(local):
    raise UserError(f"workdir {local} does not exist")
  checkpoints = RunDir(checkpoint_root).checkpoints
  if not storage.request(checkpoints, epath.Path(checkpoints).exists):
    raise UserError(f"no checkpoints in {checkpoints}")
  return checkpointer(checkpoint_root, keep=1, read_only=True), local


def _open(workdir: str, step: Optional[int] = None) -> Checkpointer:
  """A read-only Checkpointer of the run ``workdir`` (see :func:`_open_with_files`)."""
  return _open_with_files(workdir, step)[0]


def _fingerprint(digests: Optional[dict[str, list[int]]]) -> Optional[str]:
  if digests is None:  # Checkpoints written before digests existed.
    return None
  return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


def base_source(workdir: str, step: int, role: str, params_paths: list[str],
                reference_paths: list[str]) -> dict[str, Any]:
  """What a checkpoint saves instead of frozen arrays it takes unchanged from
  another run's checkpoint (a *base*).

  Args:
    workdir: The base run.
    step: The base checkpoint's step.
    role: What the base is to the run, for messages ("init_from", "teacher").
    params_paths: The parameters (``a/b/kernel``) taken from it unchanged.
    reference_paths: The parameters of the train state's ``reference`` (DPO's
      frozen copy, a distillation teacher) taken from it.

  Returns:
    ``{workdir (absolute), step, role, fingerprint, params, reference}``; the
    fingerprint (a hash of the base checkpoint's array digests) lets a later
    load check that the base is still the same checkpoint.
  """
  ckpt = _open(workdir, step)
  try:
    fingerprint = _fingerprint(ckpt.saved_digests(step))
  finally:
    ckpt.close()
  where = workdir if storage.is_url(workdir) else os.path.abspath(workdir)
  return dict(workdir=where, step=step, role=role, fingerprint=fingerprint,
              params=sorted(params_paths), reference=sorted(reference_paths))


def _source_params(source: dict[str, Any], mesh, where: str) -> dict[str, Any]:
  """``{path: array}`` of a base source's checkpoint, checked to be the one it
  was (same fingerprint); ``where`` names the checkpoint that points to it."""
  what = (f"{where} holds only the arrays its run changed; the others are in checkpoint "
          f"{source['step']} of {source['workdir']} (its {source['role']}), which")
  try:
    ckpt = _open(source["workdir"], source["step"])
  except UserError:
    ckpt = None
  if ckpt is None or source["step"] not in ckpt.all_steps():
    if ckpt is not None:
      ckpt.close()
    raise UserError(f"{what} is gone: restore it there, or load an export of this run "
                    "(bigmodel.export) made while it existed")
  try:
    fingerprint = _fingerprint(ckpt.saved_digests(source["step"]))
  finally:
    ckpt.close()
  if fingerprint != source["fingerprint"]:
    raise UserError(f"{what} has changed since (its array digests differ): these arrays "
                    "belong with another base")
  params, _, _ = restore_params(source["workdir"], mesh, source["step"])
  return {sharding.path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def _provided(bases: list[dict[str, Any]], mesh, where: str) -> dict[str, dict[str, Any]]:
  """``{"params": {path: array}, "reference": {path: array}}``: what the base
  sources provide, each source's checkpoint read once."""
  provided = {"params": {}, "reference": {}}
  for source in bases:
    if source["params"] or source["reference"]:
      flat = _source_params(source, mesh, where)
      for part in provided:
        provided[part].update({path: flat[path] for path in source[part]})
  return provided


def _fill(tree: Any, abstract: Any, provided: dict[str, Any]) -> Any:
  """``abstract``'s structure: leaves from ``tree`` (None where a base
  provides them), else from ``provided``, placed and cast like ``abstract``."""
  restored = {sharding.path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

  def pick(path, target):
    name = sharding.path_name(path)
    if name in restored:
      return restored[name]
    source = provided[name]
    if source.shape != target.shape:
      raise UserError(f"the base's {name} has shape {tuple(source.shape)}, not "
                      f"{tuple(target.shape)}")
    return jax.device_put(source.astype(target.dtype), target.sharding)

  return jax.tree_util.tree_map_with_path(pick, abstract)


def fill_from_base(state: Any, abstract_state: Any, bases: list[dict[str, Any]], mesh,
                   where: str) -> Any:
  """A train state restored from a checkpoint with base sources, completed
  with their arrays (parameters and the ``reference``)."""
  provided = _provided(bases, mesh, where)
  reference = state.reference
  if abstract_state.reference is not None:
    reference = _fill(reference, abstract_state.reference, provided["reference"])
  return state.replace(params=_fill(state.params, abstract_state.params, provided["params"]),
                       reference=reference)


def _restore(ckpt: Checkpointer, config: ml_collections.ConfigDict, step: int, mesh,
             merge_lora: bool) -> tuple[Any, ml_collections.ConfigDict]:
  """(parameters, config); with ``merge_lora`` a LoRA run's adapters are folded
  into their kernels and the config says so (``lora.rank`` 0): the plain model.
  The parameters that base sources provide come from them."""
  # Imported here: these build models, which the layout does not need.
  from bigmodel import distill  # pylint: disable=g-import-not-at-top
  from bigmodel.models import build_model, lora, quantization  # pylint: disable=g-import-not-at-top
  from bigmodel.optim import make_optimizer  # pylint: disable=g-import-not-at-top
  from bigmodel.state import abstract_sharded_state  # pylint: disable=g-import-not-at-top
  optimizer, _ = make_optimizer(config.optim, config.train.steps)
  with sharding.activate(mesh):
    model = build_model(config.model, config.lora)
    if quantization.weight_quantized(config.model):  # bigmodel.quantize's: no train state.
      abstract_params = quantization.abstract_params(model, config, mesh)
    else:
      # A distilled student's parameters do not need its teacher.
      abstract_params = abstract_sharded_state(distill.without_teacher(config), model,
                                               optimizer, mesh)[0].params
    params = ckpt.restore_params(step, abstract_params)
    bases = [b for b in ckpt.base_sources(step) if b["params"]]
    if bases:
      where = f"checkpoint {step} of {os.path.dirname(ckpt.directory)}"
      params = _fill(params, abstract_params, _provided(bases, mesh, where)["params"])
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

  Raises:
    UserError: also for a weight-quantized checkpoint (``bigmodel.quantize``):
      these are the parameters runs start from or train against
      (``init_from``, a teacher, a reference), which its integers cannot be.
  """
  ckpt = _open(workdir, step)
  try:
    config, step = _saved_config(ckpt, step)
    bits = config.model.get("weight_bits", 0)
    if bits:
      raise UserError(f"{workdir} holds int{bits} weight-quantized parameters "
                      "(bigmodel.quantize): they load for generation and evaluation only, "
                      "no run trains from them; use the float run they were made from")
    params, config = _restore(ckpt, config, step, mesh, merge_lora)
  finally:
    ckpt.close()
  return params, config.to_dict(), step


def refuse_quantized(run: LoadedRun, what: str) -> None:
  """UserError if ``run`` holds weight-quantized parameters (``bigmodel.quantize``):
  ``what`` (an export) needs the float weights, which are not there."""
  bits = run.config.model.get("weight_bits", 0)
  if bits:
    raise UserError(f"{run.workdir} holds {bits}-bit quantized weights (bigmodel.quantize): "
                    f"{what} needs float weights; use the run it was quantized from")


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
  ckpt, local = _open_with_files(workdir, step)  # local: the workdir, or a URL's mirror.
  try:
    config, step = _saved_config(ckpt, step)
    mesh = mesh if mesh is not None else run_mesh(config.mesh)
    params, config = _restore(ckpt, config, step, mesh, merge_lora)
    bases = ckpt.base_sources(step)
  finally:
    ckpt.close()
  return LoadedRun(workdir=workdir, config=config, step=step, mesh=mesh,
                   model=build_model(config.model, config.lora), params=params,
                   tokenizer=find_tokenizer(config, local), bases=bases, local_dir=local)
