"""The analytic FLOP and parameter counts (``bigmodel.flops``)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from bigmodel import flops
from bigmodel.models import ModelConfig, build_model
from configs.gpt import PRESETS, get_config
from model_fixtures import tiny_config


def test_train_flops_match_a_hand_count():
  # tiny_config: 2 layers, D=64, N=4 (H=16), F=128, V=128; context L=32.
  c = ModelConfig.from_config(tiny_config().model)
  # Per token, forward multiply-adds: q, k, v, out 4*D*D = 16384 and the MLP
  # 2*D*F = 16384 per layer, x 2 layers = 65536, plus the logits D*V = 8192.
  weight_macs = 2 * (4 * 64 * 64 + 2 * 64 * 128) + 64 * 128
  # Scores and weighted sum: 2 * L * D multiply-adds per layer, half of them causal.
  attention_macs = 2 * (2 * 32 * 64) // 2
  assert flops.forward_flops_per_token(c, 32) == (2 * weight_macs, 2 * attention_macs)
  assert flops.train_flops_per_token(c, 32) == 3 * 2 * (weight_macs + attention_macs) == 466944
  assert flops.train_flops_per_token(c, 32, causal=False) == 3 * 2 * (weight_macs + 2 * attention_macs)


def test_grouped_query_attention_counts_fewer_kv_weights():
  c = ModelConfig.from_config(tiny_config(num_kv_heads=2).model)
  # k and v project to 2 heads of 16: 64 * 32 each instead of 64 * 64.
  assert flops.matmul_params_per_layer(c) == 2 * 64 * 64 + 2 * 64 * 32 + 2 * 64 * 128


@pytest.mark.parametrize("remat,fraction", [
    ("none", 0.0), ("dots_saveable", 0.0),
    ("full", None),  # The layers' whole forward (not the logits).
    ("dots_with_no_batch_dims_saveable", None),  # The attention einsums.
])
def test_recompute_flops(remat, fraction):
  c = ModelConfig.from_config(tiny_config(remat=remat).model)
  weight, attention = flops.forward_flops_per_token(c, 32)
  got = flops.recompute_flops_per_token(c, 32)
  if remat == "full":
    assert got == weight - 2 * 64 * 128 + attention
  elif remat == "dots_with_no_batch_dims_saveable":
    assert got == attention
  else:
    assert got == fraction


def _eval_shape_count(config) -> int:
  model = build_model(config.model)
  tokens = jnp.zeros((1, config.data.seq_len), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens)["params"])
  return sum(x.size for x in jax.tree_util.tree_leaves(nn.unbox(params)))


@pytest.mark.parametrize("preset", PRESETS)
def test_param_count_matches_the_model(preset):
  config = get_config(preset)
  assert flops.param_count(ModelConfig.from_config(config.model)) == _eval_shape_count(config)


def test_param_count_of_variants():
  config = tiny_config(num_kv_heads=2, position_embedding="rope", tie_embeddings=False)
  assert flops.param_count(ModelConfig.from_config(config.model)) == _eval_shape_count(config)


def test_known_peaks():
  assert flops.datasheet_peak_tflops("TPU v5p") == 459.0
  assert flops.datasheet_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
  assert flops.datasheet_peak_tflops("cpu") is None
  assert flops.peak_tflops_per_device(123.0, "float32") == (123.0, "configured")
