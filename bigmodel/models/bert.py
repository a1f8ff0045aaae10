"""BERT: a bidirectional encoder with an MLM head or a classification head."""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigmodel.models.config import ModelConfig
from bigmodel.models.layers import (ACTIVATIONS, DenseGeneral, MultiHeadAttention, Mlp, constrain,
                                    logical_init, make_embed, make_norm)
from bigmodel.models.stack import apply_layer_stack


def _norm(c: ModelConfig, name: str) -> nn.Module:
  return make_norm("layernorm", epsilon=c.layer_norm_epsilon, dtype=c.dtype,
                   param_dtype=c.param_dtype, name=name)


class BertBlock(nn.Module):
  """Self-attention and MLP, post-LN (BERT) or pre-LN; attends within segments."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, segment_ids_BxL, deterministic: bool):
    c = self.config
    drop = lambda h: nn.Dropout(c.dropout_rate)(h, deterministic=deterministic)  # pylint: disable=g-long-lambda
    attention = MultiHeadAttention(
        num_heads=c.num_heads, head_dim=c.head_dim, num_kv_heads=c.num_kv_heads,
        attention_impl=c.attention_impl, context_attention=c.context_attention, dtype=c.dtype,
        param_dtype=c.param_dtype, name="attn")
    mlp = Mlp(c.mlp_dim, activation=c.mlp_activation, dropout_rate=c.dropout_rate,
              dtype=c.dtype, param_dtype=c.param_dtype, name="mlp")
    attend = lambda h: attention(h, q_segment_ids_BxT=segment_ids_BxL,  # pylint: disable=g-long-lambda
                                 kv_segment_ids_BxS=segment_ids_BxL)[0]
    if c.norm_position == "pre":
      x_BxLxD = x_BxLxD + drop(attend(_norm(c, "ln_attn")(x_BxLxD)))
      x_BxLxD = x_BxLxD + drop(mlp(_norm(c, "ln_mlp")(x_BxLxD), deterministic))
    else:
      x_BxLxD = _norm(c, "ln_attn")(x_BxLxD + drop(attend(x_BxLxD)))
      x_BxLxD = _norm(c, "ln_mlp")(x_BxLxD + drop(mlp(x_BxLxD, deterministic)))
    return constrain(x_BxLxD, ("batch", "length", "act_embed")), None


class Bert(nn.Module):
  """Token ids [B, L] -> MLM logits [B, L, V], or class logits [B, C] when
  ``num_classes`` > 0 (pooled from the first token, BERT's [CLS]).

  Segment id 0 marks padding, never attended; packed documents attend only
  within their own segment. ``head=False`` (MLM) returns the transformed
  hidden states [B, L, D] that the tied output head reads.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL: jax.Array, *,
               segment_ids_BxL: Optional[jax.Array] = None,
               positions_BxL: Optional[jax.Array] = None,
               type_ids_BxL: Optional[jax.Array] = None,
               deterministic: bool = True, head: bool = True) -> jax.Array:
    c = self.config
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
    if type_ids_BxL is None:
      type_ids_BxL = jnp.zeros_like(tokens_BxL)
    if segment_ids_BxL is None:
      segment_ids_BxL = jnp.ones_like(tokens_BxL)
    embed = make_embed(c.vocab_size, c.embed_dim, axes=("vocab", "embed"), dtype=c.dtype,
                       param_dtype=c.param_dtype, name="token_embed")
    x_BxLxD = (embed(tokens_BxL)
               + make_embed(c.max_len, c.embed_dim, axes=(None, "embed"), dtype=c.dtype,
                            param_dtype=c.param_dtype, name="position_embed")(positions_BxL)
               + make_embed(c.type_vocab_size, c.embed_dim, axes=(None, "embed"),
                            dtype=c.dtype, param_dtype=c.param_dtype,
                            name="type_embed")(type_ids_BxL))
    if c.norm_position == "post":
      x_BxLxD = _norm(c, "ln_embed")(x_BxLxD)
    x_BxLxD = nn.Dropout(c.dropout_rate)(x_BxLxD, deterministic=deterministic)
    x_BxLxD = constrain(x_BxLxD.astype(c.dtype), ("batch", "length", "act_embed"))
    x_BxLxD, _ = apply_layer_stack(BertBlock, x_BxLxD, segment_ids_BxL, deterministic,
                                num_layers=c.num_layers, scan=c.scan, remat=c.remat,
                                name="blocks", config=c)
    if c.norm_position == "pre":
      x_BxLxD = _norm(c, "ln_final")(x_BxLxD)

    if c.num_classes:
      pooled_BxD = jnp.tanh(DenseGeneral((c.embed_dim,), ("embed", "mlp"), dtype=c.dtype,
                                         param_dtype=c.param_dtype, name="pooler")(x_BxLxD[:, 0]))
      pooled_BxD = nn.Dropout(c.dropout_rate)(pooled_BxD, deterministic=deterministic)
      return DenseGeneral((c.num_classes,), ("mlp", None), dtype=c.dtype,
                          param_dtype=c.param_dtype,
                          name="classifier")(pooled_BxD).astype(jnp.float32)

    # MLM head: transform, then the tied input embedding plus an output bias.
    h_BxLxD = ACTIVATIONS[c.mlp_activation](DenseGeneral(
        (c.embed_dim,), ("embed", "mlp"), dtype=c.dtype, param_dtype=c.param_dtype,
        name="mlm_dense")(x_BxLxD))
    h_BxLxD = _norm(c, "mlm_ln")(h_BxLxD)
    if not head:  # The chunked loss applies the tied embedding and bias itself.
      return h_BxLxD
    logits_BxLxV = embed.attend(h_BxLxD) + self.param(
        "mlm_bias", logical_init(nn.initializers.zeros, ("vocab",)), (c.vocab_size,),
        c.param_dtype).astype(c.dtype)
    return constrain(logits_BxLxV.astype(jnp.float32), ("batch", "length", "act_vocab"))
