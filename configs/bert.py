"""BERT presets for masked-language-model pretraining: ``--config=configs/bert.py:PRESET``.

``tiny`` trains on 2 CPU cores in minutes on the Python standard library;
``base`` (110M) and ``large`` (340M) are the BERT paper's shapes.
"""
from bigmodel.config import base_config

# name: (num_layers, embed_dim, num_heads, seq_len)
_BERT_SHAPES = {
    "base": (12, 768, 12, 512),
    "large": (24, 1024, 16, 512),
}
PRESETS = ("tiny",) + tuple(_BERT_SHAPES)


def get_config(preset: str = "tiny"):
  preset = preset or "tiny"
  if preset not in PRESETS:
    raise ValueError(f"unknown BERT preset {preset!r}; choose from {', '.join(PRESETS)}")
  c = base_config()
  c.preset = preset
  c.model.update(family="bert", norm_position="post", type_vocab_size=2, tie_embeddings=True,
                 dropout_rate=0.1, layer_norm_epsilon=1e-12)
  c.data.task = "mlm"
  c.data.mlm_probability = 0.15
  if preset == "tiny":
    c.model.update(num_layers=4, embed_dim=256, num_heads=4, mlp_dim=1024, vocab_size=4096,
                   max_len=128, dropout_rate=0.0)
    # 4000 tokenizer pieces leave room for the [MASK] id inside the 4096 rows.
    c.data.update(vocab_size=4000, seq_len=128)
    c.optim.update(learning_rate=1e-3, warmup_steps=50, weight_decay=0.01)
    c.train.update(steps=300, batch_size=32, log_every=25, eval_every=100, sample_tokens=0)
    return c
  layers, width, heads, seq_len = _BERT_SHAPES[preset]
  c.model.update(num_layers=layers, embed_dim=width, num_heads=heads, mlp_dim=4 * width,
                 vocab_size=30592, max_len=seq_len)
  c.data.update(vocab_size=30000, seq_len=seq_len)
  c.optim.update(learning_rate=1e-4, warmup_steps=10000, weight_decay=0.01, b2=0.999,
                 schedule="linear", end_lr_fraction=0.0)
  c.train.update(steps=1000000, batch_size=256, log_every=100, eval_every=5000,
                 sample_tokens=0)
  return c
