"""Log-likelihoods of token continuations: bigmodel's jitted forward in fixed shape buckets.

This is the model side of the lm-eval adapter, free of lm-eval itself: it
takes token ids, never text. A request is a pair (context ids, continuation
ids); its answer is the sum of the continuation tokens' log-probabilities and
whether greedy decoding would have produced every one of them.

- Decoders (``gpt`` family): the row is context + continuation cut from the
  left to ``model.max_len + 1`` tokens; the model reads all but the last and
  the last ``len(continuation)`` next-token predictions are scored. Rows are
  right-padded: causal attention keeps padding out of the real positions, so
  no segment ids are needed.
- Encoder-decoders (``t5``): the context goes to the encoder (right-padded,
  segment id 0 on padding), the decoder reads the start id + continuation
  minus its last token and predicts the continuation.

Rows are sorted by length (longest first), cut into batches of a fixed
number of rows (a multiple of the mesh's data-parallel size), and every
length is padded to a power of two (at least 16; for a decoder at most
``max_len``), so only a handful of shapes compile however many requests
come. Log-probabilities are the model's own ``log_softmax`` over its whole
output (embedding rows beyond the tokenizer included), as transformers
computes them on an exported model.

Shape letters as in ``bigmodel.models``: B rows, L tokens, E encoder
tokens, T decoder tokens, V vocabulary.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from bigmodel import sharding
from bigmodel.errors import UserError
from bigmodel.generation.generator import bucket
from bigmodel.models import families

Pair = tuple[Sequence[int], Sequence[int]]

# Jitted scoring functions by model: a trainer hook that builds a new scorer
# at every evaluation reuses the compiled programs of the same module.
_JITTED: dict[int, tuple[Any, Callable]] = {}


def _continuation_scores(logits_BxLxV: jax.Array, targets_BxL: jax.Array,
                         mask_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of the masked targets' log-probabilities [B], all masked targets greedy [B])."""
  logp_BxLxV = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
  target_logp_BxL = jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  # where, not a product: a padding position's value never reaches the sum.
  logp_B = jnp.sum(jnp.where(mask_BxL, target_logp_BxL, 0.0), axis=-1)
  greedy_BxL = jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL
  return logp_B, jnp.all(greedy_BxL | ~mask_BxL, axis=-1)


def _decoder_fn(model) -> Callable:
  def scores(params, inputs_BxL, targets_BxL, mask_BxL):
    logits_BxLxV = model.apply({"params": params}, inputs_BxL)
    return _continuation_scores(logits_BxLxV, targets_BxL, mask_BxL)
  return scores


def _encoder_decoder_fn(model) -> Callable:
  def scores(params, encoder_BxE, encoder_segment_ids_BxE, decoder_BxT, targets_BxT, mask_BxT):
    # Decoder padding follows the real tokens: causal attention keeps it out,
    # and its queries always see the encoder's real tokens (never all-masked).
    logits_BxTxV = model.apply({"params": params}, encoder_BxE, decoder_BxT,
                               encoder_segment_ids_BxE=encoder_segment_ids_BxE)
    return _continuation_scores(logits_BxTxV, targets_BxT, mask_BxT)
  return scores


def _jitted(model, encoder_decoder: bool) -> Callable:
  cached = _JITTED.get(id(model))
  if cached is None or cached[0] is not model:
    fn = _encoder_decoder_fn(model) if encoder_decoder else _decoder_fn(model)
    cached = _JITTED[id(model)] = (model, jax.jit(fn))
  return cached[1]


@dataclasses.dataclass
class TokenScorer:
  """Scores (context ids, continuation ids) pairs with a model on its mesh.

  Attributes:
    model: A ``gpt`` or ``t5`` family module.
    params: Its parameters, placed on ``mesh``.
    mesh: The device mesh; rows are split over its data-parallel axes.
    max_len: Decoder: the model's context (``model.max_len``). Encoder-decoder:
      the decoder's room (continuations are cut from the left to it).
    encoder_len: Encoder-decoder: the encoder's room (contexts are cut from
      the left to it); unused for a decoder.
    batch_size: Rows per compiled call (rounded up to a multiple of the
      data-parallel size).
    decoder_start_id: First decoder input of an encoder-decoder.
    pad_id: What padding holds.
  """
  model: Any
  params: Any
  mesh: jax.sharding.Mesh
  max_len: int
  encoder_len: int = 0
  batch_size: int = 8
  decoder_start_id: int = 0
  pad_id: int = 0

  def __post_init__(self):
    family = families.family_of(self.model)
    if not (family.is_causal_lm or family.encoder_decoder):
      raise UserError(f"a {family.name} model has no left-to-right likelihood to score")
    self.encoder_decoder = family.encoder_decoder
    dp = sharding.data_parallel_size(self.mesh)
    self.rows = -(-max(1, int(self.batch_size)) // dp) * dp
    self.shapes: set[tuple[int, ...]] = set()  # Every input shape run (each compiled once).

  def _place(self, x: np.ndarray) -> jax.Array:
    return jax.device_put(x, NamedSharding(self.mesh, P(sharding.BATCH_AXES)))

  def _fetch(self, x: jax.Array) -> np.ndarray:
    if not x.is_fully_addressable:  # Several processes: every one gets all rows.
      x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))

  def _length(self, n: int, cap: int = 0) -> int:
    return min(bucket(n), cap) if cap else bucket(n)

  def score(self, pairs: Sequence[Pair]) -> list[tuple[float, bool]]:
    """(log-probability of the continuation, greedy) per pair, in order.

    An empty continuation scores (0.0, True). Raises UserError for a
    continuation longer than the model can read (decoder: ``max_len``).
    """
    results: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
    todo = [i for i, (_, continuation) in enumerate(pairs) if len(continuation)]
    for i in todo:
      if not self.encoder_decoder and len(pairs[i][1]) > self.max_len:
        raise UserError(f"a continuation of {len(pairs[i][1])} tokens does not fit the "
                        f"model's context of {self.max_len} tokens")
    # Longest first: each batch pads to little more than its own rows.
    todo.sort(key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    run = self._encoder_decoder_batch if self.encoder_decoder else self._decoder_batch
    for start in range(0, len(todo), self.rows):
      chunk = todo[start:start + self.rows]
      logp_B, greedy_B = run([pairs[i] for i in chunk])
      for row, i in enumerate(chunk):
        results[i] = (float(logp_B[row]), bool(greedy_B[row]))
    return results

  def _decoder_batch(self, pairs: Sequence[Pair]) -> tuple[np.ndarray, np.ndarray]:
    # The row: context + continuation, cut from the left to max_len + 1
    # tokens; the model reads all but the last, and predicts all but the first.
    rows = [(list(ctx) + list(cont))[-(self.max_len + 1):] for ctx, cont in pairs]
    length = self._length(max(len(r) - 1 for r in rows), self.max_len)
    inputs_BxL = np.full((self.rows, length), self.pad_id, np.int32)
    targets_BxL = np.zeros((self.rows, length), np.int32)
    mask_BxL = np.zeros((self.rows, length), bool)
    for b, (row, (_, cont)) in enumerate(zip(rows, pairs)):
      n = len(row) - 1
      inputs_BxL[b, :n] = row[:-1]
      targets_BxL[b, :n] = row[1:]
      mask_BxL[b, n - len(cont):n] = True
    fn = _jitted(self.model, encoder_decoder=False)
    self.shapes.add(inputs_BxL.shape)
    with sharding.activate(self.mesh):
      logp_B, greedy_B = fn(self.params, *map(self._place, (inputs_BxL, targets_BxL, mask_BxL)))
    return self._fetch(logp_B), self._fetch(greedy_B)

  def _encoder_decoder_batch(self, pairs: Sequence[Pair]) -> tuple[np.ndarray, np.ndarray]:
    encoders = [list(ctx)[-self.encoder_len:] if self.encoder_len else list(ctx)
                for ctx, _ in pairs]
    continuations = [list(cont)[-self.max_len:] for _, cont in pairs]
    enc_len = self._length(max(len(e) for e in encoders))
    dec_len = self._length(max(len(c) for c in continuations))
    encoder_BxE = np.full((self.rows, enc_len), self.pad_id, np.int32)
    # Filler rows hold one real encoder token, so no query meets only padding.
    encoder_segment_ids_BxE = np.zeros((self.rows, enc_len), np.int32)
    encoder_segment_ids_BxE[:, 0] = 1
    decoder_BxT = np.full((self.rows, dec_len), self.pad_id, np.int32)
    targets_BxT = np.zeros((self.rows, dec_len), np.int32)
    mask_BxT = np.zeros((self.rows, dec_len), bool)
    for b, (enc, cont) in enumerate(zip(encoders, continuations)):
      encoder_BxE[b, :len(enc)] = enc
      encoder_segment_ids_BxE[b, :len(enc)] = 1
      decoder_BxT[b, :len(cont)] = [self.decoder_start_id] + cont[:-1]
      targets_BxT[b, :len(cont)] = cont
      mask_BxT[b, :len(cont)] = True
    fn = _jitted(self.model, encoder_decoder=True)
    self.shapes.add(encoder_BxE.shape + decoder_BxT.shape[1:])
    with sharding.activate(self.mesh):
      logp_B, greedy_B = fn(self.params, *map(self._place, (
          encoder_BxE, encoder_segment_ids_BxE, decoder_BxT, targets_BxT, mask_BxT)))
    return self._fetch(logp_B), self._fetch(greedy_B)
