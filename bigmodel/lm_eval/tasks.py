"""Finding lm-eval tasks, checking them up front, and the offline stdlib task.

``task_manager`` indexes lm-eval's own tasks and those of ``--include_path``
folders (YAML files); ``check_tasks`` refuses, with one ``UserError`` line
before anything runs, an unknown task name or a local data file of an
included task that is missing or lies outside its folder (the rule
``bigmodel.convert`` applies to a model directory's files).

``write_stdlib_task`` writes three offline tasks, built from the running
interpreter's standard library (no download), a 4-choice question per snippet
of ``bigmodel.data.stdlib_tasks``'s ``stdlib_package`` task:

* ``stdlib_package_mc``: "Which standard library package is this code from?"
  (a classification a small LM barely learns from raw code);
* ``stdlib_next_line_mc``: the snippet's last line (of at least 12
  characters) after the lines before it, against the last lines of three
  other snippets: the code LM's own skill, like HellaSwag for prose;
* ``stdlib_word_order_mc``: the same line against its own words in three
  other orders (lines of at least 4 words): all four choices hold the same
  text, so only a model that has learnt how code is written beats chance
  (what a few hundred steps of a tiny model do learn).

The folder gets, for each task NAME (``stdlib_package_mc`` shown)::

    DIR/stdlib_package_mc.yaml           the lm-eval task (dataset_path: json)
    DIR/stdlib_package_mc_test.jsonl     the questions (the snippets' validation split)
    DIR/stdlib_package_mc_train.jsonl    few-shot examples (from the train split)

Rows: ``text`` (the snippet), ``choices`` (four package names: the right one
and three others), ``answer`` (the right one's index), ``path`` (where the
snippet comes from). The choices, their order and the order of the rows
(shuffled, so that ``--limit`` takes every package) are deterministic for a
given Python installation.
"""
from __future__ import annotations

import difflib
import functools
import glob
import json
import os
import sysconfig
from typing import Any, Optional, Sequence

import numpy as np

from bigmodel import cli
from bigmodel.data.stdlib_tasks import stdlib_package_rows
from bigmodel.errors import UserError

STDLIB_TASK = "stdlib_package_mc"
NEXT_LINE_TASK = "stdlib_next_line_mc"
WORD_ORDER_TASK = "stdlib_word_order_mc"
_MIN_LINE_CHARS = 12  # A next line worth predicting (not "    )" or "else:").
QUESTION = "Which standard library package is this code from?"
NUM_CHOICES = 4
# Few-shot examples kept: each question is a 10-30 line snippet, so a few
# shots already fill a small model's context.
_MAX_FEWSHOT_ROWS = 64
_SEED = 0


def _as_list(include_path: Optional[str | Sequence[str]]) -> list[str]:
  if not include_path:
    return []
  paths = include_path.split(",") if isinstance(include_path, str) else list(include_path)
  return [os.path.abspath(p.strip()) for p in paths if p.strip()]


@functools.lru_cache(maxsize=8)
def _manager(include_paths: tuple[str, ...], include_defaults: bool):
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
  return TaskManager(include_path=list(include_paths) or None,
                     include_defaults=include_defaults)


def task_manager(tasks: Sequence[str], include_path: Optional[str | Sequence[str]] = None):
  """An lm-eval ``TaskManager`` that knows ``tasks``, cached per folders.

  Indexing lm-eval's ~15k built-in task files takes seconds: when every task
  is in ``include_path`` only those folders are indexed.

  Raises:
    UserError: a folder of ``include_path`` that does not exist.
  """
  paths = _as_list(include_path)
  for path in paths:
    if not os.path.isdir(path):
      raise UserError(f"--include_path={path}: no such folder (it holds task YAML files)")
  if paths:
    local = _manager(tuple(paths), False)
    if all(task in local.all_tasks for task in tasks):
      return local
  return _manager(tuple(paths), True)


def _inside(path: str, folder: str) -> bool:
  real, root = os.path.realpath(path), os.path.realpath(folder)
  return os.path.commonpath([real, root]) == root


def _data_files(cfg: dict[str, Any]) -> list[str]:
  """The local file names (or glob patterns) an lm-eval task config reads."""
  files = (cfg.get("dataset_kwargs") or {}).get("data_files")
  if isinstance(files, dict):
    files = list(files.values())
  names = []
  for item in files if isinstance(files, list) else [files]:
    names += item if isinstance(item, list) else [item]
  return [n for n in names if isinstance(n, str) and n]


def check_tasks(manager, tasks: Sequence[str],
                include_path: Optional[str | Sequence[str]] = None) -> None:
  """Raises UserError for an unknown task, or an included task's data file
  that is missing or outside its ``include_path`` folder.

  A relative data file name is read from the working directory (that is
  where the ``datasets`` library looks), so ``write_stdlib_task`` writes
  absolute ones.
  """
  if not tasks:
    raise UserError("--tasks is empty; name at least one lm-eval task")
  known = manager.all_tasks
  for task in tasks:
    if task not in known:
      near = difflib.get_close_matches(task, known, n=3, cutoff=0.7)
      hint = f"; did you mean {', '.join(near)}?" if near else ""
      where = f" or in {', '.join(_as_list(include_path))}" if include_path else ""
      raise UserError(f"unknown lm-eval task {task!r}: not one of lm-eval's tasks{where}{hint}")
  for task in tasks:
    entry = manager.task_index[task]
    folder = next((p for p in _as_list(include_path)
                   if entry.yaml_path is not None and _inside(str(entry.yaml_path), p)), None)
    if folder is None or not entry.cfg:
      continue  # lm-eval's own task: its data comes from the Hugging Face hub.
    for pattern in _data_files(entry.cfg):
      matches = glob.glob(pattern) or ([pattern] if os.path.exists(pattern) else [])
      if not matches:
        raise UserError(f"task {task} ({entry.yaml_path}) reads {pattern}, which does not exist")
      outside = [m for m in matches if not _inside(m, folder)]
      if outside:
        raise UserError(f"task {task} ({entry.yaml_path}) reads {outside[0]}, outside its "
                        f"--include_path folder {folder}; keep a task's data files in its folder")


def stdlib_questions(stdlib: Optional[str] = None) -> dict[str, list[dict[str, Any]]]:
  """The ``stdlib_package_mc`` rows: {"test": questions, "train": few-shot examples}."""
  splits = stdlib_package_rows(stdlib or sysconfig.get_paths()["stdlib"])
  packages = sorted({row["label"] for rows in splits.values() for row in rows})
  if len(packages) < NUM_CHOICES:
    raise UserError(f"the standard library here has {len(packages)} of the packages the "
                    f"stdlib task asks about; it needs {NUM_CHOICES}")
  rng = np.random.default_rng(_SEED)
  questions = {}
  for name, split in (("test", "validation"), ("train", "train")):
    rows = []
    for row in splits[split]:
      others = [p for p in packages if p != row["label"]]
      choices = [row["label"]] + [others[i] for i in rng.choice(len(others), NUM_CHOICES - 1,
                                                                replace=False)]
      choices = [choices[i] for i in rng.permutation(NUM_CHOICES)]
      rows.append({"text": row["text"], "choices": choices,
                   "answer": choices.index(row["label"]), "path": row["path"]})
    # The snippets come package by package: shuffled, a --limit sees them all.
    rows = [rows[i] for i in rng.permutation(len(rows))]
    questions[name] = rows[:_MAX_FEWSHOT_ROWS] if name == "train" else rows
  return questions


def _last_lines(rows: Sequence[dict[str, str]]) -> list[tuple[str, str, str]]:
  """(lines before, last line of at least 12 characters, path) per snippet."""
  cut = []
  for row in rows:
    lines = row["text"].rstrip("\n").split("\n")
    last = max((i for i, line in enumerate(lines) if len(line.strip()) >= _MIN_LINE_CHARS
                and i > 0), default=None)
    if last is not None:
      cut.append(("\n".join(lines[:last]) + "\n", lines[last], row["path"]))
  return cut


def _shuffled_words(line: str, rng: np.random.Generator) -> list[str] | None:
  """Three distinct reorderings of the line's words (its indentation kept),
  or None when it has fewer than 4 words (too few distinct orders)."""
  words = line.split()
  if len(words) < 4:
    return None
  indent = line[:len(line) - len(line.lstrip())]
  seen = {" ".join(words)}
  distractors = []
  while len(distractors) < NUM_CHOICES - 1:
    candidate = " ".join(words[i] for i in rng.permutation(len(words)))
    if candidate not in seen:  # 4 words have 23 other orders: this ends.
      seen.add(candidate)
      distractors.append(indent + candidate)
  return distractors


def next_line_questions(stdlib: Optional[str] = None, *, shuffled: bool = False
                        ) -> dict[str, list[dict[str, Any]]]:
  """The ``stdlib_next_line_mc`` rows (``stdlib_word_order_mc`` with
  ``shuffled``): {"test": questions, "train": few-shot examples}.

  ``text`` is a snippet's lines before its last line of at least 12
  characters (ending with a newline), ``choices`` that line and three
  distractors: the same line of three other snippets of the split, or (with
  ``shuffled``, lines of at least 4 words only) the line's own words in three
  other orders. ``answer`` is the true line's index.
  """
  splits = stdlib_package_rows(stdlib or sysconfig.get_paths()["stdlib"])
  rng = np.random.default_rng(_SEED)
  questions = {}
  for name, split in (("test", "validation"), ("train", "train")):
    cut = _last_lines(splits[split])
    endings = sorted({ending for _, ending, _ in cut})
    rows = []
    for context, ending, path in cut:
      if shuffled:
        distractors = _shuffled_words(ending, rng)
        if distractors is None:
          continue
      else:
        others = [e for e in endings if e != ending]
        distractors = [others[i] for i in rng.choice(len(others), NUM_CHOICES - 1,
                                                     replace=False)]
      choices = [ending] + distractors
      choices = [choices[i] for i in rng.permutation(NUM_CHOICES)]
      rows.append({"text": context, "choices": choices, "answer": choices.index(ending),
                   "path": path})
    rows = [rows[i] for i in rng.permutation(len(rows))]
    questions[name] = rows[:_MAX_FEWSHOT_ROWS] if name == "train" else rows
  return questions


def stdlib_task_config(folder: str, task: str = STDLIB_TASK) -> dict[str, Any]:
  """The lm-eval YAML config of an offline task, reading its JSONL files in ``folder``."""
  folder = os.path.abspath(folder)
  if task == STDLIB_TASK:
    prompt = dict(doc_to_text=QUESTION + "\n\n{{text}}\nAnswer:")
  else:  # The next line follows the code directly (its newline ends the context).
    prompt = dict(doc_to_text="{{text}}", target_delimiter="")
  return {
      "task": task,
      "dataset_path": "json",
      "dataset_kwargs": {"data_files": {
          split: os.path.join(folder, f"{task}_{split}.jsonl") for split in ("train", "test")}},
      "output_type": "multiple_choice",
      "training_split": "train",
      "test_split": "test",
      "fewshot_split": "train",
      **prompt,
      "doc_to_choice": "choices",
      "doc_to_target": "answer",
      "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                      {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
      "metadata": {"version": 1.0},
  }


def _write(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` atomically (a temporary file renamed)."""
  tmp = f"{path}.tmp.{os.getpid()}"
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def check_task_folder(folder: str) -> None:
  """Raises UserError unless the task can be written to ``folder`` (an
  existing writable folder, or a new one whose parent exists)."""
  if os.path.isdir(folder):
    if not os.access(folder, os.W_OK | os.X_OK):
      raise UserError(f"--make_stdlib_task={folder}: cannot write there (permission denied)")
  else:
    cli.check_new_folder(folder, "--make_stdlib_task")


def write_stdlib_task(folder: str, stdlib: Optional[str] = None) -> dict[str, Any]:
  """Writes the offline tasks (YAML + JSONL each) into ``folder``.

  Returns ``stdlib_package_mc``'s {"task", "yaml", "test", "train"} (the
  name, the YAML's path, the number of questions and few-shot examples) and
  under "also" the same of ``stdlib_next_line_mc`` and
  ``stdlib_word_order_mc``. Rewriting gives the same
  files; other files in the folder are left alone.
  """
  check_task_folder(folder)
  os.makedirs(folder, exist_ok=True)
  written = []
  for task, make_questions in (
      (STDLIB_TASK, stdlib_questions), (NEXT_LINE_TASK, next_line_questions),
      (WORD_ORDER_TASK, functools.partial(next_line_questions, shuffled=True))):
    questions = make_questions(stdlib)
    config = stdlib_task_config(folder, task)
    for split, rows in questions.items():
      _write(config["dataset_kwargs"]["data_files"][split],
             "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    yaml_path = os.path.join(os.path.abspath(folder), f"{task}.yaml")
    # One key per line, each value in JSON (which YAML reads): the question's
    # newlines stay visible as \n.
    _write(yaml_path, "# Written by python -m bigmodel.lm_eval --make_stdlib_task.\n" + "".join(
        f"{key}: {json.dumps(value)}\n" for key, value in config.items()))
    written.append({"task": task, "yaml": yaml_path, "test": len(questions["test"]),
                    "train": len(questions["train"])})
  return {**written[0], "also": written[1:]}
