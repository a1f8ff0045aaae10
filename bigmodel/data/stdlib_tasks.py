"""Default fine-tuning tasks built from the Python standard library.

With ``data.paths=""`` a classify or seq2seq run needs no download: its task
is generated from the running interpreter's standard library, written once as
JSONL under ``<data_dir>/tasks/<name>/{train,validation}.jsonl`` (columns
``text``, ``label`` / ``target``, and ``path`` for reference) and then read
through the local-file path of :mod:`bigmodel.data.records` like any user
file.

* ``stdlib_package`` (classify): which top-level package a snippet of 10-30
  consecutive lines comes from, among up to 8 large packages present
  (asyncio, email, unittest, xml, multiprocessing, importlib, tkinter,
  idlelib, then lib2to3, distutils if some are missing). Their test
  subpackages are left out. Files go to train or validation by a hash of
  their path (about 15% validation, at least one file per package each), so
  snippets of one file never straddle the splits; at most 500 train and 100
  validation snippets per class, sampled with a fixed seed, keep the classes
  balanced.
* ``docstring`` (seq2seq): a function's docstring summary from its code:
  input = the function's source (decorators included, dedented) with the
  docstring removed, target = the docstring's first line. Functions of every
  stdlib module outside test packages with a summary of at least 8
  characters and a body beyond the docstring; split by file as above
  (about 10% validation).

* ``docstring_chat`` (chat): the ``docstring`` rows as conversations, the
  user asking what the function (its source, docstring removed) does, the
  assistant answering with the docstring's summary (column ``messages``).

* ``docstring_preference`` (preference): the same question as a chat prompt
  (column ``prompt``), ``chosen`` = the function's own summary, ``rejected``
  = the summary of the function half the split further on (rows are in file
  order: a function of another module, with another summary).

All are deterministic for a given Python installation.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import sysconfig
import time
from collections.abc import Iterator

from absl import logging
import numpy as np

DEFAULT_TASKS = {"classify": "stdlib_package", "seq2seq": "docstring",
                 "chat": "docstring_chat", "preference": "docstring_preference"}
# The column holding each default task's input: text, or a chat's messages.
DEFAULT_TEXT_COLUMNS = {"classify": "text", "seq2seq": "text", "chat": "messages",
                        "preference": "prompt"}
_CHAT_QUESTION = "What does this Python function do?\n\n"

_PACKAGES = ("asyncio", "email", "unittest", "xml", "multiprocessing",
             "importlib", "tkinter", "idlelib", "lib2to3", "distutils")
_MAX_PACKAGES = 8
_MIN_PACKAGE_FILES = 6
_SNIPPET_LINES = (10, 30)  # Inclusive range of lines per snippet.
_MIN_SNIPPET_CODE_LINES = 5  # Non-blank lines; emptier windows are skipped.
_MAX_TRAIN_SNIPPETS = 500
_MAX_VALIDATION_SNIPPETS = 100
_SNIPPET_VALIDATION_PERCENT = 15
_DOCSTRING_VALIDATION_PERCENT = 10
_MIN_SUMMARY_CHARS = 8
_MAX_FUNCTION_CHARS = 4000  # Longer functions would be mostly truncated.
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__",
                           "test", "tests", "idle_test"})
_SEED = 0


def _python_files(root: str) -> list[str]:
  """Sorted relative paths of the .py files under root, tests left out."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames
                         if d not in _SKIPPED_DIRS and not d.startswith("."))
    found.extend(os.path.relpath(os.path.join(dirpath, name), root)
                 for name in filenames if name.endswith(".py"))
  return sorted(found)


def _path_hash(relpath: str) -> int:
  return int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:4], "big")


def _split_by_file(relpaths: list[str], percent: int
                   ) -> tuple[list[str], list[str]]:
  """(train, validation) files by path hash; each non-empty with >= 2 files."""
  hashes = {p: _path_hash(p) for p in relpaths}
  validation = [p for p in relpaths if hashes[p] % 100 < percent]
  train = [p for p in relpaths if hashes[p] % 100 >= percent]
  if len(relpaths) >= 2 and not validation:
    validation.append(min(train, key=hashes.__getitem__))
    train.remove(validation[-1])
  elif len(relpaths) >= 2 and not train:
    train.append(max(validation, key=hashes.__getitem__))
    validation.remove(train[-1])
  return train, validation


def _read(path: str) -> str | None:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except (OSError, UnicodeDecodeError):
    return None


def _snippets(text: str, rng: np.random.Generator) -> Iterator[str]:
  """Consecutive windows of 10-30 lines covering the file, none overlapping."""
  lines = text.splitlines(keepends=True)
  start = 0
  while start < len(lines):
    length = int(rng.integers(_SNIPPET_LINES[0], _SNIPPET_LINES[1] + 1))
    window = lines[start:start + length]
    start += length
    if sum(bool(line.strip()) for line in window) >= _MIN_SNIPPET_CODE_LINES:
      yield "".join(window)


def stdlib_package_rows(stdlib: str) -> dict[str, list[dict[str, str]]]:
  """The ``stdlib_package`` task: {"train": rows, "validation": rows}."""
  rng = np.random.default_rng(_SEED)
  splits = {"train": [], "validation": []}
  packages = []
  for package in _PACKAGES:
    files = _python_files(os.path.join(stdlib, package))
    if len(files) < _MIN_PACKAGE_FILES:
      continue
    packages.append(package)
    for split, split_files, cap in zip(
        ("train", "validation"),
        _split_by_file(files, _SNIPPET_VALIDATION_PERCENT),
        (_MAX_TRAIN_SNIPPETS, _MAX_VALIDATION_SNIPPETS)):
      rows = []
      for relpath in split_files:
        text = _read(os.path.join(stdlib, package, relpath))
        rows.extend({"text": snippet, "label": package,
                     "path": f"{package}/{relpath}"}
                    for snippet in _snippets(text or "", rng))
      if len(rows) > cap:
        keep = np.sort(rng.choice(len(rows), cap, replace=False))
        rows = [rows[i] for i in keep]
      splits[split].extend(rows)
    if len(packages) == _MAX_PACKAGES:
      break
  return splits


def _dedent(lines: list[str], indent: int) -> str:
  """Lines without the def's indentation; lines indented less (inside a
  multi-line string) are kept as they are, unlike ``textwrap.dedent``, which
  would then remove nothing."""
  return "".join(line[indent:] if line[:indent].isspace() else line
                 for line in lines)


def _functions(node: ast.AST) -> Iterator[ast.FunctionDef]:
  """Function definitions under ``node``, nested ones included, in source
  order; descends through statements only (``ast.walk`` would also visit
  every expression, several times slower)."""
  for child in ast.iter_child_nodes(node):
    if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
      yield child
    if isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
      yield from _functions(child)


def _function_examples(text: str, relpath: str) -> Iterator[dict[str, str]]:
  """(source without docstring, docstring summary) of the file's functions."""
  try:
    tree = ast.parse(text)
  except (SyntaxError, ValueError):
    return
  lines = text.splitlines(keepends=True)
  for node in _functions(tree):
    docstring = ast.get_docstring(node)
    if not docstring or len(node.body) < 2:
      continue  # No docstring, or nothing but the docstring to read.
    summary = docstring.strip().splitlines()[0].strip()
    docstring_node = node.body[0]
    if (len(summary) < _MIN_SUMMARY_CHARS
        or docstring_node.lineno == node.lineno  # def f(): """On one line."""
        or docstring_node.end_lineno >= node.body[1].lineno):
      continue
    start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
    source = _dedent(lines[start:docstring_node.lineno - 1]
                     + lines[docstring_node.end_lineno:node.end_lineno],
                     node.col_offset)
    if len(source) <= _MAX_FUNCTION_CHARS:
      yield {"text": source, "target": summary, "path": relpath}


def docstring_rows(stdlib: str) -> dict[str, list[dict[str, str]]]:
  """The ``docstring`` task: {"train": rows, "validation": rows}."""
  train_files, validation_files = _split_by_file(
      _python_files(stdlib), _DOCSTRING_VALIDATION_PERCENT)
  splits = {}
  for split, files in (("train", train_files),
                       ("validation", validation_files)):
    splits[split] = [row for relpath in files
                     for row in _function_examples(
                         _read(os.path.join(stdlib, relpath)) or "", relpath)]
  return splits


def docstring_chat_rows(stdlib: str) -> dict[str, list[dict[str, object]]]:
  """The ``docstring_chat`` task: {"train": rows, "validation": rows}."""
  return {split: [{"messages": [
      {"role": "user", "content": _CHAT_QUESTION + row["text"]},
      {"role": "assistant", "content": row["target"]}], "path": row["path"]}
                  for row in rows]
          for split, rows in docstring_rows(stdlib).items()}


def docstring_preference_rows(stdlib: str) -> dict[str, list[dict[str, object]]]:
  """The ``docstring_preference`` task: {"train": rows, "validation": rows}."""
  splits = {}
  for split, rows in docstring_rows(stdlib).items():
    splits[split] = []
    for i, row in enumerate(rows):
      # Another module's function: the pair asks which summary fits this
      # code, not which of two neighbours' near-identical summaries does.
      others = (rows[(i + len(rows) // 2 + k) % len(rows)] for k in range(len(rows)))
      rejected = next((r["target"] for r in others
                       if r["target"] != row["target"] and r["path"] != row["path"]), None)
      if rejected is not None:
        splits[split].append({
            "prompt": [{"role": "user", "content": _CHAT_QUESTION + row["text"]}],
            "chosen": row["target"], "rejected": rejected, "path": row["path"]})
  return splits


_ROWS = {"classify": stdlib_package_rows, "seq2seq": docstring_rows,
         "chat": docstring_chat_rows, "preference": docstring_preference_rows}


def ensure_default_task(kind: str, data_dir: str) -> str:
  """Writes the default task of ``kind`` once; returns its directory.

  Hosts sharing ``data_dir`` may race: each writes a private directory and
  renames it into place; the loser's identical copy is dropped.
  """
  name = DEFAULT_TASKS[kind]
  task_dir = os.path.join(data_dir, "tasks", name)
  if os.path.isfile(os.path.join(task_dir, "train.jsonl")):
    return task_dir
  start = time.perf_counter()
  stdlib = sysconfig.get_paths()["stdlib"]
  splits = _ROWS[kind](stdlib)
  partial_dir = f"{task_dir}.partial.{os.getpid()}"
  os.makedirs(partial_dir, exist_ok=True)
  for split, rows in splits.items():
    with open(os.path.join(partial_dir, f"{split}.jsonl"), "w",
              encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
  try:
    os.rename(partial_dir, task_dir)
  except OSError:
    if not os.path.isfile(os.path.join(task_dir, "train.jsonl")):
      raise
    shutil.rmtree(partial_dir, ignore_errors=True)
  logging.info("Wrote default %s task %r (%d train, %d validation rows from"
               " %s) to %s in %.1f s", kind, name, len(splits["train"]),
               len(splits["validation"]), stdlib, task_dir,
               time.perf_counter() - start)
  return task_dir
