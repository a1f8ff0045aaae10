"""Qwen presets: ``--config=configs/qwen.py:PRESET`` (default ``tiny``).

Qwen3 (``qwen3_0_6b``, ``qwen3_8b``): RMSNorm on q and k per head, no
biases, explicit head_dim 128; ``qwen3_30b_a3b`` (Qwen3-MoE) has 128 experts
of width 768 in every layer, each token running 8. Qwen2.5 (``qwen2_5_7b``): biases on q, k and v.
Both: rotary base 1,000,000, RMSNorm epsilon 1e-6. See ``configs/open_weights.py``.
"""
from configs.open_weights import make_config

ARCHITECTURE = dict(rope_theta=1000000.0, layer_norm_epsilon=1e-6, qk_norm=True)
SHAPES = {
    "qwen3_0_6b": dict(vocab_size=151936, num_layers=28, embed_dim=1024, num_heads=16,
                       num_kv_heads=8, head_dim=128, mlp_dim=3072, max_len=40960,
                       tie_embeddings=True),
    "qwen3_8b": dict(vocab_size=151936, num_layers=36, embed_dim=4096, num_heads=32,
                     num_kv_heads=8, head_dim=128, mlp_dim=12288, max_len=40960),
    "qwen3_30b_a3b": dict(vocab_size=151936, num_layers=48, embed_dim=2048, num_heads=32,
                          num_kv_heads=4, head_dim=128, mlp_dim=6144, max_len=40960,
                          num_experts=128, experts_per_token=8, moe_mlp_dim=768,
                          moe_normalize_top_k=True, moe_load_balance_weight=0.001),
    "qwen2_5_7b": dict(vocab_size=152064, num_layers=28, embed_dim=3584, num_heads=28,
                       num_kv_heads=4, head_dim=128, mlp_dim=18944, max_len=32768,
                       qk_norm=False, attention_qkv_bias=True),
}
PRESETS = ("tiny",) + tuple(SHAPES)


def get_config(preset: str = "tiny"):
  return make_config(preset, ARCHITECTURE, SHAPES)
