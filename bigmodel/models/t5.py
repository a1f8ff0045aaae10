"""T5 (v1.1 conventions): an encoder-decoder with relative position bias.

RMSNorm without bias, pre-norm blocks, gated-GELU MLP, no biases in dense
layers, unscaled attention scores (the scale is folded into the query
initialisation), a shared input embedding and an untied output projection.
"""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigmodel.models.config import ModelConfig
from bigmodel.models.layers import (DenseGeneral, MultiHeadAttention, Mlp, RelativePositionBias,
                                    constrain, make_embed, make_norm)
from bigmodel.models.stack import apply_layer_stack


def _norm(c: ModelConfig, name: str) -> nn.Module:
  return make_norm("rmsnorm", epsilon=c.layer_norm_epsilon, dtype=c.dtype,
                   param_dtype=c.param_dtype, name=name)


def _attention(c: ModelConfig, name: str) -> MultiHeadAttention:
  return MultiHeadAttention(
      num_heads=c.num_heads, head_dim=c.head_dim, num_kv_heads=c.num_kv_heads, use_bias=False,
      score_scale=1.0, query_init_stddev=(c.embed_dim * c.head_dim) ** -0.5,
      attention_impl=c.attention_impl, dtype=c.dtype, param_dtype=c.param_dtype, name=name)


def _mlp(c: ModelConfig) -> Mlp:
  return Mlp(c.mlp_dim, activation="gelu", gated=True, use_bias=False,
             dropout_rate=c.dropout_rate, dtype=c.dtype, param_dtype=c.param_dtype, name="mlp")


def _relative_bias(c: ModelConfig, bidirectional: bool, name: str) -> RelativePositionBias:
  return RelativePositionBias(c.relative_buckets, c.relative_max_distance, c.num_heads,
                              bidirectional=bidirectional, dtype=c.dtype,
                              param_dtype=c.param_dtype, name=name)


class T5EncoderBlock(nn.Module):
  """Bidirectional self-attention (within segments) and a gated MLP."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxSxD, bias_1xNxSxS, segment_ids_BxS, deterministic: bool):
    c = self.config
    drop = lambda h: nn.Dropout(c.dropout_rate)(h, deterministic=deterministic)  # pylint: disable=g-long-lambda
    x_BxSxD = x_BxSxD + drop(_attention(c, "attn")(
        _norm(c, "ln_attn")(x_BxSxD), q_segment_ids_BxT=segment_ids_BxS,
        kv_segment_ids_BxS=segment_ids_BxS, bias_BxNxTxS=bias_1xNxSxS))
    x_BxSxD = x_BxSxD + drop(_mlp(c)(_norm(c, "ln_mlp")(x_BxSxD), deterministic))
    return constrain(x_BxSxD, ("batch", "length", "act_embed")), None


class T5DecoderBlock(nn.Module):
  """Causal self-attention, cross-attention to the encoder, and a gated MLP.

  Decoder segment i attends only to encoder segment i (packed examples).
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, y_BxTxD, encoded_BxSxD, bias_1xNxTxT, segment_ids_BxT,
               encoder_segment_ids_BxS, deterministic: bool):
    c = self.config
    drop = lambda h: nn.Dropout(c.dropout_rate)(h, deterministic=deterministic)  # pylint: disable=g-long-lambda
    y_BxTxD = y_BxTxD + drop(_attention(c, "self_attn")(
        _norm(c, "ln_self_attn")(y_BxTxD), causal=True, q_segment_ids_BxT=segment_ids_BxT,
        kv_segment_ids_BxS=segment_ids_BxT, bias_BxNxTxS=bias_1xNxTxT))
    y_BxTxD = y_BxTxD + drop(_attention(c, "cross_attn")(
        _norm(c, "ln_cross_attn")(y_BxTxD), encoded_BxSxD, q_segment_ids_BxT=segment_ids_BxT,
        kv_segment_ids_BxS=encoder_segment_ids_BxS))
    y_BxTxD = y_BxTxD + drop(_mlp(c)(_norm(c, "ln_mlp")(y_BxTxD), deterministic))
    return constrain(y_BxTxD, ("batch", "length", "act_embed")), None


class T5Encoder(nn.Module):
  """Embedded encoder tokens [B, S, D] -> encoder states [B, S, D]."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxSxD, segment_ids_BxS, deterministic: bool):
    c = self.config
    seq_len = x_BxSxD.shape[1]
    bias_1xNxSxS = _relative_bias(c, bidirectional=True, name="relative_bias")(seq_len, seq_len)
    x_BxSxD = apply_layer_stack(T5EncoderBlock, x_BxSxD, bias_1xNxSxS, segment_ids_BxS,
                                deterministic, num_layers=c.num_layers, scan=c.scan,
                                remat=c.remat, name="blocks", config=c)
    return nn.Dropout(c.dropout_rate)(_norm(c, "ln_final")(x_BxSxD),
                                      deterministic=deterministic)


class T5Decoder(nn.Module):
  """Embedded decoder inputs [B, T, D] and encoder states -> hidden states [B, T, D]."""
  config: ModelConfig

  @nn.compact
  def __call__(self, y_BxTxD, encoded_BxSxD, encoder_segment_ids_BxS, segment_ids_BxT,
               deterministic: bool):
    c = self.config
    seq_len = y_BxTxD.shape[1]
    bias_1xNxTxT = _relative_bias(c, bidirectional=False, name="relative_bias")(seq_len, seq_len)
    y_BxTxD = apply_layer_stack(
        T5DecoderBlock, y_BxTxD, encoded_BxSxD, bias_1xNxTxT, segment_ids_BxT,
        encoder_segment_ids_BxS, deterministic, num_layers=c.num_decoder_layers or c.num_layers,
        scan=c.scan, remat=c.remat, name="blocks", config=c)
    return nn.Dropout(c.dropout_rate)(_norm(c, "ln_final")(y_BxTxD),
                                      deterministic=deterministic)


class T5(nn.Module):
  """(encoder tokens [B, S], decoder input tokens [B, T]) -> logits [B, T, V].

  Segment id 0 marks padding. Decoder inputs are the targets shifted right
  (BOS first), as the data pipeline produces them.
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

  def encode(self, tokens_BxS: jax.Array, segment_ids_BxS: jax.Array,
             deterministic: bool = True) -> jax.Array:
    """Encoder states [B, S, D]."""
    return self.encoder(self._embed(tokens_BxS, deterministic), segment_ids_BxS, deterministic)

  def decode(self, encoded_BxSxD: jax.Array, tokens_BxT: jax.Array,
             encoder_segment_ids_BxS: jax.Array, segment_ids_BxT: jax.Array,
             deterministic: bool = True) -> jax.Array:
    """Next-token logits [B, T, V] (float32) given the encoder states."""
    y_BxTxD = self.decoder(self._embed(tokens_BxT, deterministic), encoded_BxSxD,
                           encoder_segment_ids_BxS, segment_ids_BxT, deterministic)
    logits_BxTxV = self.lm_head(y_BxTxD)
    return constrain(logits_BxTxV.astype(jnp.float32), ("batch", "length", "act_vocab"))

  def __call__(self, encoder_tokens_BxS: jax.Array, decoder_tokens_BxT: jax.Array, *,
               encoder_segment_ids_BxS: Optional[jax.Array] = None,
               decoder_segment_ids_BxT: Optional[jax.Array] = None,
               deterministic: bool = True) -> jax.Array:
    if encoder_segment_ids_BxS is None:
      encoder_segment_ids_BxS = jnp.ones_like(encoder_tokens_BxS)
    if decoder_segment_ids_BxT is None:
      decoder_segment_ids_BxT = jnp.ones_like(decoder_tokens_BxT)
    encoded_BxSxD = self.encode(encoder_tokens_BxS, encoder_segment_ids_BxS, deterministic)
    return self.decode(encoded_BxSxD, decoder_tokens_BxT, encoder_segment_ids_BxS,
                       decoder_segment_ids_BxT, deterministic)
