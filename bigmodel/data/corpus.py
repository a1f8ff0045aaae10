"""Text corpora: local text files or a tfds text dataset, as a Source.

* ``data.source="files"``: local text files, one example per file (features
  ``text`` and ``path``), and record shards (JSON lines, plain or ``.gz`` /
  ``.zst``, Parquet, ArrayRecord: :mod:`bigmodel.data.shards`), one example
  per record (its ``data.text_key``; ``path`` is ``FILE:INDEX``), prepared once per distinct file set
  (:func:`bigmodel.data.sources.prepare_once`) under ``data.data_dir``
  (``WORKDIR/data`` when empty). ``data.paths`` is a directory (files matching
  ``data.file_pattern``, searched recursively, hidden directories and
  ``__pycache__`` skipped), a single file or a glob (``**`` allowed). ``""``
  means the Python standard library of the running interpreter
  (``sysconfig.get_paths()["stdlib"]``) without
  ``site-packages``/``dist-packages``. The stdlib's own ``test`` packages are
  kept: they are real, idiomatic Python and about a third of the text.
* ``data.source="tfds"``: any tfds dataset already prepared in ArrayRecord
  format under ``data.data_dir`` (tfds's default data dir when empty, since
  that is where ``tfds build`` puts it); nothing is ever downloaded.

Files are read as UTF-8 with ``errors="replace"``: a file with a few bytes of
another encoding (the stdlib tests have some) stays in the corpus with those
bytes replaced by U+FFFD; a file that cannot be read at all is skipped with a
warning.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import glob
import hashlib
import os
import posixpath
import sys
import sysconfig
from collections.abc import Iterator, Sequence

from absl import logging
import ml_collections

from bigmodel import storage
from bigmodel.data import remote
from bigmodel.data import shards
from bigmodel.data import sources
from bigmodel.data.sources import Source
from bigmodel.errors import UserError

# Where callers opened tfds datasets before sources.py held it.
open_prepared_tfds = sources.open_prepared_tfds

# Bytes read from each corpus file to tell text from binary.
_BINARY_SNIFF_BYTES = 8192

# Share of the files that go to the validation split, in 1/10000.
_VALIDATION_PER_10000 = 200
# Directory names never searched for corpus files.
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclasses.dataclass(frozen=True)
class CorpusFile:
  """One file of a local corpus.

  Attributes:
    path: Absolute path.
    relpath: Path relative to the corpus root; decides the split and is what
      the ``path`` feature stores.
    size: Size in bytes.
    mtime_ns: Modification time, part of the corpus fingerprint.
  """
  path: str
  relpath: str
  size: int
  mtime_ns: int


def _walk(root: str, file_pattern: str) -> list[str]:
  """Files under ``root`` whose name matches ``file_pattern``, recursively."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    # Pruning in place stops os.walk from descending into these.
    dirnames[:] = sorted(d for d in dirnames
                         if d not in _SKIPPED_DIRS and not d.startswith("."))
    found.extend(os.path.join(dirpath, name) for name in filenames
                 if fnmatch.fnmatch(name, file_pattern))
  return found


def _local_names(paths: str, file_pattern: str) -> tuple[str, list[str]]:
  """(root, file names) of a local ``data.paths`` (see :func:`resolve_files`)."""
  if not paths:
    root = sysconfig.get_paths()["stdlib"]
    return root, _walk(root, file_pattern)
  if os.path.isdir(paths):
    return os.path.abspath(paths), _walk(paths, file_pattern)
  if os.path.isfile(paths):
    return os.path.abspath(os.path.dirname(paths) or "."), [paths]
  names = [p for p in glob.glob(paths, recursive=True) if os.path.isfile(p)]
  if not names:
    raise UserError(
        f"data.paths={paths!r} is not a file or directory and matches no file"
        " as a glob; give a directory, a file, a glob, or '' for the Python"
        " standard library")
  return os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in names]), names


def resolve_files(paths: str, file_pattern: str) -> list[CorpusFile]:
  """Lists the files of a corpus, sorted by relative path.

  Args:
    paths: A directory, a file, a glob, ``""`` for the Python stdlib, or a
      URL of any of the first three in an object store
      (:mod:`bigmodel.data.remote`).
    file_pattern: Pattern of file names picked up from directories.

  Returns:
    The corpus files, in a deterministic order.

  Raises:
    UserError: if ``paths`` names nothing, or nothing readable matches.
  """
  if storage.is_url(paths):
    root, listed = remote.list_files(paths, file_pattern)
    candidates = [(url, posixpath.relpath(url.split("://", 1)[1], root.split("://", 1)[1]),
                   size, version) for url, size, version in listed]
  else:
    root, names = _local_names(paths, file_pattern)
    candidates = []
    for name in names:
      path = os.path.abspath(name)
      try:
        stat = os.stat(path)
      except OSError as e:
        logging.warning("Skipping unreadable corpus file %s: %s", path, e)
        continue
      candidates.append((path, os.path.relpath(path, root), stat.st_size, stat.st_mtime_ns))
  files = []
  for path, relpath, size, version in candidates:
    if not shards.shard_format(path):
      try:
        with storage.open_binary(path) as f:
          head = f.read(_BINARY_SNIFF_BYTES)
      except OSError as e:
        logging.warning("Skipping unreadable corpus file %s: %s", path, e)
        continue
      if b"\0" in head:  # git's test for a binary file.
        print(f"warning: skipping {path}: a binary file (NUL bytes), not text",
              file=sys.stderr, flush=True)
        continue
    files.append(CorpusFile(path=path, relpath=relpath, size=size, mtime_ns=version))
  files.sort(key=lambda f: f.relpath)
  where = f"data.paths={paths!r}" if paths else "the Python standard library"
  if not files:
    raise UserError(f"no text file matching data.file_pattern={file_pattern!r} in"
                    f" {where}; set data.paths or data.file_pattern")
  if not any(f.size for f in files):
    raise UserError(f"the corpus in {where} is empty: all {len(files)} files"
                    " have 0 bytes")
  return files


def fingerprint(files: Sequence[CorpusFile], header: str = "") -> str:
  """A short hash of the file set (paths, sizes, modification times) and a
  header of settings: names the prepared corpus on disk."""
  return sources.fingerprint(((f.path, f.size, f.mtime_ns) for f in files), header)


def _split_hash(relpath: str) -> int:
  return int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:4], "big")


def assign_splits(files: Sequence[CorpusFile]
                  ) -> tuple[list[CorpusFile], list[CorpusFile]]:
  """Splits files into (train, validation) by a hash of the relative path.

  About 2% go to validation. A file keeps its split when others are added or
  removed. With two or more files each split gets at least one: the file with
  the smallest hash moves to validation, or the largest to train.
  """
  train, validation = [], []
  for f in files:
    is_validation = _split_hash(f.relpath) % 10000 < _VALIDATION_PER_10000
    (validation if is_validation else train).append(f)
  if len(files) >= 2 and not validation:
    moved = min(train, key=lambda f: _split_hash(f.relpath))
    train.remove(moved)
    validation.append(moved)
  elif len(files) >= 2 and not train:
    moved = max(validation, key=lambda f: _split_hash(f.relpath))
    validation.remove(moved)
    train.append(moved)
  return train, validation


def _read_file(f: CorpusFile) -> Iterator[tuple[str, dict[str, str]]]:
  """The (key, example) of one plain corpus file; none if unreadable."""
  try:
    with storage.open_binary(f.path) as stream:
      text = stream.read().decode("utf-8", errors="replace")
  except OSError as e:
    logging.warning("Skipping unreadable corpus file %s: %s", f.path, e)
    return
  yield f.relpath, {"text": text, "path": f.relpath}


@dataclasses.dataclass(frozen=True)
class _ShardSplit:
  """The records of one shard that belong to one split."""
  shard: CorpusFile
  split: str
  text_key: str
  max_bad_fraction: float
  is_first: bool  # The first shard in path order.

  def examples(self) -> Iterator[tuple[str, dict[str, str]]]:
    """(``relpath:index``, example) of the shard's records in this split: a
    record is in validation by a hash of its key (about 2%), so a corpus of
    one shard has both splits and adding shards moves no record; the first
    good record of the first shard always is, so that a small corpus has a
    validation split too."""
    first = True
    for index, text in shards.read_texts(self.shard.path, self.text_key,
                                         self.max_bad_fraction):
      key = f"{self.shard.relpath}:{index}"
      is_validation = (_split_hash(key) % 10000 < _VALIDATION_PER_10000
                       or (self.is_first and first))
      first = False
      if is_validation == (self.split == "validation"):
        yield key, {"text": text, "path": key}


def _examples(item: CorpusFile | _ShardSplit) -> Iterator[tuple[str, dict[str, str]]]:
  return item.examples() if isinstance(item, _ShardSplit) else _read_file(item)


def load_text_files(paths: str, file_pattern: str, data_dir: str, *,
                    text_key: str = "text", max_bad_fraction: float = 0.01) -> Source:
  """Prepares (once per distinct file set) and opens a local file corpus.

  Record shards (:mod:`bigmodel.data.shards`: JSON lines, Parquet,
  ArrayRecord) give one example per record (its ``text_key``), other files
  one example each.
  """
  files = resolve_files(paths, file_pattern)
  root = files[0].path[:-len(files[0].relpath)].rstrip("/")  # path = root/relpath.
  megabytes = sum(f.size for f in files) / 1e6
  shard_files = [f for f in files if shards.shard_format(f.path)]
  plain_files = [f for f in files if not shards.shard_format(f.path)]

  def read_items():
    train, validation = assign_splits(plain_files)
    return {split: items + [_ShardSplit(f, split, text_key, max_bad_fraction, i == 0)
                            for i, f in enumerate(shard_files)]
            for split, items in (("train", train), ("validation", validation))}
  # Shards' records depend on text_key; plain files do not.
  header = f"text_key={text_key}" if shard_files else ""
  name, splits = sources.prepare_once(
      sources.BigmodelTextFiles,
      config_name=f"files_{fingerprint(files, header)}",
      description=f"{len(files)} files in {root} ({megabytes:.1f} MB)",
      data_dir=data_dir, features=("text", "path"), read_items=read_items,
      to_examples=_examples, disable_shuffling=False)
  validation = splits.get("validation")
  logging.info("Corpus %s: %d train and %d validation documents from %d files"
               " (%d record shards), %.1f MB", name, len(splits["train"]),
               len(validation) if validation is not None else 0, len(files),
               len(shard_files), megabytes)
  if not len(splits["train"]):
    raise UserError(f"data.paths={paths!r}: no train documents (every record is in"
                    " the validation split); give more data")
  return Source(name=name, train=splits["train"], validation=validation,
                text_key="text")


def load_tfds(name: str, text_key: str, data_dir: str | None) -> Source:
  """Opens an already prepared tfds text dataset; never downloads (see
  :func:`bigmodel.data.sources.open_tfds`)."""
  _, train, validation = sources.open_tfds(
      name, data_dir, example="lm1b", columns={"data.text_key": text_key})
  return Source(name=name, train=train, validation=validation,
                text_key=text_key)


def load_corpus(data_config: ml_collections.ConfigDict,
                workdir: str) -> Source:
  """The corpus ``config.data`` names (``source`` "files" or "tfds")."""
  if data_config.source == "tfds":
    return load_tfds(data_config.tfds_name, data_config.text_key,
                     data_config.data_dir or None)
  data_dir = data_config.data_dir or os.path.join(workdir, "data")
  return load_text_files(data_config.paths, data_config.file_pattern, data_dir,
                          text_key=data_config.text_key,
                          max_bad_fraction=data_config.max_bad_fraction)
