"""Llama 3 presets: ``--config=configs/llama.py:PRESET`` (default ``tiny``).

``llama3_1b`` is Llama 3.2 1B, the others Llama 3.1 (8B, 70B, 405B): RMSNorm,
SwiGLU, grouped-query attention (8 kv heads), rotary base 500,000 with the
``llama3`` frequency scaling to 128k positions. See ``configs/open_weights.py``.
"""
from configs.open_weights import make_config

ARCHITECTURE = dict(rope_theta=500000.0, layer_norm_epsilon=1e-5, rope_scaling="llama3",
                    rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
                    rope_high_freq_factor=4.0, rope_original_max_len=8192)
_LLAMA3 = dict(vocab_size=128256, num_kv_heads=8, head_dim=128, max_len=131072)
SHAPES = {
    "llama3_1b": dict(_LLAMA3, num_layers=16, embed_dim=2048, num_heads=32, head_dim=64,
                      mlp_dim=8192, tie_embeddings=True, rope_scaling_factor=32.0),
    "llama3_8b": dict(_LLAMA3, num_layers=32, embed_dim=4096, num_heads=32, mlp_dim=14336),
    "llama3_70b": dict(_LLAMA3, num_layers=80, embed_dim=8192, num_heads=64, mlp_dim=28672),
    "llama3_405b": dict(_LLAMA3, num_layers=126, embed_dim=16384, num_heads=128,
                        mlp_dim=53248),
}
# tiny: the scaling's original context inside tiny's 256 positions, so it acts.
TINY = dict(rope_original_max_len=64, rope_scaling_factor=4.0)
PRESETS = ("tiny",) + tuple(SHAPES)


def get_config(preset: str = "tiny"):
  return make_config(preset, ARCHITECTURE, SHAPES, TINY)
