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
another tokenizer or corpus is then refused. It may be a URL (``gs://``,
``s3://``, any fsspec store): the shards are made locally, uploaded, and
copied down by every later run and host (``$BIGMODEL_CACHE/token_caches``);
``cache.json`` goes up last.

On several hosts each tokenizes the shards ``i::n`` and then waits for the
others' (every shard file appears by an atomic rename); process 0 writes
``cache.json`` last. A folder without ``cache.json`` is unfinished: shards
already there are kept and the missing ones made.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
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

from bigmodel import storage
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


def _read_info(folder: str) -> str | None:
  """The local folder's ``cache.json`` text; None if absent."""
  path = os.path.join(folder, _INFO)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except OSError as e:
    raise UserError(f"{path}: not a readable token cache description ({e})") from e


def _check_info(text: str | None, expected: dict[str, Any], folder: str) -> dict[str, Any] | None:
  """The description ``text`` of the cache in ``folder`` if it matches
  ``expected``; None if there is none.

  Raises:
    UserError: a cache of another corpus or tokenizer.
  """
  if text is None:
    return None
  try:
    info = json.loads(text)
  except ValueError as e:
    raise UserError(f"{folder}/{_INFO}: not a readable token cache description ({e})") from e
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
  splits = {"train": source.train}
  if source.validation is not None:
    splits["validation"] = source.validation
  fill = functools.partial(_fill, name=source.name, splits=splits, text_key=source.text_key,
                           tokenizer=tokenizer, workers=workers or os.cpu_count() or 1,
                           process_index=process_index, process_count=process_count)
  digest = hashlib.sha256(source.name.encode()).hexdigest()[:16]
  name = f"{digest}-{expected['tokenizer']}"
  if storage.is_url(root):
    folder = _remote_cache(root, name, expected, splits, fill, process_index, process_count)
  else:
    folder = root if os.path.exists(os.path.join(root, _INFO)) else os.path.join(root, name)
    if _check_info(_read_info(folder), expected, folder) is None:
      start = time.perf_counter()
      fill(folder)
      _wait_for(lambda path: os.path.exists(os.path.join(folder, path)), splits)
      if process_index == 0:
        tmp = os.path.join(folder, f"{_INFO}.tmp.{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
          f.write(_info_text(expected, splits))
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


def _info_text(expected: dict[str, Any], splits: dict[str, Sequence[Any]]) -> str:
  return json.dumps({**expected, "documents": {s: len(r) for s, r in splits.items()}}, indent=1)


def _names(splits: dict[str, Sequence[Any]], process_index: int = 0,
           process_count: int = 1) -> list[str]:
  """The shard file names of every split (``process_index::process_count`` of each)."""
  return [os.path.basename(path) for split, records in splits.items()
          for path in _shard_files("", split, len(records))[process_index::process_count]]


def _fill(folder: str, *, name: str, splits: dict[str, Sequence[Any]], text_key: str,
          tokenizer: Tokenizer, workers: int, process_index: int, process_count: int) -> None:
  """Tokenizes this host's shards that ``folder`` lacks."""
  os.makedirs(folder, exist_ok=True)
  total = sum(num_shards(len(r)) for r in splits.values())
  progress = _Progress(name, math.ceil(total / process_count))
  for split, records in splits.items():
    _tokenize_split(records, text_key, tokenizer, folder, split, workers, process_index,
                    process_count, progress)


def _remote_cache(root: str, name: str, expected: dict[str, Any],
                  splits: dict[str, Sequence[Any]], fill, process_index: int,
                  process_count: int) -> str:
  """The token cache under the URL ``root``, copied into a local folder.

  Shards are made locally (this host's share), uploaded, and the others'
  copied down once they are all up; ``cache.json`` goes up last, from
  process 0, so a cache without it is unfinished (its shards are reused).
  Returns the local folder.
  """
  fs, key = storage.filesystem(root)
  if not storage.request(root, fs.exists, f"{key.rstrip('/')}/{_INFO}"):
    key = f"{key.rstrip('/')}/{name}"
  url = f"{root.split('://', 1)[0]}://{key}"
  request = lambda what, fn, *args: storage.request(f"{url}/{what}", fn, *args)  # noqa: E731
  info_text = (request(_INFO, fs.cat_file, f"{key}/{_INFO}").decode()
               if request(_INFO, fs.exists, f"{key}/{_INFO}") else None)
  local = storage.local_copy_dir("token_caches", url)
  os.makedirs(local, exist_ok=True)
  present = lambda path: os.path.exists(os.path.join(local, path))  # noqa: E731

  if _check_info(info_text, expected, url) is None:
    start = time.perf_counter()
    mine = _names(splits, process_index, process_count)
    missing = [n for n in mine if not request(n, fs.exists, f"{key}/{n}")]
    for shard in missing:
      if not present(shard):
        fill(local)
        break
    for shard in missing:
      request(shard, fs.put_file, os.path.join(local, shard), f"{key}/{shard}")
    _wait_for(lambda path: request(path, fs.exists, f"{key}/{path}"), splits)
    if process_index == 0:
      request(_INFO, fs.pipe_file, f"{key}/{_INFO}", _info_text(expected, splits).encode())
    logging.info("Tokenized %s into %s in %.1f s", expected["corpus"], url,
                 time.perf_counter() - start)
  else:
    logging.info("Reusing the token cache %s", url)
  for shard in _names(splits):
    if not present(shard):
      target = os.path.join(local, shard)
      request(shard, fs.get_file, f"{key}/{shard}", f"{target}.tmp.{os.getpid()}")
      os.replace(f"{target}.tmp.{os.getpid()}", target)
  return local


def _wait_for(exists, splits: dict[str, Sequence[Any]]) -> None:
  """Returns when ``exists(name)`` for every shard of every split (other hosts' too)."""
  names = _names(splits)
  deadline = time.monotonic() + _WAIT_SECONDS
  while not all(exists(n) for n in names):
    if time.monotonic() > deadline:
      missing = [n for n in names if not exists(n)]
      raise UserError(f"waited {_WAIT_SECONDS:.0f} s for other hosts' token cache shards,"
                      f" {len(missing)} still missing (e.g. {missing[0]})")
    time.sleep(1.0)
