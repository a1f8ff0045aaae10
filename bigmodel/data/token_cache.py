"""A tokenized cache: a corpus' documents as token ids, tokenized once.

With ``data.token_cache`` set (``auto`` = ``DATA_DIR/token_cache``, or a
folder), the text tasks (lm, mlm, span_corruption) read token ids instead of
text: each split of the corpus is tokenized once, in parallel worker
processes, into ArrayRecord shards of int32 ids (one record per document,
without BOS/EOS, which the task adds as it does to text), in::

    ROOT/<corpus fingerprint>-<tokenizer fingerprint>/
        cache.json                           what it holds (below)
        train-00000-of-00004.array_record    ...
        validation-00000-of-00001.array_record

The folder's name changes with the corpus (its prepared-dataset name, itself
a fingerprint of the files) and with the tokenizer (a hash of its
serialized form), so later runs, other hosts and ``python -m
bigmodel.prepare`` reuse it, and a changed tokenizer never reads stale ids.
``data.token_cache`` may also name one such folder directly; one made with
another tokenizer or corpus is then refused.

On several hosts each tokenizes the shards ``i::n`` and then waits for the
others' (every shard file appears by an atomic rename); process 0 writes
``cache.json`` last. A folder without ``cache.json`` is unfinished: shards
already there are kept and the missing ones made.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import pickle
import sys
import time
from collections.abc import Sequence
from typing import Any

from absl import logging
import numpy as np

from bigmodel.data.sources import Source, record_text
from bigmodel.data.tokenizer import Tokenizer
from bigmodel.errors import UserError

FORMAT_VERSION = 1
# Documents per shard: small corpora get several shards (work for several
# processes), large ones at most about 64 + n / 65536 (not millions of files).
# A function of the corpus only, so that any machine finds the same shards.
DOCUMENTS_PER_SHARD = 256
_MANY_DOCUMENTS_PER_SHARD = 65536
_MIN_SHARDS_OF_LARGE_CORPORA = 64
_INFO = "cache.json"
# How long a host waits for the other hosts' shards.
_WAIT_SECONDS = 3600.0


def cache_root(data_config, workdir: str) -> str:
  """The folder ``data.token_cache`` names (``auto``: ``DATA_DIR/token_cache``)."""
  if data_config.token_cache != "auto":
    return data_config.token_cache
  return os.path.join(data_config.data_dir or os.path.join(workdir, "data"), "token_cache")


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
  """A short hash of the tokenizer's serialized form (its model / files)."""
  return hashlib.sha256(pickle.dumps(tokenizer)).hexdigest()[:16]


def num_shards(num_documents: int) -> int:
  """Shards of a split of ``num_documents`` documents."""
  return max(1, min(math.ceil(num_documents / DOCUMENTS_PER_SHARD),
                    max(_MIN_SHARDS_OF_LARGE_CORPORA,
                        math.ceil(num_documents / _MANY_DOCUMENTS_PER_SHARD))))


def _shard_name(split: str, index: int, count: int) -> str:
  return f"{split}-{index:05d}-of-{count:05d}.array_record"


def _write_shard(records: Sequence[Any], text_key: str, tokenizer: Tokenizer,
                 start: int, stop: int, path: str) -> tuple[int, int, int]:
  """Tokenizes ``records[start:stop]`` into ``path`` (atomically).

  Returns:
    (documents, tokens, characters) written.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  tmp = f"{path}.tmp.{os.getpid()}"
  tokens = characters = 0
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
  try:
    for index in range(start, stop):
      text = record_text(records[index], text_key)
      ids = np.asarray(tokenizer.encode(text), np.int32)
      writer.write(ids.tobytes())
      tokens += len(ids)
      characters += len(text)
  finally:
    writer.close()
  os.replace(tmp, path)
  return stop - start, tokens, characters


@dataclasses.dataclass
class _Progress:
  """One stderr line of progress (redrawn on a terminal)."""
  name: str
  total: int
  done: int = 0
  start: float = dataclasses.field(default_factory=time.perf_counter)

  def step(self) -> None:
    self.done += 1
    line = (f"tokenizing {self.name}: {self.done}/{self.total} shards,"
            f" {time.perf_counter() - self.start:.0f}s")
    if sys.stderr.isatty():
      print("\r\033[K" + line, end="\n" if self.done == self.total else "",
            file=sys.stderr, flush=True)
    elif self.done == self.total or self.done % max(1, self.total // 10) == 0:
      print(line, file=sys.stderr, flush=True)


def _tokenize_split(records: Sequence[Any], text_key: str, tokenizer: Tokenizer,
                    folder: str, split: str, workers: int, process_index: int,
                    process_count: int, progress: _Progress) -> None:
  """Writes this host's missing shards of one split, ``workers`` at a time."""
  count = num_shards(len(records))
  jobs = []
  for index in range(process_index, count, process_count):
    path = os.path.join(folder, _shard_name(split, index, count))
    if not os.path.exists(path):
      start = index * len(records) // count
      stop = (index + 1) * len(records) // count
      jobs.append((records, text_key, tokenizer, start, stop, path))
    else:
      progress.step()
  if not jobs:
    return
  if workers <= 1 or len(jobs) == 1:
    for job in jobs:
      _write_shard(*job)
      progress.step()
    return
  # spawn: the trainer has JAX's threads running, which fork would copy.
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)),
                                              mp_context=context) as pool:
    for future in concurrent.futures.as_completed(
        [pool.submit(_write_shard, *job) for job in jobs]):
      future.result()
      progress.step()


def _shard_files(folder: str, split: str, num_documents: int) -> list[str]:
  count = num_shards(num_documents)
  return [os.path.join(folder, _shard_name(split, i, count)) for i in range(count)]


def _check_info(folder: str, expected: dict[str, Any]) -> dict[str, Any] | None:
  """The folder's ``cache.json`` if it matches ``expected``; None if absent.

  Raises:
    UserError: a cache of another corpus or tokenizer.
  """
  path = os.path.join(folder, _INFO)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      info = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: not a readable token cache description ({e})") from e
  for key in ("format", "corpus", "tokenizer"):
    if info.get(key) != expected[key]:
      raise UserError(
          f"data.token_cache={folder} was made with another {key} ({info.get(key)!r}, this"
          f" run's is {expected[key]!r}); point data.token_cache at its parent folder (or"
          " 'auto') to keep one cache per corpus and tokenizer")
  return info


def cached_source(source: Source, tokenizer: Tokenizer, root: str, *, workers: int = 0,
                  process_index: int = 0, process_count: int = 1) -> Source:
  """``source`` as token-id records, tokenizing what the cache lacks.

  Args:
    source: A prepared text corpus (random-access records).
    tokenizer: The run's tokenizer.
    root: ``data.token_cache``: a folder of caches, or one cache's folder.
    workers: Tokenizing processes (0: one per CPU core).
    process_index, process_count: This host and the number of hosts.

  Returns:
    A Source whose records are the documents' int32 ids as bytes (what
    :func:`bigmodel.data.transforms.document_tokens` reads).
  """
  expected = {"format": FORMAT_VERSION, "corpus": source.name,
              "tokenizer": tokenizer_fingerprint(tokenizer)}
  if os.path.exists(os.path.join(root, _INFO)):
    folder = root
  else:
    digest = hashlib.sha256(source.name.encode()).hexdigest()[:16]
    folder = os.path.join(root, f"{digest}-{expected['tokenizer']}")
  info = _check_info(folder, expected)
  splits = {"train": source.train}
  if source.validation is not None:
    splits["validation"] = source.validation
  if info is None:
    os.makedirs(folder, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    total = sum(num_shards(len(r)) for r in splits.values())
    progress = _Progress(source.name, math.ceil(total / process_count))
    start = time.perf_counter()
    for split, records in splits.items():
      _tokenize_split(records, source.text_key, tokenizer, folder, split, workers,
                      process_index, process_count, progress)
    _wait_for_shards(folder, splits)
    if process_index == 0:
      info = {**expected, "documents": {s: len(r) for s, r in splits.items()}}
      tmp = os.path.join(folder, f"{_INFO}.tmp.{os.getpid()}")
      with open(tmp, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
      os.replace(tmp, os.path.join(folder, _INFO))
    logging.info("Tokenized %s into %s in %.1f s", source.name, folder,
                 time.perf_counter() - start)
  else:
    logging.info("Reusing the token cache %s", folder)
  from grain import sources as grain_sources  # pylint: disable=g-import-not-at-top
  opened = {split: grain_sources.ArrayRecordDataSource(_shard_files(folder, split, len(records)))
            for split, records in splits.items()}
  for split, records in splits.items():
    if len(opened[split]) != len(records):
      raise UserError(f"the token cache {folder} holds {len(opened[split])} {split} documents,"
                      f" the corpus {len(records)}: delete the folder to tokenize again")
  return Source(name=f"{source.name} (token ids)", train=opened["train"],
                validation=opened.get("validation"), text_key=source.text_key)


def _wait_for_shards(folder: str, splits: dict[str, Sequence[Any]]) -> None:
  """Returns when every shard of every split exists (other hosts' too)."""
  paths = [p for split, records in splits.items()
           for p in _shard_files(folder, split, len(records))]
  deadline = time.monotonic() + _WAIT_SECONDS
  while not all(os.path.exists(p) for p in paths):
    if time.monotonic() > deadline:
      missing = [p for p in paths if not os.path.exists(p)]
      raise UserError(f"waited {_WAIT_SECONDS:.0f} s for other hosts' token cache shards,"
                      f" {len(missing)} still missing (e.g. {missing[0]})")
    time.sleep(1.0)
