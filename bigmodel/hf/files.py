"""Hugging Face model directories: ``config.json`` + safetensors, read and written.

Only safetensors are read (never pickles), through the ``safetensors`` numpy
API, so neither ``torch`` nor ``transformers`` is needed. A model may be one
``model.safetensors`` or several shards listed by
``model.safetensors.index.json``'s ``weight_map``.
"""
import json
import os
from typing import Any, Iterable

import numpy as np
import safetensors
from safetensors.numpy import save_file

from bigmodel.errors import UserError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def read_config(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, CONFIG)
  if not os.path.isfile(path):
    raise UserError(f"{path} does not exist; --from_hf needs a Hugging Face model directory")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise UserError(f"{path} is not valid JSON: {e}") from e


class TensorReader:
  """The tensors of a model directory, loaded on demand by name.

  ``get`` checks the shape the bigmodel config implies, so a mismatch names
  the tensor; ``unused`` lists the tensors nobody asked for.
  """

  def __init__(self, directory: str):
    self.directory = directory
    single, index = os.path.join(directory, WEIGHTS), os.path.join(directory, INDEX)
    if os.path.isfile(index):
      with open(index) as f:
        weight_map = json.load(f).get("weight_map")
      if not isinstance(weight_map, dict):
        raise UserError(f"{index} has no weight_map")
      self._file_of = {name: os.path.join(directory, shard) for name, shard in weight_map.items()}
    elif os.path.isfile(single):
      with safetensors.safe_open(single, framework="numpy") as f:
        self._file_of = {name: single for name in f.keys()}
    else:
      found = sorted(n for n in os.listdir(directory) if n.endswith((".bin", ".pt", ".h5")))
      hint = f" (found {', '.join(found)}: pickled or TF weights are not read)" if found else ""
      raise UserError(f"no {WEIGHTS} or {INDEX} in {directory}{hint}")
    for path in sorted(set(self._file_of.values())):
      if not os.path.isfile(path):
        raise UserError(f"the shard {path} listed in {INDEX} does not exist")
    self._used: set[str] = set()

  def names(self) -> list[str]:
    return sorted(self._file_of)

  def has(self, name: str) -> bool:
    return name in self._file_of

  def shape(self, name: str) -> tuple[int, ...]:
    with safetensors.safe_open(self._file_of[name], framework="numpy") as f:
      return tuple(f.get_slice(name).get_shape())

  def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 tensor ``name``; UserError if missing or not of ``shape``."""
    if name not in self._file_of:
      raise UserError(f"tensor {name} is missing from {self.directory}")
    with safetensors.safe_open(self._file_of[name], framework="numpy") as f:
      dtype = f.get_slice(name).get_dtype()
      if dtype not in ("BF16", "F8_E4M3", "F8_E5M2"):
        array = f.get_tensor(name)
    if dtype in ("BF16", "F8_E4M3", "F8_E5M2"):
      # numpy has no bfloat16 / float8: read those through JAX's safetensors API.
      with safetensors.safe_open(self._file_of[name], framework="flax") as f:
        array = np.asarray(f.get_tensor(name).astype(np.float32))
    if tuple(array.shape) != tuple(shape):
      raise UserError(f"tensor {name} has shape {tuple(array.shape)} but config.json implies "
                      f"{tuple(shape)}")
    self._used.add(name)
    return array.astype(np.float32)

  def mark_used(self, names: Iterable[str]) -> None:
    self._used.update(names)

  def unused(self) -> list[str]:
    return sorted(set(self._file_of) - self._used)


def write_model(directory: str, config: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
  """Writes ``config.json`` and one ``model.safetensors`` (what ``from_pretrained`` reads)."""
  os.makedirs(directory, exist_ok=True)
  # transformers refuses safetensors files without a "format" entry.
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
            os.path.join(directory, WEIGHTS), metadata={"format": "pt"})
  with open(os.path.join(directory, CONFIG), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write("\n")
