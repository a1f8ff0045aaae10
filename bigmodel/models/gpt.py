"""The decoder-only transformer: GPT-2, Llama, Qwen, Mistral and Gemma from one block.

GPT-2 is the default (LayerNorm, GELU MLP with biases, learned positions, tied
head). ``ModelConfig``'s decoder options turn the same block into the others:
RMSNorm (Gemma's ``1 + w`` scale), gated MLPs, per-projection biases, rotary
positions with scaling, q/k norms, sliding windows on some or all layers
(with their own rotary base), soft-capped attention and output logits, norms
after each sublayer (Gemma 2/3) and an embedding scaled by sqrt(D) (Gemma).
``num_experts`` > 0 puts a mixture of experts in every layer's MLP (Mixtral,
Qwen-MoE: ``bigmodel.models.moe``).
"""
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigmodel.models import moe
from bigmodel.models.config import ModelConfig
from bigmodel.models.decoding import LocalGlobalCache
from bigmodel.models.layers import (DECODE, TRAIN, DenseGeneral, KVCache, MultiHeadAttention, Mlp,
                                    NormSpec, check_mode, constrain, make_embed)
from bigmodel.models.stack import apply_layer_stack


def norm_spec(c: ModelConfig) -> NormSpec:
  return NormSpec(c.norm, c.layer_norm_epsilon, c.norm_scale_offset)


def softcap(x: jax.Array, cap: float) -> jax.Array:
  """cap * tanh(x / cap): bounds logits smoothly to (-cap, cap); 0 = off."""
  return cap * jnp.tanh(x / cap) if cap else x


class GptBlock(nn.Module):
  """x + attn(norm(x)), then x + mlp(norm(x)); causal within packed segments.

  With ``post_norms`` each sublayer's output is normed again before the
  residual add (Gemma 2/3). ``layer_input`` is what differs per layer:
  ``(local, cache)``, ``local`` a bool scalar (this layer attends within
  the sliding window) or None (every layer alike), ``cache`` the layer's
  ``KVCache`` when decoding.

  Returns (x, cache) in every ``mode``: cache None in training, the
  attention's ``KVCache`` at prefill, the updated one when decoding (one
  step, L = 1, against ``cache``; ``segment_ids_BxL`` are then the cache's
  [B, S] slot segment ids, 0 = empty or padding).
  """
  config: ModelConfig
  mode: str = TRAIN

  @nn.compact
  def __call__(self, x_BxLxD, segment_ids_BxL, positions_BxL, deterministic: bool,
               layer_input: Optional[tuple[Any, Optional[KVCache]]] = None):
    c = self.config
    local, cache = layer_input if layer_input is not None else (None, None)
    if local is None:  # Every layer alike: windowed iff there is a window.
      local = bool(c.sliding_window)
    # GPT-2: residual projections scaled by 1/sqrt(2 * layers) at init so the
    # residual stream's variance does not grow with depth.
    out_stddev = 0.02 / math.sqrt(2 * c.num_layers)
    norm = lambda name: norm_spec(c).make(name, c.dtype, c.param_dtype)  # pylint: disable=g-long-lambda
    rope = c.position_embedding == "rope"
    attention = MultiHeadAttention(
        num_heads=c.num_heads, head_dim=c.head_dim, num_kv_heads=c.num_kv_heads,
        use_bias=c.attention_qkv_bias, out_bias=c.attention_out_bias,
        rope=c.rope() if rope else None,
        local_rope=c.rope(local=True) if rope and c.rope_local_theta else None,
        window=c.sliding_window, softcap=c.attn_softcap,
        qk_norm=norm_spec(c) if c.qk_norm else None,
        score_scale=c.query_pre_attn_scalar ** -0.5 if c.query_pre_attn_scalar else None,
        attention_impl=c.attention_impl, context_attention=c.context_attention,
        out_init_stddev=out_stddev, mode=self.mode, dtype=c.dtype, param_dtype=c.param_dtype,
        name="attn")
    # Decoding needs no causal or query mask: the cache's later slots are empty.
    decoding = self.mode == DECODE
    h_BxLxD, kv = attention(
        norm("ln_attn")(x_BxLxD), causal=not decoding,
        q_segment_ids_BxT=None if decoding else segment_ids_BxL,
        kv_segment_ids_BxS=segment_ids_BxL, q_positions_BxT=positions_BxL, cache=cache,
        local=local)
    if c.post_norms:
      h_BxLxD = norm("ln_attn_out")(h_BxLxD)
    x_BxLxD = x_BxLxD + nn.Dropout(c.dropout_rate)(h_BxLxD, deterministic=deterministic)
    if c.num_experts:  # Mixtral / Qwen-MoE: routed experts instead of one MLP.
      mlp = moe.from_config(c, gated=c.mlp_gated)
    else:
      mlp = Mlp(c.mlp_dim, activation=c.mlp_activation, gated=c.mlp_gated, use_bias=c.mlp_bias,
                dropout_rate=c.dropout_rate, out_init_stddev=out_stddev, dtype=c.dtype,
                param_dtype=c.param_dtype, name="mlp")
    h_BxLxD = mlp(norm("ln_mlp")(x_BxLxD), deterministic)
    if c.post_norms:
      h_BxLxD = norm("ln_mlp_out")(h_BxLxD)
    x_BxLxD = x_BxLxD + nn.Dropout(c.dropout_rate)(h_BxLxD, deterministic=deterministic)
    return constrain(x_BxLxD, ("batch", "length", "act_embed")), kv


class Gpt(nn.Module):
  """Token ids [B, L] -> next-token logits [B, L, V] (float32).

  Decoding (``bigmodel.models.decoding``): ``mode=PREFILL`` returns (logits,
  the stacked per-layer ``KVCache`` of the tokens, leaves [layers, B, L, K,
  H]); ``mode=DECODE`` runs one step (L = 1) against ``cache`` (that
  stack, or a ``LocalGlobalCache`` when local and global layers alternate),
  with ``kv_segment_ids_BxS`` marking the filled slots of all S keys (this
  step's included), and returns (logits, updated cache). ``head=False``
  (training) returns the final hidden states [B, L, D] that the output head
  reads (``bigmodel.models.chunked_loss``).
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL: jax.Array, *,
               segment_ids_BxL: Optional[jax.Array] = None,
               positions_BxL: Optional[jax.Array] = None,
               deterministic: bool = True,
               mode: str = TRAIN,
               cache: Optional[KVCache] = None,
               kv_segment_ids_BxS: Optional[jax.Array] = None,
               head: bool = True):
    c = self.config
    check_mode(mode)
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
    embed = make_embed(c.vocab_size, c.embed_dim, axes=("vocab", "embed"), dtype=c.dtype,
                       param_dtype=c.param_dtype, name="token_embed")
    x_BxLxD = embed(tokens_BxL)
    if c.embed_scale:  # Gemma; the factor rounded to the compute dtype, as Gemma does.
      x_BxLxD = x_BxLxD * jnp.asarray(c.embed_dim ** 0.5, x_BxLxD.dtype)
    if c.position_embedding == "learned":
      x_BxLxD += make_embed(c.max_len, c.embed_dim, axes=(None, "embed"), dtype=c.dtype,
                            param_dtype=c.param_dtype, stddev=0.01,
                            name="position_embed")(positions_BxL)
    x_BxLxD = nn.Dropout(c.dropout_rate)(x_BxLxD, deterministic=deterministic)
    x_BxLxD = constrain(x_BxLxD.astype(c.dtype), ("batch", "length", "act_embed"))
    if isinstance(cache, LocalGlobalCache):
      x_BxLxD, new_cache = self._decode_local_global(x_BxLxD, kv_segment_ids_BxS,
                                                     positions_BxL, cache)
    else:
      local_layers = c.local_layers()
      # Alternating local and global layers: each scanned layer gets its flag.
      local_L = jnp.asarray(local_layers) if 0 < local_layers.sum() < c.num_layers else None
      layer_inputs = None if local_L is None and cache is None else (local_L, cache)
      # Decoding computes no gradients: remat would only cost compile time.
      x_BxLxD, new_cache = apply_layer_stack(
          GptBlock, x_BxLxD, kv_segment_ids_BxS if mode == DECODE else segment_ids_BxL,
          positions_BxL, deterministic, layer_inputs=layer_inputs,
          num_layers=c.num_layers, scan=c.scan, remat=c.remat if mode == TRAIN else "none",
          name="blocks", config=c, mode=mode)
    x_BxLxD = norm_spec(c).make("ln_final", c.dtype, c.param_dtype)(x_BxLxD)
    if not head:  # Training with the chunked loss: it applies the head itself.
      return x_BxLxD
    if c.tie_embeddings:
      logits_BxLxV = embed.attend(x_BxLxD)
    else:
      logits_BxLxV = DenseGeneral((c.vocab_size,), ("embed", "vocab"), use_bias=False,
                                  dtype=c.dtype, param_dtype=c.param_dtype,
                                  name="lm_head")(x_BxLxD)
    logits_BxLxV = softcap(logits_BxLxV.astype(jnp.float32), c.final_softcap)
    logits_BxLxV = constrain(logits_BxLxV, ("batch", "length", "act_vocab"))
    return logits_BxLxV if mode == TRAIN else (logits_BxLxV, new_cache)

  def _decode_local_global(self, x_Bx1xD: jax.Array, kv_segment_ids_BxS: jax.Array,
                           positions_Bx1: jax.Array,
                           cache: LocalGlobalCache) -> tuple[jax.Array, LocalGlobalCache]:
    """One decoding step through layers whose caches differ in size by kind.

    The local layers' rings and the global layers' caches cannot share one
    scanned [layers] stack, so the layers run in groups of the window
    pattern p (p - 1 local layers, then a global one; MaxText scans Gemma 3
    this way): a scan over the groups, each unrolled, then the leftover
    local layers. Compile time stays flat in depth; every layer reads its
    slice of the stacked parameters and caches in place.
    """
    c = self.config
    p, local_L = c.sliding_window_pattern, c.local_layers()
    params = self.variables["params"]
    block = GptBlock(c, mode=DECODE, parent=None)

    def layer(i, local: bool, kind_index, x_Bx1xD, cache: LocalGlobalCache):
      # i (layer) and kind_index (its slot in cache.local or cache.full) are
      # traced inside the scan over groups, Python ints outside it.
      if c.scan:
        layer_params = jax.tree_util.tree_map(lambda a: a[i], params["blocks"])
      else:
        layer_params = params[f"blocks_{i}"]
      caches = cache.local if local else cache.full
      x_Bx1xD, new = block.apply(
          {"params": layer_params}, x_Bx1xD, kv_segment_ids_BxS, positions_Bx1, True,
          (local, jax.tree_util.tree_map(lambda a: a[kind_index], caches)))
      caches = jax.tree_util.tree_map(lambda a, n: a.at[kind_index].set(n), caches, new)
      return x_Bx1xD, (cache.replace(local=caches) if local else cache.replace(full=caches))

    def group(g, x_Bx1xD, cache):
      for j in range(p):
        local = j < p - 1
        x_Bx1xD, cache = layer(g * p + j, local, g * (p - 1) + j if local else g, x_Bx1xD, cache)
      return x_Bx1xD, cache

    num_groups = c.num_layers // p
    assert local_L[num_groups * p:].all() and not local_L[p - 1::p].any()
    if c.scan:  # Stacked parameters: one compiled group.
      (x_Bx1xD, cache), _ = jax.lax.scan(
          lambda carry, g: (group(g, *carry), None), (x_Bx1xD, cache), jnp.arange(num_groups))
    else:
      for g in range(num_groups):
        x_Bx1xD, cache = group(g, x_Bx1xD, cache)
    for i in range(num_groups * p, c.num_layers):  # Local layers after the last group.
      x_Bx1xD, cache = layer(i, True, num_groups * (p - 1) + i - num_groups * p, x_Bx1xD, cache)
    return x_Bx1xD, cache
