"""Text corpora as random-access tfds data sources.

Two kinds of corpus, both read through ``builder.as_data_source()``
(ArrayRecord files, random access, no TensorFlow):

* ``data.source="files"``: local text files, prepared by
  :class:`TextFilesBuilder` (one example per file, features ``text`` and
  ``path``) under ``data.data_dir`` (``WORKDIR/data`` when empty).
  ``data.paths`` is a directory (files matching ``data.file_pattern``, searched
  recursively, hidden directories and ``__pycache__`` skipped), a single file
  or a glob (``**`` allowed). ``""`` means the Python standard library of the
  running interpreter (``sysconfig.get_paths()["stdlib"]``) without
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

import contextlib
import dataclasses
import fnmatch
import glob
import hashlib
import io
import os
import sys
import sysconfig
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from absl import logging
from etils import epath
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from bigmodel.errors import UserError

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


@dataclasses.dataclass(frozen=True)
class TextCorpus:
  """Random-access train/validation records of a text corpus.

  Attributes:
    name: Human-readable name for logs.
    train: Records of the train split (each a mapping of features).
    validation: Records of the validation split; None when there is none.
    text_key: Feature of a record holding its text.
  """
  name: str
  train: Sequence[Mapping[str, Any]]
  validation: Sequence[Mapping[str, Any]] | None
  text_key: str

  def text(self, record: Mapping[str, Any]) -> str:
    """The text of one record of this corpus."""
    return record_text(record, self.text_key)

  def shuffled_train_texts(self, seed: int) -> Iterator[str]:
    """Train documents in a seeded random order (a prefix is a fair sample)."""
    for index in np.random.default_rng(seed).permutation(len(self.train)):
      yield self.text(self.train[int(index)])


def record_text(record: Mapping[str, Any], text_key: str) -> str:
  """Decodes the text feature of a record (tfds returns ``bytes``)."""
  text = record[text_key]
  if isinstance(text, bytes):
    return text.decode("utf-8", errors="replace")
  return str(text)


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


def resolve_files(paths: str, file_pattern: str) -> list[CorpusFile]:
  """Lists the files of a local corpus, sorted by relative path.

  Args:
    paths: A directory, a file, a glob, or ``""`` for the Python stdlib.
    file_pattern: Pattern of file names picked up from directories.

  Returns:
    The corpus files, in a deterministic order.

  Raises:
    UserError: if ``paths`` names nothing, or nothing readable matches.
  """
  if not paths:
    root = sysconfig.get_paths()["stdlib"]
    names = _walk(root, file_pattern)
  elif os.path.isdir(paths):
    root = paths
    names = _walk(root, file_pattern)
  elif os.path.isfile(paths):
    root = os.path.dirname(paths) or "."
    names = [paths]
  else:
    names = [p for p in glob.glob(paths, recursive=True) if os.path.isfile(p)]
    if not names:
      raise UserError(
          f"data.paths={paths!r} is not a file or directory and matches no file"
          " as a glob; give a directory, a file, a glob, or '' for the Python"
          " standard library")
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p))
                               for p in names])
  root = os.path.abspath(root)
  files = []
  for name in names:
    path = os.path.abspath(name)
    try:
      stat = os.stat(path)
      with open(path, "rb") as f:
        head = f.read(_BINARY_SNIFF_BYTES)
    except OSError as e:
      logging.warning("Skipping unreadable corpus file %s: %s", path, e)
      continue
    if b"\0" in head:  # git's test for a binary file.
      print(f"warning: skipping {path}: a binary file (NUL bytes), not text",
            file=sys.stderr, flush=True)
      continue
    files.append(CorpusFile(path=path, relpath=os.path.relpath(path, root),
                            size=stat.st_size, mtime_ns=stat.st_mtime_ns))
  files.sort(key=lambda f: f.relpath)
  where = f"data.paths={paths!r}" if paths else "the Python standard library"
  if not files:
    raise UserError(f"no text file matching data.file_pattern={file_pattern!r} in"
                    f" {where}; set data.paths or data.file_pattern")
  if not any(f.size for f in files):
    raise UserError(f"the corpus in {where} is empty: all {len(files)} files"
                    " have 0 bytes")
  return files


def fingerprint(files: Sequence[CorpusFile]) -> str:
  """A short hash of the file set; names the prepared dataset on disk.

  Paths, sizes and modification times: a changed corpus gets a new name (never
  stale prepared files), the same corpus the same name (no re-prepare).
  """
  digest = hashlib.sha256()
  for f in files:
    digest.update(f"{f.path}\0{f.size}\0{f.mtime_ns}\n".encode())
  return digest.hexdigest()[:16]


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


class BigmodelTextFiles(tfds.core.GeneratorBasedBuilder):
  """Local text files, one example per file; registered as
  ``bigmodel_text_files``.

  The file list is passed to the constructor; the config name must be
  :func:`fingerprint` of that list so that each corpus has its own directory
  ``<data_dir>/bigmodel_text_files/<fingerprint>/<version>``.
  """

  VERSION = tfds.core.Version("1.0.0")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds' own lookup for builders defined inside a package needs the
    # `importlib_resources` backport, which tfds does not install.
    return epath.Path(__file__)

  def __init__(self, *, files: Sequence[CorpusFile], **kwargs):
    self._files = list(files)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Local text files, one example per file.",
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "path": tfds.features.Text(),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    train, validation = assign_splits(self._files)
    splits = {"train": self._generate_examples(train)}
    if validation:  # A one-file corpus has no validation split.
      splits["validation"] = self._generate_examples(validation)
    return splits

  def _generate_examples(self, files: Sequence[CorpusFile]):
    for f in files:
      try:
        with open(f.path, "rb") as stream:
          text = stream.read().decode("utf-8", errors="replace")
      except OSError as e:
        logging.warning("Skipping unreadable corpus file %s: %s", f.path, e)
        continue
      yield f.relpath, {"text": text, "path": f.relpath}


def text_files_builder(files: Sequence[CorpusFile],
                       data_dir: str) -> BigmodelTextFiles:
  """The (possibly already prepared) builder of a local file corpus."""
  root = os.path.commonpath([os.path.dirname(f.path) for f in files])
  config = tfds.core.BuilderConfig(name=f"files_{fingerprint(files)}",
                                   description=f"{len(files)} files in {root}")
  return BigmodelTextFiles(files=files, data_dir=data_dir, config=config,
                           file_format="array_record")


def load_text_files(paths: str, file_pattern: str,
                    data_dir: str) -> TextCorpus:
  """Prepares (once per distinct file set) and opens a local file corpus."""
  files = resolve_files(paths, file_pattern)
  builder = text_files_builder(files, data_dir)
  if builder.is_prepared():
    logging.info("Reusing prepared corpus %s (%d files)", builder.data_path,
                 len(files))
  else:
    logging.info("Preparing corpus of %d files (%.1f MB) into %s", len(files),
                 sum(f.size for f in files) / 1e6, builder.data_path)
    start = time.perf_counter()
    tfds.disable_progress_bar()  # Progress bars would flood the training log.
    try:
      with contextlib.redirect_stdout(io.StringIO()):  # tfds prints "Downloading ...".
        builder.download_and_prepare()
    except Exception:  # pylint: disable=broad-except
      # Hosts sharing data_dir race to rename their finished copy into
      # place; losing that race is fine since the copies are identical.
      if not builder.is_prepared():
        raise
    logging.info("Prepared corpus in %.1f s", time.perf_counter() - start)
  # Read through a read-only builder: unlike ours it pickles without the file
  # list, which grain worker processes need.
  sources = tfds.builder_from_directory(builder.data_path).as_data_source()
  validation = sources.get("validation")
  logging.info("Corpus %s: %d train and %d validation files, %.1f MB",
               builder.builder_config.name, len(sources["train"]),
               len(validation) if validation is not None else 0,
               sum(f.size for f in files) / 1e6)
  return TextCorpus(name=f"{builder.name}/{builder.builder_config.name}",
                    train=sources["train"], validation=validation,
                    text_key="text")


def check_offline_tfds_name(name: str, example: str = "lm1b") -> None:
  """UserError for a tfds name that cannot be opened without the network.

  A namespaced name (``huggingface:imdb``, ``kubric:...``) makes tfds query
  the community registry or the Hugging Face hub before anything else, so it
  is refused before tfds sees it.
  """
  if not name:
    raise UserError(f"data.source='tfds' needs data.tfds_name, e.g. {example!r}")
  namespace, sep, _ = name.split("/")[0].partition(":")
  if sep:
    raise UserError(
        f"data.tfds_name={name!r} is a community dataset (namespace {namespace!r}) that tfds "
        "fetches over the network, and bigmodel never downloads; use a registered tfds "
        "dataset prepared under data.data_dir, or its text as files (data.paths)")


def open_prepared_tfds(name: str, data_dir: str | None,
                       example: str) -> tuple[Any, set[str]]:
  """(builder, split names) of a prepared tfds dataset with a train split.

  Never downloads: an unknown, unprepared or community (network) dataset is a
  ``UserError``.
  """
  check_offline_tfds_name(name, example)
  try:
    builder = tfds.builder(name, data_dir=data_dir or None, try_gcs=False)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise UserError(f"data.tfds_name={name!r} is not a registered tfds dataset"
                    f" ({str(e).splitlines()[0]})") from e
  if not builder.is_prepared():
    raise UserError(
        f"tfds dataset {name!r} is not prepared in {builder.data_dir}: nothing"
        " is downloaded here; prepare it first (tfds build"
        " --file_format=array_record) or set data.data_dir")
  splits = set(builder.info.splits)
  if "train" not in splits:
    raise UserError(f"tfds dataset {name!r} has no 'train' split"
                    f" (splits: {sorted(splits)})")
  return builder, splits


def load_tfds(name: str, text_key: str, data_dir: str | None) -> TextCorpus:
  """Opens an already prepared tfds text dataset; never downloads.

  The validation split is ``validation`` if the dataset has one, else ``test``.

  Raises:
    UserError: if the dataset is unknown, not prepared in ArrayRecord format,
      has no train split, or lacks ``text_key``.
  """
  builder, splits = open_prepared_tfds(name, data_dir, example="lm1b")
  features = builder.info.features
  if features is not None and text_key not in features:
    raise UserError(f"data.text_key={text_key!r} is not a feature of tfds"
                    f" dataset {name!r} (features: {sorted(features)})")
  eval_split = next((s for s in ("validation", "test") if s in splits), None)
  try:
    train = builder.as_data_source(split="train")
    validation = (builder.as_data_source(split=eval_split)
                  if eval_split else None)
  except (NotImplementedError, ValueError) as e:
    raise UserError(f"tfds dataset {name!r} in {builder.data_dir} has no"
                    " random-access files; prepare it with"
                    " --file_format=array_record") from e
  logging.info("tfds dataset %s: %d train and %d %s records", name,
               len(train), len(validation) if validation else 0, eval_split)
  return TextCorpus(name=name, train=train, validation=validation,
                    text_key=text_key)


def load_corpus(data_config: ml_collections.ConfigDict,
                workdir: str) -> TextCorpus:
  """The corpus ``config.data`` names (``source`` "files" or "tfds")."""
  if data_config.source == "tfds":
    return load_tfds(data_config.tfds_name, data_config.text_key,
                     data_config.data_dir or None)
  data_dir = data_config.data_dir or os.path.join(workdir, "data")
  return load_text_files(data_config.paths, data_config.file_pattern, data_dir)
