"""Model families. ``build_model(config.model)`` returns a Flax module."""
from typing import Any, Optional

import flax.linen as nn
import jax

from bigmodel.models.bert import Bert
from bigmodel.models.config import ModelConfig
from bigmodel.models.gpt import Gpt
from bigmodel.models.t5 import T5

MODEL_FAMILIES = {"gpt": Gpt, "bert": Bert, "t5": T5}


def targets_and_weights(model: nn.Module, batch: dict[str, jax.Array]) -> tuple[jax.Array,
                                                                                 jax.Array]:
  """Integer targets and loss weights of a batch: per token ([B, L]) for language
  modelling, MLM and seq2seq; per example ([B]) for classification."""
  if isinstance(model, T5):
    return batch["decoder_targets"], batch["loss_mask"]
  if isinstance(model, Bert) and model.config.num_classes:
    return batch["label"], batch["example_mask"]
  return batch["targets"], batch["loss_mask"]


def batch_logits(model: nn.Module, params: Any, batch: dict[str, jax.Array], *,
                 rng: Optional[jax.Array]) -> jax.Array:
  """Runs ``model`` on a batch of its family's format (see ``bigmodel.data``).

  Returns float32 logits [..., V or C] matching ``targets_and_weights``.
  Dropout is on when ``rng`` is given.
  """
  kwargs = dict(deterministic=rng is None, rngs={"dropout": rng} if rng is not None else None)
  variables = {"params": params}
  if isinstance(model, T5):
    return model.apply(variables, batch["encoder_inputs"], batch["decoder_inputs"],
                       encoder_segment_ids_BxS=batch["encoder_segment_ids"],
                       decoder_segment_ids_BxT=batch["decoder_segment_ids"], **kwargs)
  if isinstance(model, Bert):
    return model.apply(variables, batch["inputs"], segment_ids_BxL=batch["segment_ids"],
                       positions_BxL=batch["positions"], type_ids_BxL=batch["type_ids"],
                       **kwargs)
  return model.apply(variables, batch["inputs"], segment_ids_BxL=batch["segment_ids"],
                     positions_BxL=batch["positions"], **kwargs)


def build_model(model_cfg) -> nn.Module:
  """Returns the Flax module for ``model_cfg.family``."""
  model_config = ModelConfig.from_config(model_cfg)
  return MODEL_FAMILIES[model_config.family](model_config)


__all__ = ["MODEL_FAMILIES", "Bert", "Gpt", "ModelConfig", "T5", "batch_logits", "build_model",
           "targets_and_weights"]
