"""Per-record transforms and rows -> batch functions of the data tasks.

A transform turns one record of a source into one example (or, for span
corruption, a list of them); :mod:`bigmodel.data.loader` packs or pads the
examples into rows, batches them and calls the task's rows -> batch
function. All special ids come from the tokenizer (``Tokenizer
.special_tokens``, via :class:`bigmodel.data.special.SpecialIds`), never from
constants. Per-example randomness (masks, noise spans) is seeded by (seed,
host, index of the record in the host's shuffled, repeated stream), so every
epoch draws anew and a restored iterator repeats its batches exactly.

Batch formats (B = rows of this host, L = data.seq_len; the task's
``BatchSpec`` in :mod:`bigmodel.data.batch_spec` is the exact schema):

* lm: ``inputs``/``targets`` [B, L] (``targets[:, i]`` is the token after
  ``inputs[:, i]``), ``segment_ids`` (1, 2, ... per document, 0 padding),
  ``positions`` (0, 1, ... per segment, restarting in every row),
  ``loss_mask`` (1 where the target continues the same document). Rows are
  slices of L + 1 tokens of the ``[BOS] + text + [EOS]`` stream, so a
  document cut by a row's end continues in the next row as segment 1.
* mlm: the same keys, targets not shifted (the original tokens),
  ``loss_mask`` 1 exactly at the chosen positions, plus ``type_ids`` (0).
* classify (encoder): one example per row, ``[BOS] + text + [EOS]``
  truncated to L: ``inputs``, ``segment_ids``, ``positions``, ``type_ids``
  [B, L], ``label`` [B] and ``example_mask`` [B] (0 on padding rows).
* encoder-decoder (span_corruption, seq2seq, classify with T5):
  ``encoder_{inputs,segment_ids,positions}`` [B, Le],
  ``decoder_{inputs,targets,segment_ids,positions}`` [B, Ld], ``loss_mask``
  [B, Ld] (1 on every real target); ``decoder_inputs`` are the targets
  shifted right within each segment, starting with the tokenizer's
  ``decoder_start_id``. One example per row adds ``example_mask`` [B] and,
  for classification, ``label`` [B].
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from bigmodel.data.batch_spec import Batch
from bigmodel.data.objectives import SpanCorruptionLengths
from bigmodel.data.objectives import corrupt_spans, mlm_mask
from bigmodel.data.objectives import random_spans_noise_mask
from bigmodel.data.sources import answer_text, record_text
from bigmodel.data.special import SpecialIds
from bigmodel.data.tokenizer import Tokenizer

ENCODER_DECODER_KEYS = ("encoder_inputs", "encoder_segment_ids",
                        "encoder_positions", "decoder_inputs",
                        "decoder_targets", "decoder_segment_ids",
                        "decoder_positions")


def example_rng(seed: int, process_index: int,
                index: int) -> np.random.Generator:
  """The generator of one example: a pure function of its coordinates."""
  return np.random.default_rng([seed % 2**32, process_index, index])


def document_ids(tokenizer: Tokenizer, record: Mapping[str, Any] | bytes,
                 text_key: str) -> np.ndarray:
  """A document's token ids (int32): its text tokenized, or, for a record of
  the token cache (:mod:`bigmodel.data.token_cache`: bytes), the ids stored."""
  if isinstance(record, bytes):
    return np.frombuffer(record, np.int32)
  return np.asarray(tokenizer.encode(record_text(record, text_key)), np.int32)


def _with_bos_eos(tokenizer: Tokenizer, ids: list[int] | np.ndarray) -> np.ndarray:
  tokens = np.empty(len(ids) + 2, dtype=np.int32)
  tokens[0], tokens[1:-1], tokens[-1] = tokenizer.bos_id, ids, tokenizer.eos_id
  return tokens


# --------------------------------------------------------------------------
# Text corpora: lm, mlm, span_corruption.


@dataclasses.dataclass(frozen=True)
class TokenizeDocument(grain.transforms.Map):
  """Record -> ``{"tokens": int32 [BOS] + encode(text) + [EOS]}``."""

  tokenizer: Tokenizer
  text_key: str

  def map(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    ids = document_ids(self.tokenizer, record, self.text_key)
    return {"tokens": _with_bos_eos(self.tokenizer, ids)}


def rows_to_lm_batch(rows: Mapping[str, np.ndarray]) -> Batch:
  """Packed ``tokens`` rows [B, L + 1] (+ segment ids, positions) -> the lm
  batch [B, L]: shifted into inputs/targets, loss mask derived."""
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
    tokens = _with_bos_eos(self.tokenizer,
                           document_ids(self.tokenizer, record, self.text_key))
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


@dataclasses.dataclass(frozen=True)
class SpanCorruptDocument(grain.transforms.MapWithIndex):
  """(index, record) -> ``{"examples": [{"encoder", "decoder"}, ...]}``, one
  span-corrupted example per chunk of the document's text tokens, both ends
  with the tokenizer's EOS (``special.eos_id``)."""

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
    tokens = document_ids(self.tokenizer, record, self.text_key)
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


# --------------------------------------------------------------------------
# Labelled records: classify, seq2seq.


@dataclasses.dataclass(frozen=True)
class EncodeForClassification(grain.transforms.Map):
  """Record -> ``{"inputs": int32 [BOS] + text[:L - 2] + [EOS], "label":
  int32}`` (padded to L by the loader)."""

  tokenizer: Tokenizer
  text_key: str
  answer_key: str
  class_names: tuple[str, ...] | None
  label_ids: Mapping[str, int]
  seq_len: int

  def map(self, record: Mapping[str, Any]) -> dict[str, Any]:
    ids = self.tokenizer.encode(record_text(record, self.text_key))
    label = self.label_ids[answer_text(record, self.answer_key,
                                       self.class_names)]
    return {"inputs": _with_bos_eos(self.tokenizer, ids[:self.seq_len - 2]),
            "label": np.int32(label)}


def rows_to_classify_batch(rows: Mapping[str, np.ndarray]) -> Batch:
  """Padded ``inputs`` rows (+ segment ids, positions) and labels -> the
  encoder classification batch."""
  inputs = rows["inputs"].astype(np.int32)
  return {
      "inputs": inputs,
      "segment_ids": rows["inputs_segment_ids"].astype(np.int32),
      "positions": rows["inputs_positions"].astype(np.int32),
      "type_ids": np.zeros_like(inputs),
      "label": rows["label"].astype(np.int32),
      "example_mask": np.ones(len(inputs), np.float32),
  }


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


@dataclasses.dataclass(frozen=True)
class ToEncoderDecoderBatch(grain.transforms.Map):
  """Packed or padded ``encoder``/``decoder`` rows (+ ``*_segment_ids``,
  ``*_positions``) [B, L] -> the encoder-decoder batch.

  Attributes:
    decoder_start_id: The tokenizer's first decoder input.
    per_example: One example per row: adds ``example_mask`` (and ``label``
      when the rows have one).
  """

  decoder_start_id: int
  per_example: bool = False

  def map(self, rows: Mapping[str, np.ndarray]) -> Batch:
    targets = rows["decoder"].astype(np.int32)
    segment_ids = rows["decoder_segment_ids"].astype(np.int32)
    positions = rows["decoder_positions"].astype(np.int32)
    shifted = np.zeros_like(targets)
    shifted[:, 1:] = targets[:, :-1]
    # Position 0 starts a segment, so the shift never crosses examples.
    decoder_inputs = np.where(positions == 0, self.decoder_start_id, shifted)
    batch = {
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
    if self.per_example:
      batch["example_mask"] = np.ones(len(targets), np.float32)
      if "label" in rows:
        batch["label"] = rows["label"].astype(np.int32)
    return batch
