"""BatchSpec: what a task's batches hold, key -> per-row shape and dtype.

Each task of :mod:`bigmodel.data.registry` declares the spec of its train
and eval batches; everything that needs a batch without data derives it from
the spec instead of restating the schema: eval padding
(:meth:`BatchSpec.empty_batch`: all zeros, so padding ids, segment ids, masks
and weights are 0), abstract batches for state init and AOT compilation
(:meth:`BatchSpec.abstract_batch`), FLOP counts and benchmarks
(:meth:`BatchSpec.shapes`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class BatchSpec:
  """Keys of a batch and, per key, the shape of one row and the dtype.

  Attributes:
    fields: key -> (per-row shape, dtype); a batch of B rows holds arrays of
      shape (B, *per-row shape).
  """
  fields: Mapping[str, tuple[tuple[int, ...], Any]]

  @classmethod
  def of(cls, **fields: tuple[tuple[int, ...], Any]) -> BatchSpec:
    """``BatchSpec.of(inputs=((L,), np.int32), ...)``, dtypes normalised."""
    return cls({key: (tuple(shape), np.dtype(dtype))
                for key, (shape, dtype) in fields.items()})

  def shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
    """key -> (batch_size, *per-row shape)."""
    return {key: (batch_size, *shape) for key, (shape, _) in self.fields.items()}

  def empty_batch(self, batch_size: int) -> Batch:
    """``batch_size`` rows of padding: zeros of every key's shape and dtype."""
    return {key: np.zeros((batch_size, *shape), dtype)
            for key, (shape, dtype) in self.fields.items()}

  def abstract_batch(self, batch_size: int, sharding: Any = None
                     ) -> dict[str, Any]:
    """key -> ``jax.ShapeDtypeStruct`` of a global batch, for ``jit(...)
    .lower`` and state init without data; ``sharding`` is given to each."""
    import jax  # pylint: disable=g-import-not-at-top  (the data layer runs without it)
    return {key: jax.ShapeDtypeStruct((batch_size, *shape), dtype,
                                      sharding=sharding)
            for key, (shape, dtype) in self.fields.items()}

  def mismatches(self, batch: Mapping[str, np.ndarray],
                 batch_size: int) -> list[str]:
    """What differs between ``batch`` and this spec (empty: it matches)."""
    problems = [f"missing key {key!r}" for key in self.fields if key not in batch]
    problems += [f"unexpected key {key!r}" for key in batch if key not in self.fields]
    for key, (shape, dtype) in self.fields.items():
      if key in batch:
        value = np.asarray(batch[key])
        if value.shape != (batch_size, *shape) or value.dtype != dtype:
          problems.append(f"{key}: {value.shape} {value.dtype}, spec"
                          f" {(batch_size, *shape)} {dtype}")
    return problems


def lm_spec(seq_len: int) -> BatchSpec:
  """Causal LM rows: inputs, targets, segment_ids, positions [L], loss_mask."""
  row = (seq_len,)
  return BatchSpec.of(inputs=(row, np.int32), targets=(row, np.int32),
                      segment_ids=(row, np.int32), positions=(row, np.int32),
                      loss_mask=(row, np.float32))


def mlm_spec(seq_len: int) -> BatchSpec:
  """Packed MLM rows: the LM keys (targets unshifted) plus type_ids."""
  return BatchSpec({**lm_spec(seq_len).fields,
                    "type_ids": ((seq_len,), np.dtype(np.int32))})


def classify_spec(seq_len: int) -> BatchSpec:
  """Encoder classification: one example per row, a label and its weight."""
  row = (seq_len,)
  return BatchSpec.of(inputs=(row, np.int32), segment_ids=(row, np.int32),
                      positions=(row, np.int32), type_ids=(row, np.int32),
                      label=((), np.int32), example_mask=((), np.float32))


def encoder_decoder_spec(encoder_length: int, decoder_length: int, *,
                         per_example: bool = False,
                         with_label: bool = False) -> BatchSpec:
  """Encoder-decoder rows; ``per_example`` adds ``example_mask``,
  ``with_label`` adds ``label``."""
  fields = {}
  for prefix, length, keys in (
      ("encoder", encoder_length, ("inputs", "segment_ids", "positions")),
      ("decoder", decoder_length,
       ("inputs", "targets", "segment_ids", "positions"))):
    fields.update({f"{prefix}_{key}": ((length,), np.int32) for key in keys})
  fields["loss_mask"] = ((decoder_length,), np.float32)
  if per_example:
    fields["example_mask"] = ((), np.float32)
  if with_label:
    fields["label"] = ((), np.int32)
  return BatchSpec.of(**fields)


def preference_spec(seq_len: int) -> BatchSpec:
  """Preference pairs, one per row: the LM keys per side (``chosen_*``,
  ``rejected_*``; loss_mask 1 on the reply) and example_mask."""
  fields = {f"{side}_{key}": value for side in ("chosen", "rejected")
            for key, value in lm_spec(seq_len).fields.items()}
  return BatchSpec({**fields, "example_mask": ((), np.dtype(np.float32))})
