"""BERT (``BertForMaskedLM``) <-> bigmodel ``bert``.

Original BERT is bigmodel's BERT with post-LN blocks (``norm_position=post``),
token-type embeddings, exact (erf) GELU (``mlp_activation=gelu_exact``) and
LayerNorm epsilon 1e-12, all config fields. The MLM head's decoder is the
word embedding (tied) plus its own bias.
"""
from typing import Any

from bigmodel.errors import UserError
from bigmodel.hf.mapping import Rule, TO_HF_ACTIVATION, hf_heads_and_width, hf_size, mlp_activation
from bigmodel.models.config import ModelConfig

MODEL_TYPE = "bert"
FAMILY = "bert"
IGNORED = (r"(bert\.)?embeddings\.position_ids",)
TIED = (("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),
        ("cls.predictions.decoder.bias", "cls.predictions.bias"))


def model_config(hf: dict[str, Any]) -> dict[str, Any]:
  """``config.model`` fields for a BERT ``config.json``."""
  position_type = hf.get("position_embedding_type", "absolute")
  if position_type != "absolute":
    raise UserError(f"config.json position_embedding_type={position_type!r} is not supported "
                    "(only absolute)")
  num_heads, embed_dim = hf_heads_and_width(hf, "num_attention_heads", "hidden_size")
  return dict(
      family=FAMILY, vocab_size=hf_size(hf, "vocab_size"),
      num_layers=hf_size(hf, "num_hidden_layers"), num_heads=num_heads,
      num_kv_heads=0, head_dim=0, embed_dim=embed_dim,
      mlp_dim=hf_size(hf, "intermediate_size"), max_len=hf_size(hf, "max_position_embeddings"),
      type_vocab_size=hf_size(hf, "type_vocab_size", 2), position_embedding="learned",
      norm_position="post", num_classes=0, layer_norm_epsilon=hf.get("layer_norm_eps", 1e-12),
      mlp_activation=mlp_activation(hf.get("hidden_act", "gelu"), "hidden_act"),
      dropout_rate=hf.get("hidden_dropout_prob", 0.1))


def hf_config(m: ModelConfig) -> dict[str, Any]:
  """A ``config.json`` for a bigmodel BERT; UserError if HF BERT cannot express it."""
  if m.norm_position != "post":
    raise UserError("Hugging Face BERT is post-LN; this model has norm_position=pre")
  if m.num_classes:
    raise UserError("only MLM BERT models export (this one has a classification head)")
  if m.num_kv_heads not in (0, m.num_heads) or m.head_dim * m.num_heads != m.embed_dim:
    raise UserError("BERT needs num_kv_heads = num_heads and head_dim = embed_dim / num_heads")
  return {
      "architectures": ["BertForMaskedLM"], "model_type": MODEL_TYPE,
      "vocab_size": m.vocab_size, "hidden_size": m.embed_dim, "num_hidden_layers": m.num_layers,
      "num_attention_heads": m.num_heads, "intermediate_size": m.mlp_dim,
      "hidden_act": TO_HF_ACTIVATION[m.mlp_activation], "max_position_embeddings": m.max_len,
      "type_vocab_size": m.type_vocab_size, "layer_norm_eps": m.layer_norm_epsilon,
      "position_embedding_type": "absolute", "hidden_dropout_prob": m.dropout_rate,
      "attention_probs_dropout_prob": 0.0, "tie_word_embeddings": True,
  }


def rules(m: ModelConfig, hf: dict[str, Any] | None = None) -> list[Rule]:  # pylint: disable=unused-argument
  """Where each bigmodel parameter lives in a BERT checkpoint."""
  d, f, layers = m.embed_dim, m.mlp_dim, m.num_layers

  def names(name: str) -> tuple[str, ...]:
    # BertForMaskedLM prefixes "bert."; old checkpoints name LayerNorm gamma / beta.
    old = name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                      "LayerNorm.beta")
    prefixed = [] if name.startswith("cls.") else [f"bert.{name}", f"bert.{old}"]
    return tuple(dict.fromkeys(prefixed + [name, old]))

  def norm(param: str, name: str, stack: bool) -> list[Rule]:
    return [Rule(f"{param}/scale", names(f"{name}.LayerNorm.weight"), (d,),
                 layers=layers if stack else 0),
            Rule(f"{param}/bias", names(f"{name}.LayerNorm.bias"), (d,),
                 layers=layers if stack else 0)]

  def dense(param: str, name: str, d_in: int, d_out: int, stack: bool = True) -> list[Rule]:
    n = layers if stack else 0
    return [Rule(f"{param}/kernel", names(f"{name}.weight"), (d_out, d_in), "linear", layers=n),
            Rule(f"{param}/bias", names(f"{name}.bias"), (d_out,), layers=n)]

  layer = "encoder.layer.{i}"
  result = [
      Rule("token_embed/embedding", names("embeddings.word_embeddings.weight"), (m.vocab_size, d)),
      Rule("position_embed/embedding", names("embeddings.position_embeddings.weight"),
           (m.max_len, d)),
      Rule("type_embed/embedding", names("embeddings.token_type_embeddings.weight"),
           (m.type_vocab_size, d)),
      *norm("ln_embed", "embeddings", stack=False),
      *dense("blocks/attn/query", f"{layer}.attention.self.query", d, d),
      *dense("blocks/attn/key", f"{layer}.attention.self.key", d, d),
      *dense("blocks/attn/value", f"{layer}.attention.self.value", d, d),
      *dense("blocks/attn/out", f"{layer}.attention.output.dense", d, d),
      *norm("blocks/ln_attn", f"{layer}.attention.output", stack=True),
      *dense("blocks/mlp/wi", f"{layer}.intermediate.dense", d, f),
      *dense("blocks/mlp/wo", f"{layer}.output.dense", f, d),
      *norm("blocks/ln_mlp", f"{layer}.output", stack=True),
      *dense("mlm_dense", "cls.predictions.transform.dense", d, d, stack=False),
      *norm("mlm_ln", "cls.predictions.transform", stack=False),
      Rule("mlm_bias", ("cls.predictions.bias", "cls.predictions.decoder.bias"), (m.vocab_size,)),
  ]
  return result
