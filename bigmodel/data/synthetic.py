"""Synthetic batches: seeded random tokens, for benchmarks and smoke tests.

Batch ``step`` on host ``process_index`` depends only on (seed, process_index,
step), so the stream is infinite, reproducible and resumable from the step
count alone, and hosts get different rows.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from bigmodel.data.pipeline import Batch

# Ids below this are pad/bos/eos/unk; random tokens never use them.
FIRST_TOKEN_ID = 3


class SyntheticIterator(Iterator[Batch]):
  """Endless batches of uniform random tokens in [3, vocab_size).

  Same format as the text pipeline: one document per row (segment_ids 1,
  positions 0..L-1, loss_mask all 1), targets the shift of inputs.
  """

  def __init__(self, *, vocab_size: int, seq_len: int, batch_size: int,
               seed: int, process_index: int = 0):
    if vocab_size <= FIRST_TOKEN_ID:
      raise ValueError(f"vocab_size must exceed {FIRST_TOKEN_ID}")
    self._vocab_size = vocab_size
    self._seq_len = seq_len
    self._batch_size = batch_size
    self._seed = seed
    self._process_index = process_index
    self._step = 0

  def __iter__(self) -> SyntheticIterator:
    return self

  def __next__(self) -> Batch:
    rng = np.random.default_rng([self._seed, self._process_index, self._step])
    self._step += 1
    rows = rng.integers(FIRST_TOKEN_ID, self._vocab_size,
                        (self._batch_size, self._seq_len + 1), dtype=np.int32)
    shape = (self._batch_size, self._seq_len)
    return {
        "inputs": rows[:, :-1],
        "targets": rows[:, 1:],
        "segment_ids": np.ones(shape, np.int32),
        "positions": np.broadcast_to(
            np.arange(self._seq_len, dtype=np.int32), shape).copy(),
        "loss_mask": np.ones(shape, np.float32),
    }

  def get_state(self) -> dict[str, int]:
    return {"step": self._step}

  def set_state(self, state: Mapping[str, int]) -> None:
    self._step = int(state["step"])
