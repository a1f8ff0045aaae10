"""Mixtral presets: ``--config=configs/mixtral.py:PRESET`` (default ``tiny``).

``mixtral_8x7b`` is Mixtral 8x7B v0.1: Mistral's block without the sliding
window, its MLP 8 SwiGLU experts of which each token runs 2 (softmax
router, the 2 gates renormalised). ``tiny`` has 4 experts, top 2. Experts
run dropless (``model.moe_dispatch``); ``--config.model.moe_dispatch=capacity``
with ``--config.mesh.expert=E`` splits them over E devices (docs/sharding.md).
See ``configs/open_weights.py``.
"""
from configs.open_weights import make_config

ARCHITECTURE = dict(rope_theta=1000000.0, layer_norm_epsilon=1e-5, num_experts=8,
                    experts_per_token=2, moe_router="softmax", moe_normalize_top_k=True,
                    moe_load_balance_weight=0.02)
SHAPES = {
    "mixtral_8x7b": dict(vocab_size=32000, num_layers=32, embed_dim=4096, num_heads=32,
                         num_kv_heads=8, head_dim=128, mlp_dim=14336, max_len=32768),
}
TINY = dict(num_experts=4)
PRESETS = ("tiny",) + tuple(SHAPES)


def get_config(preset: str = "tiny"):
  return make_config(preset, ARCHITECTURE, SHAPES, TINY)
