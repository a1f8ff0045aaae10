"""Gemma 2 and 3 presets: ``--config=configs/gemma.py:PRESET`` (default ``tiny``).

Both: RMSNorm with Gemma's ``1 + w`` scale before and after each sublayer,
GeGLU (tanh GELU), embeddings scaled by sqrt(D) and tied to the head, queries
scaled by ``query_pre_attn_scalar``^-0.5, local (sliding-window) layers
alternating with global ones. Gemma 2 (``gemma2_2b``): every 2nd layer global,
attention and output logits soft-capped. Gemma 3 (``gemma3_1b``,
``gemma3_12b``): every 6th layer global, q/k norms, local layers with their
own rotary base (10,000; global 1,000,000, scaled 8x linearly in 12B). See ``configs/open_weights.py``.
"""
from configs.open_weights import make_config

ARCHITECTURE = dict(norm_scale_offset=1.0, mlp_activation="gelu_tanh", embed_scale=True,
                    post_norms=True, tie_embeddings=True, layer_norm_epsilon=1e-6,
                    qk_norm=True, rope_theta=1000000.0, rope_local_theta=10000.0,
                    sliding_window_pattern=6)
_GEMMA2 = dict(qk_norm=False, rope_theta=10000.0, rope_local_theta=0.0,
               sliding_window_pattern=2, attn_softcap=50.0, final_softcap=30.0)
SHAPES = {
    "gemma2_2b": dict(_GEMMA2, vocab_size=256000, num_layers=26, embed_dim=2304, num_heads=8,
                      num_kv_heads=4, head_dim=256, mlp_dim=9216, max_len=8192,
                      query_pre_attn_scalar=256.0, sliding_window=4096),
    "gemma3_1b": dict(vocab_size=262144, num_layers=26, embed_dim=1152, num_heads=4,
                      num_kv_heads=1, head_dim=256, mlp_dim=6912, max_len=32768,
                      query_pre_attn_scalar=256.0, sliding_window=512),
    "gemma3_12b": dict(vocab_size=262208, num_layers=48, embed_dim=3840, num_heads=16,
                       num_kv_heads=8, head_dim=256, mlp_dim=15360, max_len=131072,
                       query_pre_attn_scalar=256.0, sliding_window=1024,
                       rope_scaling="linear", rope_scaling_factor=8.0),
}
# tiny: Gemma 3 with every option acting at 4 layers and 256 positions: a
# 64-position window on layers 0 and 2 (pattern 2), 1 and 3 global, and
# Gemma 2's soft-caps.
TINY = dict(sliding_window=64, sliding_window_pattern=2, query_pre_attn_scalar=64.0,
            attn_softcap=50.0, final_softcap=30.0)
PRESETS = ("tiny",) + tuple(SHAPES)


def get_config(preset: str = "tiny"):
  return make_config(preset, ARCHITECTURE, SHAPES, TINY)
