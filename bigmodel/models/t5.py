"""T5 (v1.1 conventions): an encoder-decoder with relative position bias.

RMSNorm without bias, pre-norm blocks, a gated-GELU MLP (``t5_mlp_gated=False``:
original T5's ungated one), no biases in dense layers, unscaled attention
scores (the scale is folded into the query initialisation), a shared input
embedding and an untied output projection. ``num_experts`` > 0 makes every
encoder and decoder MLP a mixture of experts (``models/moe.py``; Switch
Transformer routes each token to its top 1 with a capacity).
"""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigmodel.models import moe
from bigmodel.models.attention import context_axis
from bigmodel.models.config import ModelConfig
from bigmodel.models.layers import (DECODE, TRAIN, DenseGeneral, KVCache, MultiHeadAttention, Mlp,
                                    RelativePositionBias, check_mode, constrain, make_embed,
                                    make_norm)
from bigmodel.models.stack import apply_layer_stack


def _norm(c: ModelConfig, name: str) -> nn.Module:
  return make_norm("rmsnorm", epsilon=c.layer_norm_epsilon, dtype=c.dtype,
                   param_dtype=c.param_dtype, name=name)


def _attention(c: ModelConfig, name: str, mode: str = TRAIN,
               cross: bool = False) -> MultiHeadAttention:
  return MultiHeadAttention(
      num_heads=c.num_heads, head_dim=c.head_dim, num_kv_heads=c.num_kv_heads, use_bias=False,
      score_scale=1.0, query_init_stddev=(c.embed_dim * c.head_dim) ** -0.5,
      attention_impl=c.attention_impl, cross=cross, mode=mode, dtype=c.dtype,
      param_dtype=c.param_dtype, name=name)


def _mlp(c: ModelConfig) -> nn.Module:
  """The dense MLP, or with ``num_experts`` > 0 a mixture of experts (Switch)."""
  if c.num_experts:
    return moe.from_config(c, gated=c.t5_mlp_gated)
  return Mlp(c.mlp_dim, activation=c.mlp_activation, gated=c.t5_mlp_gated, use_bias=False,
             dropout_rate=c.dropout_rate, dtype=c.dtype, param_dtype=c.param_dtype, name="mlp")


def _relative_bias(c: ModelConfig, bidirectional: bool, name: str) -> RelativePositionBias:
  return RelativePositionBias(c.relative_buckets, c.relative_max_distance, c.num_heads,
                              bidirectional=bidirectional, dtype=c.dtype,
                              param_dtype=c.param_dtype, name=name)


class T5EncoderBlock(nn.Module):
  """Bidirectional self-attention (within segments) and a gated MLP."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxExD, bias_1xNxExE, segment_ids_BxE, deterministic: bool):
    c = self.config
    drop = lambda h: nn.Dropout(c.dropout_rate)(h, deterministic=deterministic)  # pylint: disable=g-long-lambda
    h_BxExD, _ = _attention(c, "attn")(
        _norm(c, "ln_attn")(x_BxExD), q_segment_ids_BxT=segment_ids_BxE,
        kv_segment_ids_BxS=segment_ids_BxE, bias_BxNxTxS=bias_1xNxExE)
    x_BxExD = x_BxExD + drop(h_BxExD)
    x_BxExD = x_BxExD + drop(_mlp(c)(_norm(c, "ln_mlp")(x_BxExD), deterministic))
    return constrain(x_BxExD, ("batch", "length", "act_embed")), None


class T5DecoderBlock(nn.Module):
  """Causal self-attention, cross-attention to the encoder, and a gated MLP.

  Decoder segment i attends only to encoder segment i (packed examples).

  Returns (y, cache) in every ``mode``: cache None in training; at prefill
  the block's (self, cross) ``KVCache`` pair; decoding (one step, T = 1,
  ``cache`` = that pair) appends to the self-attention cache, attends to the
  cached encoder keys/values (``encoded_BxExD`` is unused) and returns
  (updated self-attention cache, None): the cross-attention cache never
  changes, so it is not copied through the layer scan. ``segment_ids_BxT``
  are then the self-attention cache's [B, S] slot segment ids.
  """
  config: ModelConfig
  mode: str = TRAIN

  @nn.compact
  def __call__(self, y_BxTxD, encoded_BxExD, bias_1xNxTxS, segment_ids_BxT,
               encoder_segment_ids_BxE, deterministic: bool,
               cache: Optional[tuple[KVCache, KVCache]] = None):
    c = self.config
    drop = lambda h: nn.Dropout(c.dropout_rate)(h, deterministic=deterministic)  # pylint: disable=g-long-lambda
    decoding = self.mode == DECODE
    self_cache, cross_cache = cache if decoding else (None, None)
    # Decoding needs no causal or query mask: the cache's later slots are empty.
    q_segment_ids_BxT = None if decoding else segment_ids_BxT
    h_BxTxD, self_kv = _attention(c, "self_attn", self.mode)(
        _norm(c, "ln_self_attn")(y_BxTxD), causal=not decoding,
        q_segment_ids_BxT=q_segment_ids_BxT, kv_segment_ids_BxS=segment_ids_BxT,
        bias_BxNxTxS=bias_1xNxTxS, cache=self_cache)
    y_BxTxD = y_BxTxD + drop(h_BxTxD)
    h_BxTxD, cross_kv = _attention(c, "cross_attn", self.mode, cross=True)(
        _norm(c, "ln_cross_attn")(y_BxTxD), encoded_BxExD, q_segment_ids_BxT=q_segment_ids_BxT,
        kv_segment_ids_BxS=encoder_segment_ids_BxE, cache=cross_cache)
    y_BxTxD = y_BxTxD + drop(h_BxTxD)
    y_BxTxD = y_BxTxD + drop(_mlp(c)(_norm(c, "ln_mlp")(y_BxTxD), deterministic))
    new_cache = None if self.mode == TRAIN else (self_kv, None if decoding else cross_kv)
    return constrain(y_BxTxD, ("batch", "length", "act_embed")), new_cache


class T5Encoder(nn.Module):
  """Embedded encoder tokens [B, E, D] -> encoder states [B, E, D]."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxExD, segment_ids_BxE, deterministic: bool):
    c = self.config
    seq_len = x_BxExD.shape[1]
    # Split over a context axis, attention builds each block's bias itself.
    bias_1xNxExE = _relative_bias(c, bidirectional=True, name="relative_bias")(
        seq_len, seq_len, per_block=context_axis(seq_len, seq_len) is not None)
    x_BxExD, _ = apply_layer_stack(T5EncoderBlock, x_BxExD, bias_1xNxExE, segment_ids_BxE,
                                   deterministic, num_layers=c.num_layers, scan=c.scan,
                                   remat=c.remat, name="blocks", config=c)
    return nn.Dropout(c.dropout_rate)(_norm(c, "ln_final")(x_BxExD),
                                      deterministic=deterministic)


class T5Decoder(nn.Module):
  """Embedded decoder inputs [B, T, D] and encoder states -> (hidden states [B, T, D], cache).

  ``mode``: training returns cache None; prefill the stacked (self, cross)
  ``KVCache`` pair of every layer; decoding runs one step (T = 1) at slot
  ``cache[0].index`` and returns the pair with the self-attention cache
  updated. ``segment_ids_BxT`` are then the cache's [B, S] slot ids.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, y_BxTxD, encoded_BxExD, encoder_segment_ids_BxE, segment_ids_BxT,
               deterministic: bool, mode: str = TRAIN,
               cache: Optional[tuple[KVCache, KVCache]] = None):
    c = self.config
    relative_bias = _relative_bias(c, bidirectional=False, name="relative_bias")
    if check_mode(mode) == DECODE:
      # The query sits at the cache's write slot (the same in every layer).
      q_len, kv_len = y_BxTxD.shape[1], cache[0].k_BxSxKxH.shape[-3]
      bias_1xNxTxS = relative_bias(q_len, kv_len, cache[0].index[0])
    else:
      length = y_BxTxD.shape[1]
      bias_1xNxTxS = relative_bias(length, length,
                                   per_block=context_axis(length, length) is not None)
    # Decoding computes no gradients: remat would only cost compile time.
    y_BxTxD, layer_caches = apply_layer_stack(
        T5DecoderBlock, y_BxTxD, encoded_BxExD, bias_1xNxTxS, segment_ids_BxT,
        encoder_segment_ids_BxE, deterministic, layer_inputs=cache,
        num_layers=c.num_decoder_layers or c.num_layers, scan=c.scan,
        remat=c.remat if mode == TRAIN else "none", name="blocks", config=c, mode=mode)
    if mode == DECODE:
      layer_caches = (layer_caches[0], cache[1])
    y_BxTxD = nn.Dropout(c.dropout_rate)(_norm(c, "ln_final")(y_BxTxD),
                                         deterministic=deterministic)
    return y_BxTxD, layer_caches


class T5(nn.Module):
  """(encoder tokens [B, E], decoder input tokens [B, T]) -> logits [B, T, V].

  Segment id 0 marks padding. Decoder inputs are the targets shifted right
  (the decoder start token first), as the data pipeline produces them.
  """
  config: ModelConfig

  def setup(self):
    c = self.config
    self.token_embed = make_embed(c.vocab_size, c.embed_dim, axes=("vocab", "embed"),
                                  dtype=c.dtype, param_dtype=c.param_dtype, stddev=1.0)
    self.encoder = T5Encoder(c)
    self.decoder = T5Decoder(c)
    self.lm_head = DenseGeneral((c.vocab_size,), ("embed", "vocab"), use_bias=False,
                                stddev=c.embed_dim ** -0.5, dtype=c.dtype,
                                param_dtype=c.param_dtype)
    self.dropout = nn.Dropout(c.dropout_rate)

  def _embed(self, tokens_BxL: jax.Array, deterministic: bool) -> jax.Array:
    x_BxLxD = self.dropout(self.token_embed(tokens_BxL), deterministic=deterministic)
    return constrain(x_BxLxD.astype(self.config.dtype), ("batch", "length", "act_embed"))

  def encode(self, tokens_BxE: jax.Array, segment_ids_BxE: jax.Array,
             deterministic: bool = True) -> jax.Array:
    """Encoder states [B, E, D]."""
    return self.encoder(self._embed(tokens_BxE, deterministic), segment_ids_BxE, deterministic)

  def decode(self, encoded_BxExD: Optional[jax.Array], tokens_BxT: jax.Array,
             encoder_segment_ids_BxE: jax.Array, segment_ids_BxT: jax.Array,
             deterministic: bool = True, mode: str = TRAIN,
             cache: Optional[tuple[KVCache, KVCache]] = None, head: bool = True):
    """Next-token logits [B, T, V] (float32) given the encoder states.

    ``mode``: see ``T5Decoder``; prefill and decode return (logits, cache),
    and decode needs no ``encoded_BxExD`` (None: the cache holds its keys).
    ``head=False`` (training): the decoder's final states [B, T, D] instead.
    """
    y_BxTxD, new_cache = self.decoder(self._embed(tokens_BxT, deterministic), encoded_BxExD,
                                      encoder_segment_ids_BxE, segment_ids_BxT, deterministic,
                                      mode=mode, cache=cache)
    if not head:
      return y_BxTxD
    logits_BxTxV = self.lm_head(y_BxTxD)
    logits_BxTxV = constrain(logits_BxTxV.astype(jnp.float32), ("batch", "length", "act_vocab"))
    return logits_BxTxV if mode == TRAIN else (logits_BxTxV, new_cache)

  def __call__(self, encoder_tokens_BxE: jax.Array, decoder_tokens_BxT: jax.Array, *,
               encoder_segment_ids_BxE: Optional[jax.Array] = None,
               decoder_segment_ids_BxT: Optional[jax.Array] = None,
               deterministic: bool = True, head: bool = True) -> jax.Array:
    if encoder_segment_ids_BxE is None:
      encoder_segment_ids_BxE = jnp.ones_like(encoder_tokens_BxE)
    if decoder_segment_ids_BxT is None:
      decoder_segment_ids_BxT = jnp.ones_like(decoder_tokens_BxT)
    encoded_BxExD = self.encode(encoder_tokens_BxE, encoder_segment_ids_BxE, deterministic)
    return self.decode(encoded_BxExD, decoder_tokens_BxT, encoder_segment_ids_BxE,
                       decoder_segment_ids_BxT, deterministic, head=head)
