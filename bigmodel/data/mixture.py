"""Weighted mixtures of text corpora: ``data.mixture``.

``data.mixture`` is a JSON list (on the command line, or ``json.dumps`` of a
list in a config file) of sources, each ``{"name", "paths", "weight"}`` and
optionally ``"text_key"``, ``"file_pattern"`` (default: ``data``'s) or
``"tfds_name"`` instead of ``"paths"``. Each source is a corpus as
``data.paths`` / ``data.tfds_name`` would give (:mod:`bigmodel.data.corpus`:
text files, JSONL/Parquet/ArrayRecord shards, a prepared tfds dataset).
Training draws each example from a source with probability proportional to
its weight (grain's deterministic mixing, :func:`bigmodel.data.loader.
make_mixture_train_iter`); evaluation reads every source's validation split,
one after the other; the tokenizer, when trained here, trains on texts drawn
by the same weights.

A weight of 0 leaves its source out (e.g. to stop reading it on resume).
"""
from __future__ import annotations

import bisect
import dataclasses
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from bigmodel.data.sources import Source
from bigmodel.errors import UserError

_KEYS = {"name", "paths", "weight", "text_key", "file_pattern", "tfds_name"}
# Names become metric names (data/tokens/NAME): no slashes or spaces.
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclasses.dataclass(frozen=True)
class MixtureSource:
  """One entry of ``data.mixture``."""
  name: str
  weight: float
  paths: str = ""
  tfds_name: str = ""
  text_key: str = ""
  file_pattern: str = ""

  def data_config(self, data: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``data`` reading this source alone."""
    copy = ml_collections.ConfigDict(data.to_dict())
    copy.mixture = ""
    copy.source = "tfds" if self.tfds_name else "files"
    copy.paths, copy.tfds_name = self.paths, self.tfds_name
    copy.text_key = self.text_key or data.text_key
    copy.file_pattern = self.file_pattern or data.file_pattern
    return copy


def parse(mixture: str) -> list[MixtureSource]:
  """The sources of ``data.mixture`` with a positive weight ([] when unset).

  Raises:
    UserError: not a JSON list of objects, an unknown or missing key, a name
      that repeats or is not ``[A-Za-z0-9_.-]+``, a weight that is not a
      finite number >= 0, all weights 0, or neither / both of ``paths`` and
      ``tfds_name``.
  """
  if not mixture.strip():
    return []
  try:
    entries = json.loads(mixture)
  except json.JSONDecodeError as e:
    raise UserError(f"data.mixture is not JSON ({e}); give a list of"
                    ' {"name": ..., "paths": ..., "weight": ...}') from e
  if not isinstance(entries, list) or not entries:
    raise UserError("data.mixture must be a non-empty JSON list of sources")
  sources, names = [], set()
  for position, entry in enumerate(entries):
    where = f"data.mixture[{position}]"
    if not isinstance(entry, dict):
      raise UserError(f"{where} is not a JSON object")
    unknown = set(entry) - _KEYS
    if unknown:
      raise UserError(f"{where} has unknown keys {sorted(unknown)}; known: {sorted(_KEYS)}")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
      raise UserError(f"{where}.name={name!r} must be a string of letters, digits, _ . -")
    if name in names:
      raise UserError(f"{where}.name={name!r} repeats; source names must differ")
    names.add(name)
    weight = entry.get("weight")
    if (isinstance(weight, bool) or not isinstance(weight, (int, float))
        or not math.isfinite(weight) or weight < 0):
      raise UserError(f"{where}.weight={weight!r} must be a finite number >= 0")
    strings = {key: entry.get(key, "") for key in _KEYS - {"name", "weight"}}
    for key, value in strings.items():
      if not isinstance(value, str):
        raise UserError(f"{where}.{key}={value!r} must be a string")
    if bool(strings["paths"]) == bool(strings["tfds_name"]):
      raise UserError(f"{where} needs exactly one of paths (files, shards, a glob) and"
                      " tfds_name")
    sources.append(MixtureSource(name=name, weight=float(weight), **strings))
  if not any(s.weight for s in sources):
    raise UserError("data.mixture: every weight is 0; give at least one source a weight > 0")
  return [s for s in sources if s.weight > 0]


class Concatenated(Sequence):
  """Random access to several record sequences, one after the other."""

  def __init__(self, parts: Sequence[Sequence[Any]]):
    self._parts = list(parts)
    self._ends = np.cumsum([len(p) for p in self._parts]).tolist()

  def __len__(self) -> int:
    return self._ends[-1] if self._ends else 0

  def __getitem__(self, index: int) -> Any:
    if not 0 <= index < len(self):
      raise IndexError(index)
    part = bisect.bisect_right(self._ends, index)
    return self._parts[part][index - (self._ends[part - 1] if part else 0)]


def combined_source(named: Mapping[str, Source]) -> Source:
  """One Source of all the sources' records (validation: those that have one)."""
  validations = [s.validation for s in named.values() if s.validation is not None]
  texts = {s.text_key for s in named.values()}
  assert texts == {"text"}, texts  # Corpora are prepared with a "text" feature.
  return Source(name=f"mixture({', '.join(named)})",
                train=Concatenated([s.train for s in named.values()]),
                validation=Concatenated(validations) if validations else None,
                text_key="text")


def training_texts(named: Mapping[str, tuple[Source, float]], seed: int) -> Iterator[str]:
  """Train texts of the sources, each drawn from a source chosen by weight
  (seeded): what a tokenizer trained on a prefix sees in the mix's shares."""
  rng = np.random.default_rng(seed)
  streams = [source.shuffled_train_texts(seed) for source, _ in named.values()]
  weights = np.array([weight for _, weight in named.values()], np.float64)
  while streams:
    pick = rng.choice(len(streams), p=weights / weights.sum())
    text = next(streams[pick], None)
    if text is None:  # That source is used up: draw from the others.
      del streams[pick]
      weights = np.delete(weights, pick)
      continue
    yield text
