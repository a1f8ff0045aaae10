"""``ModelConfig``: the frozen, hashable view of ``config.model`` that modules hold."""
import dataclasses
from typing import Any

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture hyper-parameters; see ``bigmodel/config.py`` for meanings."""
  family: str
  vocab_size: int
  num_layers: int
  num_heads: int
  embed_dim: int
  mlp_dim: int
  max_len: int
  num_kv_heads: int = 0          # 0 = num_heads.
  head_dim: int = 0              # 0 = embed_dim // num_heads (T5 sets its own).
  position_embedding: str = "learned"
  rope_theta: float = 10000.0
  dropout_rate: float = 0.0
  tie_embeddings: bool = True
  layer_norm_epsilon: float = 1e-5
  mlp_activation: str = "gelu_tanh"  # A name in layers.ACTIVATIONS.
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = "auto"
  remat: str = "none"
  scan: bool = True
  # BERT and T5 only.
  num_decoder_layers: int = 0    # T5; 0 = num_layers.
  norm_position: str = "post"    # BERT: post-LN (original) or pre.
  type_vocab_size: int = 2       # BERT token types.
  num_classes: int = 0           # BERT: > 0 puts a classification head on the pooler.
  relative_buckets: int = 32     # T5 relative position bias.
  relative_max_distance: int = 128

  @classmethod
  def from_config(cls, model_cfg) -> "ModelConfig":
    """Builds from ``config.model`` (a ConfigDict); dtype names become dtypes."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in model_cfg.items() if k in fields}
    values["dtype"] = jnp.dtype(values.get("dtype", "float32"))
    values["param_dtype"] = jnp.dtype(values.get("param_dtype", "float32"))
    if not values.get("head_dim"):
      values["head_dim"] = values["embed_dim"] // values["num_heads"]
    return cls(**values)
