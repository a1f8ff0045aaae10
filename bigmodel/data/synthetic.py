"""Synthetic batches: seeded random tokens, for benchmarks and smoke tests.

Row ``r`` of global batch ``step`` depends only on (seed, step, r), and host
``process_index`` takes the rows ``[process_index * B, (process_index + 1) * B)``
of every global batch (B = this host's rows), which is where
``sharding.global_batch`` puts them. So the global batches are the same
whatever the number of processes, the stream is infinite and reproducible,
and it resumes from the step count alone.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from bigmodel.data.batch_spec import Batch

# Ids below this are pad/bos/eos/unk; random tokens never use them.
FIRST_TOKEN_ID = 3


class SyntheticIterator(Iterator[Batch]):
  """Endless batches of uniform random tokens in [3, vocab_size).

  Same format as the text pipeline: one document per row (segment_ids 1,
  positions 0..L-1, loss_mask all 1), targets the shift of inputs.

  Args:
    vocab_size: Tokens are drawn from [3, vocab_size).
    seq_len: L, tokens per row of inputs.
    batch_size: Rows per batch on this host (global batch / process count).
    seed: The stream's seed.
    process_index: This host; it gets global rows
      ``process_index * batch_size`` onwards.
  """

  def __init__(self, *, vocab_size: int, seq_len: int, batch_size: int,
               seed: int, process_index: int = 0):
    if vocab_size <= FIRST_TOKEN_ID:
      raise ValueError(f"vocab_size must exceed {FIRST_TOKEN_ID}")
    self._vocab_size = vocab_size
    self._seq_len = seq_len
    self._batch_size = batch_size
    self._seed = seed
    self._first_row = process_index * batch_size
    self._step = 0

  def __iter__(self) -> SyntheticIterator:
    return self

  def _row(self, step: int, row: int) -> np.ndarray:
    # One generator per global row (a few microseconds each): a row does not
    # depend on how the global batch is split between hosts.
    rng = np.random.default_rng([self._seed, step, row])
    return rng.integers(FIRST_TOKEN_ID, self._vocab_size, self._seq_len + 1,
                        dtype=np.int32)

  def __next__(self) -> Batch:
    step, self._step = self._step, self._step + 1
    rows = np.stack([self._row(step, self._first_row + i)
                     for i in range(self._batch_size)])
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
