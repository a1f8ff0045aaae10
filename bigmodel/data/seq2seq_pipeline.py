"""grain pipelines for encoder-decoder (T5) batches.

Three sources of (encoder tokens, decoder tokens) examples:

* span corruption (``data.task="span_corruption"``): each document's text
  tokens are cut into chunks of ``SpanCorruptionLengths.raw_length`` and
  corrupted (:mod:`bigmodel.data.objectives`), several examples per document;
* seq2seq (``data.task="seq2seq"``): ``encode(input) + [EOS]`` ->
  ``encode(target) + [EOS]``, each truncated to its length;
* text-to-text classification (``data.task="classify"`` with a T5 model):
  the same with the label name as the target.

Span corruption and seq2seq training examples are packed first-fit
(``grain.experimental.FirstFitPackIterDataset``) into rows of Le encoder and
Ld decoder tokens, never split across rows; the k-th example of a row is
segment k in both streams. Every batch is a dict of numpy arrays, B = this
host's rows:

* ``encoder_inputs`` int32 [B, Le], ``encoder_segment_ids`` int32 [B, Le]
  (1, 2, ... per example, 0 padding), ``encoder_positions`` int32 [B, Le]
  (0, 1, ... per example);
* ``decoder_targets`` int32 [B, Ld], ``decoder_segment_ids``,
  ``decoder_positions`` int32 [B, Ld], likewise;
* ``decoder_inputs`` int32 [B, Ld]: the targets shifted right by one within
  each segment, BOS at each segment's first position, 0 on padding;
* ``loss_mask`` float32 [B, Ld]: 1 on every real target token.

Text-to-text classification (train and eval) and seq2seq evaluation are one
example per row instead (segment ids 1 and 0; for evaluation the number of
batches of the whole split is then known in advance, the same on every host;
for classification the decoder rows stay a label long) and add
``example_mask`` float32 [B] (0 for padding rows) and, for classification,
``label`` int32 [B] (the class id). Evaluation of span corruption is packed
like training, in order.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from bigmodel.data import pipeline
from bigmodel.data.corpus import record_text
from bigmodel.data.encoder_pipeline import example_rng
from bigmodel.data.objectives import SpanCorruptionLengths
from bigmodel.data.objectives import corrupt_spans, random_spans_noise_mask
from bigmodel.data.pipeline import Batch, TrainIterator
from bigmodel.data.records import answer_text
from bigmodel.data.special import SpecialIds
from bigmodel.data.tokenizer import BOS_ID, Tokenizer

# First-fit packing fills rows better with more open rows; at least this many.
_MIN_PACKING_BINS = 32

ENCODER_DECODER_KEYS = ("encoder_inputs", "encoder_segment_ids",
                        "encoder_positions", "decoder_inputs",
                        "decoder_targets", "decoder_segment_ids",
                        "decoder_positions")


@dataclasses.dataclass(frozen=True)
class SpanCorruptDocument(grain.transforms.MapWithIndex):
  """(index, record) -> ``{"examples": [{"encoder", "decoder"}, ...]}``, one
  span-corrupted example per chunk of the document's text tokens."""

  tokenizer: Tokenizer
  text_key: str
  special: SpecialIds
  lengths: SpanCorruptionLengths
  noise_density: float
  mean_span_length: float
  seed: int
  process_index: int

  def map_with_index(self, index: int, record: Mapping[str, Any]
                     ) -> dict[str, list[dict[str, np.ndarray]]]:
    tokens = np.asarray(
        self.tokenizer.encode(record_text(record, self.text_key)), np.int32)
    rng = example_rng(self.seed, self.process_index, index)
    examples = []
    for start in range(0, len(tokens), self.lengths.raw_length):
      chunk = tokens[start:start + self.lengths.raw_length]
      noise_mask = random_spans_noise_mask(
          len(chunk), rng, noise_density=self.noise_density,
          mean_span_length=self.mean_span_length)
      encoder, decoder = corrupt_spans(chunk, noise_mask,
                                       special=self.special)
      examples.append({"encoder": encoder, "decoder": decoder})
    return {"examples": examples}


class Unbatch(grain.experimental.FlatMapTransform):
  """``{"examples": [e0, e1, ...]}`` -> e0, e1, ... (possibly none)."""

  max_fan_out = 1 << 20  # Unused by the iterator flat map; a document's chunks.

  def flat_map(self, element: Mapping[str, Any]) -> Sequence[Any]:
    return element["examples"]


@dataclasses.dataclass(frozen=True)
class EncodePair(grain.transforms.Map):
  """Record -> ``{"encoder": encode(text) + [EOS], "decoder":
  encode(answer) + [EOS]}`` truncated to the lengths; with ``label_ids``
  also ``"label"``, the class id of the answer."""

  tokenizer: Tokenizer
  text_key: str
  answer_key: str
  class_names: tuple[str, ...] | None
  encoder_length: int
  decoder_length: int
  label_ids: Mapping[str, int] | None = None

  def _with_eos(self, text: str, length: int) -> np.ndarray:
    ids = self.tokenizer.encode(text)[:length - 1]
    return np.asarray(ids + [self.tokenizer.eos_id], np.int32)

  def target_ids(self, record: Mapping[str, Any]) -> np.ndarray:
    """The decoder's targets of ``record``: what ``map`` puts in "decoder"."""
    return self._with_eos(
        answer_text(record, self.answer_key, self.class_names),
        self.decoder_length)

  def map(self, record: Mapping[str, Any]) -> dict[str, Any]:
    example = {
        "encoder": self._with_eos(record_text(record, self.text_key),
                                  self.encoder_length),
        "decoder": self.target_ids(record)}
    if self.label_ids is not None:
      answer = answer_text(record, self.answer_key, self.class_names)
      example["label"] = np.int32(self.label_ids[answer])
    return example


def to_encoder_decoder_batch(rows: Mapping[str, np.ndarray]) -> Batch:
  """Packed ``encoder``/``decoder`` rows (+ ``*_segment_ids``,
  ``*_positions``) [B, L] -> the batch of the module docstring."""
  targets = rows["decoder"].astype(np.int32)
  segment_ids = rows["decoder_segment_ids"].astype(np.int32)
  positions = rows["decoder_positions"].astype(np.int32)
  shifted = np.zeros_like(targets)
  shifted[:, 1:] = targets[:, :-1]
  # Position 0 starts a segment, so the shift never crosses examples.
  decoder_inputs = np.where(positions == 0, BOS_ID, shifted)
  return {
      "encoder_inputs": rows["encoder"].astype(np.int32),
      "encoder_segment_ids": rows["encoder_segment_ids"].astype(np.int32),
      "encoder_positions": rows["encoder_positions"].astype(np.int32),
      "decoder_inputs": np.where(segment_ids > 0, decoder_inputs,
                                 0).astype(np.int32),
      "decoder_targets": targets,
      "decoder_segment_ids": segment_ids,
      "decoder_positions": positions,
      "loss_mask": (segment_ids > 0).astype(np.float32),
  }


def empty_encoder_decoder_batch(batch_size: int, encoder_length: int,
                                decoder_length: int, *,
                                per_example: bool = False,
                                with_label: bool = False) -> Batch:
  """A batch of padding; ``per_example`` adds ``example_mask``,
  ``with_label`` adds ``label``."""
  batch = {key: np.zeros((batch_size, encoder_length if key.startswith(
      "encoder") else decoder_length), np.int32)
           for key in ENCODER_DECODER_KEYS}
  batch["loss_mask"] = np.zeros((batch_size, decoder_length), np.float32)
  if per_example:
    batch["example_mask"] = np.zeros(batch_size, np.float32)
  if with_label:
    batch["label"] = np.zeros(batch_size, np.int32)
  return batch


def _packed_batches(examples: grain.IterDataset, encoder_length: int,
                    decoder_length: int, batch_size: int, seed: int,
                    drop_remainder: bool) -> grain.IterDataset:
  rows = grain.experimental.FirstFitPackIterDataset(
      examples, length_struct={"encoder": encoder_length,
                               "decoder": decoder_length},
      num_packing_bins=max(batch_size, _MIN_PACKING_BINS), seed=seed,
      shuffle_bins=True)
  return rows.batch(batch_size, drop_remainder=drop_remainder).map(
      to_encoder_decoder_batch)


def _span_corrupted_batches(documents: grain.MapDataset,
                            corrupt: SpanCorruptDocument,
                            encoder_length: int, decoder_length: int,
                            batch_size: int,
                            drop_remainder: bool) -> grain.IterDataset:
  stream = documents.map_with_index(corrupt).to_iter_dataset(
      pipeline.read_options())
  examples = grain.experimental.FlatMapIterDataset(stream, Unbatch())
  return _packed_batches(examples, encoder_length, decoder_length,
                         batch_size, corrupt.seed, drop_remainder)


def make_span_corruption_train_iter(
    documents: Sequence[Mapping[str, Any]], corrupt: SpanCorruptDocument, *,
    encoder_length: int, decoder_length: int, batch_size: int,
    process_count: int = 1, num_workers: int = 0) -> TrainIterator:
  """Endless span-corruption batches of this host's (corrupt.process_index)
  share of ``documents``, shuffled by ``corrupt.seed`` every epoch."""
  shard = grain.MapDataset.source(documents)[
      corrupt.process_index::process_count]
  dataset = _span_corrupted_batches(
      shard.seed(corrupt.seed).shuffle().repeat(), corrupt, encoder_length,
      decoder_length, batch_size, drop_remainder=True)
  return TrainIterator(pipeline.in_workers(dataset, num_workers))


def make_span_corruption_eval_iter(
    documents: Sequence[Mapping[str, Any]], corrupt: SpanCorruptDocument, *,
    encoder_length: int, decoder_length: int, batch_size: int,
    num_batches: int, process_count: int = 1) -> Iterator[Batch]:
  """Exactly ``num_batches`` packed batches of this host's validation
  documents, in order with fixed corruption; padding once they run out."""
  shard = grain.MapDataset.source(documents)[
      corrupt.process_index::process_count]
  batches = iter(_span_corrupted_batches(
      shard, corrupt, encoder_length, decoder_length, batch_size,
      drop_remainder=False))
  return pipeline.exactly_n_batches(batches, num_batches,
                                    empty_encoder_decoder_batch(
                                        batch_size, encoder_length,
                                        decoder_length))


def make_seq2seq_train_iter(records: Sequence[Mapping[str, Any]],
                            encode: EncodePair, *, batch_size: int, seed: int,
                            process_index: int = 0, process_count: int = 1,
                            num_workers: int = 0) -> TrainIterator:
  """Endless packed (input, target) batches of this host's share."""
  shard = grain.MapDataset.source(records)[process_index::process_count]
  encode = dataclasses.replace(encode, label_ids=None)
  stream = shard.seed(seed).shuffle().repeat().map(encode).to_iter_dataset(
      pipeline.read_options())
  dataset = _packed_batches(stream, encode.encoder_length,
                            encode.decoder_length, batch_size, seed,
                            drop_remainder=True)
  return TrainIterator(pipeline.in_workers(dataset, num_workers))


@dataclasses.dataclass(frozen=True)
class OneExamplePerRow(grain.transforms.Map):
  """An encoded example -> a packed row holding just it (segment 1)."""

  encoder_length: int
  decoder_length: int

  def map(self, example: Mapping[str, Any]) -> dict[str, Any]:
    row = {}
    for key, length in (("encoder", self.encoder_length),
                        ("decoder", self.decoder_length)):
      tokens = example[key]
      is_real = np.arange(length) < len(tokens)
      row[key] = np.zeros(length, np.int32)
      row[key][:len(tokens)] = tokens
      row[f"{key}_segment_ids"] = is_real.astype(np.int32)
      row[f"{key}_positions"] = np.where(is_real, np.arange(length),
                                         0).astype(np.int32)
    if "label" in example:
      row["label"] = example["label"]
    return row


def _to_per_example_batch(rows: Mapping[str, np.ndarray]) -> Batch:
  batch = to_encoder_decoder_batch(rows)
  batch["example_mask"] = np.ones(len(rows["encoder"]), np.float32)
  if "label" in rows:
    batch["label"] = rows["label"].astype(np.int32)
  return batch


def _per_example_batches(examples: grain.MapDataset, encode: EncodePair,
                         batch_size: int,
                         drop_remainder: bool) -> grain.IterDataset:
  rows = examples.map(encode).map(
      OneExamplePerRow(encode.encoder_length, encode.decoder_length))
  return rows.to_iter_dataset(pipeline.read_options()).batch(
      batch_size, drop_remainder=drop_remainder).map(_to_per_example_batch)


def make_per_example_train_iter(records: Sequence[Mapping[str, Any]],
                                encode: EncodePair, *, batch_size: int,
                                seed: int, process_index: int = 0,
                                process_count: int = 1,
                                num_workers: int = 0) -> TrainIterator:
  """Endless shuffled batches of one example per row (text-to-text
  classification: a label is a few tokens, so the decoder rows are short);
  with ``example_mask`` and, given ``encode.label_ids``, ``label``."""
  shard = grain.MapDataset.source(records)[process_index::process_count]
  dataset = _per_example_batches(shard.seed(seed).shuffle().repeat(), encode,
                                 batch_size, drop_remainder=True)
  return TrainIterator(pipeline.in_workers(dataset, num_workers))


def make_seq2seq_eval_iter(records: Sequence[Mapping[str, Any]],
                           encode: EncodePair, *, batch_size: int,
                           num_batches: int, process_index: int = 0,
                           process_count: int = 1) -> Iterator[Batch]:
  """``num_batches`` batches of one validation example per row, in order;
  padding rows (example_mask 0) once the split runs out. Use
  ``encoder_pipeline.num_eval_batches`` to cover the whole split once."""
  shard = grain.MapDataset.source(records)[process_index::process_count]
  batches = iter(_per_example_batches(shard, encode, batch_size,
                                      drop_remainder=False))
  return pipeline.exactly_n_batches(batches, num_batches,
                                    empty_encoder_decoder_batch(
                                        batch_size, encode.encoder_length,
                                        encode.decoder_length,
                                        per_example=True,
                                        with_label=encode.label_ids
                                        is not None))


def unigram_baseline_loss(encode: EncodePair,
                          train: Sequence[Mapping[str, Any]],
                          validation: Sequence[Mapping[str, Any]]) -> float:
  """Eval loss of the best predictor that ignores the input: every target
  token drawn from the train targets' token frequencies (add-half smoothed
  over the tokenizer's vocabulary), in nats per target token (EOS included),
  the unit of the seq2seq ``eval_loss``."""
  vocab_size = encode.tokenizer.vocab_size
  counts = np.full(vocab_size, 0.5)
  for index in range(len(train)):
    np.add.at(counts, encode.target_ids(train[index]), 1)
  log_probs = np.log(counts / counts.sum())
  loss_sum = num_tokens = 0.0
  for index in range(len(validation)):
    ids = encode.target_ids(validation[index])
    loss_sum -= log_probs[ids].sum()
    num_tokens += len(ids)
  return loss_sum / max(num_tokens, 1)


def segment_exact_match(predictions: np.ndarray,
                        batch: Mapping[str, np.ndarray]) -> tuple[int, int]:
  """(examples whose every target token is predicted, examples) in a batch.

  Args:
    predictions: int [B, Ld] predicted decoder tokens (e.g. the argmax of
      teacher-forced logits).
    batch: An encoder-decoder batch (packed or one example per row).

  Returns:
    The counts over all real segments of the batch: text-to-text accuracy.
  """
  segment_ids = np.asarray(batch["decoder_segment_ids"])
  real = segment_ids > 0
  rows = np.broadcast_to(np.arange(len(segment_ids))[:, None],
                         segment_ids.shape)
  example_keys = rows * (segment_ids.shape[1] + 1) + segment_ids
  wrong = real & (np.asarray(predictions) != batch["decoder_targets"])
  num_examples = len(np.unique(example_keys[real]))
  return num_examples - len(np.unique(example_keys[wrong])), num_examples
