"""The family registry: everything that differs between GPT, BERT and T5, in one place.

A ``Family`` owns what is family-specific outside its Flax module: building
the module, example inputs for ``init``, its batch format (``batch_spec``,
``batch_logits``, ``targets_and_weights``), the cached decoder that
generation runs (``prefill`` / ``step``), its FLOP count, its Hugging Face
name map and the ``model.*`` options that apply to it. Code elsewhere asks
``get(config.model.family)`` or ``family_of(model)`` instead of testing
which family it has.

Adding a decoder variant: its module (``bigmodel/models/NAME.py``, with a
``Family`` subclass of ``bigmodel.models.family``), one line in ``FAMILIES``
below, and tests
(``tests/test_models.py`` runs every registered family through the registry
tests). Shape letters as in ``bigmodel.models``.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigmodel.errors import UserError
from bigmodel.models import moe
from bigmodel.models.bert import Bert
from bigmodel.models.chunked_loss import OutputHead
from bigmodel.models.decoding import DecodeState, LocalGlobalCache, fill_slot
from bigmodel.models.family import (Family, apply_kwargs, mlp_weights, projection_weights,
                                    score_flops, token_spec, weights_spec)
from bigmodel.models.gpt import Gpt
from bigmodel.models.layers import DECODE, PREFILL, pad_slots
from bigmodel.models.t5 import T5


class GptFamily(Family):
  """Decoder-only causal LM (GPT-2, Llama, Qwen, Mistral, Gemma); prompts
  left-padded (every row writes the same cache slot)."""
  name, module, positions, hf_name_map = "gpt", Gpt, ("learned", "rope"), "gpt2"
  generates = analytic_memory = context_parallel = True
  options = {
      "norm": "layernorm", "norm_scale_offset": 0.0, "mlp_gated": False,
      "attention_qkv_bias": True, "attention_out_bias": True, "mlp_bias": True,
      "embed_scale": False, "qk_norm": False, "post_norms": False,
      "query_pre_attn_scalar": 0.0, "sliding_window": 0, "sliding_window_pattern": 0,
      "attn_softcap": 0.0, "final_softcap": 0.0, "rope_scaling": "none",
      "rope_scaling_factor": 1.0, "rope_original_max_len": 0, "rope_low_freq_factor": 1.0,
      "rope_high_freq_factor": 4.0, "rope_yarn_beta_fast": 32.0, "rope_yarn_beta_slow": 1.0,
      "rope_attention_factor": 0.0, "rope_local_theta": 0.0, **moe.OPTIONS,
  }

  def validate(self, model_cfg):
    super().validate(model_cfg)
    m = {**self.options, **self.options_of(model_cfg)}
    if m["norm_scale_offset"] and m["norm"] != "rmsnorm":
      raise UserError("model.norm_scale_offset applies to model.norm=rmsnorm only")
    rope_keys = [k for k in self.options if k.startswith("rope_") and m[k] != self.options[k]]
    if rope_keys and model_cfg.get("position_embedding") != "rope":
      raise UserError(f"model.{rope_keys[0]} needs model.position_embedding=rope")
    if m["rope_scaling"] != "none" and m["rope_scaling_factor"] <= 0:
      raise UserError(f"model.rope_scaling_factor must be positive, got "
                      f"{m['rope_scaling_factor']}")
    if m["rope_scaling"] == "llama3" and m["rope_high_freq_factor"] <= m["rope_low_freq_factor"]:
      raise UserError("model.rope_high_freq_factor must exceed model.rope_low_freq_factor")
    if m["sliding_window_pattern"] and not m["sliding_window"]:
      raise UserError("model.sliding_window_pattern needs model.sliding_window > 0")
    if m["rope_local_theta"] and not m["sliding_window"]:
      raise UserError("model.rope_local_theta (local layers' rotary base) needs "
                      "model.sliding_window > 0")
    if m["num_experts"]:
      moe.validate(m)

  def batch_spec(self, c, batch_size, seq_len, target_len=0):
    spec = token_spec(batch_size, seq_len, "inputs", "targets", "segment_ids", "positions")
    return {**spec, "loss_mask": weights_spec(batch_size, seq_len)}

  def batch_logits(self, model, params, batch, *, rng, head=True, mutable=False):
    return model.apply({"params": params}, batch["inputs"], segment_ids_BxL=batch["segment_ids"],
                       positions_BxL=batch["positions"], head=head, **apply_kwargs(rng, mutable))

  def output_head(self, c, params):
    kernel_DxV = (params["token_embed"]["embedding"].T if c.tie_embeddings
                  else params["lm_head"]["kernel"])
    return OutputHead(kernel_DxV, softcap=c.final_softcap, dtype=c.dtype)

  def forward_flops(self, c, lengths):
    # Gated MLPs have three D x F matrices; local layers count their window;
    # a mixture of experts counts the experts a token runs (active parameters).
    length, (qo_weights, kv_weights) = lengths["inputs"], projection_weights(c)
    mlp = mlp_weights(c)
    layers = sum(length * 2 * (qo_weights + kv_weights + mlp)
                 + score_flops(c, length, length, causal=True, window=c.sliding_window * local)
                 for local in c.local_layers())
    return float(layers + length * 2 * c.embed_dim * c.vocab_size)

  def prefill(self, model, params, tokens_BxP, lengths_B, num_new, start_id):
    # Left padding: positions count from each row's first real token and
    # padding slots have segment id 0 (never attended), so a row computes
    # what it would alone.
    del start_id
    batch, prompt_len = tokens_BxP.shape
    first_real_B = prompt_len - lengths_B
    slots_BxP = jnp.broadcast_to(jnp.arange(prompt_len), (batch, prompt_len))
    segment_ids_BxP = (slots_BxP >= first_real_B[:, None]).astype(jnp.int32)
    positions_BxP = jnp.maximum(slots_BxP - first_real_B[:, None], 0)
    logits_BxPxV, cache = model.apply(
        {"params": params}, tokens_BxP, segment_ids_BxL=segment_ids_BxP,
        positions_BxL=positions_BxP, mode=PREFILL)
    slots, c = prompt_len + num_new, model.config
    local_L = c.local_layers()
    # A local layer sees the last `window` keys only: it keeps just those, in
    # a ring. The slot ids cover all keys; a ring views them.
    if not local_L.any() or c.sliding_window >= slots:
      cache = cache.padded(slots)
    elif local_L.all():  # Mistral.
      cache = cache.ring(c.sliding_window)
    else:  # Gemma.
      cache = LocalGlobalCache.split(cache, local_L, c.sliding_window, slots)
    state = DecodeState(cache=cache, kv_segment_ids_BxS=pad_slots(segment_ids_BxP, slots),
                        positions_B=lengths_B.astype(jnp.int32))
    return logits_BxPxV[:, -1], state

  def step(self, model, params, tokens_B, state):
    kv_segment_ids_BxS = fill_slot(state.kv_segment_ids_BxS, state.self_cache.index[0])
    logits_Bx1xV, cache = model.apply(
        {"params": params}, tokens_B[:, None], positions_BxL=state.positions_B[:, None],
        mode=DECODE, cache=state.cache, kv_segment_ids_BxS=kv_segment_ids_BxS)
    return logits_Bx1xV[:, 0], state.replace(cache=cache, kv_segment_ids_BxS=kv_segment_ids_BxS,
                                             positions_B=state.positions_B + 1)


class BertFamily(Family):
  """Bidirectional encoder: MLM logits [B, L, V], or class logits [B, C] (``num_classes``)."""
  name, module, hf_name_map = "bert", Bert, "bert"
  context_parallel = True
  options = {"norm_position": "post", "type_vocab_size": 2, "num_classes": 0}

  def validate(self, model_cfg):
    super().validate(model_cfg)
    if model_cfg.get("num_classes", 0) < 0:
      raise UserError(f"model.num_classes must be >= 0, got {model_cfg.num_classes}")
    if model_cfg.get("type_vocab_size", 2) <= 0:
      raise UserError(f"model.type_vocab_size must be positive, got {model_cfg.type_vocab_size}")

  def batch_spec(self, c, batch_size, seq_len, target_len=0):
    spec = token_spec(batch_size, seq_len, "inputs", "segment_ids", "positions", "type_ids")
    if c.num_classes:
      return {**spec, "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
              "example_mask": weights_spec(batch_size)}
    return {**spec, **token_spec(batch_size, seq_len, "targets"),
            "loss_mask": weights_spec(batch_size, seq_len)}

  def batch_logits(self, model, params, batch, *, rng, head=True, mutable=False):
    return model.apply({"params": params}, batch["inputs"], segment_ids_BxL=batch["segment_ids"],
                       positions_BxL=batch["positions"], type_ids_BxL=batch["type_ids"],
                       head=head, **apply_kwargs(rng, mutable))

  def output_head(self, c, params):
    if c.num_classes:
      return None
    return OutputHead(params["token_embed"]["embedding"].T, params["mlm_bias"], dtype=c.dtype)

  def targets_and_weights(self, c, batch):
    if c.num_classes:
      return batch["label"], batch["example_mask"]
    return batch["targets"], batch["loss_mask"]

  def forward_flops(self, c, lengths):
    # Bidirectional attention; then the MLM transform and logits at every
    # position, or the pooler and classifier on the first token.
    length, (qo_weights, kv_weights) = lengths["inputs"], projection_weights(c)
    d = c.embed_dim
    layers = c.num_layers * (length * 2 * (qo_weights + kv_weights + 2 * d * c.mlp_dim)
                             + score_flops(c, length, length, causal=False))
    if c.num_classes:
      return float(layers + 2 * (d * d + d * c.num_classes))
    return float(layers + length * 2 * (d * d + d * c.vocab_size))


class T5Family(Family):
  """Encoder-decoder: encoder input right-padded, decoding from a start token."""
  name, module, positions, hf_name_map = "t5", T5, ("relative",), "t5"
  # num_experts > 0: every encoder and decoder MLP a mixture of experts
  # (Switch Transformer: top 1, capacity dispatch).
  options = {"num_decoder_layers": 0, "relative_buckets": 32, "relative_max_distance": 128,
             "t5_mlp_gated": True, **moe.OPTIONS}
  token_keys = ("encoder_inputs", "decoder_inputs")
  encoder_decoder = generates = context_parallel = True
  methods = ("__call__", "encode", "decode")

  def validate(self, model_cfg):
    super().validate(model_cfg)
    for key in ("relative_buckets", "relative_max_distance"):
      if model_cfg.get(key, self.options[key]) <= 0:
        raise UserError(f"model.{key} must be positive, got {model_cfg[key]}")
    m = {**self.options, **self.options_of(model_cfg)}
    if m["num_experts"]:
      moe.validate(m)

  def example_inputs(self, c, seq_len):
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return tokens, tokens

  def batch_spec(self, c, batch_size, seq_len, target_len=0):
    return {**token_spec(batch_size, seq_len, "encoder_inputs", "encoder_segment_ids",
                          "encoder_positions"),
            **token_spec(batch_size, target_len or seq_len, "decoder_inputs", "decoder_targets",
                          "decoder_segment_ids", "decoder_positions"),
            "loss_mask": weights_spec(batch_size, target_len or seq_len)}

  def batch_logits(self, model, params, batch, *, rng, head=True, mutable=False):
    return model.apply({"params": params}, batch["encoder_inputs"], batch["decoder_inputs"],
                       encoder_segment_ids_BxE=batch["encoder_segment_ids"],
                       decoder_segment_ids_BxT=batch["decoder_segment_ids"], head=head,
                       **apply_kwargs(rng, mutable))

  def output_head(self, c, params):
    return OutputHead(params["lm_head"]["kernel"], dtype=c.dtype)

  def targets_and_weights(self, c, batch):
    return batch["decoder_targets"], batch["loss_mask"]

  def forward_flops(self, c, lengths):
    # The decoder adds cross-attention (k and v projected from the E encoder
    # positions) and the logits.
    e, t = lengths["encoder_inputs"], lengths["decoder_inputs"]
    qo_weights, kv_weights = projection_weights(c)
    # wi(, wi_linear), wo; or a token's experts and the router.
    mlp = mlp_weights(c, gated=c.t5_mlp_gated)
    encoder = c.num_layers * (e * 2 * (qo_weights + kv_weights + mlp)
                              + score_flops(c, e, e, causal=False))
    decoder = (c.num_decoder_layers or c.num_layers) * (
        t * 2 * (2 * qo_weights + kv_weights + mlp)  # self q,k,v,o; cross q,o; MLP
        + e * 2 * kv_weights                                   # cross k, v
        + score_flops(c, t, t, causal=True) + score_flops(c, t, e, causal=False))
    return float(encoder + decoder + t * 2 * c.embed_dim * c.vocab_size)

  def prefill(self, model, params, tokens_BxP, lengths_B, num_new, start_id):
    # Encode once (right padding, segment id 0 on padding), cache every
    # decoder layer's cross-attention keys/values, decode from ``start_id``.
    encoder_BxE = tokens_BxP
    batch, encoder_len = encoder_BxE.shape
    encoder_segment_ids_BxE = (jnp.arange(encoder_len)[None, :] < lengths_B[:, None]).astype(
        jnp.int32)
    encoded_BxExD = model.apply({"params": params}, encoder_BxE, encoder_segment_ids_BxE,
                                method="encode")
    start_Bx1 = jnp.full((batch, 1), start_id, jnp.int32)
    ones_Bx1 = jnp.ones((batch, 1), jnp.int32)
    logits_Bx1xV, (self_cache, cross_cache) = model.apply(
        {"params": params}, encoded_BxExD, start_Bx1, encoder_segment_ids_BxE, ones_Bx1,
        mode=PREFILL, method="decode")
    state = DecodeState(
        cache=(self_cache.padded(1 + num_new), cross_cache),
        kv_segment_ids_BxS=jnp.pad(ones_Bx1, ((0, 0), (0, num_new))),
        positions_B=jnp.ones((batch,), jnp.int32),
        encoder_segment_ids_BxE=encoder_segment_ids_BxE)
    return logits_Bx1xV[:, -1], state

  def step(self, model, params, tokens_B, state):
    kv_segment_ids_BxS = fill_slot(state.kv_segment_ids_BxS, state.self_cache.index[0])
    logits_Bx1xV, cache = model.apply(
        {"params": params}, None, tokens_B[:, None], state.encoder_segment_ids_BxE,
        kv_segment_ids_BxS, mode=DECODE, cache=state.cache, method="decode")
    return logits_Bx1xV[:, 0], state.replace(cache=cache, kv_segment_ids_BxS=kv_segment_ids_BxS,
                                             positions_B=state.positions_B + 1)


# The registry: one line per family.
FAMILIES: dict[str, Family] = {f.name: f for f in (GptFamily(), BertFamily(), T5Family())}


def foreign_options(family: Family) -> dict[str, tuple[str, Any]]:
  """{key: (owning family, default)} for the other families' options."""
  return {k: (f.name, default) for f in FAMILIES.values() if f is not family
          for k, default in f.options.items() if k not in family.options}


def get(name: str) -> Family:
  """The family called ``name`` (``model.family``); UserError if none is."""
  if name not in FAMILIES:
    raise UserError(f"model.family={name!r} is not one of: {', '.join(FAMILIES)}")
  return FAMILIES[name]


def family_of(model: nn.Module) -> Family:
  """The family of a module built by ``build_model`` (every one holds its ``ModelConfig``)."""
  return get(model.config.family)
