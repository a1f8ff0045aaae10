"""Greedy decoding by re-running the whole forward pass for every new token.

No cache: each step recomputes every position, so it is obviously right and
slow (quadratic in length). It is the oracle the cached decoder must equal
token for token (tests/test_generate.py) and the baseline of
benchmarks/generate.py. Rows are unpadded: every prompt of a call has the
same length.

Shape letters as in ``bigmodel.models``: B rows, P prompt tokens, M new
tokens, V vocabulary.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigmodel.generation import sampling
from bigmodel.models.families import family_of


def full_forward_greedy(model: nn.Module, params: Any, prompt_BxP: jax.Array, num_new: int, *,
                        start_id: int = 1, num_valid_ids: int | None = None) -> jax.Array:
  """``num_new`` greedy tokens [B, M] after each prompt (no EOS stop).

  Decoder-only: ``prompt_BxP`` are the first tokens. Encoder-decoder: the
  encoder input; the decoder starts from ``start_id``.
  """
  batch, prompt_len = prompt_BxP.shape
  vocab_limit = num_valid_ids or 1 << 30
  variables = {"params": params}
  if family_of(model).encoder_decoder:
    buffer_BxL = jnp.zeros((batch, 1 + num_new), jnp.int32).at[:, 0].set(start_id)
    first = 1
    logits_fn = lambda tokens_BxL: model.apply(variables, prompt_BxP, tokens_BxL)  # pylint: disable=g-long-lambda
  else:
    buffer_BxL = jnp.zeros((batch, prompt_len + num_new), jnp.int32).at[:, :prompt_len].set(
        prompt_BxP)
    first = prompt_len
    logits_fn = lambda tokens_BxL: model.apply(variables, tokens_BxL)  # pylint: disable=g-long-lambda

  def body(i, buffer_BxL):
    # Causal attention: the zeros after position i - 1 do not change its logits.
    logits_BxV = jax.lax.dynamic_index_in_dim(logits_fn(buffer_BxL), i - 1, axis=1,
                                              keepdims=False)
    logits_BxV = sampling.mask_invalid(logits_BxV, vocab_limit)
    token_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    return jax.lax.dynamic_update_slice_in_dim(buffer_BxL, token_B[:, None], i, axis=1)

  buffer_BxL = jax.lax.fori_loop(first, first + num_new, body, buffer_BxL)
  return buffer_BxL[:, first:]
