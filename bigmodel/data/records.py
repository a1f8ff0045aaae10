"""Labelled and paired examples for fine-tuning, as random-access tfds sources.

Three kinds of task read here, each example a text and an answer:

* ``classify``: (text, label name);
* ``seq2seq``: (input text, target text);
* ``chat``: (a conversation's ``messages`` as JSON, its last reply), JSON
  lines or Parquet; every conversation is checked
  (``bigmodel.data.chat.check_messages``);
* ``preference``: ({prompt, chosen, rejected} as JSON, the chosen reply),
  JSON lines or Parquet: the prompt (``data.text_column``) is text or chat
  ``messages``, ``chosen`` and ``rejected`` are replies.

Sources, read as a :class:`bigmodel.data.sources.Source` like
:mod:`bigmodel.data.corpus`:

* local files (``data.source="files"``): ``data.paths`` is a ``.csv``,
  ``.jsonl`` (also ``.jsonl.gz``, ``.jsonl.zst``: :mod:`bigmodel.data.shards`)
  or ``.parquet`` file, or a directory holding ``train.<extension>`` and
  optionally ``validation.<extension>``. Without a validation file about 10%
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
import csv
import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from absl import logging
import tensorflow_datasets as tfds

from bigmodel.data import chat
from bigmodel.data import preference
from bigmodel.data import shards
from bigmodel.data import sources
from bigmodel.data.sources import Source
from bigmodel.errors import UserError

TASK_KINDS = ("classify", "seq2seq", "chat", "preference")
# Percent of the rows held out for validation when there is no validation file.
_HOLDOUT_PERCENT = 10
_EXTENSIONS = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".csv", ".parquet")

# Long texts (IMDB reviews, source files) exceed csv's 128 KiB field default.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def answer_feature(kind: str) -> str:
  """Name of the stored answer feature: ``label`` or ``target``."""
  return "label" if kind == "classify" else "target"


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
    raise UserError(f"data.paths={paths!r} is neither a task file ({', '.join(_EXTENSIONS)})"
                    " nor a directory with a train file (train.jsonl, train.csv, ...)")

  def find(split: str) -> str | None:
    found = [os.path.join(paths, split + ext) for ext in _EXTENSIONS
             if os.path.isfile(os.path.join(paths, split + ext))]
    if len(found) > 1:
      raise UserError(f"{paths} has both {' and '.join(found)}; keep one")
    return os.path.abspath(found[0]) if found else None

  train = find("train")
  if train is None:
    raise UserError(f"data.paths={paths!r} has no train file (train.jsonl, train.csv, ...:"
                    f" {', '.join(_EXTENSIONS)})")
  return TaskFiles(train=train, validation=find("validation"))


def _check_extension(path: str) -> None:
  if not path.endswith(_EXTENSIONS):
    raise UserError(f"data.paths={path!r}: task files end in one of"
                    f" {', '.join(_EXTENSIONS)}")


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


def _rows_of(path: str, columns: Mapping[str, str]
             ) -> Iterable[tuple[str, Mapping[str, Any]]]:
  """(location, row) of every row of a CSV, JSON-lines (maybe compressed) or
  Parquet file (whose ``columns``, option -> column, are read)."""
  if path.endswith(".parquet"):
    for number, row in enumerate(shards.parquet_rows(path, columns), start=1):
      yield f"{path} row {number}", row
    return
  if path.endswith(".csv"):
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
      reader = csv.DictReader(f)
      for row in reader:
        yield f"{path}:{reader.line_num}", row
    return
  for line_number, line in shards.jsonl_lines(path):
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
  columns = [(text_option, text_column)]
  if kind in ("chat", "preference"):
    if path.endswith(".csv"):
      raise UserError(f"{path}: {kind} examples are read from JSONL or Parquet files")
  else:
    columns.append((answer_option, answer_column))
  read = dict(columns)
  if kind == "preference":  # Parquet: the pair's replies are read too.
    read.update({f"the {side} reply": side for side in preference.SIDES})
  rows = []
  for where, row in _rows_of(path, read):
    if not rows:  # The first row decides the columns.
      for option, column in columns:
        if column not in row:
          raise UserError(
              f"{option}={column!r} is not a column of {path} (columns:"
              f" {', '.join(map(str, row)) or 'none'})")
    if kind == "chat":
      messages = chat.check_messages(row.get(text_column), where)
      last_reply = [m["content"] for m in messages if m["role"] == "assistant"][-1]
      rows.append((json.dumps(messages, ensure_ascii=False), last_reply))
    elif kind == "preference":
      pair = preference.check_preference(row, text_column, where)
      rows.append((json.dumps(pair, ensure_ascii=False), pair["chosen"]))
    else:
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
  stats = [(path, os.stat(path).st_size, os.stat(path).st_mtime_ns)
           for path in (files.train, files.validation) if path]
  return sources.fingerprint(stats, f"{kind}\0{chr(0).join(columns)}\n")


def _indexed(rows: Sequence[tuple[str, str]], answer_key: str
             ) -> list[tuple[int, dict[str, str]]]:
  """(key, example) of each row, keyed by its index: the order is kept."""
  return [(index, {"text": text, answer_key: answer})
          for index, (text, answer) in enumerate(rows)]


def load_task_files(paths: str, kind: str, text_column: str,
                    answer_column: str, data_dir: str) -> Source:
  """Prepares (once per distinct files and columns) and opens a local task.

  The files are parsed and checked before preparing, so that a bad file
  fails with a UserError before tfds starts writing.
  """
  files = resolve_task_files(paths)
  answer_key = answer_feature(kind)

  def read_items():
    train = read_task_file(files.train, text_column, answer_column, kind)
    if files.validation:
      validation = read_task_file(files.validation, text_column,
                                  answer_column, kind)
    else:
      train, validation = hold_out(train)
      logging.info("No validation file: held out %d of %d rows of %s",
                   len(validation), len(train) + len(validation), files.train)
    return {"train": _indexed(train, answer_key),
            "validation": _indexed(validation, answer_key)}
  name, splits = sources.prepare_once(
      sources.BigmodelTaskRecords,
      config_name=f"{kind}_{_fingerprint(files, kind, (text_column, answer_column))}",
      description=f"{kind} rows of {files.train}", data_dir=data_dir,
      features=("text", answer_key), read_items=read_items,
      # Keep the files' order, so that evaluation runs over the validation
      # file in order.
      to_examples=lambda item: [item], disable_shuffling=True)
  return Source(name=name, kind=kind, train=splits["train"],
                validation=splits.get("validation"), text_key="text",
                answer_key=answer_key)


# --------------------------------------------------------------------------
# Registered tfds datasets.


def load_tfds_task(name: str, kind: str, text_column: str,
                   answer_column: str, data_dir: str | None) -> Source:
  """Opens an already prepared tfds dataset as a task; never downloads."""
  answer_option = ("data.label_column" if kind == "classify"
                   else "data.target_column")
  features, train, validation = sources.open_tfds(
      name, data_dir, example="glue/sst2",
      columns={"data.text_column": text_column, answer_option: answer_column})
  answer = features[answer_column]
  class_names = (tuple(answer.names)
                 if isinstance(answer, tfds.features.ClassLabel) else None)
  return Source(name=name, kind=kind, train=train, validation=validation,
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


def _count_answers(task: Source,
                   records: Sequence[Mapping[str, Any]] | None
                   ) -> collections.Counter:
  counts = collections.Counter()
  for index in range(len(records) if records is not None else 0):
    counts[task.answer(records[index])] += 1
  return counts


def label_stats(task: Source, declared: str) -> LabelStats:
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
