"""BERT (masked LM, bare encoder or sequence classifier) <-> bigmodel ``bert``.

Original BERT is bigmodel's BERT with post-LN blocks (``norm_position=post``),
token-type embeddings, exact (erf) GELU (``mlp_activation=gelu_exact``) and
LayerNorm epsilon 1e-12, all config fields. The head follows the checkpoint's
class (``architectures``):

* ``BertForMaskedLM`` / ``BertForPreTraining`` (and a config naming none): the
  MLM head, whose decoder is the word embedding (tied) plus its own bias;
* ``BertModel``, the encoder alone (as fine-tuning scripts save it, with or
  without the ``bert.`` prefix): an MLM model whose head starts fresh
  (``Rule.fresh``; the import lists it), ready for ``init_from`` by a
  classification run, which adds its own pooler and classifier (the
  checkpoint's pooler is listed as not imported);
* ``BertForSequenceClassification``: ``num_classes`` = its label count, with
  its pooler and classifier. It exports back as that class.

Other heads (token classification, question answering, a causal BERT) are
refused by name.
"""
import dataclasses
from typing import Any

from bigmodel.errors import UserError
from bigmodel.hf.mapping import Rule, TO_HF_ACTIVATION, hf_heads_and_width, hf_size, mlp_activation
from bigmodel.models.config import ModelConfig

MODEL_TYPE = "bert"
ARCHITECTURE = "BertForMaskedLM"
FAMILY = "bert"
IGNORED = (r"(bert\.)?embeddings\.position_ids",)
TIED = (("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),
        ("cls.predictions.decoder.bias", "cls.predictions.bias"))
CLASSIFIER = "BertForSequenceClassification"
# Classes whose checkpoints hold the MLM head, and the one that holds no head.
MLM_ARCHITECTURES = (ARCHITECTURE, "BertForPreTraining")
ENCODER = "BertModel"


def _architecture(hf: dict[str, Any]) -> str:
  """The checkpoint's class: the first of ``architectures`` (none: ``BertForMaskedLM``)."""
  architecture = (hf.get("architectures") or [ARCHITECTURE])[0]
  supported = (*MLM_ARCHITECTURES, ENCODER, CLASSIFIER)
  if architecture not in supported:
    raise UserError(f"config.json architectures={hf['architectures']} is not supported; "
                    f"supported: {', '.join(supported)}")
  if hf.get("is_decoder"):
    raise UserError("config.json is_decoder=true (causal attention) is not supported")
  return architecture


def _num_labels(hf: dict[str, Any]) -> int:
  """A ``BertForSequenceClassification``'s label count: ``id2label``'s, else ``num_labels`` (2)."""
  id2label = hf.get("id2label")
  num_labels = len(id2label) if isinstance(id2label, dict) else hf_size(hf, "num_labels", 2)
  problem = hf.get("problem_type") or "single_label_classification"
  if problem != "single_label_classification":
    raise UserError(f"config.json problem_type={problem!r} is not supported (only "
                    "single_label_classification)")
  if num_labels < 2:
    raise UserError(f"config.json has {num_labels} label: a regression head is not supported")
  return num_labels


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
      norm_position="post", layer_norm_epsilon=hf.get("layer_norm_eps", 1e-12),
      num_classes=_num_labels(hf) if _architecture(hf) == CLASSIFIER else 0,
      mlp_activation=mlp_activation(hf.get("hidden_act", "gelu"), "hidden_act"),
      dropout_rate=hf.get("hidden_dropout_prob", 0.1))


def hf_config(m: ModelConfig) -> dict[str, Any]:
  """A ``config.json`` for a bigmodel BERT; UserError if HF BERT cannot express it."""
  if m.norm_position != "post":
    raise UserError("Hugging Face BERT is post-LN; this model has norm_position=pre")
  if m.num_kv_heads not in (0, m.num_heads) or m.head_dim * m.num_heads != m.embed_dim:
    raise UserError("BERT needs num_kv_heads = num_heads and head_dim = embed_dim / num_heads")
  labels = {}
  if m.num_classes:  # The label names are the data's, not the model's.
    labels = {"id2label": {str(i): f"LABEL_{i}" for i in range(m.num_classes)},
              "label2id": {f"LABEL_{i}": i for i in range(m.num_classes)},
              "problem_type": "single_label_classification"}
  return {
      "architectures": [CLASSIFIER if m.num_classes else ARCHITECTURE], "model_type": MODEL_TYPE,
      "vocab_size": m.vocab_size, "hidden_size": m.embed_dim, "num_hidden_layers": m.num_layers,
      "num_attention_heads": m.num_heads, "intermediate_size": m.mlp_dim,
      "hidden_act": TO_HF_ACTIVATION[m.mlp_activation], "max_position_embeddings": m.max_len,
      "type_vocab_size": m.type_vocab_size, "layer_norm_eps": m.layer_norm_epsilon,
      "position_embedding_type": "absolute", "hidden_dropout_prob": m.dropout_rate,
      "attention_probs_dropout_prob": 0.0, "tie_word_embeddings": True, **labels,
  }


def rules(m: ModelConfig, hf: dict[str, Any] | None = None) -> list[Rule]:
  """Where each bigmodel parameter lives in a BERT checkpoint (``hf``: its config, on import)."""
  d, f, layers = m.embed_dim, m.mlp_dim, m.num_layers

  def names(name: str) -> tuple[str, ...]:
    # The encoder is "bert."-prefixed in a model with a head; old checkpoints
    # name LayerNorm gamma / beta. Heads (cls., classifier.) never are.
    old = name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                      "LayerNorm.beta")
    prefixed = [] if name.startswith(("cls.", "classifier.")) else [f"bert.{name}", f"bert.{old}"]
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
  encoder = [
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
  ]
  if m.num_classes:
    return [*encoder, *dense("pooler", "pooler.dense", d, d, stack=False),
            *dense("classifier", "classifier", d, m.num_classes, stack=False)]
  head = [*dense("mlm_dense", "cls.predictions.transform.dense", d, d, stack=False),
          *norm("mlm_ln", "cls.predictions.transform", stack=False),
          Rule("mlm_bias", ("cls.predictions.bias", "cls.predictions.decoder.bias"),
               (m.vocab_size,))]
  if hf is not None and _architecture(hf) == ENCODER:  # No head to read: it starts fresh.
    head = [dataclasses.replace(rule, fresh=True) for rule in head]
  return [*encoder, *head]
