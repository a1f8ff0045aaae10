"""Llama, Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3 (text), Mixtral and
Qwen3-MoE <-> bigmodel ``gpt``.

The six are one decoder (RMSNorm, rotary positions, a gated MLP, grouped-query
attention) with one set of tensor names (``model.layers.{i}.self_attn.q_proj``
...), so one name map serves them all: ``rules`` depends on the bigmodel
options only. What differs is data, one ``Architecture`` row each in
``ARCHITECTURES``: which projections have biases, q/k norms, Gemma's block
(norms scaled by ``1 + w``, a norm after each sublayer too, embeddings times
sqrt(D), soft-capped logits, ``query_pre_attn_scalar``), how the config says
which layers slide a window, how a mixture-of-experts architecture names its
experts (``Experts``: Mixtral's ``block_sparse_moe.experts.{e}.w1``, Qwen3-MoE's
``mlp.experts.{e}.gate_proj``, one tensor per expert), and the config class'
defaults for keys a ``config.json`` leaves out.

Rotary settings are read in both forms: transformers 5's ``rope_parameters``
(Gemma 3: one dict per layer type) and the older ``rope_theta`` +
``rope_scaling`` (+ Gemma 3's ``rope_local_base_freq``); export writes
transformers 5's. A setting bigmodel cannot reproduce exactly (another rope
type, a partial rotary dimension, DeepSeek's yarn ``mscale``, experts in a
dense architecture or dense layers among experts, windows on an irregular
set of layers) is refused by name.

Export picks the first architecture in ``ARCHITECTURES`` order that expresses
the model (``for_model``), so a plain model becomes Llama, windows on every
layer Mistral, q/k/v biases without an output bias Qwen2, q/k norms Qwen3,
Gemma's block Gemma 2, or Gemma 3 with q/k norms or a local rotary base;
experts Mixtral, or Qwen3-MoE with q/k norms.
"""
import dataclasses
from typing import Any, ClassVar, Optional

from bigmodel.errors import UserError
from bigmodel.hf.mapping import (Rule, TO_HF_ACTIVATION, hf_bool, hf_heads_and_width, hf_number,
                                 hf_size, hf_value, mlp_activation)
from bigmodel.models.config import ModelConfig
from bigmodel.models.rope import RopeSpec

FULL, SLIDING = "full_attention", "sliding_attention"  # HF's layer_types.
# HF rope_type -> model.rope_scaling. Others (dynamic, longrope, ...) are refused.
ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3", "yarn": "yarn"}
# config.json keys of mixture-of-experts variants (Mixtral, Qwen-MoE, DeepSeek).
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


@dataclasses.dataclass(frozen=True)
class Experts:
  """How a mixture-of-experts architecture says and stores its experts.

  Attributes:
    count_keys: ``config.json``'s number of experts (the first present is
      read; export writes the first).
    block: The MoE block's module in each layer (router ``{block}.gate``,
      experts ``{block}.experts.{e}.*``).
    projections: The experts' (activated, linear, output) projection names.
    width_key: The experts' width key ("": ``intermediate_size``).
    normalize_key: Whether the chosen k gates are renormalised ("": always).
    fixed: Keys that must hold these values (null allowed): every layer an
      MoE layer.
  """
  count_keys: tuple[str, ...]
  block: str
  projections: tuple[str, str, str]
  width_key: str = ""
  normalize_key: str = ""
  fixed: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Architecture:
  """One Hugging Face architecture of the Llama kind, as data.

  Instances are what ``bigmodel.hf.FAMILIES`` holds for these names, with
  the interface of the ``gpt2`` / ``bert`` / ``t5`` modules (``bigmodel.hf``).

  Attributes:
    name: The ``--family`` name.
    model_type: ``config.json``'s ``model_type``.
    hf_class: The causal LM class in ``config.json``'s ``architectures``.
    bias: Attention biases: ``config`` (on q, k, v and the output iff
      ``attention_bias``), ``qkv`` (q, k and v always, never the output:
      Qwen2) or ``none`` (Mistral).
    mlp_bias: The MLP has biases iff ``mlp_bias`` (Llama); else never.
    qk_norm: RMSNorm of each query and key head (Qwen3, Gemma 3).
    gemma: Gemma's block (module doc); its activation key is ``hidden_activation``.
    attn_softcap: Attention logits are soft-capped by ``attn_logit_softcapping``
      (Gemma 2). transformers' Gemma 3 has the key but ignores it, and so does
      the import.
    windows: Which layers slide a window: ``none`` (Llama: no window),
      ``all`` (Mistral: every layer when ``sliding_window`` is set), ``qwen``
      (with ``use_sliding_window``: ``layer_types``, by default the layers from
      ``max_window_layers`` on) or ``pattern`` (Gemma: ``layer_types``, by
      default all but every ``sliding_window_pattern``-th layer).
    rope_by_layer_type: ``rope_parameters`` holds one dict per layer type,
      local layers' without scaling (Gemma 3).
    experts: A mixture-of-experts architecture's ``Experts`` (None: dense MLPs).
    defaults: The config class' values for keys a ``config.json`` may leave out.
  """
  name: str
  model_type: str
  hf_class: str
  bias: str = "config"
  mlp_bias: bool = False
  qk_norm: bool = False
  gemma: bool = False
  attn_softcap: bool = False
  windows: str = "none"
  rope_by_layer_type: bool = False
  experts: Optional[Experts] = None
  defaults: dict[str, Any] = dataclasses.field(default_factory=dict)

  FAMILY: ClassVar[str] = "gpt"
  # Rotary frequency buffers that old checkpoints stored.
  IGNORED: ClassVar[tuple[str, ...]] = (r"(model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)
  # A tied model may still store the head: it must equal the embedding.
  TIED: ClassVar[tuple[tuple[str, str], ...]] = (("lm_head.weight", "model.embed_tokens.weight"),)

  @property
  def MODEL_TYPE(self) -> str:  # pylint: disable=invalid-name
    return self.model_type

  @property
  def ARCHITECTURE(self) -> str:  # pylint: disable=invalid-name
    return self.hf_class

  @property
  def activation_key(self) -> str:
    return "hidden_activation" if self.gemma else "hidden_act"

  # Import.

  def model_config(self, hf: dict[str, Any]) -> dict[str, Any]:
    """``config.model`` fields for a ``config.json`` of this architecture."""
    self._refuse_unsupported(hf)
    hf = {**_COMMON_DEFAULTS, **self.defaults, **hf}  # HF semantics: absent = class default.
    if hf.get("head_dim") is None:  # Then the heads split the width.
      hf_heads_and_width(hf, "num_attention_heads", "hidden_size")
    num_heads, embed_dim = hf_size(hf, "num_attention_heads"), hf_size(hf, "hidden_size")
    num_layers = hf_size(hf, "num_hidden_layers")
    num_kv_heads = hf_size(hf, "num_key_value_heads", num_heads)
    if num_heads % num_kv_heads:
      raise UserError(f"config.json num_key_value_heads={num_kv_heads} does not divide "
                      f"num_attention_heads={num_heads}")
    max_len = hf_size(hf, "max_position_embeddings")
    attention_bias = hf_bool(hf, "attention_bias", False)
    qkv_bias, out_bias = {"config": (attention_bias, attention_bias), "qkv": (True, False),
                          "none": (False, False)}[self.bias]
    window, local = self._sliding_layers(hf, num_layers)
    fields = dict(
        family=self.FAMILY, vocab_size=hf_size(hf, "vocab_size"), num_layers=num_layers,
        num_heads=num_heads, num_kv_heads=num_kv_heads,
        head_dim=hf_size(hf, "head_dim", embed_dim // num_heads), embed_dim=embed_dim,
        mlp_dim=hf_size(hf, "intermediate_size"), max_len=max_len, position_embedding="rope",
        norm="rmsnorm", layer_norm_epsilon=hf_number(hf, "rms_norm_eps"), mlp_gated=True,
        mlp_activation=mlp_activation(hf.get(self.activation_key), self.activation_key),
        attention_qkv_bias=qkv_bias, attention_out_bias=out_bias,
        mlp_bias=self.mlp_bias and hf_bool(hf, "mlp_bias", False), qk_norm=self.qk_norm,
        tie_embeddings=hf_bool(hf, "tie_word_embeddings", False),
        sliding_window=window if any(local) else 0,
        sliding_window_pattern=_window_pattern(local, self._layer_types_source(hf)),
        dropout_rate=0.0, **self._rope_fields(hf, max_len, any(local)))
    if self.gemma:
      fields.update(
          norm_scale_offset=1.0, embed_scale=True, post_norms=True,
          query_pre_attn_scalar=hf_number(hf, "query_pre_attn_scalar"),
          attn_softcap=(_optional_number(hf, "attn_logit_softcapping") if self.attn_softcap
                        else 0.0),
          final_softcap=_optional_number(hf, "final_logit_softcapping"))
    if self.experts:
      fields.update(self._expert_fields(hf))
    return fields

  def _expert_fields(self, hf: dict[str, Any]) -> dict[str, Any]:
    """``model.num_experts`` and the MoE options of a mixture-of-experts config."""
    e = self.experts
    for key, value in e.fixed.items():
      if hf.get(key) not in (None, value):
        raise UserError(f"config.json {key}={hf[key]!r} is not supported (every layer a "
                        f"mixture of experts: {value!r})")
    count_key = next((k for k in e.count_keys if hf.get(k) is not None), e.count_keys[0])
    return dict(
        num_experts=hf_size(hf, count_key), experts_per_token=hf_size(hf, "num_experts_per_tok"),
        moe_mlp_dim=hf_size(hf, e.width_key) if e.width_key else 0,
        moe_normalize_top_k=hf_bool(hf, e.normalize_key, False) if e.normalize_key else True,
        moe_load_balance_weight=float(hf.get("router_aux_loss_coef") or 0.0))

  def _refuse_unsupported(self, hf: dict[str, Any]) -> None:
    """UserError for a config.json that is not this causal LM, or has options bigmodel lacks."""
    classes = hf.get("architectures")
    if classes and self.hf_class not in classes:
      raise UserError(f"config.json architectures={classes}: only {self.hf_class} converts "
                      f"(model_type {self.model_type!r})")
    for key in MOE_KEYS:
      if hf.get(key) and (self.experts is None or key not in self.experts.count_keys):
        raise UserError(f"config.json {key}={hf[key]!r}: mixture-of-experts models are not "
                        f"supported as {self.model_type} (dense MLPs only; Mixtral and "
                        "Qwen3-MoE convert as such)")
    if self.experts and self.windows == "none" and hf.get("use_sliding_window"):
      raise UserError("config.json use_sliding_window=true is not supported for "
                      f"{self.model_type} (no sliding window)")
    if hf.get("partial_rotary_factor") not in (None, 1, 1.0):
      raise UserError(f"config.json partial_rotary_factor={hf['partial_rotary_factor']!r} is "
                      "not supported (rotary positions on whole heads only: 1.0)")
    if self.gemma and hf.get("use_bidirectional_attention"):
      raise UserError("config.json use_bidirectional_attention=true is not supported (causal "
                      "attention only)")

  def _sliding_layers(self, hf: dict[str, Any], num_layers: int) -> tuple[int, list[bool]]:
    """(window, which layers slide it) as transformers reads this config (HF defaults applied)."""
    window = hf.get("sliding_window")
    if self.windows == "none" or window is None or (
        self.windows == "qwen" and not hf_bool(hf, "use_sliding_window", False)):
      return 0, [False] * num_layers
    window = hf_size(hf, "sliding_window")
    if self.windows == "all":
      return window, [True] * num_layers
    types = hf.get("layer_types")
    if types is None:  # The config class' own derivation.
      if self.windows == "qwen":
        first = hf_value(hf, "max_window_layers")
        if isinstance(first, bool) or not isinstance(first, int) or first < 0:
          raise UserError(f"config.json max_window_layers={first!r} is not an integer >= 0")
        return window, [i >= first for i in range(num_layers)]
      pattern = hf_size(hf, "sliding_window_pattern")
      return window, [(i + 1) % pattern != 0 for i in range(num_layers)]
    if (not isinstance(types, list) or len(types) != num_layers
        or any(t not in (FULL, SLIDING) for t in types)):
      raise UserError(f"config.json layer_types={types!r} is not a list of {num_layers} "
                      f"{FULL!r} / {SLIDING!r}")
    return window, [t == SLIDING for t in types]

  def _layer_types_source(self, hf: dict[str, Any]) -> str:
    """What says which layers slide, for messages."""
    if hf.get("layer_types") is not None or self.windows != "qwen":
      return "layer_types"
    return f"max_window_layers={hf.get('max_window_layers')!r}"

  def _rope_fields(self, hf: dict[str, Any], max_len: int, has_local: bool) -> dict[str, Any]:
    """``model.rope_*`` fields from either form of the rotary settings (module doc)."""
    legacy, params = hf.get("rope_scaling") or {}, hf.get("rope_parameters") or {}
    for key, value in (("rope_scaling", legacy), ("rope_parameters", params)):
      if not isinstance(value, dict):
        raise UserError(f"config.json {key}={value!r} is not a JSON object")
    if not self.rope_by_layer_type:  # transformers prefers the legacy key when both are set.
      where = "config.json " + ("rope_scaling" if legacy else "rope_parameters")
      return _fields_of_rope(dict(legacy or params), hf["rope_theta"], max_len, where)
    # Gemma 3: rope_scaling (legacy) applies to the global layers; the local
    # ones' base was rope_local_base_freq.
    full = {**(params.get(FULL) or {}), **legacy}
    local = dict(params.get(SLIDING) or {})
    fields = _fields_of_rope(full, hf["rope_theta"], max_len, f"config.json rope_parameters.{FULL}")
    local_fields = _fields_of_rope(local, hf["rope_local_base_freq"], max_len,
                                f"config.json rope_parameters.{SLIDING}")
    if has_local and local_fields != fields:
      # bigmodel's local layers rotate by rope_local_theta, unscaled.
      if local_fields["rope_scaling"] != "none":
        raise UserError(f"config.json rope_parameters.{SLIDING} rope_type="
                        f"{local.get('rope_type', local.get('type'))!r} is not supported (local "
                        f"layers: default, or the same as {FULL})")
      fields["rope_local_theta"] = local_fields["rope_theta"]
    return fields

  # Export.

  def unexpressed(self, m: ModelConfig) -> list[str]:
    """The settings of ``m`` this architecture cannot express (none: it exports)."""
    local = m.local_layers()
    biases = {"config": [(False, False), (True, True)], "qkv": [(True, False)],
              "none": [(False, False)]}[self.bias]
    windows = {"none": not local.any(), "all": local.all() or not local.any()}
    checks = [
        (m.position_embedding == "rope", f"model.position_embedding={m.position_embedding!r}"),
        (m.norm == "rmsnorm", f"model.norm={m.norm!r}"),
        (m.mlp_gated, "model.mlp_gated=False"),
        (m.mlp_activation in TO_HF_ACTIVATION, f"model.mlp_activation={m.mlp_activation!r}"),
        (m.norm_scale_offset == float(self.gemma),
         f"model.norm_scale_offset={m.norm_scale_offset}"),
        (m.embed_scale == self.gemma, f"model.embed_scale={m.embed_scale}"),
        (m.post_norms == self.gemma, f"model.post_norms={m.post_norms}"),
        (m.qk_norm == self.qk_norm, f"model.qk_norm={m.qk_norm}"),
        ((m.attention_qkv_bias, m.attention_out_bias) in biases,
         f"model.attention_qkv_bias={m.attention_qkv_bias} with "
         f"model.attention_out_bias={m.attention_out_bias}"),
        (self.mlp_bias or not m.mlp_bias, f"model.mlp_bias={m.mlp_bias}"),
        (self.attn_softcap or not m.attn_softcap, f"model.attn_softcap={m.attn_softcap}"),
        (self.gemma or not m.final_softcap, f"model.final_softcap={m.final_softcap}"),
        # transformers' Gemma configs take an integer.
        (m.query_pre_attn_scalar in (0, m.head_dim) or (
            self.gemma and float(m.query_pre_attn_scalar).is_integer()),
         f"model.query_pre_attn_scalar={m.query_pre_attn_scalar}"),
        (windows.get(self.windows, True),
         f"model.sliding_window={m.sliding_window} with "
         f"sliding_window_pattern={m.sliding_window_pattern}"),
        (self.rope_by_layer_type or not local.any() or m.rope(local=True) == m.rope(),
         f"model.rope_local_theta={m.rope_local_theta}"),
        (bool(m.num_experts) == bool(self.experts), f"model.num_experts={m.num_experts}"),
    ]
    if self.experts and m.num_experts:
      checks += [
          (m.moe_router == "softmax", f"model.moe_router={m.moe_router!r}"),
          (not m.moe_shared_experts, f"model.moe_shared_experts={m.moe_shared_experts}"),
          (self.experts.normalize_key or m.moe_normalize_top_k,
           f"model.moe_normalize_top_k={m.moe_normalize_top_k}"),
      ]
    return [setting for ok, setting in checks if not ok]

  def hf_config(self, m: ModelConfig) -> dict[str, Any]:
    """A ``config.json`` for a bigmodel GPT; UserError if this architecture cannot express it."""
    problems = self.unexpressed(m)
    if problems:
      raise UserError(f"{self.hf_class} cannot express {problems[0]}")
    local = m.local_layers()
    hf = {
        "architectures": [self.hf_class], "model_type": self.model_type,
        "vocab_size": m.vocab_size, "hidden_size": m.embed_dim, "intermediate_size": m.mlp_dim,
        "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads or m.num_heads, "head_dim": m.head_dim,
        self.activation_key: _hf_activation(m.mlp_activation, self.gemma),
        "max_position_embeddings": m.max_len, "rms_norm_eps": m.layer_norm_epsilon,
        "tie_word_embeddings": m.tie_embeddings, "attention_dropout": 0.0,
        "rope_parameters": ({FULL: _hf_rope(m.rope()), SLIDING: _hf_rope(m.rope(local=True))}
                            if self.rope_by_layer_type else _hf_rope(m.rope())),
    }
    if self.bias == "config":
      hf["attention_bias"] = m.attention_qkv_bias
    if self.mlp_bias:
      hf["mlp_bias"] = m.mlp_bias
    layer_types = [SLIDING if is_local else FULL for is_local in local]
    if self.windows == "all":
      hf["sliding_window"] = m.sliding_window if local.any() else None
    elif self.windows == "qwen":
      hf.update(use_sliding_window=bool(local.any()),
                sliding_window=m.sliding_window if local.any() else None,
                # layer_types decides; max_window_layers says the same where it can.
                max_window_layers=int(local.argmax()) if local.any() else m.num_layers,
                layer_types=layer_types)
    elif self.windows == "pattern":
      # Gemma builds a sliding mask whatever the layers: it needs a window, used or not.
      hf.update(sliding_window=m.sliding_window if local.any() else m.max_len,
                layer_types=layer_types)
    if self.gemma:
      hf.update(query_pre_attn_scalar=int(m.query_pre_attn_scalar or m.head_dim),
                attn_logit_softcapping=m.attn_softcap or None,
                final_logit_softcapping=m.final_softcap or None)
    if self.experts:
      e = self.experts
      hf.update(e.fixed, num_experts_per_tok=m.experts_per_token,
                router_aux_loss_coef=m.moe_load_balance_weight)
      hf[e.count_keys[0]] = m.num_experts
      hf[e.width_key or "intermediate_size"] = m.moe_mlp_dim or m.mlp_dim
      if e.normalize_key:
        hf[e.normalize_key] = m.moe_normalize_top_k
    return hf

  def rules(self, m: ModelConfig, hf: Optional[dict[str, Any]] = None) -> list[Rule]:
    return rules(m, hf, self.experts)


# What every architecture's config class defaults to, unless its row says otherwise.
_COMMON_DEFAULTS = {"hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                    "attention_bias": False, "mlp_bias": False, "rope_theta": 10000.0}
_QWEN_DEFAULTS = {"max_position_embeddings": 32768, "num_key_value_heads": 32,
                  "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28}
_GEMMA_DEFAULTS = {"hidden_activation": "gelu_pytorch_tanh", "head_dim": 256,
                   "num_key_value_heads": 4, "tie_word_embeddings": True,
                   "query_pre_attn_scalar": 256, "sliding_window": 4096}

# The table, in export preference order (``for_model``).
ARCHITECTURES = {a.name: a for a in (
    Architecture("llama", "llama", "LlamaForCausalLM", mlp_bias=True,
                 defaults={"max_position_embeddings": 2048}),
    Architecture("mistral", "mistral", "MistralForCausalLM", bias="none", windows="all",
                 defaults={"max_position_embeddings": 131072, "num_key_value_heads": 8,
                           "sliding_window": 4096}),
    Architecture("qwen2", "qwen2", "Qwen2ForCausalLM", bias="qkv", windows="qwen",
                 defaults=_QWEN_DEFAULTS),
    Architecture("qwen3", "qwen3", "Qwen3ForCausalLM", qk_norm=True, windows="qwen",
                 defaults={**_QWEN_DEFAULTS, "head_dim": 128}),
    Architecture("gemma2", "gemma2", "Gemma2ForCausalLM", gemma=True, attn_softcap=True,
                 windows="pattern",
                 defaults={**_GEMMA_DEFAULTS, "max_position_embeddings": 8192,
                           "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                           "sliding_window_pattern": 2}),
    Architecture("gemma3", "gemma3_text", "Gemma3ForCausalLM", qk_norm=True, gemma=True,
                 windows="pattern", rope_by_layer_type=True,
                 defaults={**_GEMMA_DEFAULTS, "max_position_embeddings": 131072,
                           "rope_theta": 1e6, "rope_local_base_freq": 1e4,
                           "sliding_window_pattern": 6}),
    Architecture("mixtral", "mixtral", "MixtralForCausalLM", bias="none", windows="all",
                 experts=Experts(("num_local_experts",), "block_sparse_moe", ("w1", "w3", "w2")),
                 defaults={"max_position_embeddings": 131072, "num_key_value_heads": 8,
                           "rms_norm_eps": 1e-5, "rope_theta": 1e6, "num_local_experts": 8,
                           "num_experts_per_tok": 2, "router_aux_loss_coef": 0.001}),
    Architecture("qwen3_moe", "qwen3_moe", "Qwen3MoeForCausalLM", qk_norm=True,
                 # transformers 5 saves num_experts as num_local_experts.
                 experts=Experts(("num_experts", "num_local_experts"), "mlp",
                                 ("gate_proj", "up_proj", "down_proj"),
                                 width_key="moe_intermediate_size",
                                 normalize_key="norm_topk_prob",
                                 fixed={"decoder_sparse_step": 1, "mlp_only_layers": []}),
                 defaults={"max_position_embeddings": 32768, "num_key_value_heads": 4,
                           "num_local_experts": 128, "num_experts_per_tok": 8,
                           "moe_intermediate_size": 768, "norm_topk_prob": False,
                           "router_aux_loss_coef": 0.001}),
)}


def for_model(m: ModelConfig) -> Architecture:
  """The first architecture (table order) that expresses ``m``; UserError if none does."""
  problems = {name: a.unexpressed(m) for name, a in ARCHITECTURES.items()}
  for name, unexpressed in problems.items():
    if not unexpressed:
      return ARCHITECTURES[name]
  # The closest: of the same kind (experts or not), then with the fewest problems.
  closest = min(problems, key=lambda name: (
      bool(ARCHITECTURES[name].experts) != bool(m.num_experts), len(problems[name])))
  raise UserError(f"no Hugging Face architecture expresses this model (supported: "
                  f"{', '.join(a.hf_class for a in ARCHITECTURES.values())}); the closest, "
                  f"{ARCHITECTURES[closest].hf_class}, cannot express {problems[closest][0]}")


def _window_pattern(local: list[bool], source: str) -> int:
  """``model.sliding_window_pattern`` for these sliding layers; UserError if none gives them.

  0 slides every layer; p > 0 all but every p-th (``ModelConfig.local_layers``).
  """
  if all(local) or not any(local):
    return 0
  pattern = local.index(False) + 1
  if pattern > 1 and local == [(i + 1) % pattern != 0 for i in range(len(local))]:
    return pattern
  raise UserError(f"config.json {source} slides the window on layers "
                  f"{[i for i, is_local in enumerate(local) if is_local]} only; supported: every "
                  "layer, or all but every p-th")


def _optional_number(hf: dict[str, Any], key: str) -> float:
  """A positive number, or null for 0 (off: a soft-cap)."""
  return 0.0 if hf.get(key) is None else hf_number(hf, key)


def _fields_of_rope(rope: dict[str, Any], theta: Any, max_len: int, where: str) -> dict[str, Any]:
  """``model.rope_*`` fields of one HF rotary dict (``theta``: the base it may omit)."""
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind not in ROPE_TYPES:
    raise UserError(f"{where} rope_type={kind!r} is not supported; supported: "
                    f"{', '.join(ROPE_TYPES)}")
  if rope.get("partial_rotary_factor") not in (None, 1, 1.0):
    raise UserError(f"{where} partial_rotary_factor={rope['partial_rotary_factor']!r} is not "
                    "supported (rotary positions on whole heads only: 1.0)")
  fields = {"rope_theta": hf_number(rope, "rope_theta", theta, where),
            "rope_scaling": ROPE_TYPES[kind]}
  if kind == "default":
    return fields
  if kind == "linear":
    return {**fields, "rope_scaling_factor": hf_number(rope, "factor", None, where)}
  original = hf_size(rope, "original_max_position_embeddings", max_len, where)
  # yarn without a factor: the ratio of the context lengths, as transformers does.
  factor = hf_number(rope, "factor", max_len / original if kind == "yarn" else None, where)
  fields.update(rope_scaling_factor=factor, rope_original_max_len=original)
  if kind == "llama3":
    fields.update(rope_low_freq_factor=hf_number(rope, "low_freq_factor", None, where),
                  rope_high_freq_factor=hf_number(rope, "high_freq_factor", None, where))
  elif kind == "yarn":
    if rope.get("truncate", True) is not True:
      raise UserError(f"{where} truncate={rope['truncate']!r} is not supported (only true)")
    if rope.get("attention_factor") is None and rope.get("mscale") and rope.get("mscale_all_dim"):
      raise UserError(f"{where} mscale={rope['mscale']!r} / mscale_all_dim="
                      f"{rope['mscale_all_dim']!r} is not supported (give attention_factor)")

    def number(key: str, default: float) -> float:
      # transformers reads a missing (or 0) beta as 32 / 1, a missing attention
      # factor as 0.1 ln(factor) + 1 (bigmodel's 0).
      return hf_number(rope, key, None, where) if rope.get(key) else default

    fields.update(rope_yarn_beta_fast=number("beta_fast", 32.0),
                  rope_yarn_beta_slow=number("beta_slow", 1.0),
                  rope_attention_factor=number("attention_factor", 0.0))
  return fields


def _hf_rope(spec: RopeSpec) -> dict[str, Any]:
  """transformers 5's rotary dict for a bigmodel ``RopeSpec``."""
  kind = next(k for k, v in ROPE_TYPES.items() if v == spec.scaling)
  rope = {"rope_type": kind, "rope_theta": float(spec.theta)}
  if kind == "default":
    return rope
  rope["factor"] = float(spec.factor)
  if kind != "linear":
    rope["original_max_position_embeddings"] = int(spec.original_max_len)
  if kind == "llama3":
    rope.update(low_freq_factor=float(spec.low_freq_factor),
                high_freq_factor=float(spec.high_freq_factor))
  elif kind == "yarn":
    rope.update(beta_fast=float(spec.beta_fast), beta_slow=float(spec.beta_slow))
    if spec.attention_factor:
      rope["attention_factor"] = float(spec.attention_factor)
  return rope


def _hf_activation(activation: str, gemma: bool) -> str:
  if gemma and activation == "gelu_tanh":
    return "gelu_pytorch_tanh"  # The same tanh GELU, as Gemma's configs name it.
  return TO_HF_ACTIVATION[activation]


def rules(m: ModelConfig, hf: Optional[dict[str, Any]] = None,  # pylint: disable=unused-argument
          experts: Optional[Experts] = None) -> list[Rule]:
  """Where each bigmodel parameter lives in a checkpoint of any of these
  architectures (``experts``: how a mixture-of-experts one stores them)."""
  d, f, v, h = m.embed_dim, m.mlp_dim, m.vocab_size, m.head_dim
  n, k = m.num_heads, m.num_kv_heads or m.num_heads

  def names(name: str) -> tuple[str, ...]:
    # *ForCausalLM prefixes "model."; a bare *Model does not.
    return (f"model.{name}", name)

  def block(param: str, name: str, shape: tuple[int, ...]) -> Rule:
    return Rule(f"blocks/{param}", names(f"layers.{{i}}.{name}"), shape,
                "same" if len(shape) == 1 else "linear", layers=m.num_layers)

  def dense(param: str, name: str, d_in: int, d_out: int, bias: bool) -> list[Rule]:
    result = [block(f"{param}/kernel", f"{name}.weight", (d_out, d_in))]
    return result + [block(f"{param}/bias", f"{name}.bias", (d_out,))] if bias else result

  qkv_bias = m.attention_qkv_bias
  result = [
      Rule("token_embed/embedding", names("embed_tokens.weight"), (v, d)),
      Rule("ln_final/scale", names("norm.weight"), (d,)),
      block("ln_attn/scale", "input_layernorm.weight", (d,)),
      *dense("attn/query", "self_attn.q_proj", d, n * h, qkv_bias),
      *dense("attn/key", "self_attn.k_proj", d, k * h, qkv_bias),
      *dense("attn/value", "self_attn.v_proj", d, k * h, qkv_bias),
      *dense("attn/out", "self_attn.o_proj", n * h, d, m.attention_out_bias),
  ]
  if m.num_experts:
    x, width = m.num_experts, m.moe_mlp_dim or f
    prefix = f"layers.{{i}}.{experts.block}"

    def expert(param: str, projection: str, d_in: int, d_out: int) -> Rule:
      return Rule(f"blocks/moe/{param}", names(f"{prefix}.experts.{{e}}.{projection}.weight"),
                  (d_out, d_in), "linear", layers=m.num_layers, experts=x)
    gate, up, down = experts.projections
    result += [Rule("blocks/moe/router", names(f"{prefix}.gate.weight"), (x, d), "linear",
                    layers=m.num_layers),
               expert("wi", gate, d, width), expert("wi_linear", up, d, width),
               expert("wo", down, width, d)]
  else:
    result += [
        *dense("mlp/wi", "mlp.gate_proj", d, f, m.mlp_bias),  # The activated half.
        *dense("mlp/wi_linear", "mlp.up_proj", d, f, m.mlp_bias),
        *dense("mlp/wo", "mlp.down_proj", f, d, m.mlp_bias),
    ]
  if m.qk_norm:
    result += [block("attn/query_norm/scale", "self_attn.q_norm.weight", (h,)),
               block("attn/key_norm/scale", "self_attn.k_norm.weight", (h,))]
  if m.post_norms:  # Gemma's post_attention_layernorm norms the attention's output ...
    result += [block("ln_attn_out/scale", "post_attention_layernorm.weight", (d,)),
               block("ln_mlp/scale", "pre_feedforward_layernorm.weight", (d,)),
               block("ln_mlp_out/scale", "post_feedforward_layernorm.weight", (d,))]
  else:  # ... everyone else's the MLP's input.
    result.append(block("ln_mlp/scale", "post_attention_layernorm.weight", (d,)))
  if not m.tie_embeddings:
    result.append(Rule("lm_head/kernel", ("lm_head.weight",), (v, d), "linear"))
  return result
