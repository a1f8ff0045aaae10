"""Analytic FLOP counts and per-device peak FLOP/s, for the ``mfu`` metric.

Model FLOPs count matmuls only (the convention of PaLM and MaxText): the
forward pass costs 2 FLOPs per multiply-add; training (forward + backward) is
3x the forward. Attention scores and the weighted sum cost 2 * 2 * L * D per
token per layer, halved when causal (only the lower triangle is needed).
"""
import functools
import time

import jax
import jax.numpy as jnp

from bigmodel.models.config import ModelConfig

# Dense bf16 peak TFLOP/s per chip, from vendor datasheets.
KNOWN_PEAK_TFLOPS = {
    "tpu v4": 275.0,
    "tpu v5 lite": 197.0,   # v5e
    "tpu v5e": 197.0,
    "tpu v5p": 459.0,
    "tpu v5": 459.0,
    "tpu v6 lite": 918.0,   # v6e (Trillium)
    "tpu v6e": 918.0,
    "a100": 312.0,
    "h100": 989.0,
    "h200": 989.0,
}


def matmul_params_per_layer(c: ModelConfig) -> int:
  """Weights touched by matmuls in one transformer layer (self-attention + MLP)."""
  kv_heads = c.num_kv_heads or c.num_heads
  attn = c.embed_dim * c.head_dim * (2 * c.num_heads + 2 * kv_heads)  # q, out, k, v
  return attn + 2 * c.embed_dim * c.mlp_dim


def train_flops_per_token(c: ModelConfig, seq_len: int, causal: bool = True) -> float:
  """Forward + backward FLOPs for one token of a decoder of context ``seq_len``."""
  weight_flops = 2 * (c.num_layers * matmul_params_per_layer(c) + c.embed_dim * c.vocab_size)
  attention_flops = c.num_layers * 4 * seq_len * c.num_heads * c.head_dim
  if causal:
    attention_flops /= 2
  return 3.0 * (weight_flops + attention_flops)


@functools.lru_cache(maxsize=None)
def measured_matmul_tflops(dtype_name: str = "float32", n: int = 2048, repeats: int = 5) -> float:
  """Best TFLOP/s of an n^3 jitted matmul on the default device.

  The fastest repeat, not the median: a peak should not count time lost to
  other processes on a shared machine.
  """
  dtype = jnp.dtype(dtype_name)
  a = jnp.ones((n, n), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, a).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * n ** 3 / min(times) / 1e12


def peak_tflops_per_device(configured: float, dtype_name: str) -> tuple[float, str]:
  """(peak TFLOP/s, where it came from): configured, datasheet, or measured."""
  if configured > 0:
    return configured, "configured"
  kind = jax.devices()[0].device_kind.lower()
  for name, tflops in KNOWN_PEAK_TFLOPS.items():
    if name in kind:
      return tflops, f"datasheet ({kind})"
  return measured_matmul_tflops(dtype_name), f"measured {dtype_name} matmul ({kind})"
