"""Hugging Face model directory <-> bigmodel workdir (checkpoint + config.json).

``import_hf`` writes ``WORKDIR/config.json`` and a parameters-only checkpoint
at step 0 in ``WORKDIR/checkpoints`` (``Checkpointer.save_params``: a Hugging
Face model has no optimizer state to resume), plus the HF tokenizer in
``WORKDIR/tokenizer`` (``data.tokenizer`` points there). So
``--config.init_from=WORKDIR`` fine-tunes from it, and tools that load a
workdir's parameters (generate, evaluate, export) work on it. Import streams:
each parameter is read, converted to ``model.param_dtype`` and moved to its
devices (sharded over every local device, fsdp) before the next is read, and
orbax writes from the devices, so the host never holds a second copy of the
model. ``export_hf`` reads any run's checkpoint back into a HF directory.
"""
import contextlib
import dataclasses
import functools
import os
import re
import shutil
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bigmodel import sharding
from bigmodel import run as run_lib
from bigmodel.config import base_config, validate
from bigmodel.errors import UserError
from bigmodel.hf import FAMILIES, describes, exporter, family_of_config
from bigmodel.hf.files import GENERATION_CONFIG, TensorReader, read_config, write_model
from bigmodel.hf.mapping import Rule, export_tensors, iter_params
from bigmodel.hf.tokenizer import HfTokenizer, copy_tokenizer_files, has_tokenizer, tokenizer_files
from bigmodel.models import ModelConfig, build_model, families
from bigmodel.optim import make_optimizer
from bigmodel.state import abstract_sharded_state

TOKENIZER_DIR = "tokenizer"


def _flatten(tree: Any) -> dict[str, Any]:
  return {sharding.path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return tree


def hf_config_to_config(hf: dict[str, Any], family: str) -> ml_collections.ConfigDict:
  """The bigmodel config of a HF ``config.json`` (UserError if not this family)."""
  if family not in FAMILIES:
    raise UserError(f"--family={family!r} is not one of: {', '.join(FAMILIES)}")
  name_map = FAMILIES[family]
  if not describes(name_map, hf):
    raise UserError(f"config.json describes a {hf.get('model_type')!r} model (architectures "
                    f"{hf.get('architectures')}), not {family}")
  config = base_config()
  config.model.update(name_map.model_config(hf))
  if config.model.position_embedding != "relative":  # Training sequences fit the context.
    config.data.seq_len = min(config.data.seq_len, config.model.max_len)
  if config.model.get("num_classes"):  # A classifier: its task, and what its classes mean.
    config.data.update(task="classify", labels=_label_names(hf, config.model.num_classes))
  return config


def _label_names(hf: dict[str, Any], num_classes: int) -> str:
  """``data.labels`` of a classifier: ``id2label``'s names in class order, so a
  dataset's labels keep the indices the model learnt; "" (the labels found in
  the data, sorted) for transformers' placeholder names ``LABEL_i``."""
  id2label = hf.get("id2label") or {}
  try:
    names = [str(id2label[key]) for key in sorted(id2label, key=int)]
  except (TypeError, ValueError) as e:
    raise UserError(f"config.json id2label={id2label!r} is not keyed by class index") from e
  if names == [f"LABEL_{i}" for i in range(num_classes)] or not names:
    return ""
  if len(names) != num_classes or any("," in n for n in names) or len(set(names)) < len(names):
    raise UserError(f"config.json id2label={id2label!r}: expected {num_classes} distinct "
                    "label names without commas")
  return ",".join(names)


def _check_tied(reader: TensorReader, tied: tuple[tuple[str, str], ...],
                rules: list[Rule]) -> None:
  """A stored copy of a tied tensor must equal the original (bigmodel ties them).

  A "copy" that a rule reads as a parameter of its own (GPT-2's ``lm_head.weight``
  when ``tie_word_embeddings`` is false) is no copy and may differ.
  """
  own = {rule.hf[0] for rule in rules}
  for copy, original in tied:
    if copy not in own and reader.has(copy) and reader.has(original):
      if not np.array_equal(reader.get(copy, reader.shape(copy)),
                            reader.get(original, reader.shape(original))):
        raise UserError(f"tensor {copy} differs from {original}, but this architecture ties them")


# What an import writes into its workdir (run.write_config goes through config.json.tmp).
_WRITTEN = ("config.json", "config.json.tmp", "checkpoints", TOKENIZER_DIR)


def _check_workdir(workdir: str) -> None:
  """Import never replaces anything: what it writes must be absent or an empty directory."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir={workdir} is not a directory")
  for name in _WRITTEN:
    path = os.path.join(workdir, name)
    if os.path.lexists(path) and not (os.path.isdir(path) and not os.listdir(path)):
      raise UserError(f"--workdir={workdir} already holds {name}; choose a new directory")


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  else:
    os.remove(path)


@contextlib.contextmanager
def _undone_on_failure(workdir: str):
  """If the block fails, removes what it wrote into ``workdir``, and nothing else.

  A workdir the block created goes, with any parents it created. Otherwise
  ``_check_workdir`` let each entry of ``_WRITTEN`` through only absent or an
  empty directory: those absent are removed, those empty emptied again.
  """
  created, parent = None, os.path.abspath(workdir)
  while not os.path.exists(parent):
    created, parent = parent, os.path.dirname(parent)
  empty = {n for n in _WRITTEN if os.path.isdir(os.path.join(workdir, n))}
  try:
    yield
  except BaseException:
    if created:
      shutil.rmtree(created, ignore_errors=True)
      raise
    for name in _WRITTEN:
      path = os.path.join(workdir, name)
      if name in empty:
        for child in os.listdir(path):
          _remove(os.path.join(path, child))
      elif os.path.lexists(path):
        _remove(path)
    raise


@dataclasses.dataclass
class Imported:
  """A HF model read and checked by ``read_hf``, not yet written.

  Attributes:
    family: The ``--family`` name.
    hf: The model's ``config.json``.
    config: The bigmodel config of the workdir to write.
    rules: The name map's rules for this model (``hf`` decides heads and scales).
    params: Flat parameters (path -> array on the devices).
    fresh: Paths of the parameters the checkpoint lacks, initialised afresh.
    unused: HF tensors no parameter came from.
    tokenizer: The tokenizer files found, kept in the workdir.
  """
  family: str
  hf: dict[str, Any]
  config: ml_collections.ConfigDict
  rules: list[Rule]
  params: dict[str, jax.Array]
  fresh: list[str]
  unused: list[str]
  tokenizer: list[str]

  def summary(self) -> dict[str, Any]:
    return {"family": self.family, "num_params": sum(x.size for x in self.params.values()),
            "tokenizer": self.tokenizer or None, "unused": self.unused, "fresh": self.fresh}


def import_hf(hf_dir: str, family: Optional[str], workdir: str) -> dict[str, Any]:
  """Converts the HF model in ``hf_dir`` into a bigmodel workdir.

  Everything is read and checked before the first write, and a failure while
  writing removes what was written. Returns a summary: family, parameter
  count, the tokenizer kept (or None), the HF tensors no parameter came from
  and the parameters no tensor came from (``Rule.fresh``: initialised afresh).
  """
  imported = read_hf(hf_dir, family, workdir)
  write_import(hf_dir, workdir, imported)
  return imported.summary()


def read_hf(hf_dir: str, family: Optional[str], workdir: str) -> Imported:
  """``import_hf``'s reading half: the model in ``hf_dir`` read, converted and
  checked (and ``workdir`` checked to be writable without replacing anything);
  nothing is written. A caller may add to it (``bigmodel.hf.peft``: adapters)
  before ``write_import``."""
  hf = read_config(hf_dir)
  family = family or family_of_config(hf)
  if family is None:
    # model_type names, which differ from --family names where HF's do (gemma3_text).
    raise UserError(f"config.json describes a {hf.get('model_type')!r} model; supported: "
                    f"{', '.join(m.MODEL_TYPE for m in FAMILIES.values())}")
  config = hf_config_to_config(hf, family)
  _check_workdir(workdir)
  name_map = FAMILIES[family]
  reader = TensorReader(hf_dir)
  model_config = ModelConfig.from_config(config.model)
  rules = name_map.rules(model_config, hf)
  flat, fresh = _read_params(config, rules, reader)
  _check_tied(reader, name_map.TIED, rules)
  reader.mark_used(n for pair in name_map.TIED for n in pair if reader.has(n))
  unused = [n for n in reader.unused()
            if not any(re.fullmatch(p, n) for p in name_map.IGNORED)]
  tokenizer_names = tokenizer_files(hf_dir)
  if has_tokenizer(hf_dir):
    config.data.tokenizer = os.path.abspath(os.path.join(workdir, TOKENIZER_DIR))
    config.data.vocab_size = HfTokenizer(hf_dir).vocab_size
  else:  # A tokenizer trained later must fit the embedding.
    config.data.vocab_size = min(config.data.vocab_size, config.model.vocab_size)
  validate(config)
  return Imported(family, hf, config, rules, flat, fresh, unused, tokenizer_names)


def write_import(hf_dir: str, workdir: str, imported: Imported) -> None:
  """``import_hf``'s writing half: the tokenizer, a step-0 checkpoint of
  ``imported.params`` and the config; a failure removes what was written."""
  with _undone_on_failure(workdir):
    os.makedirs(workdir, exist_ok=True)
    copy_tokenizer_files(hf_dir, os.path.join(workdir, TOKENIZER_DIR))
    _save_params(workdir, imported.config, _unflatten(imported.params))
    run_lib.write_config(imported.config, run_lib.RunDir(workdir).config)


def _import_mesh() -> jax.sharding.Mesh:
  """fsdp over every local device (``data`` would replicate the model on each)."""
  return sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1)))


def abstract_params(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The flat parameters (shape, dtype, sharding on the import mesh) of
  ``config``'s model, with ``config.lora``'s adapters if it has any."""
  mesh = _import_mesh()
  optimizer, _ = make_optimizer(config.optim, config.train.steps)
  model = build_model(config.model, config.lora)
  with sharding.activate(mesh):
    return _flatten(abstract_sharded_state(config, model, optimizer, mesh)[0].params)


def _read_params(config: ml_collections.ConfigDict, rules: list[Rule],
                 reader: TensorReader) -> tuple[dict[str, jax.Array], list[str]]:
  """(flat parameters read through ``rules``, each moved to its devices as it is
  read; the paths of those the checkpoint lacks, initialised afresh).

  The mesh is ``_import_mesh``'s. A layer stack is filled on the devices one
  layer at a time (a donated in-place update), so the host holds one layer's
  tensor at a time.
  """
  model = build_model(config.model)
  abstract = abstract_params(config)
  dtype = jnp.dtype(config.model.param_dtype)
  flat = {}
  for path, layer, array in iter_params(rules, reader,
                                        {k: v.shape for k, v in abstract.items()},
                                        scan=config.model.scan, dtype=dtype):
    target = abstract[path]
    if layer is None:
      flat[path] = jax.device_put(array, target.sharding)
      continue
    if path not in flat:
      flat[path] = jax.jit(functools.partial(jnp.zeros, target.shape, dtype),
                           out_shardings=target.sharding)()
    flat[path] = _set_layer(flat[path], array, layer)
  fresh = sorted(set(abstract) - set(flat))
  for path, array in _initial_params(model, config, fresh).items():
    flat[path] = jax.device_put(array.astype(dtype), abstract[path].sharding)
  return flat, fresh


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stack_LxN: jax.Array, layer_N: jax.Array, index: int) -> jax.Array:
  """``stack`` with row ``index`` replaced, in place (the stack is donated)."""
  return jax.lax.dynamic_update_index_in_dim(stack_LxN, layer_N.astype(stack_LxN.dtype),
                                             index, axis=0)


def _initial_params(model, config: ml_collections.ConfigDict,
                    paths: list[str]) -> dict[str, jax.Array]:
  """The model's initial values (seed ``train.seed``) of the parameters at
  ``paths``; jit computes only those."""
  inputs = families.family_of(model).example_inputs(model.config, config.data.seq_len)
  init = lambda: {k: v for k, v in _flatten(sharding.strip_boxes(  # pylint: disable=g-long-lambda
      model.init(jax.random.key(config.train.seed), *inputs)["params"])).items() if k in paths}
  return jax.jit(init)() if paths else {}


def _save_params(workdir: str, config: ml_collections.ConfigDict, params: Any) -> None:
  """A parameters-only checkpoint at step 0 (``Checkpointer.save_params``)."""
  # Orbax copies arrays to the host to write them: the largest one at a time
  # (its budget must fit it), not all.
  largest = max(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
  checkpointer = run_lib.checkpointer(workdir, keep=1, async_save=False,
                                      save_concurrent_gb=largest / 1e9 * 1.01)
  try:
    checkpointer.save_params(0, params, config)
    checkpointer.wait()
  finally:
    checkpointer.close()


def export_hf(workdir: str, out: str, step: Optional[int] = None) -> dict[str, Any]:
  """Writes checkpoint ``step`` (default: the latest) of ``workdir`` as a HF directory."""
  if os.path.exists(out) and os.listdir(out):
    raise UserError(f"--to_hf={out} already exists and is not empty; choose a new directory")
  run = run_lib.load_run(workdir, step)
  run_lib.refuse_quantized(run, "--to_hf")
  params, config, step = run.params, run.config.to_dict(), run.step
  model_config = ModelConfig.from_config(run.config.model)
  family, name_map = exporter(model_config)
  hf = name_map.hf_config(model_config)
  flat = {k: np.asarray(jax.device_get(v), np.float32) for k, v in _flatten(params).items()}
  tensors = export_tensors(name_map.rules(model_config), flat, scan=model_config.scan)
  tokenizer = run.tokenizer  # Loaded by load_run: read before anything is written.
  family_info, generation = families.get(model_config.family), None
  if tokenizer is not None:  # The ids training used, whatever the tokenizer's kind.
    ids = dict(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
               pad_token_id=tokenizer.pad_id)
    if family_info.encoder_decoder:
      ids["decoder_start_token_id"] = tokenizer.decoder_start_id
    hf.update(ids)
    generation = ids if family_info.generates else None  # generate() reads them there.
  tokenizer_dir = config["data"].get("tokenizer", "")
  tokenizer_names = []
  if tokenizer_dir and os.path.isdir(tokenizer_dir):
    tokenizer_names = copy_tokenizer_files(tokenizer_dir, out)
  if GENERATION_CONFIG in tokenizer_names:  # The original model's (its eos ids) stays.
    generation = None
  hf["torch_dtype"] = "float32"
  write_model(out, hf, tensors, generation)
  return {"family": family, "step": step, "num_tensors": len(tensors),
          "tokenizer": tokenizer_names or None}
