"""Tests of the pretraining objectives and special ids (pure numpy, fast)."""
import numpy as np
import pytest

from bigmodel.data import objectives
from bigmodel.data import segment_exact_match
from bigmodel.data.special import decode, special_ids
from bigmodel.errors import UserError

TOKENIZER_VOCAB = 1000
SPECIAL = special_ids(TOKENIZER_VOCAB, TOKENIZER_VOCAB + 64)
PAD, BOS, EOS = 0, 1, 2


def _documents(rng, count, length):
  """BOS + ordinary tokens (unk included) + EOS, then padding."""
  docs = rng.integers(3, TOKENIZER_VOCAB, (count, length))
  docs[:, 0], docs[:, -6], docs[:, -5:] = BOS, EOS, PAD
  return docs


def test_mlm_chooses_15_percent_with_80_10_10():
  rng = np.random.default_rng(0)
  docs = _documents(rng, 2000, 100)
  chosen_count = eligible_count = 0
  masked = randomised = kept = 0
  for doc in docs:
    inputs, chosen = objectives.mlm_mask(doc, rng, probability=0.15,
                                         special=SPECIAL)
    assert not chosen[np.isin(doc, [PAD, BOS, EOS])].any()
    np.testing.assert_array_equal(inputs[~chosen], doc[~chosen])
    picked, original = inputs[chosen], doc[chosen]
    masked += np.sum(picked == SPECIAL.mask_id)
    changed = (picked != SPECIAL.mask_id) & (picked != original)
    assert np.all((picked[changed] >= 4) & (picked[changed] < TOKENIZER_VOCAB))
    randomised += np.sum(changed)
    kept += np.sum(picked == original)
    chosen_count += chosen.sum()
    eligible_count += np.sum(doc > EOS)
  assert chosen_count / eligible_count == pytest.approx(0.15, abs=0.003)
  assert masked / chosen_count == pytest.approx(0.8, abs=0.01)
  # A random token equals the original with probability 1/996: negligible.
  assert randomised / chosen_count == pytest.approx(0.1, abs=0.008)
  assert kept / chosen_count == pytest.approx(0.1, abs=0.008)


def test_mlm_short_documents_are_unbiased_and_never_choose_specials():
  rng = np.random.default_rng(1)
  counts = [objectives.mlm_mask(np.array([BOS, 50, 60, EOS]), rng,
                                probability=0.15, special=SPECIAL)[1]
            for _ in range(4000)]
  counts = np.array(counts)
  assert not counts[:, [0, 3]].any()
  assert counts.sum() / (2 * len(counts)) == pytest.approx(0.15, abs=0.015)
  inputs, chosen = objectives.mlm_mask(np.array([BOS, EOS, PAD]), rng,
                                       probability=0.15, special=SPECIAL)
  assert not chosen.any() and list(inputs) == [BOS, EOS, PAD]


@pytest.mark.parametrize("encoder_length, raw, targets", [
    (512, 568, 114),  # T5's own numbers (random_spans_helper).
    (256, 284, 58),
])
def test_span_lengths_follow_t5(encoder_length, raw, targets):
  lengths = objectives.span_corruption_lengths(encoder_length, 0, 0.15, 3.0)
  assert (lengths.raw_length, lengths.inputs_length,
          lengths.targets_length) == (raw, encoder_length, targets)


def test_span_lengths_respect_a_decoder_bound():
  lengths = objectives.span_corruption_lengths(256, 40, 0.15, 3.0)
  assert lengths.targets_length <= 40 and lengths.inputs_length <= 256
  with pytest.raises(UserError, match="noise_density"):
    objectives.span_corruption_lengths(256, 0, 1.0, 3.0)
  with pytest.raises(UserError, match="mean_span_length"):
    objectives.span_corruption_lengths(256, 0, 0.15, 0.5)


def _reconstruct(inputs, targets):
  """The original chunk from corrupted inputs and targets."""
  assert inputs[-1] == EOS and targets[-1] == EOS
  spans, current = {}, None
  for token in targets[:-1]:
    if token >= SPECIAL.first_sentinel_id:
      current = spans.setdefault(int(token), [])
    else:
      current.append(int(token))
  chunk = []
  for token in inputs[:-1]:
    chunk.extend(spans.pop(int(token)) if token >= SPECIAL.first_sentinel_id
                 else [int(token)])
  assert not spans  # Every target span was used once.
  return chunk


def test_span_corruption_reconstructs_and_matches_t5_counts():
  rng = np.random.default_rng(2)
  lengths = objectives.span_corruption_lengths(64, 0, 0.15, 3.0)
  noise_total = token_total = 0
  for length in list(range(1, 40)) + [lengths.raw_length] * 200:
    chunk = rng.integers(3, TOKENIZER_VOCAB, length)
    mask = objectives.random_spans_noise_mask(
        length, rng, noise_density=0.15, mean_span_length=3.0)
    num_noise, num_spans = objectives.span_counts(length, 0.15, 3.0)
    assert mask.sum() == num_noise
    starts = mask & ~np.concatenate([[False], mask[:-1]])
    assert starts.sum() == num_spans
    if length >= 2:
      assert not mask[0] and mask[-1]  # T5: non-noise first, noise last.
    inputs, targets = objectives.corrupt_spans(chunk, mask, special=SPECIAL)
    assert _reconstruct(inputs, targets) == list(chunk)
    sentinels = inputs[inputs >= SPECIAL.first_sentinel_id]
    np.testing.assert_array_equal(
        sentinels, SPECIAL.first_sentinel_id + np.arange(num_spans))
    np.testing.assert_array_equal(
        targets[targets >= SPECIAL.first_sentinel_id], sentinels)
    assert len(inputs) <= 64 and len(targets) <= lengths.targets_length
    if length == lengths.raw_length:
      assert (len(inputs), len(targets)) == (lengths.inputs_length,
                                             lengths.targets_length)
      noise_total += mask.sum()
      token_total += length
  assert noise_total / token_total == pytest.approx(0.15, abs=0.01)


def test_special_ids_room_and_decode():
  special = special_ids(400, 410)
  assert special.mask_id == 400 and special.sentinel_id(0) == 401
  assert special.num_sentinels == 9 and special.sentinel_id(8) == 409
  special.require(10, "span corruption")
  with pytest.raises(UserError, match=r"needs 11 ids.*model.vocab_size"):
    special.require(11, "span corruption")
  with pytest.raises(UserError, match="needs 1 ids"):
    special_ids(400, 400).require(1, "mlm")
  with pytest.raises(UserError, match="more than"):
    special_ids(401, 400)

  class Letters:  # A stand-in tokenizer: id i <-> chr(ord('a') + i - 4).
    vocab_size = 400

    def decode(self, ids):
      return "".join(chr(ord("a") + i - 4) for i in ids if i >= 4)
  text = decode(Letters(), [1, 4, 5, 400, 6, 401, 403, 2, 0, 999], special)
  assert text == "ab<mask>c<extra_id_0><extra_id_2><id_999>"


def test_segment_exact_match_counts_examples():
  batch = {"decoder_segment_ids": np.array([[1, 1, 2, 2, 0],
                                            [1, 1, 1, 0, 0]]),
           "decoder_targets": np.array([[5, 6, 7, 8, 0],
                                        [9, 9, 9, 0, 0]])}
  predictions = np.array([[5, 6, 7, 0, 3],   # Segment 2 wrong; padding free.
                          [9, 9, 9, 4, 4]])
  assert segment_exact_match(predictions, batch) == (2, 3)
