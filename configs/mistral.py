"""Mistral presets: ``--config=configs/mistral.py:PRESET`` (default ``tiny``).

``mistral_7b`` is Mistral 7B v0.1: Llama's block with a 4,096-position sliding
window on every layer. See ``configs/open_weights.py``.
"""
from configs.open_weights import make_config

ARCHITECTURE = dict(rope_theta=10000.0, layer_norm_epsilon=1e-5, sliding_window=4096)
SHAPES = {
    "mistral_7b": dict(vocab_size=32000, num_layers=32, embed_dim=4096, num_heads=32,
                       num_kv_heads=8, head_dim=128, mlp_dim=14336, max_len=32768),
}
TINY = dict(sliding_window=64)  # Narrower than tiny's 256 positions, so it acts.
PRESETS = ("tiny",) + tuple(SHAPES)


def get_config(preset: str = "tiny"):
  return make_config(preset, ARCHITECTURE, SHAPES, TINY)
