"""T5 (v1.1) presets for span-corruption pretraining: ``--config=configs/t5.py:PRESET``.

``tiny`` trains on 2 CPU cores in minutes on the Python standard library;
``small`` .. ``xl`` are the T5 v1.1 shapes.
"""
from bigmodel.config import base_config

# name: (layers per stack, embed_dim, num_heads, head_dim, mlp_dim)
_T5_SHAPES = {
    "small": (8, 512, 6, 64, 1024),
    "base": (12, 768, 12, 64, 2048),
    "large": (24, 1024, 16, 64, 2816),
    "xl": (24, 2048, 32, 64, 5120),
}
PRESETS = ("tiny",) + tuple(_T5_SHAPES)


def get_config(preset: str = "tiny"):
  preset = preset or "tiny"
  if preset not in PRESETS:
    raise ValueError(f"unknown T5 preset {preset!r}; choose from {', '.join(PRESETS)}")
  c = base_config()
  c.preset = preset
  c.model.update(family="t5", position_embedding="relative", tie_embeddings=False,
                 layer_norm_epsilon=1e-6, relative_buckets=32, relative_max_distance=128,
                 dropout_rate=0.0)
  c.data.task = "span_corruption"
  c.data.noise_density = 0.15
  c.data.mean_span_length = 3.0
  c.optim.update(name="adafactor", learning_rate=1e-2, schedule="rsqrt", warmup_steps=100,
                 weight_decay=0.0, clip=1.0)
  if preset == "tiny":
    c.model.update(num_layers=2, num_decoder_layers=2, embed_dim=256, num_heads=4, head_dim=64,
                   mlp_dim=512, vocab_size=4096, max_len=256)
    # 4000 tokenizer pieces leave 96 ids for the sentinels.
    c.data.update(vocab_size=4000, seq_len=256, target_len=64)
    c.optim.update(learning_rate=1e-2, warmup_steps=50)
    c.train.update(steps=300, batch_size=16, log_every=25, eval_every=100, sample_tokens=0)
    return c
  layers, width, heads, head_dim, mlp = _T5_SHAPES[preset]
  c.model.update(num_layers=layers, num_decoder_layers=layers, embed_dim=width, num_heads=heads,
                 head_dim=head_dim, mlp_dim=mlp, vocab_size=32128, max_len=512)
  c.data.update(vocab_size=32000, seq_len=512, target_len=114)
  c.train.update(steps=524288, batch_size=128, log_every=100, eval_every=5000, sample_tokens=0)
  return c
