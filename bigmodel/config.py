"""The config schema shared by every model family, and its validation.

Every family's config file starts from :func:`base_config` and fills in
``model.*`` so that overrides read the same everywhere, e.g.
``--config.train.steps=40 --config.mesh.fsdp=2``.
"""
import re

import ml_collections

from bigmodel.errors import UserError
from bigmodel import pruning, sharding
from bigmodel.models import families, lora, quantization
from bigmodel.models.attention import ATTENTION_IMPLS, CONTEXT_ATTENTION
from bigmodel.models.layers import ACTIVATIONS
from bigmodel.models.rope import ROPE_SCALINGS
from bigmodel.models.stack import REMAT_POLICIES
from bigmodel.optim import OPTIMIZERS, SCHEDULES


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict(dict(
      family="gpt",
      vocab_size=4096,        # Rows of the embedding table (>= tokenizer size).
      num_layers=2,
      num_heads=4,
      num_kv_heads=0,         # 0 = num_heads; fewer = grouped-query attention.
      head_dim=0,             # 0 = embed_dim // num_heads.
      embed_dim=128,
      mlp_dim=512,
      max_len=256,            # Longest sequence learned positions support.
      position_embedding="learned",   # learned | rope (GPT) | relative (T5)
      rope_theta=10000.0,
      dropout_rate=0.0,
      tie_embeddings=True,
      layer_norm_epsilon=1e-5,
      # MLP (and BERT MLM head) activation: gelu_tanh (GPT-2's "gelu_new", T5 v1.1)
      # | gelu_exact (erf; BERT's "gelu") | relu.
      mlp_activation="gelu_tanh",
      dtype="float32",        # Compute dtype of activations and matmuls.
      param_dtype="float32",  # Storage dtype of parameters.
      attention_impl="auto",  # auto (pallas on GPU/TPU, xla on CPU) | xla | pallas | cudnn
      # With mesh.context > 1 (the sequence split over devices): ring (keys and
      # values passed between neighbours) | all_gather (every device gathers them).
      context_attention="ring",
      remat="none",           # none | full | dots_saveable | dots_with_no_batch_dims_saveable
      scan=True,              # Scan over layers: compile time flat in depth.
      # The output projection and cross-entropy in chunks of this many positions,
      # never holding [batch, length, vocab] logits (bigmodel/models/chunked_loss.py);
      # 0 = full logits. Falls back to full logits for distillation, DPO and a
      # quantized or LoRA-adapted head.
      loss_chunk_len=0,
      # Quantized training of every dense layer (bigmodel/models/quantization.py,
      # through Qwix): none | int8 | fp8 (float8_e4m3fn). Weights per output
      # channel; activations per token unless quantize_activations=False;
      # quantize_gradients also quantizes the backward pass's incoming gradients.
      quantization="none",
      quantize_activations=True,
      quantize_gradients=False,
      # A weight-quantized model (written by bigmodel.quantize; loads for generation
      # and evaluation, never trains): 0 (float) | 8 | 4 bits per dense kernel
      # weight, scales per output channel or per group of this many inputs (0).
      weight_bits=0,
      weight_group_size=0,
      # Family options (each family's sub-config; ``families.Family.options``).
      # They stay flat keys so config.json files of earlier runs load; another
      # family rejects them unless they keep their defaults.
      num_decoder_layers=0,   # T5 decoder depth; 0 = num_layers.
      norm_position="post",   # BERT: post (original BERT) | pre.
      type_vocab_size=2,      # BERT token types.
      num_classes=0,          # BERT: > 0 = classification head instead of MLM.
      relative_buckets=32,    # T5 relative position bias buckets ...
      relative_max_distance=128,  # ... logarithmic up to this distance.
      t5_mlp_gated=True,      # T5 MLP: act(x wi) * (x wi_linear) (v1.1); False: act(x wi) (T5).
      # Decoder (gpt family) options. The defaults are GPT-2; configs/llama.py,
      # qwen.py, mistral.py and gemma.py set them for those architectures.
      norm="layernorm",       # layernorm | rmsnorm
      norm_scale_offset=0.0,  # rmsnorm scale = offset + weight (Gemma: 1, weights from 0).
      mlp_gated=False,        # act(x W_gate) * (x W_up): SwiGLU (silu), GeGLU (gelu_tanh).
      attention_qkv_bias=True,   # Biases on q, k, v (GPT-2, Qwen2) ...
      attention_out_bias=True,   # ... on the attention output (GPT-2) ...
      mlp_bias=True,             # ... and on the MLP (GPT-2).
      embed_scale=False,      # Embeddings times sqrt(embed_dim) (Gemma).
      qk_norm=False,          # Norm q and k per head before rotary (Qwen3, Gemma 3).
      post_norms=False,       # Norm each sublayer's output too (Gemma 2/3).
      query_pre_attn_scalar=0.0,  # Scores scaled by this^-0.5 (0 = head_dim; Gemma).
      sliding_window=0,       # Local layers attend to this many latest positions (0 = off).
      sliding_window_pattern=0,   # 0: every layer local; p: every p-th layer global.
      attn_softcap=0.0,       # Attention logits -> cap * tanh(logits / cap) (0 = off).
      final_softcap=0.0,      # The same on the output logits (Gemma 2).
      rope_scaling="none",    # none | linear | llama3 | yarn (bigmodel/models/rope.py)
      rope_scaling_factor=1.0,
      rope_original_max_len=0,    # llama3/yarn: pretraining context (0 = max_len).
      rope_low_freq_factor=1.0,   # llama3.
      rope_high_freq_factor=4.0,  # llama3.
      rope_yarn_beta_fast=32.0,   # yarn.
      rope_yarn_beta_slow=1.0,    # yarn.
      rope_attention_factor=0.0,  # yarn: cos/sin factor (0 = 0.1 ln(factor) + 1).
      rope_local_theta=0.0,   # Local layers' rotary base (0 = rope_theta; Gemma 3).
      # Mixture of Experts (bigmodel/models/moe.py): every layer's MLP becomes
      # num_experts expert MLPs (0 = dense), each token routed to its top
      # experts_per_token (Mixtral: 8 and 2; Qwen3-MoE: 128 and 8).
      num_experts=0,
      experts_per_token=2,
      moe_mlp_dim=0,          # An expert's width (0 = mlp_dim).
      moe_router="softmax",   # softmax (Mixtral, Qwen) | sigmoid (DeepSeek-V3).
      moe_normalize_top_k=True,   # The chosen experts' gates sum to 1.
      moe_dispatch="dropless",    # dropless (ragged_dot) | capacity (capped, drops overflow).
      moe_capacity_factor=1.25,   # capacity: slots per expert x tokens x k / experts.
      moe_shared_experts=0,       # Always-on experts of moe_mlp_dim each (Qwen-MoE, DeepSeek).
      moe_load_balance_weight=0.01,  # Switch's load-balancing loss in the training loss.
      moe_router_z_weight=0.001,     # ST-MoE's router z-loss in the training loss.
  ))

  c.data = ml_collections.ConfigDict(dict(
      source="files",       # files | tfds | synthetic
      paths="",             # Directory, file or glob; "" = the Python stdlib.
      file_pattern="*.py",  # Files picked up when `paths` is a directory.
      tfds_name="",         # A registered tfds text dataset, e.g. "lm1b".
      text_key="text",      # Field holding the text: tfds feature, JSONL/Parquet/ArrayRecord field.
      max_bad_fraction=0.01,  # Bad records a shard may skip before the run stops.
      # Weighted sources, a JSON list of {"name", "paths" | "tfds_name", "weight"}
      # (bigmodel/data/mixture.py); "" = the one source above.
      mixture="",
      # Text tasks read token ids tokenized once (bigmodel/data/token_cache.py):
      # "" = off, "auto" = DATA_DIR/token_cache, or a folder.
      token_cache="",
      cache_workers=0,        # Tokenizing processes (0 = one per CPU core).
      data_dir="",          # ArrayRecords: "" = WORKDIR/data (files) or tfds's default dir.
      tokenizer="",         # A sentencepiece .model; "" = train one in WORKDIR.
      vocab_size=4096,      # Size of a tokenizer trained here.
      seq_len=256,
      num_workers=0,        # grain worker processes (0 = in the main process).
      # What a batch is for: lm | mlm | span_corruption | classify | seq2seq.
      task="lm",
      mlm_probability=0.15,   # mlm: share of the real tokens predicted.
      noise_density=0.15,     # span_corruption: share of the tokens corrupted ...
      mean_span_length=3.0,   # ... in spans of this mean length.
      target_len=0,           # Decoder length; 0 = implied by seq_len (span_corruption),
                              # the longest label (classify, t5), else seq_len.
      # classify / seq2seq: `paths` is a .csv/.jsonl file or a directory with
      # train.* and validation.*; "" = a default task built from the stdlib.
      text_column="text",     # Column (or tfds feature) holding the input text.
      label_column="label",   # classify: column holding the label.
      target_column="target", # seq2seq: column holding the target text.
      labels="",              # classify: comma-separated label set; "" = those in train.
  ))

  c.optim = ml_collections.ConfigDict(dict(
      name="adamw",           # adamw | adafactor | sgd
      learning_rate=1e-3,
      schedule="cosine",      # cosine | linear | rsqrt | constant
      warmup_steps=100,
      decay_steps=0,          # 0 = train.steps.
      end_lr_fraction=0.1,    # Final learning rate as a fraction of the peak.
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      momentum=0.9,           # sgd only.
      weight_decay=0.1,
      clip=1.0,               # Global-norm clip; 0 = off.
      grad_accum=1,           # Micro-batches per step.
      # Parameters whose path (e.g. "blocks/attn/query/kernel") this regular
      # expression finds are frozen: no gradient, no optimizer state ("" = none).
      freeze="",
  ))

  # DPO (data.task=preference; bigmodel/objectives.py): the reward is beta
  # times the log-probability ratio to the starting model; sft_weight > 0 adds
  # the chosen reply's per-token NLL to each pair's loss (RPO).
  c.dpo = ml_collections.ConfigDict(dict(beta=0.1, sft_weight=0.0))

  # Magnitude pruning (bigmodel/pruning.py, docs/compression.md): masks kept in
  # the optimizer state hold the pruned weights at exactly zero.
  c.prune = ml_collections.ConfigDict(dict(
      method="",              # "" (off) | magnitude (unstructured) | n_m (N:M structured).
      sparsity=0.5,           # magnitude: the final pruned fraction, in [0, 1).
      n=2,                    # n_m: keep n of every m consecutive weights along each
      m=4,                    # kernel's input dimension (2:4: sparse tensor cores).
      start_step=0,           # Pruning starts here (n_m: applied in one step here) ...
      end_step=0,             # ... and reaches `sparsity` here (0 = train.steps).
      every=100,              # Steps between mask updates (Zhu & Gupta's dt).
      targets=pruning.DEFAULT_TARGETS,  # Regular expression searched in parameter paths.
  ))

  # LoRA adapters (bigmodel/models/lora.py): rank 0 = off. With adapters only
  # they train; every other parameter is frozen.
  c.lora = ml_collections.ConfigDict(dict(
      rank=0,
      alpha=16.0,             # Adapter output scaled by alpha / rank.
      targets="attn/(query|value)",  # Regular expression over dense layers' module paths.
      dropout=0.0,            # On the adapter's input, in training.
  ))

  c.train = ml_collections.ConfigDict(dict(
      steps=1000,
      batch_size=32,          # Global batch, in sequences.
      log_every=10,
      eval_every=200,         # 0 = only at the end.
      eval_steps=4,           # Batches per evaluation.
      seed=0,
      peak_tflops_per_device=0.0,  # 0 = known or measured peak of the platform.
      sample_tokens=96,       # Tokens sampled at the end (0 = none).
      sample_prompt="def ",
      sample_temperature=0.8,
      progress=True,          # A compact progress line on a terminal.
      nonfinite="skip",       # A non-finite loss/gradient/update: skip the update, or halt.
      # skip: halt anyway once this many updates were skipped in a row, or within
      # one logging interval (a diverged run never recovers by skipping).
      max_nonfinite=5,
      # Where metrics go besides metrics.jsonl (always written: resume and
      # bigmodel.goodput read it): "tensorboard", "wandb", comma-separated.
      trackers="tensorboard",
      # Steps "a,b": a jax.profiler trace of steps a..b in WORKDIR/profile
      # (TensorBoard / XProf) and their time split; "" = none.
      profile_steps="",
  ))

  # Knowledge distillation (bigmodel.distill): a frozen teacher run of the same
  # family and vocabulary; loss = alpha T^2 KL(teacher_T || student_T) + (1 - alpha) CE.
  c.distill = ml_collections.ConfigDict(dict(
      teacher="",        # The teacher's WORKDIR; "" = no distillation.
      alpha=0.5,
      temperature=2.0,
      teacher_dtype="",  # float32 | bfloat16; "" = as saved.
  ))

  # lm-evaluation-harness tasks during training (bigmodel.lm_eval; needs the
  # eval extra): every N steps and at the last, logged as lm_eval/TASK/METRIC.
  c.lm_eval = ml_collections.ConfigDict(dict(
      every=0,           # 0 = never.
      tasks="",          # Comma-separated task names.
      include_path="",   # Folders of task YAML files, comma-separated.
      num_fewshot=-1,    # -1 = each task's own.
      limit=0,           # The first N documents of each task; 0 = all.
      batch_size=8,
  ))

  # Weights & Biases (train.trackers=...,wandb): the run id is kept in
  # WORKDIR/wandb_run_id so a resumed run continues the same W&B run.
  c.wandb = ml_collections.ConfigDict(dict(
      project="bigmodel",
      entity="",   # "" = the account's default.
      name="",     # "" = the workdir's name.
      tags="",     # Comma-separated.
      mode="",     # online | offline | disabled; "" = W&B's default (WANDB_MODE).
  ))

  # rules: overrides of sharding.LOGICAL_AXIS_RULES, "LOGICAL=AXES,..." with mesh
  # axes joined by + or none, e.g. "embed=none,mlp=fsdp+tensor"; "" = the defaults.
  # In-slice sizes; dcn_*: slices along data / fsdp (multi-slice TPU, -1 = the rest).
  # context: devices that split each sequence (context parallelism; attention by
  # model.context_attention); every family (T5's bias is built per block).
  # context_balance: a causal decoder's training rows reordered so each of
  # those devices holds an early and a late chunk (even causal work; the ring
  # skips wholly masked blocks). expert: devices that split each layer's
  # experts (expert parallelism, all-to-all dispatch; model.moe_dispatch=
  # capacity); they split the batch too.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, context=1, tensor=1,
                                          dcn_data=1, dcn_fsdp=1, rules="",
                                          context_balance=True))

  c.checkpoint = ml_collections.ConfigDict(dict(
      save_every=0,       # Steps between saves; 0 = only at the end and on SIGTERM.
      keep=3,             # The latest checkpoints kept (>= 1: the newest is never deleted).
      keep_best=False,    # Also keep the one with the lowest eval_loss.
      async_save=True,    # Write in the background while training continues.
      # False: a run from init_from saves the frozen parameters it took from
      # there (LoRA's base, optim.freeze, DPO's reference) as a pointer to that
      # checkpoint, not again; True: every checkpoint holds every array.
      self_contained=False,
  ))

  c.print_sharding = False
  c.init_from = ""  # A run's WORKDIR whose latest parameters start this run (fine-tuning).
  return c


def config_from_dict(values: dict) -> ml_collections.ConfigDict:
  """``base_config()`` updated with the keys of ``values`` it knows.

  For configs saved by any version (``config.json``, a checkpoint's config):
  keys added since take their defaults, keys since removed are ignored.
  """
  config = base_config()

  def update(target: ml_collections.ConfigDict, source: dict) -> None:
    for key, value in source.items():
      if key not in target:
        continue  # A key of another version of the schema.
      if isinstance(target[key], ml_collections.ConfigDict):
        update(target[key], value)
      else:
        target[key] = value

  update(config, values)
  return config


_CHOICES = {
    "model.family": tuple(families.FAMILIES),
    "model.position_embedding": ("learned", "rope", "relative"),
    "model.norm_position": ("post", "pre"),
    "model.mlp_activation": tuple(ACTIVATIONS),
    "model.norm": ("layernorm", "rmsnorm"),
    "model.rope_scaling": ROPE_SCALINGS,
    "model.remat": tuple(REMAT_POLICIES),
    "model.attention_impl": ATTENTION_IMPLS,
    "model.context_attention": tuple(CONTEXT_ATTENTION),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "data.source": ("files", "tfds", "synthetic"),
    "optim.name": OPTIMIZERS,
    "optim.schedule": SCHEDULES,
    "train.nonfinite": ("skip", "halt"),
}
_POSITIVE = ("model.vocab_size", "model.num_layers", "model.num_heads", "model.embed_dim",
             "model.mlp_dim", "model.max_len", "data.seq_len", "train.steps",
             "train.batch_size", "train.log_every", "optim.grad_accum", "checkpoint.keep",
             "train.max_nonfinite")
_NON_NEGATIVE = ("model.num_kv_heads", "model.head_dim", "model.num_decoder_layers",
                 "model.sliding_window", "model.sliding_window_pattern", "model.attn_softcap",
                 "model.final_softcap", "model.query_pre_attn_scalar",
                 "model.rope_original_max_len", "model.rope_attention_factor",
                 "model.rope_local_theta", "model.num_experts", "model.moe_mlp_dim",
                 "model.moe_shared_experts", "model.moe_load_balance_weight",
                 "model.moe_router_z_weight",
                 "optim.warmup_steps", "optim.decay_steps", "optim.eps", "optim.clip",
                 "optim.weight_decay", "optim.end_lr_fraction", "train.eval_every",
                 "train.eval_steps", "train.sample_tokens", "train.sample_temperature",
                 "checkpoint.save_every")


TRACKERS = ("jsonl", "tensorboard", "wandb")


def tracker_names(trackers: str) -> list[str]:
  """``train.trackers`` as names (``jsonl`` is always on)."""
  return [name.strip() for name in trackers.split(",") if name.strip()]


def profile_steps(value: str, total_steps: int) -> tuple[int, int] | None:
  """``train.profile_steps`` "a,b" (or "a") as (first, last); None for ""."""
  if not value.strip():
    return None
  try:
    bounds = [int(part) for part in value.split(",")]
  except ValueError:
    bounds = []
  if len(bounds) == 1:
    bounds *= 2
  if len(bounds) != 2 or not 1 <= bounds[0] <= bounds[1] <= total_steps:
    raise UserError(f"train.profile_steps={value!r} must be 'FIRST,LAST' (or one step) with "
                    f"1 <= FIRST <= LAST <= train.steps={total_steps}")
  return bounds[0], bounds[1]


def _get(config, dotted: str):
  value = config
  for part in dotted.split("."):
    value = value[part]
  return value


def _validate_expert_axis(config) -> None:
  expert = int(config.mesh.get("expert", 1))
  if expert == 1:
    return
  m = config.model
  if expert < 1:
    raise UserError(f"mesh.expert={expert} must be a positive size (no -1: it splits experts)")
  if not m.get("num_experts", 0):
    raise UserError(f"mesh.expert={expert} splits experts but model.num_experts=0 (a dense "
                    "model); use mesh.data instead")
  if m.num_experts % expert:
    raise UserError(f"mesh.expert={expert} does not divide model.num_experts={m.num_experts}")
  if m.moe_dispatch != "capacity":
    raise UserError(f"mesh.expert={expert} sends tokens to their experts' devices in fixed-size "
                    f"buffers: it needs model.moe_dispatch=capacity, not {m.moe_dispatch!r}")


def validate(config) -> None:
  """Checks a resolved config; raises ``UserError`` naming the first problem.

  Device-dependent checks (mesh product, batch vs data parallelism) live in
  ``bigmodel.sharding`` and ``bigmodel.train`` where the devices are known.
  """
  for key, choices in _CHOICES.items():
    if _get(config, key) not in choices:
      raise UserError(f"--config.{key}={_get(config, key)!r} is not one of: {', '.join(choices)}")
  for key in _POSITIVE:
    if _get(config, key) <= 0:
      raise UserError(f"--config.{key} must be positive, got {_get(config, key)}")
  for key in _NON_NEGATIVE:
    if _get(config, key) < 0:
      raise UserError(f"--config.{key} must be >= 0, got {_get(config, key)}")
  m = config.model
  families.get(m.family).validate(m)  # Positions and the family's own options.
  sharding.logical_rules(config)  # A bad mesh.rules entry is one error line.
  context = int(config.mesh.get("context", 1))
  if context > 1 and not families.get(m.family).context_parallel:
    raise UserError(f"mesh.context={context}: model.family={m.family} has no context-parallel "
                    "attention; use mesh.context=1")
  if context > 1 and config.data.seq_len % context:
    raise UserError(f"mesh.context={context} does not divide data.seq_len="
                    f"{config.data.seq_len}")
  if (context > 1 and config.mesh.get("context_balance", True)
      and families.get(m.family).is_causal_lm and config.data.seq_len % (2 * context)):
    raise UserError(f"mesh.context_balance gives each of the mesh.context={context} devices two "
                    f"chunks: data.seq_len={config.data.seq_len} must be a multiple of "
                    f"{2 * context} (or set mesh.context_balance=False)")
  _validate_expert_axis(config)
  if not m.head_dim and m.embed_dim % m.num_heads:
    raise UserError(f"model.num_heads={m.num_heads} does not divide model.embed_dim={m.embed_dim}"
                    " (or set model.head_dim)")
  if m.num_kv_heads and m.num_heads % m.num_kv_heads:
    raise UserError(f"model.num_kv_heads={m.num_kv_heads} does not divide "
                    f"model.num_heads={m.num_heads}")
  if m.position_embedding == "rope" and (m.head_dim or m.embed_dim // m.num_heads) % 2:
    raise UserError("rotary positions need an even head dim (embed_dim / num_heads)")
  if m.position_embedding == "learned" and config.data.seq_len > m.max_len:
    raise UserError(f"data.seq_len={config.data.seq_len} exceeds model.max_len={m.max_len} "
                    "(the learned position table)")
  if not 0.0 <= m.dropout_rate < 1.0:
    raise UserError(f"model.dropout_rate must be in [0, 1), got {m.dropout_rate}")
  if m.get("loss_chunk_len", 0) < 0:
    raise UserError(f"model.loss_chunk_len must be >= 0 (0 = full logits), got "
                    f"{m.loss_chunk_len}")
  if config.train.batch_size % config.optim.grad_accum:
    raise UserError(f"optim.grad_accum={config.optim.grad_accum} does not divide "
                    f"train.batch_size={config.train.batch_size}")
  lora.validate(config.lora)
  quantization.validate(config)
  pruning.validate(config.prune, config.train.steps)
  if config.dpo.beta <= 0:
    raise UserError(f"dpo.beta must be positive, got {config.dpo.beta}")
  if not config.dpo.sft_weight >= 0:
    raise UserError(f"dpo.sft_weight must be >= 0, got {config.dpo.sft_weight}")
  if config.optim.freeze:
    try:
      re.compile(config.optim.freeze)
    except re.error as e:
      raise UserError(f"optim.freeze={config.optim.freeze!r} is not a regular expression: "
                      f"{e}") from e
  trackers = tracker_names(config.train.trackers)
  unknown = sorted(set(trackers) - set(TRACKERS))
  if unknown:
    raise UserError(f"train.trackers={config.train.trackers!r}: unknown {', '.join(unknown)}; "
                    f"choose from {', '.join(TRACKERS)}")
  if config.wandb.mode not in ("", "online", "offline", "disabled"):
    raise UserError(f"wandb.mode={config.wandb.mode!r} is not one of: online, offline, "
                    "disabled (or empty)")
  profile_steps(config.train.profile_steps, config.train.steps)
  from bigmodel import distill  # pylint: disable=g-import-not-at-top  (it loads runs)
  distill.validate(config)
  if config.lm_eval.every < 0 or config.lm_eval.limit < 0 or config.lm_eval.num_fewshot < -1:
    raise UserError("lm_eval.every and lm_eval.limit must be >= 0 and lm_eval.num_fewshot "
                    ">= -1")
  if config.lm_eval.every and not config.lm_eval.tasks.strip():
    raise UserError(f"lm_eval.every={config.lm_eval.every} needs lm_eval.tasks")
  if config.optim.learning_rate <= 0:
    raise UserError(f"optim.learning_rate must be positive, got {config.optim.learning_rate}")
