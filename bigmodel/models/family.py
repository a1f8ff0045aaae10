"""``Family``: what a model family provides besides its Flax module.

Subclasses live next to their module or in ``bigmodel.models.families``, whose
``FAMILIES`` is the registry. Shape letters as in ``bigmodel.models``.
"""
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigmodel.errors import UserError
from bigmodel.models.config import ModelConfig
from bigmodel.models.decoding import DecodeState
from bigmodel.models import moe
from bigmodel.models.chunked_loss import OutputHead

Batch = Mapping[str, jax.Array]


def score_flops(c: ModelConfig, q_len: int, kv_len: int, causal: bool, window: int = 0) -> float:
  """Scores and weighted sum of one attention layer: 2 matmuls of T x S x N x H.

  Causal attention counts half the pairs (the convention of PaLM and
  MaxText); a sliding window of W positions counts the W x S band instead
  (what a kernel that skips masked blocks does) once it is narrower.
  """
  pairs = q_len * kv_len / 2 if causal else q_len * kv_len
  if window and window < kv_len:
    pairs = min(pairs, q_len * window - window * (window - 1) / 2)
  return 2 * 2 * pairs * c.num_heads * c.head_dim


def projection_weights(c: ModelConfig) -> tuple[int, int]:
  """(q + out, k + v) projection weights of one attention layer."""
  kv_heads = c.num_kv_heads or c.num_heads
  return 2 * c.embed_dim * c.num_heads * c.head_dim, 2 * c.embed_dim * kv_heads * c.head_dim


def mlp_matrices(c: ModelConfig, gated: Optional[bool] = None) -> int:
  """D x F matrices of one MLP: wi and wo, plus wi_linear when ``gated``
  (None: the decoders' ``model.mlp_gated``; T5 passes its own option)."""
  return 3 if (c.mlp_gated if gated is None else gated) else 2


def mlp_weights(c: ModelConfig, active: bool = True, gated: Optional[bool] = None) -> int:
  """Weights of one layer's MLP: D x F matrices, or a mixture of experts'
  (with ``active``, those one token runs: ``moe.layer_weights``)."""
  if c.num_experts:
    return moe.layer_weights(c, mlp_matrices(c, gated), active)
  return mlp_matrices(c, gated) * c.embed_dim * c.mlp_dim


def apply_kwargs(rng: Optional[jax.Array], mutable: Any = False) -> dict[str, Any]:
  """Dropout is on when ``rng`` is given; ``mutable`` collections (e.g.
  ``["intermediates"]``) make ``apply`` return (output, their values)."""
  return dict(deterministic=rng is None, rngs={"dropout": rng} if rng is not None else None,
              mutable=mutable)


class Family:
  """One model family. Subclasses set the attributes and override the methods.

  Attributes:
    name: ``model.family``.
    module: The Flax module class; built as ``module(ModelConfig)``.
    positions: The ``model.position_embedding`` values it supports.
    options: The ``model.*`` keys only this family reads, with their defaults
      (its sub-config). They stay flat keys so old config.json files load;
      another family rejects them when set (``validate``).
    token_keys: Batch keys of the token ids the model reads (their lengths
      set the FLOPs).
    hf_name_map: Module of ``bigmodel.hf`` holding its Hugging Face name map.
    encoder_decoder: Reads an encoder input and decodes from a start token.
    generates: Has a cached decoder (``prefill`` / ``step``).
    analytic_memory: ``bigmodel.memory`` / ``bigmodel.plan`` model its layers.
    context_parallel: Its attention runs with the sequence split over devices
      (``mesh.context`` > 1): masks and biases the blocks can build from
      token indices (T5's relative bias is one).
    methods: The module's methods that batches and decoding call (LoRA
      intercepts the dense layers inside them).
  """
  name: str = ""
  module: type = nn.Module
  positions: tuple[str, ...] = ("learned",)
  options: Mapping[str, Any] = {}
  token_keys: tuple[str, ...] = ("inputs",)
  hf_name_map: Optional[str] = None
  encoder_decoder: bool = False
  generates: bool = False
  analytic_memory: bool = False
  context_parallel: bool = False
  methods: tuple[str, ...] = ("__call__",)

  @property
  def is_causal_lm(self) -> bool:
    """A decoder-only language model: it continues a text prompt."""
    return self.generates and not self.encoder_decoder

  def build(self, c: ModelConfig) -> nn.Module:
    return self.module(c)

  def example_inputs(self, c: ModelConfig, seq_len: int) -> tuple[jax.Array, ...]:
    """Positional inputs for ``init``; parameter shapes do not depend on lengths."""
    del c
    return (jnp.zeros((1, seq_len), jnp.int32),)

  def options_of(self, model_cfg) -> dict[str, Any]:
    """This family's sub-config: its own options' values in ``model_cfg``."""
    return {k: model_cfg.get(k, default) for k, default in self.options.items()}

  def validate(self, model_cfg) -> None:
    """Raises ``UserError`` (one line) for a ``model.*`` setting this family cannot use."""
    if model_cfg.get("position_embedding", "learned") not in self.positions:
      raise UserError(f"model.position_embedding={model_cfg.position_embedding!r} is not "
                      f"available for {self.name}; use {' or '.join(self.positions)}")
    from bigmodel.models.families import foreign_options  # pylint: disable=g-import-not-at-top
    for key, (owner, default) in foreign_options(self).items():
      value = model_cfg.get(key, default)
      # Shape flags shared by scripts that train several families (e.g. one
      # --config.model.num_decoder_layers=N for all) describe a single stack too.
      if key == "num_decoder_layers" and value in (0, model_cfg.get("num_layers")):
        continue
      if value != default:
        raise UserError(f"model.{key}={value!r} does not apply to a {self.name} model (it is "
                        f"a {owner} option); leave it at {default!r} or set "
                        f"model.family={owner}")

  def batch_spec(self, c: ModelConfig, batch_size: int, seq_len: int,
                 target_len: int = 0) -> dict[str, jax.ShapeDtypeStruct]:
    """The training batch this family reads (the format of ``bigmodel.data``)."""
    raise NotImplementedError

  def batch_logits(self, model: nn.Module, params: Any, batch: Batch, *,
                   rng: Optional[jax.Array], head: bool = True, mutable: Any = False) -> Any:
    """float32 logits [..., V or C] matching ``targets_and_weights``;
    ``head=False``: the hidden states [B, L, D] that ``output_head`` reads;
    with ``mutable`` collections, (that, their values) (``apply_kwargs``)."""
    raise NotImplementedError

  def output_head(self, c: ModelConfig, params: Any) -> Optional[OutputHead]:
    """The vocabulary projection of ``params`` as an ``OutputHead`` (the
    chunked loss applies it), or None where the logits are not per token
    over the vocabulary (a classifier)."""
    del c, params
    return None

  def targets_and_weights(self, c: ModelConfig, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Integer targets and loss weights: per token [B, L] or per example [B]."""
    return batch["targets"], batch["loss_mask"]

  def forward_flops(self, c: ModelConfig, lengths: Mapping[str, int]) -> float:
    """Model FLOPs of one example's forward pass; ``lengths`` by ``token_keys``."""
    raise NotImplementedError

  def prefill(self, model: nn.Module, params: Any, tokens_BxP: jax.Array, lengths_B: jax.Array,
              num_new: int, start_id: int) -> tuple[jax.Array, DecodeState]:
    """Runs the prompt: (next-token logits [B, V], state with room for ``num_new``)."""
    raise UserError(f"a {self.name} model does not generate text")

  def step(self, model: nn.Module, params: Any, tokens_B: jax.Array,
           state: DecodeState) -> tuple[jax.Array, DecodeState]:
    """Feeds one token per row: (next-token logits [B, V], new state)."""
    raise UserError(f"a {self.name} model does not generate text")


def token_spec(batch_size: int, length: int, *keys: str) -> dict[str, jax.ShapeDtypeStruct]:
  """int32 [batch_size, length] entries of a batch spec."""
  return {k: jax.ShapeDtypeStruct((batch_size, length), jnp.int32) for k in keys}


def weights_spec(*shape: int) -> jax.ShapeDtypeStruct:
  """A float32 loss-weight entry of a batch spec."""
  return jax.ShapeDtypeStruct(shape, jnp.float32)
