"""Hugging Face model directories: ``config.json`` + safetensors, read and written.

Only safetensors are read (never pickles), through the ``safetensors`` numpy
API, so neither ``torch`` nor ``transformers`` is needed. A model may be one
``model.safetensors`` or several shards listed by
``model.safetensors.index.json``'s ``weight_map``.
"""
import contextlib
import json
import os
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import safetensors
from safetensors.numpy import save_file

from bigmodel.errors import UserError

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def model_file(directory: str, name: str) -> str:
  """``directory/name``; UserError unless it resolves inside ``directory``.

  A model directory is untrusted input: a ``../`` or absolute name in the
  shard index, or a symlink, must not make an import read (or copy into the
  workdir) a file from elsewhere. The one exception is a Hugging Face hub cache
  snapshot (``.../snapshots/REV/``), whose files link to its repository's ``blobs/``.
  """
  path = os.path.join(directory, name)
  real, root = os.path.realpath(path), os.path.realpath(directory)
  roots = [root]
  if os.path.basename(os.path.dirname(root)) == "snapshots":
    roots.append(os.path.join(os.path.dirname(os.path.dirname(root)), "blobs"))
  if not any(os.path.commonpath([real, r]) == r for r in roots):
    raise UserError(f"{path} resolves to {real}, outside the model directory {root}; "
                    "refusing to read it")
  return path


def load_json(path: str) -> dict[str, Any]:
  """The JSON object in ``path``; UserError if it holds none."""
  try:
    with open(path) as f:
      value = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path} is not valid JSON: {e}") from e
  except OSError as e:
    raise UserError(f"cannot read {path}: {e.strerror}") from e
  if not isinstance(value, dict):
    raise UserError(f"{path} is not a JSON object (it holds a {type(value).__name__})")
  return value


def read_json(directory: str, name: str) -> dict[str, Any]:
  """The JSON object in a model directory's file ``name`` (see ``model_file``)."""
  return load_json(model_file(directory, name))


def read_config(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, CONFIG)
  if not os.path.isfile(path):
    raise UserError(f"{path} does not exist; --from_hf needs a Hugging Face model directory")
  return read_json(directory, CONFIG)


@contextlib.contextmanager
def _open(path: str, framework: str = "numpy") -> Iterator[Any]:
  """``safetensors.safe_open``; a broken file (empty, truncated, garbage) is a UserError."""
  try:
    with safetensors.safe_open(path, framework=framework) as f:
      yield f
  except (safetensors.SafetensorError, OSError) as e:
    raise UserError(f"{path} is not a valid safetensors file: {e}") from e


class TensorReader:
  """The tensors of a model directory, loaded on demand by name.

  ``get`` checks the shape the bigmodel config implies, so a mismatch names
  the tensor; ``unused`` lists the tensors nobody asked for. Every file's
  header is read up front, so a broken file is refused before any work.
  """

  def __init__(self, directory: str, weights: str = WEIGHTS):
    """``weights``: the single file's name (a PEFT adapter's ``adapter_model.safetensors``)."""
    self.directory = directory
    single, index = os.path.join(directory, weights), os.path.join(directory, INDEX)
    if os.path.isfile(index):
      weight_map = read_json(directory, INDEX).get("weight_map")
      if not isinstance(weight_map, dict):
        raise UserError(f"{index} has no weight_map")
      for name, shard in weight_map.items():
        if not isinstance(shard, str):
          raise UserError(f"{index} maps {name} to {shard!r}, not a file name")
      shards = {shard: model_file(directory, shard) for shard in set(weight_map.values())}
      self._file_of = {name: shards[shard] for name, shard in weight_map.items()}
    elif os.path.isfile(single):
      with _open(model_file(directory, weights)) as f:
        self._file_of = {name: single for name in f.keys()}
    else:
      found = sorted(n for n in os.listdir(directory) if n.endswith((".bin", ".pt", ".h5")))
      hint = f" (found {', '.join(found)}: pickled or TF weights are not read)" if found else ""
      raise UserError(f"no {weights} or {INDEX} in {directory}{hint}")
    for path in sorted(set(self._file_of.values())):
      if not os.path.isfile(path):
        raise UserError(f"the shard {path} listed in {INDEX} does not exist")
      with _open(path) as f:
        stored = set(f.keys())
      listed = sorted(n for n, p in self._file_of.items() if p == path and n not in stored)
      if listed:
        raise UserError(f"{path} has no tensor {listed[0]}, but {INDEX} lists it there")
    self._used: set[str] = set()

  def names(self) -> list[str]:
    return sorted(self._file_of)

  def has(self, name: str) -> bool:
    return name in self._file_of

  def shape(self, name: str) -> tuple[int, ...]:
    with _open(self._file_of[name]) as f:
      return tuple(f.get_slice(name).get_shape())

  def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 tensor ``name``; UserError if missing or not of ``shape``."""
    if name not in self._file_of:
      raise UserError(f"tensor {name} is missing from {self.directory}")
    with _open(self._file_of[name]) as f:
      dtype = f.get_slice(name).get_dtype()
      if dtype not in ("BF16", "F8_E4M3", "F8_E5M2"):
        array = f.get_tensor(name)
    if dtype in ("BF16", "F8_E4M3", "F8_E5M2"):
      # numpy has no bfloat16 / float8: read those through JAX's safetensors API.
      with _open(self._file_of[name], framework="flax") as f:
        array = np.asarray(f.get_tensor(name).astype(np.float32))
    if tuple(array.shape) != tuple(shape):
      raise UserError(f"tensor {name} has shape {tuple(array.shape)} but config.json implies "
                      f"{tuple(shape)}")
    self._used.add(name)
    return array.astype(np.float32, copy=False)

  def mark_used(self, names: Iterable[str]) -> None:
    self._used.update(names)

  def unused(self) -> list[str]:
    return sorted(set(self._file_of) - self._used)


def _umask() -> int:
  mask = os.umask(0o022)  # Reading the umask means setting it: put it straight back.
  os.umask(mask)
  return mask


def _write_json(path: str, value: dict[str, Any]) -> None:
  with open(path, "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write("\n")


def write_model(directory: str, config: dict[str, Any], tensors: dict[str, np.ndarray],
                generation: Optional[dict[str, Any]] = None) -> None:
  """Writes ``config.json`` and one ``model.safetensors`` (what ``from_pretrained`` reads).

  ``generation`` (special token ids) becomes ``generation_config.json``, where
  ``generate`` looks for them.
  """
  os.makedirs(directory, exist_ok=True)
  weights = os.path.join(directory, WEIGHTS)
  # transformers refuses safetensors files without a "format" entry.
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, weights,
            metadata={"format": "pt"})
  # safetensors creates its file mode 0600; give it the mode of every other output.
  os.chmod(weights, 0o666 & ~_umask())
  _write_json(os.path.join(directory, CONFIG), config)
  if generation is not None:
    _write_json(os.path.join(directory, GENERATION_CONFIG), generation)
