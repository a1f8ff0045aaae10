"""Labelled and paired examples for fine-tuning, as random-access tfds sources.

Two kinds of task read here, each example a text and an answer:

* ``classify``: (text, label name);
* ``seq2seq``: (input text, target text).

Sources, read through ``builder.as_data_source()`` (ArrayRecord, random
access, no TensorFlow) like :mod:`bigmodel.data.corpus`:

* local files (``data.source="files"``): ``data.paths`` is a ``.csv`` or
  ``.jsonl`` file, or a directory holding ``train.{jsonl,csv}`` and
  optionally ``validation.{jsonl,csv}``. Without a validation file about 10%
  of the rows are held out by a hash of their content (duplicates land in
  one split). The columns are ``data.text_column`` and
  ``data.label_column`` / ``data.target_column``. The files are parsed and
  checked (columns present, no empty file) before preparing, once per
  distinct (files, columns) under ``data.data_dir`` or ``WORKDIR/data``;
* a registered tfds dataset prepared in ArrayRecord format
  (``data.source="tfds"``, ``data.tfds_name``, e.g. ``glue/sst2`` with
  ``data.text_column="sentence"``); a ``ClassLabel`` label is read as its
  name. The evaluation split is ``validation``, else ``test``.

The label set of a classification task is ``data.labels`` (comma-separated)
or, when empty, the sorted distinct labels of the train split; the class id
is the index in that list.
"""
from __future__ import annotations

import collections
import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from absl import logging
from etils import epath
import tensorflow_datasets as tfds

from bigmodel.data.corpus import open_prepared_tfds, record_text
from bigmodel.errors import UserError

TASK_KINDS = ("classify", "seq2seq")
# Percent of the rows held out for validation when there is no validation file.
_HOLDOUT_PERCENT = 10
_EXTENSIONS = (".jsonl", ".csv")

# Long texts (IMDB reviews, source files) exceed csv's 128 KiB field default.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def answer_feature(kind: str) -> str:
  """Name of the stored answer feature: ``label`` or ``target``."""
  return "label" if kind == "classify" else "target"


@dataclasses.dataclass(frozen=True)
class TaskRecords:
  """Random-access train/validation examples of a task.

  Attributes:
    name: Human-readable name for logs.
    kind: ``classify`` or ``seq2seq``.
    train: Records of the train split.
    validation: Records of the validation split; None when there is none.
    text_key: Feature holding the (input) text.
    answer_key: Feature holding the label or the target text.
    class_names: Names of a tfds ``ClassLabel`` answer (its values are
      ints); None for text answers.
  """
  name: str
  kind: str
  train: Sequence[Mapping[str, Any]]
  validation: Sequence[Mapping[str, Any]] | None
  text_key: str
  answer_key: str
  class_names: tuple[str, ...] | None = None

  def text(self, record: Mapping[str, Any]) -> str:
    return record_text(record, self.text_key)

  def answer(self, record: Mapping[str, Any]) -> str:
    """The label name or target text of a record."""
    return answer_text(record, self.answer_key, self.class_names)


def answer_text(record: Mapping[str, Any], answer_key: str,
                class_names: Sequence[str] | None) -> str:
  """A record's answer as text; a ClassLabel int becomes its name."""
  value = record[answer_key]
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  if class_names is not None and 0 <= int(value) < len(class_names):
    return class_names[int(value)]
  return str(value)


# --------------------------------------------------------------------------
# Local CSV / JSONL files.


@dataclasses.dataclass(frozen=True)
class TaskFiles:
  """The files of a local task; validation None = hold out from train."""
  train: str
  validation: str | None


def resolve_task_files(paths: str) -> TaskFiles:
  """``data.paths`` -> the train (and validation) file; UserError if none."""
  if os.path.isfile(paths):
    _check_extension(paths)
    return TaskFiles(train=os.path.abspath(paths), validation=None)
  if not os.path.isdir(paths):
    raise UserError(f"data.paths={paths!r} is neither a .csv/.jsonl file nor"
                    " a directory with train.jsonl or train.csv")

  def find(split: str) -> str | None:
    found = [os.path.join(paths, split + ext) for ext in _EXTENSIONS
             if os.path.isfile(os.path.join(paths, split + ext))]
    if len(found) > 1:
      raise UserError(f"{paths} has both {' and '.join(found)}; keep one")
    return os.path.abspath(found[0]) if found else None

  train = find("train")
  if train is None:
    raise UserError(f"data.paths={paths!r} has no train.jsonl or train.csv")
  return TaskFiles(train=train, validation=find("validation"))


def _check_extension(path: str) -> None:
  if not path.endswith(_EXTENSIONS):
    raise UserError(f"data.paths={path!r}: task files must end in .jsonl or"
                    " .csv")


def _value(row: Mapping[str, Any], column: str, where: str,
           what: str) -> str:
  """A row's cell as text; UserError naming the row if absent or empty."""
  value = row.get(column)
  if value is None or value == "":
    raise UserError(f"{where} has no {what} (column {column!r})")
  if isinstance(value, (dict, list)):
    raise UserError(f"{where}: the {what} (column {column!r}) is a JSON"
                    f" {type(value).__name__}, not text")
  return value if isinstance(value, str) else str(value)


def _rows_of(path: str) -> Iterable[tuple[str, Mapping[str, Any]]]:
  """(location, row) of every row of a CSV or JSONL file."""
  with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
    if path.endswith(".csv"):
      reader = csv.DictReader(f)
      for row in reader:
        yield f"{path}:{reader.line_num}", row
      return
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f"{path}:{line_number} is not JSON: {e}") from e
      if not isinstance(row, dict):
        raise UserError(f"{path}:{line_number} is a JSON"
                        f" {type(row).__name__}, not an object")
      yield f"{path}:{line_number}", row


def read_task_file(path: str, text_column: str, answer_column: str,
                   kind: str) -> list[tuple[str, str]]:
  """Parses a CSV/JSONL task file into (text, answer) rows.

  Raises:
    UserError: for an empty file, a missing column (naming the columns that
      exist), or a row without a text or answer.
  """
  _check_extension(path)
  text_option, answer_option = "data.text_column", (
      "data.label_column" if kind == "classify" else "data.target_column")
  rows = []
  for where, row in _rows_of(path):
    if not rows:  # The first row decides the columns.
      for option, column in ((text_option, text_column),
                             (answer_option, answer_column)):
        if column not in row:
          raise UserError(
              f"{option}={column!r} is not a column of {path} (columns:"
              f" {', '.join(map(str, row)) or 'none'})")
    rows.append((_value(row, text_column, where, "text"),
                 _value(row, answer_column, where, answer_feature(kind))))
  if not rows:
    raise UserError(f"task file {path} is empty: it has no rows")
  return rows


def _content_hash(row: tuple[str, str]) -> int:
  digest = hashlib.sha256("\0".join(row).encode("utf-8", errors="replace"))
  return int.from_bytes(digest.digest()[:4], "big")


def hold_out(rows: Sequence[tuple[str, str]]
             ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
  """Splits rows into (train, validation), ~10% by a hash of the content.

  With two or more rows each split gets at least one.
  """
  hashes = [_content_hash(row) for row in rows]
  is_validation = [h % 100 < _HOLDOUT_PERCENT for h in hashes]
  if len(rows) >= 2 and not any(is_validation):
    is_validation[min(range(len(rows)), key=hashes.__getitem__)] = True
  elif len(rows) >= 2 and all(is_validation):
    is_validation[max(range(len(rows)), key=hashes.__getitem__)] = False
  train = [row for row, v in zip(rows, is_validation) if not v]
  validation = [row for row, v in zip(rows, is_validation) if v]
  return train, validation


def _fingerprint(files: TaskFiles, kind: str, columns: Sequence[str]) -> str:
  """Names the prepared dataset: files (path, size, mtime) and columns."""
  digest = hashlib.sha256(f"{kind}\0{chr(0).join(columns)}\n".encode())
  for path in (files.train, files.validation):
    if path:
      stat = os.stat(path)
      digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
  return digest.hexdigest()[:16]


class BigmodelTaskRecords(tfds.core.GeneratorBasedBuilder):
  """(text, label) or (text, target) rows; registered as
  ``bigmodel_task_records``, one config per distinct (files, columns).

  The rows are parsed and checked before preparing and passed to the
  constructor, so that a bad file fails with a UserError before tfds starts
  writing.
  """

  VERSION = tfds.core.Version("1.0.0")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # See corpus.BigmodelTextFiles.code_path.
    return epath.Path(__file__)

  def __init__(self, *, kind: str,
               rows_by_split: Mapping[str, Sequence[tuple[str, str]]],
               **kwargs):
    self._kind = kind
    self._rows_by_split = rows_by_split
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Text classification or text-to-text examples.",
        # Keep the files' order (tfds shuffles by key hash by default), so
        # that evaluation runs over the validation file in order.
        disable_shuffling=True,
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            answer_feature(self._kind): tfds.features.Text(),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    return {split: self._generate_examples(rows)
            for split, rows in self._rows_by_split.items() if rows}

  def _generate_examples(self, rows: Sequence[tuple[str, str]]):
    answer_key = answer_feature(self._kind)
    for index, (text, answer) in enumerate(rows):
      yield index, {"text": text, answer_key: answer}


def load_task_files(paths: str, kind: str, text_column: str,
                    answer_column: str, data_dir: str) -> TaskRecords:
  """Prepares (once per distinct files and columns) and opens a local task."""
  files = resolve_task_files(paths)
  config = tfds.core.BuilderConfig(
      name=f"{kind}_{_fingerprint(files, kind, (text_column, answer_column))}",
      description=f"{kind} rows of {files.train}")
  builder = BigmodelTaskRecords(kind=kind, rows_by_split={},
                                data_dir=data_dir, config=config,
                                file_format="array_record")
  if builder.is_prepared():
    logging.info("Reusing prepared task %s", builder.data_path)
  else:
    start = time.perf_counter()
    train = read_task_file(files.train, text_column, answer_column, kind)
    if files.validation:
      validation = read_task_file(files.validation, text_column,
                                  answer_column, kind)
    else:
      train, validation = hold_out(train)
      logging.info("No validation file: held out %d of %d rows of %s",
                   len(validation), len(train) + len(validation), files.train)
    builder = BigmodelTaskRecords(
        kind=kind, rows_by_split={"train": train, "validation": validation},
        data_dir=data_dir, config=config, file_format="array_record")
    tfds.disable_progress_bar()
    try:
      with contextlib.redirect_stdout(io.StringIO()):  # tfds prints "Downloading ...".
        builder.download_and_prepare()
    except Exception:  # pylint: disable=broad-except
      if not builder.is_prepared():  # See corpus.load_text_files.
        raise
    logging.info("Prepared %d train and %d validation rows of %s into %s in"
                 " %.1f s", len(train), len(validation), paths,
                 builder.data_path, time.perf_counter() - start)
  sources = tfds.builder_from_directory(builder.data_path).as_data_source()
  return TaskRecords(name=f"{builder.name}/{config.name}", kind=kind,
                     train=sources["train"],
                     validation=sources.get("validation"),
                     text_key="text", answer_key=answer_feature(kind))


# --------------------------------------------------------------------------
# Registered tfds datasets.


def load_tfds_task(name: str, kind: str, text_column: str,
                   answer_column: str, data_dir: str | None) -> TaskRecords:
  """Opens an already prepared tfds dataset as a task; never downloads."""
  builder, splits = open_prepared_tfds(name, data_dir, example="glue/sst2")
  features = builder.info.features
  answer_option = ("data.label_column" if kind == "classify"
                   else "data.target_column")
  for option, column in (("data.text_column", text_column),
                         (answer_option, answer_column)):
    if column not in features:
      raise UserError(f"{option}={column!r} is not a feature of tfds dataset"
                      f" {name!r} (features: {', '.join(sorted(features))})")
  answer = features[answer_column]
  class_names = (tuple(answer.names)
                 if isinstance(answer, tfds.features.ClassLabel) else None)
  eval_split = next((s for s in ("validation", "test") if s in splits), None)
  try:
    train = builder.as_data_source(split="train")
    validation = (builder.as_data_source(split=eval_split)
                  if eval_split else None)
  except (NotImplementedError, ValueError) as e:
    raise UserError(f"tfds dataset {name!r} in {builder.data_dir} has no"
                    " random-access files; prepare it with"
                    " --file_format=array_record") from e
  logging.info("tfds task %s: %d train and %d %s records", name, len(train),
               len(validation) if validation else 0, eval_split)
  return TaskRecords(name=name, kind=kind, train=train, validation=validation,
                     text_key=text_column, answer_key=answer_column,
                     class_names=class_names)


# --------------------------------------------------------------------------
# Label sets.


@dataclasses.dataclass(frozen=True)
class LabelStats:
  """The classes of a classification task.

  Attributes:
    names: Class names; the class id is the index.
    train_counts: Examples per class in the train split.
    validation_counts: Examples per class in the validation split (zeros
      when there is none).
  """
  names: tuple[str, ...]
  train_counts: tuple[int, ...]
  validation_counts: tuple[int, ...]

  @property
  def majority_baseline(self) -> float | None:
    """Validation accuracy of always answering the most frequent train class;
    None without validation examples."""
    total = sum(self.validation_counts)
    if not total:
      return None
    majority = max(range(len(self.names)), key=self.train_counts.__getitem__)
    return self.validation_counts[majority] / total


def _count_answers(task: TaskRecords,
                   records: Sequence[Mapping[str, Any]] | None
                   ) -> collections.Counter:
  counts = collections.Counter()
  for index in range(len(records) if records is not None else 0):
    counts[task.answer(records[index])] += 1
  return counts


def label_stats(task: TaskRecords, declared: str) -> LabelStats:
  """Counts the labels of both splits and fixes the class ids.

  Args:
    task: A classification task.
    declared: ``data.labels``: comma-separated names, or "" for the sorted
      distinct labels of the train split.

  Raises:
    UserError: for a label outside the declared set (naming it and the set),
      or fewer than two classes.
  """
  train_counts = _count_answers(task, task.train)
  validation_counts = _count_answers(task, task.validation)
  if declared.strip():
    names = tuple(name.strip() for name in declared.split(",")
                  if name.strip())
    if len(set(names)) != len(names):
      raise UserError(f"data.labels={declared!r} names a label twice")
    for split, counts in (("train", train_counts),
                          ("validation", validation_counts)):
      unknown = sorted(set(counts) - set(names))
      if unknown:
        raise UserError(
            f"label {unknown[0]!r} ({counts[unknown[0]]} {split} examples) of"
            f" {task.name} is not in data.labels={declared!r}; declare it or"
            " set data.labels='' to use the labels found")
  else:
    names = tuple(sorted(train_counts))
    unknown = sorted(set(validation_counts) - set(names))
    if unknown:
      raise UserError(
          f"validation label {unknown[0]!r} of {task.name} never occurs in"
          f" the train split (train labels: {', '.join(names)}); declare the"
          " set with data.labels")
  if len(names) < 2:
    raise UserError(f"{task.name} has {len(names)} class"
                    f" ({', '.join(names)}); classification needs two or more")
  return LabelStats(
      names=names,
      train_counts=tuple(train_counts[name] for name in names),
      validation_counts=tuple(validation_counts[name] for name in names))
