"""Data-side evaluation numbers: text-to-text exact match, input-ignoring
baselines."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bigmodel.data.transforms import EncodePair


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
