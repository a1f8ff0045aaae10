"""The compiled decoding loops: sampling (greedy included) and beam search.

Both run the prompt once (``CachedDecoder.prefill``) and then one token per
iteration of a ``jax.lax.while_loop`` that stops early once every row is
done. They are traced once per shape bucket: B rows, P prompt slots and
M new-token slots are static, while the number of new tokens actually
wanted, the sampling values and the random key are traced arguments.

A row ends at any of its ``stop_ids`` (static: eos and, for chat models,
the other end-of-text / end-of-turn ids); every row stops on its own.

Shape letters as in ``bigmodel.models``: B rows, W beams, M new-token slots,
V vocabulary.
"""
from typing import Any

import jax
import jax.numpy as jnp

from bigmodel.generation import sampling
from bigmodel.generation.models import CachedDecoder

NEG_INF = -jnp.inf


def is_stop(token_X: jax.Array, stop_ids: tuple[int, ...]) -> jax.Array:
  """Whether each token is one of ``stop_ids`` (bool, same shape); none is for ()."""
  if not stop_ids:
    return jnp.zeros(token_X.shape, bool)
  return jnp.isin(token_X, jnp.asarray(stop_ids, token_X.dtype))


def sample_loop(decoder: CachedDecoder, params: Any, tokens_BxP: jax.Array, lengths_B: jax.Array,
                max_new_tokens: jax.Array, rng: jax.Array, values: dict[str, jax.Array], *,
                num_new: int, static_key: tuple[bool, bool, bool], stop_ids: tuple[int, ...],
                pad_id: int, start_id: int, num_valid_ids: int) -> jax.Array:
  """New tokens [B, M]: up to ``max_new_tokens`` (<= M) per row, then ``pad_id``.

  A row stops after the first of its tokens in ``stop_ids`` (kept in the
  output); with no ``stop_ids`` rows never stop early.
  """
  batch = tokens_BxP.shape[0]
  logits_BxV, state = decoder.prefill(params, tokens_BxP, lengths_B, num_new, start_id)
  out_BxM = jnp.full((batch, num_new), pad_id, jnp.int32)
  done_B = jnp.zeros((batch,), bool)

  def cond(carry):
    t, _, _, _, done_B, _ = carry
    return (t < max_new_tokens) & ~jnp.all(done_B)

  def body(carry):
    t, logits_BxV, state, out_BxM, done_B, rng = carry
    rng, step_rng = jax.random.split(rng)
    logits_BxV = sampling.mask_invalid(logits_BxV, num_valid_ids)
    token_B = sampling.next_token(logits_BxV, step_rng, values, static_key=static_key)
    token_B = jnp.where(done_B, pad_id, token_B)
    out_BxM = jax.lax.dynamic_update_slice_in_dim(out_BxM, token_B[:, None], t, axis=1)
    done_B = done_B | is_stop(token_B, stop_ids)
    logits_BxV, state = decoder.step(params, token_B, state)
    return t + 1, logits_BxV, state, out_BxM, done_B, rng

  carry = (jnp.int32(0), logits_BxV, state, out_BxM, done_B, rng)
  return jax.lax.while_loop(cond, body, carry)[3]


def length_penalty(length: jax.Array, alpha: float) -> jax.Array:
  """A hypothesis' score is its log-probability / length ** alpha."""
  return jnp.asarray(length, jnp.float32) ** alpha


def beam_loop(decoder: CachedDecoder, params: Any, tokens_BxP: jax.Array, lengths_B: jax.Array,
              max_new_tokens: jax.Array, *, num_new: int, num_beams: int, alpha: float,
              stop_ids: tuple[int, ...], pad_id: int, start_id: int,
              num_valid_ids: int) -> jax.Array:
  """The best hypothesis per row [B, M] by beam search with a length penalty.

  Keeps ``num_beams`` unfinished hypotheses per row; one that emits any of
  ``stop_ids`` (kept) joins the row's finished ones, scored log p / length **
  ``alpha`` (length counts the new tokens, the stop token included). Stops at
  ``max_new_tokens`` (the unfinished then compete too, scored the same way)
  or as soon as no unfinished hypothesis can beat a row's worst finished one.
  """
  batch, beams = tokens_BxP.shape[0], num_beams
  logits_BxV, state = decoder.prefill(params, tokens_BxP, lengths_B, num_new, start_id)
  logits_BWxV = jnp.repeat(logits_BxV, beams, axis=0)
  state = state.repeat_rows(beams)
  vocab = logits_BxV.shape[-1]
  # All beams start as the same prompt: only the first may expand at first.
  alive_logp_BxW = jnp.tile(jnp.where(jnp.arange(beams) == 0, 0.0, NEG_INF), (batch, 1))
  alive_BxWxM = jnp.full((batch, beams, num_new), pad_id, jnp.int32)
  finished_BxWxM = alive_BxWxM
  finished_score_BxW = jnp.full((batch, beams), NEG_INF)
  row_offsets_Bx1 = (jnp.arange(batch) * beams)[:, None]

  def best_alive_bound(t, alive_logp_BxW):
    # Log-probabilities only fall; for alpha >= 0 dividing by the longest
    # possible length is the most an unfinished hypothesis can reach.
    final_len = max_new_tokens if alpha >= 0 else t + 1
    return jnp.max(alive_logp_BxW, axis=-1) / length_penalty(final_len, alpha)

  def cond(carry):
    t, _, _, alive_logp_BxW, _, _, finished_score_BxW = carry
    settled_B = finished_score_BxW[:, -1] >= best_alive_bound(t, alive_logp_BxW)
    return (t < max_new_tokens) & ~jnp.all(settled_B)

  def body(carry):
    t, logits_BWxV, state, alive_logp_BxW, alive_BxWxM, finished_BxWxM, finished_score_BxW = carry
    logp_BWxV = jax.nn.log_softmax(sampling.mask_invalid(logits_BWxV, num_valid_ids), axis=-1)
    scores_BxWV = (alive_logp_BxW[:, :, None] + logp_BWxV.reshape(batch, beams, vocab)).reshape(
        batch, beams * vocab)
    # 2W candidates: even if W of them end (a stop id), W can stay alive.
    cand_logp_Bx2W, cand_flat_Bx2W = jax.lax.top_k(scores_BxWV, 2 * beams)
    cand_beam_Bx2W, cand_token_Bx2W = cand_flat_Bx2W // vocab, cand_flat_Bx2W % vocab
    cand_seq_Bx2WxM = jnp.take_along_axis(alive_BxWxM, cand_beam_Bx2W[:, :, None], axis=1)
    cand_seq_Bx2WxM = jax.lax.dynamic_update_slice_in_dim(
        cand_seq_Bx2WxM, cand_token_Bx2W[:, :, None], t, axis=2)
    is_eos_Bx2W = is_stop(cand_token_Bx2W, stop_ids)

    # Finished: the row's best W among the old ones and the new endings.
    new_score_Bx2W = jnp.where(is_eos_Bx2W, cand_logp_Bx2W / length_penalty(t + 1, alpha),
                               NEG_INF)
    pool_score_Bx3W = jnp.concatenate([finished_score_BxW, new_score_Bx2W], axis=1)
    pool_seq_Bx3WxM = jnp.concatenate([finished_BxWxM, cand_seq_Bx2WxM], axis=1)
    finished_score_BxW, keep_BxW = jax.lax.top_k(pool_score_Bx3W, beams)
    finished_BxWxM = jnp.take_along_axis(pool_seq_Bx3WxM, keep_BxW[:, :, None], axis=1)

    # Alive: the best W candidates that did not end.
    alive_logp_BxW, pick_BxW = jax.lax.top_k(jnp.where(is_eos_Bx2W, NEG_INF, cand_logp_Bx2W),
                                             beams)
    alive_BxWxM = jnp.take_along_axis(cand_seq_Bx2WxM, pick_BxW[:, :, None], axis=1)
    parent_BxW = jnp.take_along_axis(cand_beam_Bx2W, pick_BxW, axis=1)
    token_BxW = jnp.take_along_axis(cand_token_Bx2W, pick_BxW, axis=1)
    state = state.take_rows((row_offsets_Bx1 + parent_BxW).reshape(-1))
    logits_BWxV, state = decoder.step(params, token_BxW.reshape(-1), state)
    return (t + 1, logits_BWxV, state, alive_logp_BxW, alive_BxWxM, finished_BxWxM,
            finished_score_BxW)

  carry = (jnp.int32(0), logits_BWxV, state, alive_logp_BxW, alive_BxWxM, finished_BxWxM,
           finished_score_BxW)
  t, _, _, alive_logp_BxW, alive_BxWxM, finished_BxWxM, finished_score_BxW = (
      jax.lax.while_loop(cond, body, carry))
  # Unfinished hypotheses compete with the finished ones at the end.
  alive_score_BxW = alive_logp_BxW / length_penalty(t, alpha)
  scores_Bx2W = jnp.concatenate([finished_score_BxW, alive_score_BxW], axis=1)
  seqs_Bx2WxM = jnp.concatenate([finished_BxWxM, alive_BxWxM], axis=1)
  best_B = jnp.argmax(scores_Bx2W, axis=1)
  return jnp.take_along_axis(seqs_Bx2WxM, best_B[:, None, None], axis=1)[:, 0]
