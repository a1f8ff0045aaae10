"""grain pipelines for encoder-only (BERT) batches: MLM and classification.

Every batch is a dict of numpy arrays; B = this host's rows, L = seq_len.

MLM (``data.task="mlm"``): documents tokenised as ``[BOS] + text + [EOS]``,
masked (:func:`bigmodel.data.objectives.mlm_mask`), concatenated and cut into
rows of L tokens (no shift):

* ``inputs`` int32 [B, L]: the masked tokens;
* ``targets`` int32 [B, L]: the original tokens (0 on padding);
* ``loss_mask`` float32 [B, L]: 1 exactly at the chosen positions;
* ``segment_ids`` int32 [B, L]: 1, 2, ... per document piece, 0 padding;
* ``positions`` int32 [B, L]: 0, 1, ... within each segment, restarting in
  every row;
* ``type_ids`` int32 [B, L]: zeros (one-sentence inputs).

The mask of a document is drawn with a generator seeded by (seed, host,
index of the document in the shuffled, repeated stream), so every epoch masks
a document differently (dynamic masking) and a restored iterator repeats its
batches exactly.

Classification (``data.task="classify"`` with an encoder model): one example
per row, ``[BOS](=CLS) + text tokens (truncated to L - 2) + [EOS](=SEP)``,
padded with 0:

* ``inputs``, ``segment_ids`` (1 real, 0 padding), ``positions``,
  ``type_ids`` (zeros): int32 [B, L];
* ``label`` int32 [B]: the class id;
* ``example_mask`` float32 [B]: 1 for examples, 0 for padding rows (only in
  the last eval batches).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from bigmodel.data import pipeline
from bigmodel.data.corpus import record_text
from bigmodel.data.objectives import mlm_mask
from bigmodel.data.pipeline import Batch, TrainIterator
from bigmodel.data.records import answer_text
from bigmodel.data.special import SpecialIds
from bigmodel.data.tokenizer import Tokenizer


def example_rng(seed: int, process_index: int,
                index: int) -> np.random.Generator:
  """The generator of one example: a pure function of its coordinates."""
  return np.random.default_rng([seed % 2**32, process_index, index])


# --------------------------------------------------------------------------
# MLM.


@dataclasses.dataclass(frozen=True)
class MaskDocument(grain.transforms.MapWithIndex):
  """(index, record) -> ``{"tokens": int32 [n, 3]}``: columns masked input,
  original token, chosen (0/1), for ``[BOS] + encode(text) + [EOS]``.

  One feature with three columns, so that packing cuts them together.
  """

  tokenizer: Tokenizer
  text_key: str
  special: SpecialIds
  probability: float
  seed: int
  process_index: int

  def map_with_index(self, index: int,
                     record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    ids = self.tokenizer.encode(record_text(record, self.text_key))
    tokens = np.empty(len(ids) + 2, np.int32)
    tokens[0], tokens[1:-1], tokens[-1] = (self.tokenizer.bos_id, ids,
                                           self.tokenizer.eos_id)
    inputs, chosen = mlm_mask(
        tokens, example_rng(self.seed, self.process_index, index),
        probability=self.probability, special=self.special)
    return {"tokens": np.stack([inputs, tokens, chosen.astype(np.int32)],
                               axis=1)}


def rows_to_mlm_batch(rows: Mapping[str, np.ndarray]) -> Batch:
  """Packed ``tokens`` [B, L, 3] (+ segment ids, positions) -> MLM batch."""
  tokens = rows["tokens"].astype(np.int32)
  segment_ids = rows["tokens_segment_ids"].astype(np.int32)
  return {
      "inputs": tokens[..., 0],
      "targets": tokens[..., 1],
      "loss_mask": tokens[..., 2].astype(np.float32),
      "segment_ids": segment_ids,
      "positions": rows["tokens_positions"].astype(np.int32),
      "type_ids": np.zeros_like(segment_ids),
  }


def empty_mlm_batch(batch_size: int, seq_len: int) -> Batch:
  batch = {key: np.zeros((batch_size, seq_len), np.int32)
           for key in ("inputs", "targets", "segment_ids", "positions",
                       "type_ids")}
  batch["loss_mask"] = np.zeros((batch_size, seq_len), np.float32)
  return batch


def _mlm_batches(documents: grain.MapDataset, mask: MaskDocument,
                 seq_len: int, batch_size: int,
                 drop_remainder: bool) -> grain.IterDataset:
  stream = documents.map_with_index(mask).to_iter_dataset(
      pipeline.read_options())
  rows = grain.experimental.ConcatThenSplitIterDataset(
      stream, length_struct={"tokens": seq_len})
  return rows.batch(batch_size, drop_remainder=drop_remainder).map(
      rows_to_mlm_batch)


def make_mlm_train_iter(documents: Sequence[Mapping[str, Any]],
                        tokenizer: Tokenizer, special: SpecialIds, *,
                        text_key: str, seq_len: int, batch_size: int,
                        probability: float, seed: int, process_index: int = 0,
                        process_count: int = 1,
                        num_workers: int = 0) -> TrainIterator:
  """Endless MLM batches of this host's share of ``documents``.

  Arguments as :func:`bigmodel.data.pipeline.make_train_iter`, plus the
  special ids and the share of tokens chosen (``data.mlm_probability``).
  """
  shard = grain.MapDataset.source(documents)[process_index::process_count]
  mask = MaskDocument(tokenizer, text_key, special, probability, seed,
                      process_index)
  dataset = _mlm_batches(shard.seed(seed).shuffle().repeat(), mask, seq_len,
                         batch_size, drop_remainder=True)
  return TrainIterator(pipeline.in_workers(dataset, num_workers))


def make_mlm_eval_iter(documents: Sequence[Mapping[str, Any]],
                       tokenizer: Tokenizer, special: SpecialIds, *,
                       text_key: str, seq_len: int, batch_size: int,
                       probability: float, num_batches: int, seed: int = 0,
                       process_index: int = 0,
                       process_count: int = 1) -> Iterator[Batch]:
  """Exactly ``num_batches`` MLM batches of this host's validation documents,
  in order with fixed masks (the same every call), padding when the split
  runs out (loss_mask 0)."""
  shard = grain.MapDataset.source(documents)[process_index::process_count]
  mask = MaskDocument(tokenizer, text_key, special, probability, seed,
                      process_index)
  batches = iter(_mlm_batches(shard, mask, seq_len, batch_size,
                              drop_remainder=False))
  return pipeline.exactly_n_batches(batches, num_batches,
                                    empty_mlm_batch(batch_size, seq_len))


# --------------------------------------------------------------------------
# Classification.


@dataclasses.dataclass(frozen=True)
class EncodeForClassification(grain.transforms.Map):
  """Record -> ``{"inputs": int32 [L], "length": int32, "label": int32}``."""

  tokenizer: Tokenizer
  text_key: str
  answer_key: str
  class_names: tuple[str, ...] | None
  label_ids: Mapping[str, int]
  seq_len: int

  def map(self, record: Mapping[str, Any]) -> dict[str, Any]:
    ids = self.tokenizer.encode(record_text(record, self.text_key))
    ids = ids[:self.seq_len - 2]
    inputs = np.zeros(self.seq_len, np.int32)
    inputs[0], inputs[1:len(ids) + 1] = self.tokenizer.bos_id, ids
    inputs[len(ids) + 1] = self.tokenizer.eos_id
    label = self.label_ids[answer_text(record, self.answer_key,
                                       self.class_names)]
    return {"inputs": inputs, "length": np.int32(len(ids) + 2),
            "label": np.int32(label)}


def to_classify_batch(examples: Mapping[str, np.ndarray]) -> Batch:
  """Stacked examples -> the classification batch of the module docstring."""
  inputs = examples["inputs"].astype(np.int32)
  positions = np.broadcast_to(np.arange(inputs.shape[1], dtype=np.int32),
                              inputs.shape)
  is_real = positions < examples["length"][:, None]
  return {
      "inputs": inputs,
      "segment_ids": is_real.astype(np.int32),
      "positions": np.where(is_real, positions, 0).astype(np.int32),
      "type_ids": np.zeros_like(inputs),
      "label": examples["label"].astype(np.int32),
      "example_mask": np.ones(len(inputs), np.float32),
  }


def empty_classify_batch(batch_size: int, seq_len: int) -> Batch:
  batch = {key: np.zeros((batch_size, seq_len), np.int32)
           for key in ("inputs", "segment_ids", "positions", "type_ids")}
  batch["label"] = np.zeros(batch_size, np.int32)
  batch["example_mask"] = np.zeros(batch_size, np.float32)
  return batch


def make_classify_train_iter(records: Sequence[Mapping[str, Any]],
                             encode: EncodeForClassification, *,
                             batch_size: int, seed: int,
                             process_index: int = 0, process_count: int = 1,
                             num_workers: int = 0) -> TrainIterator:
  """Endless shuffled classification batches of this host's share."""
  shard = grain.MapDataset.source(records)[process_index::process_count]
  dataset = (shard.seed(seed).shuffle().repeat().map(encode)
             .to_iter_dataset(pipeline.read_options())
             .batch(batch_size, drop_remainder=True).map(to_classify_batch))
  return TrainIterator(pipeline.in_workers(dataset, num_workers))


def num_eval_batches(num_examples: int, batch_size: int,
                     process_count: int) -> int:
  """Batches that cover every host's share of ``num_examples`` (the same on
  every host, so that all run the same number of eval steps)."""
  return math.ceil(math.ceil(num_examples / process_count) / batch_size)


def make_classify_eval_iter(records: Sequence[Mapping[str, Any]],
                            encode: EncodeForClassification, *,
                            batch_size: int, num_batches: int,
                            process_index: int = 0,
                            process_count: int = 1) -> Iterator[Batch]:
  """``num_batches`` batches of this host's validation examples, in order;
  padding rows (example_mask 0) once the split runs out. Pass
  :func:`num_eval_batches` to cover the whole split exactly once."""
  shard = grain.MapDataset.source(records)[process_index::process_count]
  batches = iter(shard.map(encode).batch(batch_size).map(to_classify_batch))
  return pipeline.exactly_n_batches(
      batches, num_batches, empty_classify_batch(batch_size, encode.seq_len))
