"""``ModelConfig``: the frozen, hashable view of ``config.model`` that modules hold."""
import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from bigmodel.models.rope import RopeSpec


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
  context_attention: str = "ring"
  remat: str = "none"
  scan: bool = True
  # BERT and T5 only.
  num_decoder_layers: int = 0    # T5; 0 = num_layers.
  norm_position: str = "post"    # BERT: post-LN (original) or pre.
  type_vocab_size: int = 2       # BERT token types.
  num_classes: int = 0           # BERT: > 0 puts a classification head on the pooler.
  relative_buckets: int = 32     # T5 relative position bias.
  relative_max_distance: int = 128
  t5_mlp_gated: bool = True      # T5: v1.1's gated MLP; False = original T5's.
  # Decoder (gpt family) options: GPT-2 by default; the Llama, Qwen, Mistral
  # and Gemma presets set them (meanings in ``bigmodel/config.py``).
  norm: str = "layernorm"
  norm_scale_offset: float = 0.0
  mlp_gated: bool = False
  attention_qkv_bias: bool = True
  attention_out_bias: bool = True
  mlp_bias: bool = True
  embed_scale: bool = False
  qk_norm: bool = False
  post_norms: bool = False
  query_pre_attn_scalar: float = 0.0
  sliding_window: int = 0
  sliding_window_pattern: int = 0
  attn_softcap: float = 0.0
  final_softcap: float = 0.0
  rope_scaling: str = "none"
  rope_scaling_factor: float = 1.0
  rope_original_max_len: int = 0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_yarn_beta_fast: float = 32.0
  rope_yarn_beta_slow: float = 1.0
  rope_attention_factor: float = 0.0
  rope_local_theta: float = 0.0
  num_experts: int = 0
  experts_per_token: int = 2
  moe_mlp_dim: int = 0
  moe_router: str = "softmax"
  moe_normalize_top_k: bool = True
  moe_dispatch: str = "dropless"
  moe_capacity_factor: float = 1.25
  moe_shared_experts: int = 0
  moe_load_balance_weight: float = 0.01
  moe_router_z_weight: float = 0.001

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

  def rope(self, local: bool = False) -> RopeSpec:
    """The rotary embedding of global layers, or of local (windowed) ones.

    Local layers use ``rope_local_theta`` (when set) without scaling: Gemma 3
    scales only its global layers' long-range positions.
    """
    if local and self.rope_local_theta:
      return RopeSpec(theta=self.rope_local_theta)
    return RopeSpec(theta=self.rope_theta, scaling=self.rope_scaling,
                    factor=self.rope_scaling_factor,
                    original_max_len=self.rope_original_max_len or self.max_len,
                    low_freq_factor=self.rope_low_freq_factor,
                    high_freq_factor=self.rope_high_freq_factor,
                    beta_fast=self.rope_yarn_beta_fast, beta_slow=self.rope_yarn_beta_slow,
                    attention_factor=self.rope_attention_factor)

  def local_layers(self) -> np.ndarray:
    """bool [num_layers]: which layers attend within ``sliding_window`` only.

    Pattern 0 windows every layer (Mistral); p > 0 makes every p-th layer
    global (layer i is global iff (i + 1) % p == 0: Gemma 2's p = 2, Gemma
    3's p = 6), as Hugging Face's ``layer_types`` lists them.
    """
    if not self.sliding_window:
      return np.zeros(self.num_layers, bool)
    if not self.sliding_window_pattern:
      return np.ones(self.num_layers, bool)
    return (np.arange(self.num_layers) + 1) % self.sliding_window_pattern != 0
