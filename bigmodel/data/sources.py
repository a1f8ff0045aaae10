"""Sources: records of a dataset as random-access tfds data sources.

Whatever the origin, a run reads a :class:`Source`: train and validation
records (``builder.as_data_source()``: ArrayRecord files, random access, no
TensorFlow) and the names of their text and answer features. Two origins:

* local files, prepared once per distinct content into ArrayRecord by
  :func:`prepare_once` with the one builder :class:`PreparedRecords` (text
  features only; the caller gives the examples of each split), named by a
  :func:`fingerprint` of the files, under ``data.data_dir`` or
  ``WORKDIR/data``: text files (:mod:`bigmodel.data.corpus`) and labelled
  CSV/JSONL records (:mod:`bigmodel.data.records`);
* a registered tfds dataset already prepared in ArrayRecord format, opened
  by name (:func:`open_tfds`); nothing is ever downloaded.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from bigmodel.errors import UserError

# Evaluation split of a tfds dataset, in order of preference.
_EVAL_SPLITS = ("validation", "test")


@dataclasses.dataclass(frozen=True)
class Source:
  """Random-access train/validation records of a dataset.

  Attributes:
    name: Human-readable name for logs and messages.
    train: Records of the train split (each a mapping of features).
    validation: Records of the validation split; None when there is none.
    text_key: Feature holding the (input) text.
    answer_key: Feature holding the label or target text (labelled records).
    class_names: Names of a tfds ``ClassLabel`` answer (its values are
      ints); None for text answers.
    kind: ``classify`` or ``seq2seq`` for labelled records.
  """
  name: str
  train: Sequence[Mapping[str, Any]]
  validation: Sequence[Mapping[str, Any]] | None
  text_key: str
  answer_key: str | None = None
  class_names: tuple[str, ...] | None = None
  kind: str | None = None

  def text(self, record: Mapping[str, Any]) -> str:
    """The (input) text of one record."""
    return record_text(record, self.text_key)

  def answer(self, record: Mapping[str, Any]) -> str:
    """The label name or target text of one record."""
    return answer_text(record, self.answer_key, self.class_names)

  def shuffled_train_texts(self, seed: int) -> Iterator[str]:
    """Train texts in a seeded random order (a prefix is a fair sample)."""
    for index in np.random.default_rng(seed).permutation(len(self.train)):
      yield self.text(self.train[int(index)])


def record_text(record: Mapping[str, Any], text_key: str) -> str:
  """Decodes the text feature of a record (tfds returns ``bytes``)."""
  text = record[text_key]
  if isinstance(text, bytes):
    return text.decode("utf-8", errors="replace")
  return str(text)


def answer_text(record: Mapping[str, Any], answer_key: str,
                class_names: Sequence[str] | None) -> str:
  """A record's answer as text; a ClassLabel int becomes its name."""
  value = record[answer_key]
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  if class_names is not None and 0 <= int(value) < len(class_names):
    return class_names[int(value)]
  return str(value)


def fingerprint(files: Iterable[tuple[str, int, int]], header: str = "") -> str:
  """A short hash of (path, size, mtime_ns) of files and a header (settings
  that change the prepared data); names the prepared dataset on disk, so a
  changed file set gets a new name (never stale data) and the same one the
  same name (no re-prepare)."""
  digest = hashlib.sha256(header.encode())
  for path, size, mtime_ns in files:
    digest.update(f"{path}\0{size}\0{mtime_ns}\n".encode())
  return digest.hexdigest()[:16]


class _LocalDatasetInfo(tfds.core.DatasetInfo):
  """The info of a dataset that only ever exists locally.

  tfds looks for an unprepared dataset's info in its public bucket
  (``initialize_from_bucket``); with that lookup off, as it is by default,
  the call still makes an empty temporary folder and leaves it behind (tfds
  4.9), one per dataset prepared. These datasets are never in that bucket."""

  def initialize_from_bucket(self) -> None:
    pass


class PreparedRecords(tfds.core.GeneratorBasedBuilder,
                      skip_registration=True):
  """The builder of local records: text features, examples given per split.

  Args (keyword):
    features: Names of the (text) features.
    items_by_split: split -> items; empty when only opening prepared data.
    to_examples: item -> its (key, example) pairs (none to skip it).
    disable_shuffling: Keep the items' order (else tfds orders by key hash).
    description: For the dataset info.

  The registered subclasses only name the directory
  (``<data_dir>/<name>/<config>/<version>``) of data prepared by earlier
  versions.
  """

  VERSION = tfds.core.Version("1.0.0")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds' own lookup for builders defined inside a package needs the
    # `importlib_resources` backport, which tfds does not install.
    return epath.Path(__file__)

  def __init__(self, *, features: Sequence[str],
               items_by_split: Mapping[str, Sequence[Any]],
               to_examples: Callable[[Any], Iterable[tuple[Any, dict[str, str]]]],
               disable_shuffling: bool, description: str, **kwargs):
    self._features = tuple(features)
    self._items_by_split = items_by_split
    self._to_examples = to_examples
    self._disable_shuffling = disable_shuffling
    self._description = description
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return _LocalDatasetInfo(
        builder=self, description=self._description,
        disable_shuffling=self._disable_shuffling,
        features=tfds.features.FeaturesDict(
            {name: tfds.features.Text() for name in self._features}))

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    # A split without items (a one-file corpus' validation) is left out.
    return {split: self._generate_examples(items)
            for split, items in self._items_by_split.items() if items}

  def _generate_examples(self, items: Sequence[Any]):
    for item in items:
      yield from self._to_examples(item)


class BigmodelTextFiles(PreparedRecords):
  """Local text files, one example per file (``bigmodel_text_files``)."""


class BigmodelTaskRecords(PreparedRecords):
  """(text, label) or (text, target) rows (``bigmodel_task_records``)."""


def prepare_once(builder_class: type[PreparedRecords], *, config_name: str,
                 description: str, data_dir: str, features: Sequence[str],
                 read_items: Callable[[], Mapping[str, Sequence[Any]]],
                 to_examples: Callable[[Any], Iterable[Any]], disable_shuffling: bool
                 ) -> tuple[str, dict[str, Any]]:
  """Prepares local records once per ``config_name`` and opens them.

  ``read_items`` runs only when not yet prepared, before tfds writes
  anything, so that it can check the data and raise a UserError cleanly.

  Returns:
    (name for logs, split -> random-access records).
  """
  def builder(items_by_split):
    return builder_class(
        features=features, items_by_split=items_by_split,
        to_examples=to_examples, disable_shuffling=disable_shuffling,
        description=description, data_dir=data_dir,
        config=tfds.core.BuilderConfig(name=config_name,
                                       description=description),
        file_format="array_record")
  prepared = builder({})
  if prepared.is_prepared():
    logging.info("Reusing prepared %s", prepared.data_path)
  else:
    start = time.perf_counter()
    prepared = builder(read_items())
    logging.info("Preparing %s into %s", description, prepared.data_path)
    tfds.disable_progress_bar()  # Progress bars would flood the training log.
    # Folders tfds creates on the way (builder/config/version), removed again
    # if preparing fails (tfds removes its own half-written files).
    path = epath.Path(prepared.data_path)
    created = [p for p in (path, path.parent, path.parent.parent) if not p.exists()]
    try:
      with contextlib.redirect_stdout(io.StringIO()):  # tfds prints "Downloading ...".
        prepared.download_and_prepare()
    except Exception:  # pylint: disable=broad-except
      # Hosts sharing data_dir race to rename their finished copy into
      # place; losing that race is fine since the copies are identical.
      if not prepared.is_prepared():
        for folder in created:
          if folder.exists() and not any(folder.iterdir()):
            folder.rmdir()
        raise
    logging.info("Prepared %s in %.1f s", prepared.data_path,
                 time.perf_counter() - start)
  # Read through a read-only builder: unlike ours it pickles without the
  # items, which grain worker processes need.
  sources = tfds.builder_from_directory(prepared.data_path).as_data_source()
  return f"{prepared.name}/{config_name}", dict(sources)


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


def open_tfds(name: str, data_dir: str | None, *, example: str,
              columns: Mapping[str, str]
              ) -> tuple[Any, Sequence[Any], Sequence[Any] | None]:
  """Opens an already prepared tfds dataset by name; never downloads.

  The evaluation split is ``validation`` if the dataset has one, else
  ``test``.

  Args:
    name: ``data.tfds_name``.
    data_dir: Where it is prepared (None: tfds' default).
    example: A dataset name for messages.
    columns: option (e.g. ``data.text_key``) -> feature it names; each must
      exist.

  Returns:
    (features, train records, evaluation records or None).

  Raises:
    UserError: if the dataset is unknown, not prepared in ArrayRecord format,
      has no train split, or lacks a feature of ``columns``.
  """
  builder, splits = open_prepared_tfds(name, data_dir, example)
  features = builder.info.features
  for option, column in columns.items():
    if features is not None and column not in features:
      raise UserError(f"{option}={column!r} is not a feature of tfds dataset"
                      f" {name!r} (features: {', '.join(sorted(features))})")
  eval_split = next((s for s in _EVAL_SPLITS if s in splits), None)
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
  return features, train, validation
