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
from bigmodel.models.layers import (DenseGeneral, KVCache, MultiHeadAttention, Mlp,
                                    RelativePositionBias, constrain, make_embed, make_norm)
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
  return Mlp(c.mlp_dim, activation=c.mlp_activation, gated=True, use_bias=False,
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

  ``decode`` (generation): without ``cache`` (prefill) the block also returns
  its (self, cross) ``KVCache`` pair; with ``cache`` = that pair (one step,
  T = 1) it appends to the self-attention cache, attends to the cached
  encoder keys/values (``encoded_BxSxD`` is unused) and returns the updated
  self-attention cache. ``segment_ids_BxT`` are then the self-attention
  cache's [B, S] slot segment ids.
  """
  config: ModelConfig
  decode: bool = False

  @nn.compact
  def __call__(self, y_BxTxD, encoded_BxSxD, bias_1xNxTxT, segment_ids_BxT,
               encoder_segment_ids_BxS, deterministic: bool,
               cache: Optional[tuple[KVCache, KVCache]] = None):
    c = self.config
    drop = lambda h: nn.Dropout(c.dropout_rate)(h, deterministic=deterministic)  # pylint: disable=g-long-lambda
    self_attn, cross_attn = _attention(c, "self_attn"), _attention(c, "cross_attn")
    h_BxTxD = _norm(c, "ln_self_attn")(y_BxTxD)
    if cache is not None:
      h_BxTxD, self_kv = self_attn(h_BxTxD, kv_segment_ids_BxS=segment_ids_BxT,
                                   bias_BxNxTxS=bias_1xNxTxT, cache=cache[0])
    else:
      h_BxTxD = self_attn(h_BxTxD, causal=True, q_segment_ids_BxT=segment_ids_BxT,
                          kv_segment_ids_BxS=segment_ids_BxT, bias_BxNxTxS=bias_1xNxTxT,
                          return_kv=self.decode)
      h_BxTxD, self_kv = h_BxTxD if self.decode else (h_BxTxD, None)
    y_BxTxD = y_BxTxD + drop(h_BxTxD)
    h_BxTxD = _norm(c, "ln_cross_attn")(y_BxTxD)
    if cache is not None:
      h_BxTxD = cross_attn(h_BxTxD, kv_segment_ids_BxS=encoder_segment_ids_BxS,
                           fixed_kv=cache[1])
      new_cache = self_kv
    else:
      h_BxTxD = cross_attn(h_BxTxD, encoded_BxSxD, q_segment_ids_BxT=segment_ids_BxT,
                           kv_segment_ids_BxS=encoder_segment_ids_BxS, return_kv=self.decode)
      h_BxTxD, cross_kv = h_BxTxD if self.decode else (h_BxTxD, None)
      new_cache = (self_kv, cross_kv) if self.decode else None
    y_BxTxD = y_BxTxD + drop(h_BxTxD)
    y_BxTxD = y_BxTxD + drop(_mlp(c)(_norm(c, "ln_mlp")(y_BxTxD), deterministic))
    return constrain(y_BxTxD, ("batch", "length", "act_embed")), new_cache


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
  """Embedded decoder inputs [B, T, D] and encoder states -> hidden states [B, T, D].

  Decoding: ``return_cache`` also returns the stacked (self, cross)
  ``KVCache`` pair of every layer; ``cache`` runs one step (T = 1) at slot
  ``cache[0].index`` and returns (states, the pair with the self-attention
  cache updated). ``segment_ids_BxT`` are then the cache's [B, S] slot ids.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, y_BxTxD, encoded_BxSxD, encoder_segment_ids_BxS, segment_ids_BxT,
               deterministic: bool, return_cache: bool = False,
               cache: Optional[tuple[KVCache, KVCache]] = None):
    c = self.config
    num_layers = c.num_decoder_layers or c.num_layers
    relative_bias = _relative_bias(c, bidirectional=False, name="relative_bias")
    if cache is None and not return_cache:
      seq_len = y_BxTxD.shape[1]
      bias_1xNxTxT = relative_bias(seq_len, seq_len)
      y_BxTxD = apply_layer_stack(
          T5DecoderBlock, y_BxTxD, encoded_BxSxD, bias_1xNxTxT, segment_ids_BxT,
          encoder_segment_ids_BxS, deterministic, num_layers=num_layers,
          scan=c.scan, remat=c.remat, name="blocks", config=c)
      new_cache = None
    else:
      if cache is None:  # Prefill.
        q_len = kv_len = y_BxTxD.shape[1]
        q_offset = 0
      else:  # One step: the query sits at the cache's write slot (the same in every layer).
        q_len, kv_len = y_BxTxD.shape[1], cache[0].k_BxSxKxH.shape[-3]
        q_offset = cache[0].index[0]
      bias_1xNxTxS = relative_bias(q_len, kv_len, q_offset)
      y_BxTxD, layer_out = apply_layer_stack(
          T5DecoderBlock, y_BxTxD, encoded_BxSxD, bias_1xNxTxS, segment_ids_BxT,
          encoder_segment_ids_BxS, deterministic, layer_inputs=cache, return_outputs=True,
          num_layers=num_layers, scan=c.scan, remat="none", name="blocks", config=c,
          decode=True)
      new_cache = layer_out if cache is None else (layer_out, cache[1])
    y_BxTxD = nn.Dropout(c.dropout_rate)(_norm(c, "ln_final")(y_BxTxD),
                                         deterministic=deterministic)
    return y_BxTxD if new_cache is None else (y_BxTxD, new_cache)


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

  def decode(self, encoded_BxSxD: Optional[jax.Array], tokens_BxT: jax.Array,
             encoder_segment_ids_BxS: jax.Array, segment_ids_BxT: jax.Array,
             deterministic: bool = True, return_cache: bool = False,
             cache: Optional[tuple[KVCache, KVCache]] = None):
    """Next-token logits [B, T, V] (float32) given the encoder states.

    Decoding: see ``T5Decoder`` for ``return_cache`` and ``cache`` (with a
    cache, ``encoded_BxSxD`` may be None); both return (logits, cache).
    """
    y_BxTxD = self.decoder(self._embed(tokens_BxT, deterministic), encoded_BxSxD,
                           encoder_segment_ids_BxS, segment_ids_BxT, deterministic,
                           return_cache=return_cache, cache=cache)
    y_BxTxD, new_cache = y_BxTxD if isinstance(y_BxTxD, tuple) else (y_BxTxD, None)
    logits_BxTxV = self.lm_head(y_BxTxD)
    logits_BxTxV = constrain(logits_BxTxV.astype(jnp.float32), ("batch", "length", "act_vocab"))
    return logits_BxTxV if new_cache is None else (logits_BxTxV, new_cache)

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
