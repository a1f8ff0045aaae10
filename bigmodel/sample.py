"""Sampling text from a trained decoder.

This recomputes the whole prefix each token (no KV cache): simple and exact,
and fast enough for the short samples printed after training.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def sample_tokens(model: nn.Module, params: Any, prompt_ids: list[int], num_tokens: int,
                  *, rng: jax.Array, temperature: float = 1.0, max_len: int,
                  num_valid_ids: int | None = None) -> list[int]:
  """Extends ``prompt_ids`` by up to ``num_tokens`` sampled tokens (<= ``max_len`` total).

  ``temperature`` 0 means greedy decoding. Ids >= ``num_valid_ids`` (padding
  rows of an embedding larger than the tokenizer) are never sampled.
  """
  prompt_ids = list(prompt_ids)[-(max_len - 1):]
  total = min(max_len, len(prompt_ids) + num_tokens)
  buffer_1xL = np.zeros((1, total), np.int32)
  buffer_1xL[0, :len(prompt_ids)] = prompt_ids

  @jax.jit
  def generate(params, tokens_1xL, rng):
    def body(i, carry):
      tokens_1xL, rng = carry
      rng, step_rng = jax.random.split(rng)
      logits_V = model.apply({"params": params}, tokens_1xL)[0, i - 1]
      if num_valid_ids is not None:
        logits_V = jnp.where(jnp.arange(logits_V.shape[0]) < num_valid_ids, logits_V, -jnp.inf)
      if temperature > 0:
        next_id = jax.random.categorical(step_rng, logits_V / temperature)
      else:
        next_id = jnp.argmax(logits_V)
      return tokens_1xL.at[0, i].set(next_id.astype(jnp.int32)), rng
    tokens_1xL, _ = jax.lax.fori_loop(len(prompt_ids), total, body, (tokens_1xL, rng))
    return tokens_1xL

  return np.asarray(generate(params, jnp.asarray(buffer_1xL), rng))[0].tolist()
