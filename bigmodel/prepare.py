"""Prepares a run's data ahead of training: ``python -m bigmodel.prepare``.

Takes the trainer's ``--config`` (and overrides) and ``--workdir`` and does
everything the trainer does before its first step that touches data: prepares
the corpus (or each source of ``data.mixture``) into ArrayRecord, trains and
saves the tokenizer if there is none, and tokenizes the corpus into the token
cache (``data.token_cache``; ``auto`` when unset: ``DATA_DIR/token_cache``),
in ``data.cache_workers`` processes. A training run with the same settings
then starts on token ids at once::

    python -m bigmodel.prepare --config=configs/gpt.py:small --workdir=runs/small
    python -m bigmodel.train --config=configs/gpt.py:small --workdir=runs/small \\
        --config.data.token_cache=auto

Prints what it prepared; bad input is one ``error:`` line, exit 2.
"""
from __future__ import annotations

import os
import time

from absl import app
from absl import flags
from ml_collections import config_flags

from bigmodel import cli
from bigmodel import remote_workdir
from bigmodel import storage
from bigmodel.config import validate
from bigmodel.errors import UserError, fail, user_errors_exit


def define_flags() -> None:
  config_flags.DEFINE_config_file(
      "config", None, "Config file and preset, e.g. configs/gpt.py:tiny.", lock_config=False)
  flags.DEFINE_string("workdir", None, "The run's directory (its tokenizer and data go there).")


def prepare(config, workdir: str) -> dict[str, object]:
  """Prepares the data of ``config`` for a run in ``workdir``.

  Returns:
    What was prepared: the task, the token cache root, the train and
    validation documents, the seconds it took.
  """
  from bigmodel.data import build_datasets  # pylint: disable=g-import-not-at-top
  from bigmodel.data import token_cache  # pylint: disable=g-import-not-at-top
  if config.data.source == "synthetic":
    raise UserError("data.source='synthetic' has nothing to prepare")
  if not config.data.token_cache:
    config.data.token_cache = "auto"
  validate(config)
  start = time.perf_counter()
  remote, lock = None, None
  if storage.is_url(workdir):  # Prepared in its mirror; the tokenizer goes up.
    remote, lock, _ = remote_workdir.open_for_training(workdir)
    workdir = remote.local
  try:
    os.makedirs(workdir, exist_ok=True)
    datasets = build_datasets(config, workdir)
    datasets.train_iter.close()
    if remote:
      remote.flush()
  finally:
    if lock:
      lock.release()
  return {"task": config.data.task,
          "token_cache": token_cache.cache_root(config.data, workdir),
          "seconds": time.perf_counter() - start}


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.require_flags("config", "workdir")
  with user_errors_exit():
    done = prepare(flags.FLAGS.config, flags.FLAGS.workdir)
  print(f"prepared data.task={done['task']} in {done['seconds']:.1f} s;"
        f" token cache in {done['token_cache']}", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
