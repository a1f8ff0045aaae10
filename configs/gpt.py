"""GPT presets: ``--config=configs/gpt.py:PRESET`` (default ``tiny``).

``tiny`` trains on 2 CPU cores in a few minutes; ``small`` .. ``xl`` are the
GPT-2 shapes; ``gpt3_175b`` is the GPT-3 shape, for planning.
"""
from bigmodel.config import base_config

# name: (num_layers, embed_dim, num_heads, seq_len)
_GPT2_SHAPES = {
    "small": (12, 768, 12, 1024),
    "medium": (24, 1024, 16, 1024),
    "large": (36, 1280, 20, 1024),
    "xl": (48, 1600, 25, 1024),
    "gpt3_175b": (96, 12288, 96, 2048),
}
PRESETS = ("tiny",) + tuple(_GPT2_SHAPES)


def get_config(preset: str = "tiny"):
  preset = preset or "tiny"
  if preset not in PRESETS:
    raise ValueError(f"unknown GPT preset {preset!r}; choose from {', '.join(PRESETS)}")
  c = base_config()
  c.preset = preset
  c.model.family = "gpt"
  if preset == "tiny":
    c.model.update(num_layers=4, embed_dim=256, num_heads=4, mlp_dim=1024,
                   vocab_size=4096, max_len=256)
    c.data.update(vocab_size=4096, seq_len=256)
    c.optim.update(learning_rate=2e-3, warmup_steps=50, weight_decay=0.1)
    c.train.update(steps=300, batch_size=16, log_every=25, eval_every=100,
                   sample_temperature=0.7)
    return c
  layers, width, heads, seq_len = _GPT2_SHAPES[preset]
  # Saving the weight matmuls' outputs but recomputing the attention einsums
  # halves the step's memory (small, 4 x 512: 3,217 vs 6,327 MiB per device)
  # for no extra weight FLOPs; on CPU it was also the faster step (see
  # docs/performance.md). tiny keeps "none": it fits easily.
  c.model.update(num_layers=layers, embed_dim=width, num_heads=heads,
                 mlp_dim=4 * width, vocab_size=50304, max_len=seq_len,
                 remat="dots_with_no_batch_dims_saveable")
  c.data.update(vocab_size=32000, seq_len=seq_len)
  c.optim.update(learning_rate=6e-4, warmup_steps=2000)
  c.train.update(steps=100000, batch_size=512, log_every=50, eval_every=2000)
  if preset == "gpt3_175b":
    c.model.update(position_embedding="learned", dtype="bfloat16", remat="full")
    c.optim.update(learning_rate=6e-5)
    c.train.update(batch_size=1536)
  return c
