"""Model families. ``build_model(config.model)`` returns a Flax module.

What differs between families outside their modules lives in the registry,
``bigmodel.models.families``. Every model mode (``layers.TRAIN``,
``PREFILL``, ``DECODE``) goes through the same blocks.

Shape letters (the one glossary of the package; a tensor's name ends in its
shape, e.g. ``q_BxTxNxH``):

====  ==========================================================
B     batch (rows)
L     token length (a sequence both sides of attention read)
T     query length; the decoder length of an encoder-decoder
S     key/value length; cache slots when decoding
E     encoder length
D     model width (``embed_dim``)
F     MLP width (``mlp_dim``)
N     query heads
K     key/value heads
G     query heads per key/value head (N / K)
H     head dim
V     vocabulary
C     classes
P     prompt length
W     beams per prompt
M     new tokens (generated)
R     relative-position buckets
U     tokens of a batch, flattened (B x L)
X     experts (Mixture of Experts)
A     routed assignments (U x top-k)
Q     expert capacity (assignment slots per expert)
====  ==========================================================
"""
from typing import Any, Optional

import flax.linen as nn
import jax

from bigmodel.models import families, lora, moe, quantization
from bigmodel.models.bert import Bert
from bigmodel.models.chunked_loss import OutputHead
from bigmodel.models.config import ModelConfig
from bigmodel.models.families import FAMILIES, Family, family_of
from bigmodel.models.gpt import Gpt
from bigmodel.models.t5 import T5

# model.family -> Flax module class (kept for callers of the old name).
MODEL_FAMILIES = {name: f.module for name, f in FAMILIES.items()}


def targets_and_weights(model: nn.Module, batch: dict[str, jax.Array]) -> tuple[jax.Array,
                                                                                 jax.Array]:
  """Integer targets and loss weights of a batch: per token ([B, L]) for language
  modelling, MLM and seq2seq; per example ([B]) for classification."""
  return family_of(model).targets_and_weights(model.config, batch)


def batch_logits(model: nn.Module, params: Any, batch: dict[str, jax.Array], *,
                 rng: Optional[jax.Array], head: bool = True) -> jax.Array:
  """Runs ``model`` on a batch of its family's format (see ``bigmodel.data``).

  Returns float32 logits [..., V or C] matching ``targets_and_weights``, or
  with ``head=False`` the hidden states [B, L, D] that ``output_head``
  projects. Dropout is on when ``rng`` is given.
  """
  return family_of(model).batch_logits(model, params, batch, rng=rng, head=head)


def batch_outputs(model: nn.Module, params: Any, batch: dict[str, jax.Array], *,
                  rng: Optional[jax.Array], head: bool = True
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """``batch_logits`` and the model's auxiliary values averaged over layers
  (a mixture of experts' ``moe.AUX_NAMES``; {} for a dense model)."""
  if not getattr(model.config, "num_experts", 0):
    return batch_logits(model, params, batch, rng=rng, head=head), {}
  out, variables = family_of(model).batch_logits(model, params, batch, rng=rng, head=head,
                                                 mutable=["intermediates"])
  return out, moe.aux_losses(variables.get("intermediates", {}))


def output_head(model: nn.Module, params: Any) -> Optional[OutputHead]:
  """``model``'s vocabulary projection in ``params`` (None for a classifier)."""
  return family_of(model).output_head(model.config, params)


def build_model(model_cfg, lora_cfg=None, *, training: bool = False) -> nn.Module:
  """Returns the Flax module for ``model_cfg.family`` (``config.model``), with
  LoRA adapters when ``lora_cfg`` (``config.lora``) has a rank; ``training``
  turns their dropout on (``bigmodel.models.lora``). ``model.quantization``
  (quantized training) or ``model.weight_bits`` (a weight-quantized model)
  quantize its dense layers (``bigmodel.models.quantization``)."""
  model_config = ModelConfig.from_config(model_cfg)
  family = families.get(model_config.family)
  module = family.build(model_config)
  if lora.enabled(lora_cfg):
    # Qwix applies one provider per model (config validation refuses both).
    if quantization.qat_enabled(model_cfg) or quantization.weight_quantized(model_cfg):
      raise ValueError("LoRA adapters do not combine with model.quantization / weight_bits")
    return lora.with_lora(module, lora_cfg, family.methods, training)
  return quantization.with_quantization(module, model_cfg, family.methods)


__all__ = ["FAMILIES", "MODEL_FAMILIES", "Bert", "Family", "Gpt", "ModelConfig", "OutputHead",
           "T5", "batch_logits", "batch_outputs", "build_model", "family_of", "families", "lora",
           "moe", "output_head", "quantization", "targets_and_weights"]
