"""GPT-2 (``GPT2LMHeadModel``) <-> bigmodel ``gpt``.

GPT-2 is bigmodel's GPT with learned positions, tied embeddings, tanh-GELU
("gelu_new") and LayerNorm epsilon 1e-5, all config fields. Its ``Conv1D``
weights are stored ``[in, out]`` (the transpose of ``nn.Linear``), and
``c_attn`` fuses the q, k and v projections along its output axis.
"""
from typing import Any

from bigmodel.errors import UserError
from bigmodel.hf.mapping import (Rule, TO_HF_ACTIVATION, hf_bool, hf_heads_and_width, hf_size,
                                 mlp_activation)
from bigmodel.models.config import ModelConfig

MODEL_TYPE = "gpt2"
ARCHITECTURE = "GPT2LMHeadModel"
FAMILY = "gpt"
# Tensors read by no rule that are not weights: causal-mask buffers of old checkpoints.
IGNORED = (r"(transformer\.)?h\.\d+\.attn\.(masked_)?bias",)
# Tensors that must equal another when the model ties them: (copy, original). An
# untied model (tie_word_embeddings: false) reads lm_head.weight as its own head.
TIED = (("lm_head.weight", "transformer.wte.weight"),)


def model_config(hf: dict[str, Any]) -> dict[str, Any]:
  """``config.model`` fields for a GPT-2 ``config.json``."""
  if hf.get("scale_attn_by_inverse_layer_idx"):
    raise UserError("config.json scale_attn_by_inverse_layer_idx=true is not supported")
  if not hf.get("scale_attn_weights", True):
    raise UserError("config.json scale_attn_weights=false is not supported")
  num_heads, embed_dim = hf_heads_and_width(hf, "n_head", "n_embd")
  tied = hf_bool(hf, "tie_word_embeddings", True)
  return dict(
      family=FAMILY, vocab_size=hf_size(hf, "vocab_size"), num_layers=hf_size(hf, "n_layer"),
      num_heads=num_heads, num_kv_heads=0, head_dim=0, embed_dim=embed_dim,
      mlp_dim=hf_size(hf, "n_inner", 4 * embed_dim), max_len=hf_size(hf, "n_positions"),
      position_embedding="learned", tie_embeddings=tied,
      layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
      mlp_activation=mlp_activation(hf.get("activation_function", "gelu_new"),
                                    "activation_function"),
      dropout_rate=hf.get("resid_pdrop", 0.1))


def hf_config(m: ModelConfig) -> dict[str, Any]:
  """A ``config.json`` for a bigmodel GPT; UserError if GPT-2 cannot express it."""
  if m.position_embedding != "learned":
    raise UserError(f"GPT-2 has learned positions; this model has {m.position_embedding}")
  if m.num_kv_heads not in (0, m.num_heads) or m.head_dim * m.num_heads != m.embed_dim:
    raise UserError("GPT-2 needs num_kv_heads = num_heads and head_dim = embed_dim / num_heads")
  return {
      "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE,
      "vocab_size": m.vocab_size, "n_positions": m.max_len, "n_embd": m.embed_dim,
      "n_layer": m.num_layers, "n_head": m.num_heads, "n_inner": m.mlp_dim,
      "activation_function": TO_HF_ACTIVATION[m.mlp_activation],
      "layer_norm_epsilon": m.layer_norm_epsilon, "tie_word_embeddings": m.tie_embeddings,
      # bigmodel drops out residual branches and embeddings, never attention probabilities.
      "resid_pdrop": m.dropout_rate, "embd_pdrop": m.dropout_rate, "attn_pdrop": 0.0,
  }


def rules(m: ModelConfig, hf: dict[str, Any] | None = None) -> list[Rule]:  # pylint: disable=unused-argument
  """Where each bigmodel parameter lives in a GPT-2 checkpoint."""
  d, f, v, layers = m.embed_dim, m.mlp_dim, m.vocab_size, m.num_layers

  def names(name: str) -> tuple[str, ...]:
    # GPT2LMHeadModel prefixes "transformer."; a bare GPT2Model does not.
    return (f"transformer.{name}", name)

  def block(param: str, name: str, shape: tuple[int, ...], layout: str = "same",
            part: tuple[int, int] = (0, 1)) -> Rule:
    return Rule(f"blocks/{param}", names(f"h.{{i}}.{name}"), shape, layout, part, layers)

  result = [
      Rule("token_embed/embedding", names("wte.weight"), (v, d)),
      Rule("position_embed/embedding", names("wpe.weight"), (m.max_len, d)),
      Rule("ln_final/scale", names("ln_f.weight"), (d,)),
      Rule("ln_final/bias", names("ln_f.bias"), (d,)),
  ]
  for norm, hf_norm in (("ln_attn", "ln_1"), ("ln_mlp", "ln_2")):
    result += [block(f"{norm}/scale", f"{hf_norm}.weight", (d,)),
               block(f"{norm}/bias", f"{hf_norm}.bias", (d,))]
  for index, projection in enumerate(("query", "key", "value")):
    result += [block(f"attn/{projection}/kernel", "attn.c_attn.weight", (d, 3 * d), "conv1d",
                     (index, 3)),
               block(f"attn/{projection}/bias", "attn.c_attn.bias", (3 * d,), "same", (index, 3))]
  result += [
      block("attn/out/kernel", "attn.c_proj.weight", (d, d), "conv1d"),
      block("attn/out/bias", "attn.c_proj.bias", (d,)),
      block("mlp/wi/kernel", "mlp.c_fc.weight", (d, f), "conv1d"),
      block("mlp/wi/bias", "mlp.c_fc.bias", (f,)),
      block("mlp/wo/kernel", "mlp.c_proj.weight", (f, d), "conv1d"),
      block("mlp/wo/bias", "mlp.c_proj.bias", (d,)),
  ]
  if not m.tie_embeddings:
    result.append(Rule("lm_head/kernel", ("lm_head.weight",), (v, d), "linear"))
  return result
