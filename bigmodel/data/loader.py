"""The one grain pipeline: records -> batches, for every task.

A task (:mod:`bigmodel.data.registry`) describes its batches as
:class:`Stages`; this module runs them, the same skeleton for train and eval:

1. host shard: host ``i`` of ``n`` reads records ``i::n``;
2. train only: shuffle (differently every epoch, by ``seed``) and repeat;
3. ``transform``: record -> example (grain ``Map`` or ``MapWithIndex``; with
   ``fan_out`` an example list ``{"examples": [...]}``, flattened);
4. rows of fixed length per ``lengths`` key, by ``packing``:

   * ``"concat"``: the token stream cut into rows
     (``ConcatThenSplitIterDataset``); a document may continue in the next
     row;
   * ``"first_fit"``: whole examples packed first-fit
     (``FirstFitPackIterDataset``), the k-th example of a row being segment
     k of every key;
   * ``"pad"``: one example per row, right-padded with 0;

   each packed key ``k`` gets ``k_segment_ids`` (1, 2, ... per example, 0
   padding) and ``k_positions`` (0, 1, ... per example); other keys of a
   ``"pad"`` example pass through;
5. batch (train: full batches only) and ``to_batch``: rows -> the task's
   batch, which must match ``spec``;
6. train: ``num_workers`` grain processes, and a :class:`TrainIterator` with
   exact-resume state; eval: exactly ``num_batches`` batches, the last ones
   topped up with ``spec.empty_batch`` rows (all weights 0), so that every
   host runs the same number of eval steps.
"""
from __future__ import annotations

import ast
import dataclasses
import math
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from absl import flags
import grain
import numpy as np

from bigmodel.data.batch_spec import Batch, BatchSpec

# Threads that read and transform records ahead of packing. Measured on 2
# cores: 1.4M tokens/s with 1, 2 or 4 threads alike (use num_workers to scale).
_READ_THREADS = 2
_READ_BUFFER = 64
# First-fit packing fills rows better with more open rows; at least this many.
_MIN_PACKING_BINS = 32
PACKINGS = ("concat", "first_fit", "pad")
# A mixture's source number in its rows, and its per-source token counts in
# its batches (taken off by TrainIterator).
SOURCE_KEY = "mixture_source"


@dataclasses.dataclass(frozen=True)
class Stages:
  """What a task runs on each record, and how examples become batches.

  Attributes:
    transform: record -> example dict, a grain ``Map`` or ``MapWithIndex``
      (the index is the record's position in this host's shuffled, repeated
      stream: seed per-example randomness with it).
    packing: ``"concat"``, ``"first_fit"`` or ``"pad"`` (module docstring).
    lengths: Packed key -> row length.
    to_batch: Batched rows -> the batch (picklable: runs in workers).
    spec: The batch's keys, per-row shapes and dtypes.
    fan_out: ``transform`` returns ``{"examples": [example, ...]}``.
  """
  transform: grain.transforms.Map | grain.transforms.MapWithIndex
  packing: str
  lengths: Mapping[str, int]
  to_batch: Callable[[Mapping[str, np.ndarray]], Batch]
  spec: BatchSpec
  fan_out: bool = False

  def __post_init__(self):
    if self.packing not in PACKINGS:
      raise ValueError(f"packing {self.packing!r} is not one of {PACKINGS}")


class _Unbatch(grain.experimental.FlatMapTransform):
  """``{"examples": [e0, e1, ...]}`` -> e0, e1, ... (possibly none)."""

  max_fan_out = 1 << 20  # Unused by the iterator flat map.

  def flat_map(self, element: Mapping[str, Any]) -> Sequence[Any]:
    return element["examples"]


@dataclasses.dataclass(frozen=True)
class _PadToRow(grain.transforms.Map):
  """An example -> a row holding just it (segment 1), keys padded to
  ``lengths`` with 0; keys not in ``lengths`` pass through."""

  lengths: Mapping[str, int]

  def map(self, example: Mapping[str, Any]) -> dict[str, Any]:
    row = {key: value for key, value in example.items()
           if key not in self.lengths}
    for key, length in self.lengths.items():
      tokens = example[key]
      is_real = np.arange(length) < len(tokens)
      row[key] = np.zeros(length, np.int32)
      row[key][:len(tokens)] = tokens
      row[f"{key}_segment_ids"] = is_real.astype(np.int32)
      row[f"{key}_positions"] = np.where(is_real, np.arange(length),
                                         0).astype(np.int32)
    return row


def read_options() -> grain.ReadOptions:
  """Threads and buffer of the per-record stage (tokenize, mask, corrupt)."""
  return grain.ReadOptions(num_threads=_READ_THREADS,
                           prefetch_buffer_size=_READ_BUFFER)


def _examples(records: grain.MapDataset, stages: Stages) -> grain.IterDataset:
  """Step 3 of the module docstring (and a "pad" row per example): the
  stream of examples of (sharded, maybe shuffled) records."""
  if isinstance(stages.transform, grain.transforms.MapWithIndex):
    examples = records.map_with_index(stages.transform)
  else:
    examples = records.map(stages.transform)
  stream = examples.to_iter_dataset(read_options())
  if stages.fan_out:
    stream = grain.experimental.FlatMapIterDataset(stream, _Unbatch())
  if stages.packing == "pad":
    stream = stream.map(_PadToRow(stages.lengths))
  return stream


def _rows(stream: grain.IterDataset, stages: Stages, *, batch_size: int,
          seed: int) -> grain.IterDataset:
  """Step 4 of the module docstring: examples -> rows of fixed lengths."""
  if stages.packing == "concat":
    return grain.experimental.ConcatThenSplitIterDataset(
        stream, length_struct=dict(stages.lengths))
  if stages.packing == "first_fit":
    return grain.experimental.FirstFitPackIterDataset(
        stream, length_struct=dict(stages.lengths),
        num_packing_bins=max(batch_size, _MIN_PACKING_BINS), seed=seed,
        shuffle_bins=True)
  return stream


def _batches(records: grain.MapDataset, stages: Stages, *, batch_size: int,
             seed: int, drop_remainder: bool) -> grain.IterDataset:
  """Steps 3-5 of the module docstring on (sharded, maybe shuffled) records."""
  rows = _rows(_examples(records, stages), stages, batch_size=batch_size, seed=seed)
  return rows.batch(batch_size, drop_remainder=drop_remainder).map(stages.to_batch)


def _host_shard(records: Sequence[Mapping[str, Any]], process_index: int,
                process_count: int) -> grain.MapDataset:
  return grain.MapDataset.source(records)[process_index::process_count]


def _close_and_release(holder: list[Any]) -> None:
  """Closes the grain iterator in ``holder`` and drops the reference to it."""
  iterator, holder[0] = holder[0], None
  if iterator is not None and hasattr(iterator, "close"):
    iterator.close()


class TrainIterator(Iterator[Batch]):
  """Endless train batches with a JSON-safe, exactly resumable state.

  ``get_state()`` returns ``{"grain": str}`` (and for a mixture
  ``"source_tokens"``); ``set_state`` of it makes the following batches
  exactly those that followed when it was taken. The grain state is kept as a
  Python literal string because ConcatThenSplit's state holds tuples that a
  JSON round trip would turn into lists, which it then misreads (it silently
  skips a document).

  For a mixture (``source_names``), each batch's per-source token counts are
  taken off it and summed: :meth:`source_tokens`.

  The grain iterator is closed at the latest at interpreter exit, while
  modules still exist: grain's own cleanup during teardown prints tracebacks.
  """

  def __init__(self, dataset: grain.IterDataset, source_names: Sequence[str] = ()):
    self._holder = [iter(dataset)]
    self._finalizer = weakref.finalize(self, _close_and_release, self._holder)
    self.source_names = tuple(source_names)
    self._source_tokens = np.zeros(len(self.source_names), np.int64)

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> Batch:
    batch = next(self._holder[0])
    if self.source_names:
      self._source_tokens += batch.pop(SOURCE_KEY)
    return batch

  def source_tokens(self) -> dict[str, int]:
    """Real tokens (of the first packed key) this host has read per source."""
    return dict(zip(self.source_names, self._source_tokens.tolist()))

  def get_state(self) -> dict[str, Any]:
    state = {"grain": repr(self._holder[0].get_state())}
    if self.source_names:
      state["source_tokens"] = self.source_tokens()
    return state

  def set_state(self, state: Mapping[str, Any]) -> None:
    self._holder[0].set_state(ast.literal_eval(state["grain"]))
    counts = state.get("source_tokens", {})
    # A source added on resume starts from 0; one removed is forgotten.
    self._source_tokens = np.array([counts.get(name, 0) for name in self.source_names],
                                   np.int64)

  def close(self) -> None:
    """Stops grain worker processes, if any; the iterator is then unusable."""
    self._finalizer()


def in_workers(dataset: grain.IterDataset,
               num_workers: int) -> grain.IterDataset:
  """``dataset`` run in ``num_workers`` grain processes (0: unchanged)."""
  if num_workers <= 0:
    return dataset
  if not flags.FLAGS.is_parsed():
    # grain 0.2.18's mp_prefetch reads one of its absl flags directly, which
    # raises outside an absl app (tests, notebooks): use the defaults.
    flags.FLAGS.mark_as_parsed()
  return dataset.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=num_workers))


def make_train_iter(records: Sequence[Mapping[str, Any]], stages: Stages, *,
                    batch_size: int, seed: int, process_index: int = 0,
                    process_count: int = 1,
                    num_workers: int = 0) -> TrainIterator:
  """Endless batches of this host's share of ``records``.

  Args:
    records: Random-access records of the train split.
    stages: The task's transform, packing and batch format.
    batch_size: Rows per batch on this host.
    seed: Shuffle (and first-fit packing) seed; each epoch is shuffled
      differently.
    process_index: This host; it reads records process_index::process_count.
    process_count: Number of hosts.
    num_workers: grain worker processes (0 = this process). The batches, and
      so a saved state, depend on this number.

  Returns:
    The iterator of ``stages.spec`` batches, with get_state()/set_state().
  """
  shuffled = _host_shard(records, process_index, process_count).seed(
      seed).shuffle().repeat()
  dataset = _batches(shuffled, stages, batch_size=batch_size, seed=seed,
                     drop_remainder=True)
  return TrainIterator(in_workers(dataset, num_workers))


@dataclasses.dataclass(frozen=True)
class _TagSource(grain.transforms.Map):
  """Adds ``SOURCE_KEY``: the source's number, to a row."""

  number: int

  def map(self, row: dict[str, Any]) -> dict[str, Any]:
    return {**row, SOURCE_KEY: np.int32(self.number)}


@dataclasses.dataclass(frozen=True)
class _CountSources:
  """Rows -> the task's batch plus ``SOURCE_KEY``: the real tokens (of the
  first packed key) of each source in it, the tag taken off before
  ``to_batch`` sees the rows."""

  num_sources: int
  key: str
  to_batch: Callable[[Mapping[str, np.ndarray]], Batch]

  def __call__(self, rows: Mapping[str, np.ndarray]) -> Batch:
    tokens_per_row = (rows[f"{self.key}_segment_ids"] > 0).sum(axis=-1)
    batch = self.to_batch({key: value for key, value in rows.items() if key != SOURCE_KEY})
    batch[SOURCE_KEY] = np.bincount(rows[SOURCE_KEY], weights=tokens_per_row,
                                    minlength=self.num_sources).astype(np.int64)
    return batch


@dataclasses.dataclass(frozen=True)
class MixtureComponent:
  """One source of a mixture: its name, train records, weight and stages."""
  name: str
  records: Sequence[Mapping[str, Any]]
  weight: float
  stages: Stages


def make_mixture_train_iter(components: Sequence[MixtureComponent], *, batch_size: int,
                            seed: int, process_index: int = 0, process_count: int = 1,
                            num_workers: int = 0) -> TrainIterator:
  """Endless batches of a weighted mixture of sources.

  Each source is host-sharded, shuffled (seed + its position), repeated,
  transformed and packed into rows on its own; grain's ``IterDataset.mix``
  then draws rows by the weights (deterministically), so that the weights are
  the sources' shares of the rows, that is of the tokens (as in Levanter;
  mixing documents instead would favour sources of long documents), and a
  row never mixes sources. The rows are batched with the first component's
  ``to_batch`` (every component has the same task). The mix is keyed by
  source name, so a resumed run may change the weights or the sources: each
  source continues where it was.

  Returns:
    A :class:`TrainIterator` whose :meth:`~TrainIterator.source_tokens` counts
    the tokens read from each source.
  """
  first = components[0].stages
  streams, weights = {}, {}
  for number, component in enumerate(components):
    shuffled = _host_shard(component.records, process_index, process_count).seed(
        seed + number).shuffle().repeat()
    rows = _rows(_examples(shuffled, component.stages), component.stages,
                 batch_size=batch_size, seed=seed + number)
    streams[component.name] = rows.map(_TagSource(number))
    weights[component.name] = component.weight
  count = _CountSources(len(components), next(iter(first.lengths)), first.to_batch)
  dataset = grain.IterDataset.mix(streams, weights).batch(
      batch_size, drop_remainder=True).map(count)
  return TrainIterator(in_workers(dataset, num_workers),
                       source_names=[c.name for c in components])


def make_eval_iter(records: Sequence[Mapping[str, Any]], stages: Stages, *,
                   batch_size: int, num_batches: int, seed: int = 0,
                   process_index: int = 0,
                   process_count: int = 1) -> Iterator[Batch]:
  """Exactly ``num_batches`` batches of this host's ``records``, in order.

  No shuffle: every call yields the same batches. When the split runs out,
  the remaining rows and batches are ``stages.spec.empty_batch`` padding
  (every weight 0; an all-padding batch has no weight at all).

  Args:
    records: Random-access records of the validation split.
    stages: The task's transform, packing and batch format.
    batch_size: Rows per batch on this host.
    num_batches: Batches yielded (:func:`num_eval_batches` covers the split
      once when the packing is ``"pad"``).
    seed: First-fit packing seed.
    process_index: This host.
    process_count: Number of hosts.

  Yields:
    Batches matching ``stages.spec``.
  """
  batches = iter(_batches(_host_shard(records, process_index, process_count),
                          stages, batch_size=batch_size, seed=seed,
                          drop_remainder=False))
  return exactly_n_batches(batches, num_batches,
                           stages.spec.empty_batch(batch_size))


def exactly_n_batches(batches: Iterator[Batch], num_batches: int,
                      empty_batch: Batch) -> Iterator[Batch]:
  """``num_batches`` full batches: short ones topped up, then all padding.

  Args:
    batches: Batches of at most ``len(empty_batch[key])`` rows.
    num_batches: Batches yielded.
    empty_batch: A full batch of padding, whose rows top up short batches.

  Yields:
    Batches with the keys, shapes and dtypes of ``empty_batch``.
  """
  batch_size = len(next(iter(empty_batch.values())))
  for _ in range(num_batches):
    batch = next(batches, None)
    if batch is None:
      yield {key: value.copy() for key, value in empty_batch.items()}
      continue
    short = batch_size - len(next(iter(batch.values())))
    if short:
      batch = {key: np.concatenate([batch[key], empty_batch[key][:short]])
               for key in empty_batch}
    yield batch


def num_eval_batches(num_examples: int, batch_size: int,
                     process_count: int) -> int:
  """Batches of one example per row that cover every host's share of
  ``num_examples`` (the same on every host, so all run as many eval steps)."""
  return math.ceil(math.ceil(num_examples / process_count) / batch_size)
