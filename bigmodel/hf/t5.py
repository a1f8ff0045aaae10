"""T5 (``T5ForConditionalGeneration``: v1.1 and original T5) <-> bigmodel ``t5``.

bigmodel's T5 is RMSNorm, relative position bias, unscaled attention scores,
no biases and an untied head; the MLP's gating (``t5_mlp_gated``: v1.1's
gated ``wi_0`` / ``wi_1``, original T5's single ``wi``), activation, epsilon,
bucket count and distance are config fields.

Original T5 ties the head to the embedding and scales the decoder output by
``d_model ** -0.5``; a checkpoint that does so imports exactly by folding the
scale into bigmodel's untied head (export writes that head as its own
``lm_head.weight``, untied and unscaled). The flag is ``tie_word_embeddings``
in transformers 4 configs and ``scale_decoder_outputs`` in transformers 5 ones
(which always say ``tie_word_embeddings: true`` and tie only when the
checkpoint has no separate ``lm_head.weight``).
"""
from typing import Any

from bigmodel.errors import UserError
from bigmodel.hf.mapping import Rule, hf_size
from bigmodel.models.config import ModelConfig

MODEL_TYPE = "t5"
ARCHITECTURE = "T5ForConditionalGeneration"
FAMILY = "t5"
# The decoder's cross-attention never has a relative bias; some checkpoints store one.
IGNORED = (r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight",)
TIED = (("encoder.embed_tokens.weight", "shared.weight"),
        ("decoder.embed_tokens.weight", "shared.weight"))
# feed_forward_proj -> (model.t5_mlp_gated, model.mlp_activation). transformers
# reads "gated-gelu" as the tanh GELU ("gelu_new"), "gated-ACT" as ACT; "relu"
# is original T5's ungated MLP. Export writes the first name of each pair.
FEED_FORWARD_PROJ = {"gated-gelu": (True, "gelu_tanh"), "gated-gelu_new": (True, "gelu_tanh"),
                     "gated-gelu_pytorch_tanh": (True, "gelu_tanh"), "gated-relu": (True, "relu"),
                     "relu": (False, "relu")}


def model_config(hf: dict[str, Any]) -> dict[str, Any]:
  """``config.model`` fields for a T5 ``config.json``."""
  proj = hf.get("feed_forward_proj", "relu")
  if not isinstance(proj, str) or proj not in FEED_FORWARD_PROJ:
    raise UserError(f"config.json feed_forward_proj={proj!r} is not supported; supported: "
                    f"{', '.join(FEED_FORWARD_PROJ)}")
  gated, activation = FEED_FORWARD_PROJ[proj]
  num_layers = hf_size(hf, "num_layers")
  return dict(
      family=FAMILY, vocab_size=hf_size(hf, "vocab_size"), num_layers=num_layers,
      num_decoder_layers=hf_size(hf, "num_decoder_layers", num_layers),
      num_heads=hf_size(hf, "num_heads"), num_kv_heads=0, head_dim=hf_size(hf, "d_kv"),
      embed_dim=hf_size(hf, "d_model"), mlp_dim=hf_size(hf, "d_ff"),
      position_embedding="relative",
      relative_buckets=hf_size(hf, "relative_attention_num_buckets", 32),
      relative_max_distance=hf_size(hf, "relative_attention_max_distance", 128),
      layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
      mlp_activation=activation, t5_mlp_gated=gated,
      tie_embeddings=False, dropout_rate=hf.get("dropout_rate", 0.1))


def _scales_decoder_output(hf: dict[str, Any]) -> bool:
  if "scale_decoder_outputs" in hf:
    return bool(hf["scale_decoder_outputs"])
  return bool(hf.get("tie_word_embeddings", True))


def hf_config(m: ModelConfig) -> dict[str, Any]:
  """A ``config.json`` for a bigmodel T5; UserError if HF T5 cannot express it."""
  proj = next((p for p, v in FEED_FORWARD_PROJ.items()
               if v == (m.t5_mlp_gated, m.mlp_activation)), None)
  if proj is None:
    raise UserError(f"HF T5 has no {'gated ' if m.t5_mlp_gated else ''}{m.mlp_activation} MLP "
                    f"(feed_forward_proj: {', '.join(FEED_FORWARD_PROJ)}; gated-gelu is the "
                    "tanh GELU)")
  if m.num_kv_heads not in (0, m.num_heads):
    raise UserError("HF T5 needs num_kv_heads = num_heads")
  if m.num_experts:
    raise UserError(f"model.num_experts={m.num_experts}: HF T5 has dense MLPs only (a mixture "
                    "of experts in T5 is SwitchTransformers, which this export does not write)")
  return {
      "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE,
      "is_encoder_decoder": True, "vocab_size": m.vocab_size, "d_model": m.embed_dim,
      "d_kv": m.head_dim, "d_ff": m.mlp_dim, "num_layers": m.num_layers,
      "num_decoder_layers": m.num_decoder_layers or m.num_layers, "num_heads": m.num_heads,
      "relative_attention_num_buckets": m.relative_buckets,
      "relative_attention_max_distance": m.relative_max_distance,
      "layer_norm_epsilon": m.layer_norm_epsilon, "dropout_rate": m.dropout_rate,
      "feed_forward_proj": proj,
      # An untied head and no output scaling (read by transformers 4 and 5).
      "tie_word_embeddings": False,
  }


def rules(m: ModelConfig, hf: dict[str, Any] | None = None) -> list[Rule]:
  """Where each bigmodel parameter lives in a T5 checkpoint (``hf``: its config, on import)."""
  d, f, n, h, v = m.embed_dim, m.mlp_dim, m.num_heads, m.head_dim, m.vocab_size
  # (bigmodel, HF) MLP input projections: gated (v1.1) or one (original T5).
  mlp_inputs = [("wi", "wi_0"), ("wi_linear", "wi_1")] if m.t5_mlp_gated else [("wi", "wi")]

  def stack(side: str, layers: int, sublayers: list[tuple[str, str, str]]) -> list[Rule]:
    """Rules of one stack; sublayers: (bigmodel norm, bigmodel module, HF module) by layer index."""
    result = [Rule(f"{side}/relative_bias/rel_embedding",
                   (f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",),
                   (m.relative_buckets, n)),
              Rule(f"{side}/ln_final/scale", (f"{side}.final_layer_norm.weight",), (d,))]
    for index, (norm, module, hf_module) in enumerate(sublayers):
      prefix = f"{side}.block.{{i}}.layer.{index}"
      block = lambda param, name, shape: Rule(  # pylint: disable=g-long-lambda,cell-var-from-loop
          f"{side}/blocks/{param}", (f"{prefix}.{name}",), shape,
          "same" if len(shape) == 1 else "linear", layers=layers)
      result.append(block(f"{norm}/scale", "layer_norm.weight", (d,)))
      if hf_module == "DenseReluDense":
        result += [block(f"mlp/{p}/kernel", f"DenseReluDense.{q}.weight", (f, d))
                   for p, q in mlp_inputs]
        result.append(block("mlp/wo/kernel", "DenseReluDense.wo.weight", (d, f)))
      else:
        result += [block(f"{module}/{p}/kernel", f"{hf_module}.{q}.weight", (n * h, d))
                   for p, q in (("query", "q"), ("key", "k"), ("value", "v"))]
        result.append(block(f"{module}/out/kernel", f"{hf_module}.o.weight", (d, n * h)))
    return result

  scale = d ** -0.5 if hf is not None and _scales_decoder_output(hf) else 1.0
  return [
      Rule("token_embed/embedding",
           ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"),
           (v, d)),
      # A tied checkpoint has no lm_head.weight: the head is the shared embedding.
      Rule("lm_head/kernel", ("lm_head.weight", "shared.weight"), (v, d), "linear", scale=scale),
      *stack("encoder", m.num_layers, [("ln_attn", "attn", "SelfAttention"),
                                       ("ln_mlp", "mlp", "DenseReluDense")]),
      *stack("decoder", m.num_decoder_layers or m.num_layers,
             [("ln_self_attn", "self_attn", "SelfAttention"),
              ("ln_cross_attn", "cross_attn", "EncDecAttention"),
              ("ln_mlp", "mlp", "DenseReluDense")]),
  ]
