"""Shared by the Llama, Qwen, Mistral and Gemma preset files.

Each of those files lists its architecture's ``model.*`` options and its
models' shapes; ``make_config`` turns one preset into a config. The real
shapes are those of the published ``config.json`` files, for planning,
converting and fine-tuning; ``tiny`` keeps the architecture at the GPT tiny's
size and trains offline on the default corpus (the Python standard library,
a tokenizer trained in the workdir) in a few minutes on 2 CPU cores.
"""
from typing import Any, Mapping

from bigmodel.config import base_config

# The options every open-weight decoder here shares: RMSNorm, SwiGLU without
# biases, rotary positions, no dropout, an untied head unless a preset ties it.
COMMON = dict(family="gpt", norm="rmsnorm", mlp_gated=True, mlp_activation="silu",
              attention_qkv_bias=False, attention_out_bias=False, mlp_bias=False,
              position_embedding="rope", tie_embeddings=False, dropout_rate=0.0)

# The GPT tiny's size (configs/gpt.py), with grouped-query attention and a
# gated MLP of about the same parameter count (2/3 of 4 x D, as Llama sizes it).
TINY_SHAPE = dict(num_layers=4, embed_dim=256, num_heads=4, num_kv_heads=2, mlp_dim=688,
                  vocab_size=4096, max_len=256)


def make_config(preset: str, architecture: Mapping[str, Any],
                shapes: Mapping[str, Mapping[str, Any]], tiny: Mapping[str, Any] = ()):
  """The config of ``preset`` (``tiny`` or a key of ``shapes``).

  ``architecture``: the ``model.*`` options of the whole family of models;
  ``shapes[preset]``: what differs per model; ``tiny``: ``tiny``'s changes
  to the architecture (e.g. a window that fits 256 tokens).
  """
  preset = preset or "tiny"
  if preset != "tiny" and preset not in shapes:
    raise ValueError(f"unknown preset {preset!r}; choose from tiny, {', '.join(shapes)}")
  c = base_config()
  c.preset = preset
  c.model.update({**COMMON, **architecture})
  if preset == "tiny":
    c.model.update({**TINY_SHAPE, **dict(tiny)})
    c.data.update(vocab_size=4096, seq_len=256)
    c.optim.update(learning_rate=2e-3, warmup_steps=50, weight_decay=0.1)
    c.train.update(steps=300, batch_size=16, log_every=25, eval_every=100,
                   sample_temperature=0.7)
    return c
  c.model.update(**shapes[preset])
  # Published models train in bfloat16 with parameters kept in float32; the
  # layers' matmul outputs saved, attention recomputed (configs/gpt.py's
  # choice for its large shapes).
  c.model.update(dtype="bfloat16", remat="dots_with_no_batch_dims_saveable")
  # Their 128k-262k vocabularies: the loss in chunks of 1,024 positions never
  # holds a batch's logits (docs/performance.md: -4 GB per device for
  # llama3_8b at 8,192 positions; the same step time on CPU).
  c.model.loss_chunk_len = 1024
  c.data.update(vocab_size=c.model.vocab_size, seq_len=min(8192, c.model.max_len))
  c.optim.update(learning_rate=3e-4, warmup_steps=2000)
  c.train.update(steps=100000, batch_size=512, log_every=50, eval_every=2000)
  return c
