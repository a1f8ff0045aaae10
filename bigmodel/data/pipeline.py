"""grain pipelines that turn a text corpus into packed language-model batches.

Train: shard the documents by host, shuffle (differently every epoch), repeat
forever, tokenize to ``[BOS] + tokens + [EOS]``, concatenate the token stream
and cut it into rows of ``seq_len + 1`` tokens
(``grain.experimental.ConcatThenSplitIterDataset``), batch, and shift each row
into inputs and targets. Eval: the same on the validation split, in order,
once, padded to exactly ``eval_steps`` batches.

Every batch is a dict of numpy arrays, B = this host's rows, L = seq_len:

* ``inputs`` int32 [B, L] and ``targets`` int32 [B, L]: ``targets[:, i]`` is
  the token after ``inputs[:, i]`` in the row.
* ``segment_ids`` int32 [B, L]: 1, 2, ... for the documents of a row, 0 for
  padding. A document cut by the end of a row continues in the next row as
  that row's segment 1.
* ``positions`` int32 [B, L]: 0, 1, ... within each segment, restarting at 0
  in every row, so always < L.
* ``loss_mask`` float32 [B, L]: 1 where the target is the next token of the
  same document; 0 across document boundaries and on padding.

Cutting rows of L + 1 tokens without overlap means the one transition from a
row's last token to the next row's first token is never a target: 1 in L of
the continuation targets of long documents, traded for rows that are plain
slices of the stream.
"""
from __future__ import annotations

import ast
import dataclasses
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from absl import flags
import grain
import numpy as np

from bigmodel.data.corpus import record_text
from bigmodel.data.tokenizer import Tokenizer

Batch = dict[str, np.ndarray]

# Threads that read and tokenize documents ahead of packing. Measured on 2
# cores: 1.4M tokens/s with 1, 2 or 4 threads alike (use num_workers to scale).
_READ_THREADS = 2
_READ_BUFFER = 64


@dataclasses.dataclass(frozen=True)
class TokenizeDocument(grain.transforms.Map):
  """Record -> ``{"tokens": int32 [BOS] + encode(text) + [EOS]}``."""

  tokenizer: Tokenizer
  text_key: str

  def map(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    ids = self.tokenizer.encode(record_text(record, self.text_key))
    tokens = np.empty(len(ids) + 2, dtype=np.int32)
    tokens[0] = self.tokenizer.bos_id
    tokens[1:-1] = ids
    tokens[-1] = self.tokenizer.eos_id
    return {"tokens": tokens}


def rows_to_lm_batch(rows: Mapping[str, np.ndarray]) -> Batch:
  """Shifts packed rows into inputs/targets and derives the loss mask.

  Args:
    rows: ``tokens``, ``tokens_segment_ids`` and ``tokens_positions``, each
      [B, L + 1], as ConcatThenSplit packs and ``batch`` stacks them.

  Returns:
    The batch dict described in the module docstring, arrays [B, L].
  """
  tokens = rows["tokens"].astype(np.int32)
  segment_ids = rows["tokens_segment_ids"].astype(np.int32)
  positions = rows["tokens_positions"].astype(np.int32)
  same_document = ((segment_ids[:, 1:] == segment_ids[:, :-1])
                   & (segment_ids[:, :-1] > 0))
  return {
      "inputs": tokens[:, :-1],
      "targets": tokens[:, 1:],
      "segment_ids": segment_ids[:, :-1],
      "positions": positions[:, :-1],
      "loss_mask": same_document.astype(np.float32),
  }


def padding_rows(num_rows: int, seq_len: int) -> Batch:
  """``num_rows`` rows of padding: all zeros, loss_mask 0."""
  batch = {key: np.zeros((num_rows, seq_len), np.int32)
           for key in ("inputs", "targets", "segment_ids", "positions")}
  batch["loss_mask"] = np.zeros((num_rows, seq_len), np.float32)
  return batch


def _packed_batches(documents: grain.MapDataset, tokenizer: Tokenizer,
                    text_key: str, seq_len: int, batch_size: int,
                    drop_remainder: bool) -> grain.IterDataset:
  """Tokenize, pack into rows of seq_len + 1 tokens, batch, shift."""
  tokenized = documents.map(TokenizeDocument(tokenizer, text_key))
  stream = tokenized.to_iter_dataset(read_options())
  rows = grain.experimental.ConcatThenSplitIterDataset(
      stream, length_struct={"tokens": seq_len + 1})
  return rows.batch(batch_size, drop_remainder=drop_remainder).map(
      rows_to_lm_batch)


def _close_and_release(holder: list[Any]) -> None:
  """Closes the grain iterator in ``holder`` and drops the reference to it."""
  iterator, holder[0] = holder[0], None
  if iterator is not None and hasattr(iterator, "close"):
    iterator.close()


class TrainIterator(Iterator[Batch]):
  """Endless train batches with a JSON-safe, exactly resumable state.

  ``get_state()`` returns ``{"grain": str}``; ``set_state`` of it makes the
  following batches exactly those that followed when it was taken. The grain
  state is kept as a Python literal string because ConcatThenSplit's state
  holds tuples that a JSON round trip would turn into lists, which it then
  misreads (it silently skips a document).

  The grain iterator is closed at the latest at interpreter exit, while
  modules still exist: grain's own cleanup during teardown prints tracebacks.
  """

  def __init__(self, dataset: grain.IterDataset):
    self._holder = [iter(dataset)]
    self._finalizer = weakref.finalize(self, _close_and_release, self._holder)

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> Batch:
    return next(self._holder[0])

  def get_state(self) -> dict[str, str]:
    return {"grain": repr(self._holder[0].get_state())}

  def set_state(self, state: Mapping[str, str]) -> None:
    self._holder[0].set_state(ast.literal_eval(state["grain"]))

  def close(self) -> None:
    """Stops grain worker processes, if any; the iterator is then unusable."""
    self._finalizer()


def make_train_iter(documents: Sequence[Mapping[str, Any]],
                    tokenizer: Tokenizer, *, text_key: str, seq_len: int,
                    batch_size: int, seed: int, process_index: int = 0,
                    process_count: int = 1,
                    num_workers: int = 0) -> TrainIterator:
  """Endless packed batches of this host's share of ``documents``.

  Args:
    documents: Random-access records of the train split.
    tokenizer: Turns a record's text into ids.
    text_key: Feature holding the text.
    seq_len: L, tokens per row of inputs.
    batch_size: Rows per batch on this host.
    seed: Shuffle seed; each epoch is shuffled differently.
    process_index: This host; it reads documents process_index::process_count.
    process_count: Number of hosts.
    num_workers: grain worker processes (0 = this process). The batches, and
      so a saved state, depend on this number.

  Returns:
    The iterator, with get_state()/set_state().
  """
  shard = grain.MapDataset.source(documents)[process_index::process_count]
  shuffled = shard.seed(seed).shuffle().repeat()
  dataset = _packed_batches(shuffled, tokenizer, text_key, seq_len,
                            batch_size, drop_remainder=True)
  return TrainIterator(in_workers(dataset, num_workers))


def read_options() -> grain.ReadOptions:
  """Threads and buffer of the per-document stage (tokenize, corrupt)."""
  return grain.ReadOptions(num_threads=_READ_THREADS,
                           prefetch_buffer_size=_READ_BUFFER)


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


def make_eval_iter(documents: Sequence[Mapping[str, Any]],
                   tokenizer: Tokenizer, *, text_key: str, seq_len: int,
                   batch_size: int, num_batches: int, process_index: int = 0,
                   process_count: int = 1) -> Iterator[Batch]:
  """Exactly ``num_batches`` batches of this host's validation documents.

  In order, no shuffle: every call yields the same batches. When the split
  runs out, the remaining rows and batches are padding (loss_mask 0), so
  that all hosts run the same number of eval steps; weigh losses by
  ``loss_mask`` (an all-padding batch has loss_mask.sum() == 0).

  Args:
    documents: Random-access records of the validation split.
    tokenizer: Turns a record's text into ids.
    text_key: Feature holding the text.
    seq_len: L, tokens per row of inputs.
    batch_size: Rows per batch on this host.
    num_batches: Batches yielded.
    process_index: This host.
    process_count: Number of hosts.

  Yields:
    Batches of the format in the module docstring.
  """
  shard = grain.MapDataset.source(documents)[process_index::process_count]
  batches = iter(_packed_batches(shard, tokenizer, text_key, seq_len,
                                 batch_size, drop_remainder=False))
  for _ in range(num_batches):
    batch = next(batches, None)
    if batch is None:
      yield padding_rows(batch_size, seq_len)
      continue
    short = batch_size - len(batch["inputs"])
    if short:
      padding = padding_rows(short, seq_len)
      batch = {key: np.concatenate([batch[key], padding[key]])
               for key in batch}
    yield batch


def exactly_n_batches(batches: Iterator[Batch], num_batches: int,
                      empty_batch: Batch) -> Iterator[Batch]:
  """``num_batches`` full batches: short ones topped up, then all padding.

  Args:
    batches: Batches of at most ``len(empty_batch[key])`` rows.
    num_batches: Batches yielded.
    empty_batch: A full batch of padding (all zeros: padding ids, segment
      ids, masks and weights are 0), whose rows top up short batches.

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
