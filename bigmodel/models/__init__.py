"""Model families. ``build_model(config.model)`` returns a Flax module."""
import flax.linen as nn

from bigmodel.models.config import ModelConfig
from bigmodel.models.gpt import Gpt

MODEL_FAMILIES = {"gpt": Gpt}


def build_model(model_cfg) -> nn.Module:
  """Returns the Flax module for ``model_cfg.family``."""
  model_config = ModelConfig.from_config(model_cfg)
  return MODEL_FAMILIES[model_config.family](model_config)


__all__ = ["MODEL_FAMILIES", "ModelConfig", "build_model"]
