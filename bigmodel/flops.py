"""Analytic FLOP counts and per-device peak FLOP/s, for the ``mfu`` metric.

Model FLOPs count matmuls only (the convention of PaLM and MaxText): the
forward pass costs 2 FLOPs per multiply-add; training (forward + backward) is
3x the forward (the backward computes two matmuls per forward one: the
gradients of the activations and of the weights). Per token, the forward pass
costs 2 * (layers * matmul weights per layer + D * V) for the weights (q, k,
v, out, wi, wo and the logits; embedding lookups are free), and the attention
scores and the weighted sum cost 2 * 2 * L * N * H per layer, halved when
causal (only the lower triangle is needed). Norms, softmax and GELU are not
counted. Rematerialisation does not change model FLOPs (MFU counts useful
work); ``recompute_flops_per_token`` gives the extra hardware FLOPs.

Every family counts its own forward pass (``Family.forward_flops`` in
``bigmodel.models.families``: BERT bidirectional with an MLM or classification
head, T5's encoder and decoder with cross-attention and gated MLPs);
``train_flops_per_step`` applies it to the batch shapes. The trainer's ``mfu``
metric uses it for every family, and ``benchmarks/train_step.py`` and
``bigmodel.plan`` (GPT) agree with it.
"""
import functools
import os
import platform
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from bigmodel.models import families, lora
from bigmodel.models.config import ModelConfig
from bigmodel.models.family import mlp_matrices, mlp_weights
from bigmodel.models.family import score_flops as _score_flops

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


def matmul_params_per_layer(c: ModelConfig, active: bool = True) -> int:
  """Weights touched by matmuls in one transformer layer (self-attention + MLP);
  a mixture of experts counts a token's experts, or with ``active=False`` all."""
  kv_heads = c.num_kv_heads or c.num_heads
  attn = c.embed_dim * c.head_dim * (2 * c.num_heads + 2 * kv_heads)  # q, out, k, v
  return attn + mlp_weights(c, active)


def forward_flops_per_token(c: ModelConfig, seq_len: int,
                            causal: bool = True) -> tuple[float, float]:
  """(weight matmul FLOPs, attention FLOPs) of one token's forward pass in a GPT."""
  weight_flops = 2 * (c.num_layers * matmul_params_per_layer(c) + c.embed_dim * c.vocab_size)
  attention_flops = sum(_score_flops(c, seq_len, seq_len, causal, window=c.sliding_window * local)
                        for local in c.local_layers()) / seq_len
  return float(weight_flops), float(attention_flops)


def train_flops_per_token(c: ModelConfig, seq_len: int, causal: bool = True) -> float:
  """Forward + backward FLOPs for one token of a decoder of context ``seq_len``."""
  return 3.0 * sum(forward_flops_per_token(c, seq_len, causal))


def forward_flops_per_example(c: ModelConfig, lengths: Mapping[str, int]) -> float:
  """Model FLOPs of one example's forward pass, for every family.

  ``lengths``: the family's token keys (``bigmodel.data``'s batch keys) and
  their lengths, e.g. ``{"inputs": L}`` for GPT and BERT, ``{"encoder_inputs":
  E, "decoder_inputs": T}`` for T5. Each family counts its own layers and head
  (``Family.forward_flops``).
  """
  return families.get(c.family).forward_flops(c, lengths)


def train_flops_per_step(c: ModelConfig, batch_shapes: Mapping[str, tuple[int, ...]]) -> float:
  """Forward + backward model FLOPs of a training step on a batch of these shapes
  (``{key: (B, length)}``, only the family's token keys are read)."""
  keys = families.get(c.family).token_keys
  batch_size = batch_shapes[keys[0]][0]
  return 3.0 * batch_size * forward_flops_per_example(
      c, {k: batch_shapes[k][1] for k in keys})


def _tokens_through(name: str, keys: tuple[str, ...], batch_shapes) -> int:
  """Token positions per step that a parameter's matmul sees: the encoder's
  for T5's ``encoder/`` stack and the cross-attention's keys and values,
  else the (decoder's) inputs'."""
  reads_encoder = name.startswith("encoder/") or "cross_attn/key/" in name or (
      "cross_attn/value/" in name)
  key = keys[0] if reads_encoder else keys[-1]
  batch, length = batch_shapes[key][:2]
  return int(batch) * int(length)


def trainable_flops_correction(c: ModelConfig, params: Any, frozen: tuple[str, ...],
                               batch_shapes: Mapping[str, tuple[int, ...]]) -> float:
  """What ``train_flops_per_step`` (full training of the plain model) misses
  when some weights are frozen or LoRA adapters are added: FLOPs per step.

  A weight used in a matmul costs 2 FLOPs per element and token in the
  forward pass, 2 for the activations' gradient and 2 for its own gradient;
  a frozen weight skips the last (``-2``), and an adapter (``kernel_lora_a``
  / ``_b``, not in the model's count) adds its 6 (4 when frozen). The
  weights counted: every ``kernel`` (heads used on one position, e.g. a
  classifier's, count as applied to every token; they are small), the tied
  token table (it computes the logits), the adapters. Activation gradients
  below the lowest trained weight, which XLA also skips, are still counted.

  Args:
    c: The model config.
    params: The parameters (arrays or shapes), adapters included.
    frozen: Paths (``a/b/kernel``) of the frozen parameters (``TrainState.frozen``).
    batch_shapes: ``{key: (B, length)}`` of the family's token keys.
  """
  keys = families.get(c.family).token_keys
  frozen = set(frozen)
  total = 0.0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    is_adapter = lora.is_adapter(name)
    if not (is_adapter or name.endswith("kernel")
            or (c.tie_embeddings and name == "token_embed/embedding")):
      continue
    per_token = (4 if name in frozen else 6) if is_adapter else (-2 if name in frozen else 0)
    total += per_token * int(np.prod(leaf.shape)) * _tokens_through(name, keys, batch_shapes)
  return total


def tokens_per_batch(batch_shapes: Mapping[str, tuple[int, ...]]) -> int:
  """Token positions a batch feeds the model (encoder plus decoder for T5)."""
  keys = [k for k in ("inputs", "encoder_inputs", "decoder_inputs") if k in batch_shapes]
  return sum(int(np.prod(batch_shapes[k])) for k in keys)


def recompute_flops_per_token(c: ModelConfig, seq_len: int, causal: bool = True) -> float:
  """Forward FLOPs the backward pass recomputes under ``c.remat``, per token.

  ``full`` recomputes the layers' forward (not the logits); the ``dots_*``
  policies keep matmul outputs, except that ``dots_with_no_batch_dims_saveable``
  recomputes the attention einsums (they have batch dimensions).
  """
  weight_flops, attention_flops = forward_flops_per_token(c, seq_len, causal)
  if c.remat == "full":
    return weight_flops - 2.0 * c.embed_dim * c.vocab_size + attention_flops
  if c.remat == "dots_with_no_batch_dims_saveable":
    return attention_flops
  return 0.0


def param_count(c: ModelConfig, max_len: int | None = None) -> int:
  """Parameters of a decoder by hand (``Gpt`` in ``models/gpt.py``).

  Layers: q, k, v and out kernels with their biases, the norms (scale and
  bias for LayerNorm, scale for RMSNorm: two, four with post-norms; q/k
  norms), the MLP's kernels and biases; then the token table, learned
  positions (``max_len`` rows), the final norm and an untied output head.
  Tests check it against ``jax.eval_shape`` of the model.
  """
  d, kv_heads = c.embed_dim, c.num_kv_heads or c.num_heads
  biases = 0
  if c.attention_qkv_bias:
    biases += c.head_dim * (c.num_heads + 2 * kv_heads)
  if c.attention_out_bias:
    biases += d
  if c.mlp_bias:
    biases += (mlp_matrices(c) - 1) * c.mlp_dim + d
  norm = d * (2 if c.norm == "layernorm" else 1)
  per_layer = (matmul_params_per_layer(c, active=False) + biases + norm * (4 if c.post_norms else 2)
               + (2 * c.head_dim if c.qk_norm else 0))
  total = c.num_layers * per_layer + c.vocab_size * d + norm
  if c.position_embedding == "learned":
    total += (max_len or c.max_len) * d
  if not c.tie_embeddings:
    total += d * c.vocab_size
  return total


# One jitted function for every probe: the trainer re-probes during a run
# (``DevicePeak``), and a fresh ``jax.jit`` per call recompiled each time.
_jitted_matmul = jax.jit(jnp.matmul)


def time_matmul_tflops(dtype_name: str = "float32", n: int = 2048, repeats: int = 5,
                       reduce=min) -> float:
  """TFLOP/s of an n^3 jitted matmul on the default device, right now:
  ``reduce`` (min or statistics.median) over ``repeats`` timings."""
  a = jnp.ones((n, n), jnp.dtype(dtype_name))
  _jitted_matmul(a, a).block_until_ready()  # Compiles once per shape and dtype, then warms up.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    _jitted_matmul(a, a).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * n ** 3 / reduce(times) / 1e12


@functools.lru_cache(maxsize=None)
def measured_matmul_tflops(dtype_name: str = "float32") -> float:
  """The device's peak: the fastest of 5 timings (a peak should not count time
  lost to other processes on a shared machine), measured once per process."""
  return time_matmul_tflops(dtype_name)


def datasheet_peak_tflops(device_kind: str) -> float | None:
  """Dense bf16 peak TFLOP/s of a device kind (e.g. "NVIDIA H100 80GB HBM3"), if known."""
  kind = device_kind.lower()
  for name, tflops in KNOWN_PEAK_TFLOPS.items():
    if name in kind:
      return tflops
  return None


# /proc/cpuinfo flags, widest first, and the names a reader knows them by.
_VECTOR_ISAS = (("amx_tile", "AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2"), ("sve", "SVE"),
                ("asimd", "NEON"))


def cpu_summary(cpuinfo: str, cores: int) -> str:
  """"MODEL, N cores, ISA" from the text of Linux's /proc/cpuinfo (its first
  processor's model name and flags; ISA is the widest vector extension)."""
  model, cpu_flags = "", set()
  for line in cpuinfo.splitlines():
    key, _, value = (part.strip() for part in line.partition(":"))
    if key == "model name" and not model:
      model = value
    elif key in ("flags", "Features") and not cpu_flags:  # x86 / Arm.
      cpu_flags = set(value.split())
  isa = next((name for flag, name in _VECTOR_ISAS if flag in cpu_flags), "")
  parts = [model or platform.machine() or "unknown CPU", f"{cores} cores"] + ([isa] if isa else [])
  return ", ".join(parts)


def device_description(device: Any = None) -> str:
  """The device kind; for a CPU also the host's processor, cores and vector
  instructions: the same step differs several-fold between CPU hosts (the
  float32 matmul probe read 0.46 TFLOP/s on one 2-core development host,
  0.15 on another), so a CPU figure means little without them."""
  device = device or jax.devices()[0]
  if device.platform != "cpu":
    return device.device_kind
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      cpuinfo = f.read()
  except OSError:  # Not Linux: the model from the platform module.
    cpuinfo = f"model name: {platform.processor()}"
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return f"{device.device_kind} ({cpu_summary(cpuinfo, cores)})"


def peak_tflops_per_device(configured: float, dtype_name: str) -> tuple[float, str]:
  """(peak TFLOP/s, where it came from): configured, datasheet, or measured."""
  if configured > 0:
    return configured, "configured"
  kind = jax.devices()[0].device_kind.lower()
  datasheet = datasheet_peak_tflops(kind)
  if datasheet is not None:
    return datasheet, f"datasheet ({kind})"
  return (measured_matmul_tflops(dtype_name),
          f"measured {dtype_name} matmul on {device_description()}")


# A measured peak is re-probed at most this often (seconds) while training:
# a probe (four 2048^3 matmuls, compiled once) took 0.17-0.19 s on the
# development CPU, 0.3% of a run.
PROBE_EVERY_S = 60.0


class DevicePeak:
  """The per-device peak TFLOP/s that MFU divides by, and where it came from.

  A configured or datasheet peak is fixed. A measured one (CPUs, device kinds
  without a datasheet entry) is the best of matmul probes spread over the
  run: the start's, then one more at most every ``probe_every_s`` seconds
  when ``observe`` is called between steps. A probe taken while other
  processes load the machine comes out low (measured: 0.33 TFLOP/s at one
  start, 0.46 at another, float32 on the development CPU), and a single such
  probe made ``mfu`` read high (0.92 at 69 tokens/s for ``small``). A
  measured peak is also never below the model TFLOP/s a step achieved: that
  rate proves the device does at least as much, so MFU stays <= 1.
  """

  def __init__(self, configured: float, dtype_name: str,
               probe_every_s: float = PROBE_EVERY_S, probe=None, clock=time.monotonic):
    self.peak, self.source = peak_tflops_per_device(configured, dtype_name)
    self.measured = self.source.startswith("measured")
    if self.measured:
      self.source += ", the best of probes over the run"
    self._probe = probe or functools.partial(time_matmul_tflops, dtype_name, repeats=3)
    self._probe_every_s, self._clock = probe_every_s, clock
    self._last_probe = clock()

  def observe(self, achieved_tflops: float) -> float:
    """The peak to divide an interval's ``achieved_tflops`` by. For a
    measured peak this may first probe again: call it between steps,
    outside the timed interval."""
    if self.measured:
      if self._clock() - self._last_probe >= self._probe_every_s:
        self.peak = max(self.peak, self._probe())
        self._last_probe = self._clock()
      self.peak = max(self.peak, achieved_tflops)
    return self.peak
