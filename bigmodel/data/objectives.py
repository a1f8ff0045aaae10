"""Pretraining objectives on token arrays: BERT masking and T5 span corruption.

Pure numpy on one document or chunk at a time, with the random generator
passed in: the pipelines seed it from (seed, host, example index), so the
same example always gets the same corruption and a restored iterator
reproduces its batches exactly.

Span corruption follows T5 (``t5.data.preprocessors``): the number of noise
tokens and of noise spans is a deterministic function of the chunk length
(:func:`span_counts`), only where the spans fall is random
(:func:`random_spans_noise_mask`), and :func:`span_corruption_lengths` is the
arithmetic of T5's ``random_spans_helper`` that picks the raw chunk length
whose corrupted inputs and targets fit the model's lengths.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from bigmodel.data.special import SpecialIds
from bigmodel.errors import UserError

# Shares of the chosen MLM positions: mask token, random token; the rest stay.
MLM_MASK_SHARE = 0.8
MLM_RANDOM_SHARE = 0.1


def mlm_mask(tokens: np.ndarray, rng: np.random.Generator, *,
             probability: float, special: SpecialIds
             ) -> tuple[np.ndarray, np.ndarray]:
  """BERT masking of one token sequence.

  ``probability`` of the real tokens (not ``special.no_text_ids``: the
  tokenizer's pad, bos, eos) are chosen, the count stochastically rounded so
  that its expectation is exact even for short documents; of those 80%
  become ``special.mask_id``, 10% a uniform random ordinary id in
  ``[special.first_ordinary_id, tokenizer_vocab_size)`` and 10% stay.

  Args:
    tokens: int [n] token ids.
    rng: The example's generator.
    probability: Share of the real tokens chosen.
    special: Where the mask id and ordinary ids lie.

  Returns:
    (inputs int32 [n], chosen bool [n]): the corrupted tokens and the
    positions to predict.
  """
  tokens = np.asarray(tokens, np.int32)
  eligible = np.flatnonzero(~np.isin(tokens, special.no_text_ids))
  num_chosen = int(np.floor(len(eligible) * probability + rng.random()))
  chosen_positions = rng.choice(eligible, num_chosen, replace=False)
  chosen = np.zeros(len(tokens), bool)
  chosen[chosen_positions] = True
  inputs = tokens.copy()
  action = rng.random(num_chosen)
  to_mask = chosen_positions[action < MLM_MASK_SHARE]
  to_random = chosen_positions[
      (action >= MLM_MASK_SHARE)
      & (action < MLM_MASK_SHARE + MLM_RANDOM_SHARE)]
  inputs[to_mask] = special.mask_id
  inputs[to_random] = rng.integers(special.first_ordinary_id,
                                   special.tokenizer_vocab_size,
                                   len(to_random))
  return inputs, chosen


def span_counts(length: int, noise_density: float,
                mean_span_length: float) -> tuple[int, int]:
  """(noise tokens, noise spans) of a chunk of ``length`` tokens, as T5.

  T5's ``random_spans_noise_mask``: round(length * density) noise tokens,
  clipped to [1, length - 1], in round(noise / mean) >= 1 spans. A 1-token
  chunk is treated as 2 tokens whose noise is the second: it has no noise.
  Also capped so that every noise and non-noise span has a token (only
  binds for a mean span length below 1 or a density near 1).
  """
  if length < 2:
    return 0, 0
  num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
  num_spans = max(int(round(num_noise / mean_span_length)), 1)
  return num_noise, min(num_spans, num_noise, length - num_noise)


@dataclasses.dataclass(frozen=True)
class SpanCorruptionLengths:
  """Lengths of span corruption for a model's encoder/decoder lengths.

  Attributes:
    raw_length: Tokens of text per chunk (the last chunk of a document may be
      shorter).
    inputs_length: Encoder tokens of a full chunk (<= the encoder length).
    targets_length: Decoder tokens of a full chunk (<= the decoder length).
    max_spans: Noise spans of a full chunk, the most of any chunk: the
      sentinels needed.
  """
  raw_length: int
  inputs_length: int
  targets_length: int
  max_spans: int


def _corrupted_lengths(raw_length: int, noise_density: float,
                       mean_span_length: float) -> tuple[int, int, int]:
  """(inputs, targets, spans) lengths of a corrupted chunk, EOS included."""
  num_noise, num_spans = span_counts(raw_length, noise_density,
                                     mean_span_length)
  # Inputs: the non-noise tokens and a sentinel per span; targets: a
  # sentinel and the tokens of each span; both end with EOS.
  return (raw_length - num_noise + num_spans + 1, num_noise + num_spans + 1,
          num_spans)


def span_corruption_lengths(encoder_length: int, decoder_length: int,
                            noise_density: float,
                            mean_span_length: float) -> SpanCorruptionLengths:
  """The longest raw chunk whose corruption fits both lengths.

  T5's ``random_spans_helper`` with one extra token per span on each side,
  plus a decoder bound: with ``decoder_length`` 0 the decoder length is what
  the encoder length implies (T5's targets_length), otherwise the chunk also
  shrinks until its targets fit. The corrupted lengths never decrease with
  the raw length, so every shorter chunk fits too.

  Raises:
    UserError: if even a 1-token chunk does not fit.
  """
  if not 0.0 < noise_density < 1.0:
    raise UserError(f"data.noise_density={noise_density} must be in (0, 1)")
  if mean_span_length < 1.0:
    raise UserError(f"data.mean_span_length={mean_span_length} must be >= 1")
  decoder_bound = decoder_length or np.iinfo(np.int64).max

  def fits(raw_length: int) -> bool:
    inputs, targets, _ = _corrupted_lengths(raw_length, noise_density,
                                            mean_span_length)
    return inputs <= encoder_length and targets <= decoder_bound

  if not fits(1):
    raise UserError(
        f"data.seq_len={encoder_length} / data.target_len={decoder_length}"
        " cannot hold even one token with its EOS after span corruption")
  raw_length = 1
  # Inputs grow by at most one per raw token, so this runs ~seq_len times.
  while fits(raw_length + 1):
    raw_length += 1
  inputs, targets, spans = _corrupted_lengths(raw_length, noise_density,
                                              mean_span_length)
  return SpanCorruptionLengths(raw_length=raw_length, inputs_length=inputs,
                               targets_length=targets, max_spans=spans)


def _random_segment_lengths(num_items: int, num_segments: int,
                            rng: np.random.Generator) -> np.ndarray:
  """Lengths (each >= 1, summing to num_items) of a random partition."""
  first_in_segment = np.zeros(num_items, bool)
  first_in_segment[rng.choice(np.arange(1, num_items), num_segments - 1,
                              replace=False)] = True
  return np.bincount(np.cumsum(first_in_segment), minlength=num_segments)


def random_spans_noise_mask(length: int, rng: np.random.Generator, *,
                            noise_density: float,
                            mean_span_length: float) -> np.ndarray:
  """T5's noise mask: bool [length], noise spans at random places.

  The counts come from :func:`span_counts`; the noise and non-noise tokens are
  each cut into that many spans of random lengths (>= 1), interleaved
  starting with non-noise, so the chunk ends in noise.
  """
  num_noise, num_spans = span_counts(length, noise_density, mean_span_length)
  if num_spans == 0:
    return np.zeros(length, bool)
  noise_lengths = _random_segment_lengths(num_noise, num_spans, rng)
  kept_lengths = _random_segment_lengths(length - num_noise, num_spans, rng)
  interleaved = np.stack([kept_lengths, noise_lengths], axis=1).reshape(-1)
  span_starts = np.cumsum(interleaved)[:-1]
  span_start_indicator = np.zeros(length, np.int32)
  span_start_indicator[span_starts] = 1
  return np.cumsum(span_start_indicator) % 2 == 1


def corrupt_spans(tokens: np.ndarray, noise_mask: np.ndarray, *,
                  special: SpecialIds) -> tuple[np.ndarray, np.ndarray]:
  """T5 span corruption of one chunk, EOS appended to both sides.

  Args:
    tokens: int [n] text tokens (no BOS/EOS).
    noise_mask: bool [n], from :func:`random_spans_noise_mask`.
    special: Where the sentinels and EOS lie.

  Returns:
    (inputs, targets), int32: inputs are the tokens with noise span k
    replaced by sentinel k; targets are sentinel k followed by the tokens of
    span k, for every span in order.
  """
  tokens = np.asarray(tokens, np.int32)
  previous_noise = np.concatenate([[False], noise_mask[:-1]])
  span_start = noise_mask & ~previous_noise
  num_spans = int(span_start.sum())
  if num_spans > special.num_sentinels:
    raise ValueError(f"{num_spans} spans but only {special.num_sentinels}"
                     " sentinels")
  sentinels = special.first_sentinel_id + np.arange(num_spans, dtype=np.int32)
  eos = np.array([special.eos_id], np.int32)
  inputs = tokens.copy()
  inputs[span_start] = sentinels
  inputs = inputs[~noise_mask | span_start]
  noise_positions = np.flatnonzero(noise_mask)
  targets = np.insert(tokens[noise_positions],
                      np.flatnonzero(span_start[noise_positions]), sentinels)
  return (np.concatenate([inputs, eos]),
          np.concatenate([targets, eos]).astype(np.int32))
