"""GPT: a decoder-only transformer with pre-LayerNorm blocks."""
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigmodel.models.config import ModelConfig
from bigmodel.models.layers import (DECODE, TRAIN, DenseGeneral, KVCache, MultiHeadAttention, Mlp,
                                    check_mode, constrain, make_embed, make_norm)
from bigmodel.models.stack import apply_layer_stack


class GptBlock(nn.Module):
  """x + attn(ln(x)), then x + mlp(ln(x)); causal within packed segments.

  Returns (x, cache) in every ``mode``: cache None in training, the
  attention's ``KVCache`` at prefill, the updated one when decoding (one
  step, L = 1, against ``cache``; ``segment_ids_BxL`` are then the cache's
  [B, S] slot segment ids, 0 = empty or padding).
  """
  config: ModelConfig
  mode: str = TRAIN

  @nn.compact
  def __call__(self, x_BxLxD, segment_ids_BxL, positions_BxL, deterministic: bool,
               cache: Optional[KVCache] = None):
    c = self.config
    # GPT-2: residual projections scaled by 1/sqrt(2 * layers) at init so the
    # residual stream's variance does not grow with depth.
    out_stddev = 0.02 / math.sqrt(2 * c.num_layers)
    norm = lambda name: make_norm("layernorm", epsilon=c.layer_norm_epsilon,  # pylint: disable=g-long-lambda
                                  dtype=c.dtype, param_dtype=c.param_dtype, name=name)
    attention = MultiHeadAttention(
        num_heads=c.num_heads, head_dim=c.head_dim, num_kv_heads=c.num_kv_heads,
        rope_theta=c.rope_theta if c.position_embedding == "rope" else None,
        attention_impl=c.attention_impl, out_init_stddev=out_stddev, mode=self.mode,
        dtype=c.dtype, param_dtype=c.param_dtype, name="attn")
    # Decoding needs no causal or query mask: the cache's later slots are empty.
    decoding = self.mode == DECODE
    h_BxLxD, kv = attention(
        norm("ln_attn")(x_BxLxD), causal=not decoding,
        q_segment_ids_BxT=None if decoding else segment_ids_BxL,
        kv_segment_ids_BxS=segment_ids_BxL, q_positions_BxT=positions_BxL, cache=cache)
    x_BxLxD = x_BxLxD + nn.Dropout(c.dropout_rate)(h_BxLxD, deterministic=deterministic)
    h_BxLxD = Mlp(c.mlp_dim, activation=c.mlp_activation, dropout_rate=c.dropout_rate,
                  out_init_stddev=out_stddev, dtype=c.dtype, param_dtype=c.param_dtype,
                  name="mlp")(norm("ln_mlp")(x_BxLxD), deterministic)
    x_BxLxD = x_BxLxD + nn.Dropout(c.dropout_rate)(h_BxLxD, deterministic=deterministic)
    return constrain(x_BxLxD, ("batch", "length", "act_embed")), kv


class Gpt(nn.Module):
  """Token ids [B, L] -> next-token logits [B, L, V] (float32).

  Decoding (``bigmodel.models.decoding``): ``mode=PREFILL`` returns (logits,
  the stacked per-layer ``KVCache`` of the tokens, leaves [layers, B, L, K,
  H]); ``mode=DECODE`` runs one step (L = 1) against ``cache``, with
  ``kv_segment_ids_BxS`` marking its filled slots (this step's included),
  and returns (logits, updated cache).
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL: jax.Array, *,
               segment_ids_BxL: Optional[jax.Array] = None,
               positions_BxL: Optional[jax.Array] = None,
               deterministic: bool = True,
               mode: str = TRAIN,
               cache: Optional[KVCache] = None,
               kv_segment_ids_BxS: Optional[jax.Array] = None):
    c = self.config
    check_mode(mode)
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
    embed = make_embed(c.vocab_size, c.embed_dim, axes=("vocab", "embed"), dtype=c.dtype,
                       param_dtype=c.param_dtype, name="token_embed")
    x_BxLxD = embed(tokens_BxL)
    if c.position_embedding == "learned":
      x_BxLxD += make_embed(c.max_len, c.embed_dim, axes=(None, "embed"), dtype=c.dtype,
                            param_dtype=c.param_dtype, stddev=0.01,
                            name="position_embed")(positions_BxL)
    x_BxLxD = nn.Dropout(c.dropout_rate)(x_BxLxD, deterministic=deterministic)
    x_BxLxD = constrain(x_BxLxD.astype(c.dtype), ("batch", "length", "act_embed"))
    # Decoding computes no gradients: remat would only cost compile time.
    x_BxLxD, new_cache = apply_layer_stack(
        GptBlock, x_BxLxD, kv_segment_ids_BxS if mode == DECODE else segment_ids_BxL,
        positions_BxL, deterministic, layer_inputs=cache,
        num_layers=c.num_layers, scan=c.scan, remat=c.remat if mode == TRAIN else "none",
        name="blocks", config=c, mode=mode)
    x_BxLxD = make_norm("layernorm", epsilon=c.layer_norm_epsilon, dtype=c.dtype,
                        param_dtype=c.param_dtype, name="ln_final")(x_BxLxD)
    if c.tie_embeddings:
      logits_BxLxV = embed.attend(x_BxLxD)
    else:
      logits_BxLxV = DenseGeneral((c.vocab_size,), ("embed", "vocab"), use_bias=False,
                                  dtype=c.dtype, param_dtype=c.param_dtype,
                                  name="lm_head")(x_BxLxD)
    logits_BxLxV = constrain(logits_BxLxV.astype(jnp.float32), ("batch", "length", "act_vocab"))
    return logits_BxLxV if mode == TRAIN else (logits_BxLxV, new_cache)
