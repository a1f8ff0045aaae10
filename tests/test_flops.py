"""The analytic FLOP and parameter counts (``bigmodel.flops``)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from bigmodel import flops, sharding
from bigmodel.models import ModelConfig, build_model
from bigmodel.optim import make_optimizer
from bigmodel.state import create_sharded_state
from bigmodel.train_step import jit_train_step
from configs.gpt import PRESETS, get_config
from model_fixtures import random_family_batch, tiny_config


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


def test_known_peaks(monkeypatch):
  # Lookup is by substring in table order: a name that contains an earlier
  # one (e.g. "tpu v5 lite" contains "tpu v5") would get the wrong peak, so
  # every entry must be found as itself inside a device kind string.
  for name, tflops in flops.KNOWN_PEAK_TFLOPS.items():
    assert flops.datasheet_peak_tflops(f"Vendor {name.upper()} 80GB") == tflops, name
  # Device kinds as JAX reports them; v5e is "TPU v5 lite", not v5p's 459.
  assert flops.datasheet_peak_tflops("TPU v5 lite") == 197.0
  assert flops.datasheet_peak_tflops("TPU v6 lite") == 918.0
  assert flops.datasheet_peak_tflops("cpu") is None
  # Precedence: configured, then the datasheet, then a measurement.
  monkeypatch.setattr(flops, "measured_matmul_tflops", lambda dtype: 7.5)
  assert flops.peak_tflops_per_device(123.0, "float32") == (123.0, "configured")
  peak, source = flops.peak_tflops_per_device(0.0, "float32")
  kind = jax.devices()[0].device_kind.lower()
  want = flops.datasheet_peak_tflops(kind)
  assert peak == (7.5 if want is None else want)
  assert source.startswith("measured float32" if want is None else "datasheet")


def test_measured_peak_is_the_best_probe_of_the_run_and_bounds_mfu(monkeypatch):
  """A start-up probe on a loaded machine comes out low: later probes (at most
  one per interval) and the steps' own rate raise the peak, never lower it."""
  monkeypatch.setattr(flops, "measured_matmul_tflops", lambda dtype: 0.1)
  monkeypatch.setattr(flops, "datasheet_peak_tflops", lambda kind: None)
  now, probes = [0.0], iter([0.3, 0.2])
  peak = flops.DevicePeak(0.0, "float32", probe_every_s=60.0, probe=lambda: next(probes),
                          clock=lambda: now[0])
  assert peak.measured and "best of probes over the run" in peak.source
  assert peak.observe(0.05) == 0.1
  now[0] = 59.0
  assert peak.observe(0.05) == 0.1    # No probe due yet.
  now[0] = 61.0
  assert peak.observe(0.05) == 0.3    # The quieter moment's probe.
  now[0] = 122.0
  assert peak.observe(0.05) == 0.3    # A lower probe does not lower it.
  assert peak.observe(0.4) == 0.4     # Nor can a step beat the peak: MFU <= 1.

  def never():
    raise AssertionError("a configured or datasheet peak is never probed")
  fixed = flops.DevicePeak(2.0, "float32", probe_every_s=0.0, probe=never)
  assert fixed.source == "configured" and fixed.observe(5.0) == 2.0


def test_trainer_mfu_uses_the_peak_and_logs_it(monkeypatch):
  """The trainer's metrics hook: a start-up probe far below what the steps
  achieve (a loaded machine at start) no longer gives MFU above 1."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from bigmodel.train_hooks import MetricsHook, StepOutcome  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(flops, "measured_matmul_tflops", lambda dtype: 1e-9)
  monkeypatch.setattr(flops, "datasheet_peak_tflops", lambda kind: None)
  train = ml_collections.ConfigDict(dict(log_every=1, nonfinite="skip", max_nonfinite=5))
  hook = MetricsHook(train, tokens_per_step=64, flops_per_step=1e9,
                     peak=flops.DevicePeak(0.0, "float32", probe=lambda: 1e-9),
                     nonfinite_at_start=0)
  metrics = {"loss": jnp.float32(1.0), "nonfinite_steps": jnp.int32(0),
             "nonfinite_in_a_row": jnp.int32(0)}
  records = []
  for step in (1, 2, 3):
    outcome = StepOutcome(step, None, metrics, is_last=step == 3, save=False)
    hook(outcome)
    records.append(outcome.record)
  for record in records[1:]:
    assert 0 < record["mfu"] <= 1.0, record
    assert record["peak_tflops_per_device"] >= record["tflops_per_device"] > 1e-9


def _small(family, **kwargs) -> ModelConfig:
  # D=8, N=2 heads of H=4, F=16, V=10, one layer (one decoder layer for T5).
  return ModelConfig(family=family, vocab_size=10, num_layers=1, num_heads=2, embed_dim=8,
                     mlp_dim=16, max_len=16, head_dim=4, **kwargs)


def test_gpt_step_flops_agree_with_the_per_token_count():
  c = ModelConfig.from_config(tiny_config().model)
  assert flops.train_flops_per_step(c, {"inputs": (3, 32)}) == 3 * 32 * flops.train_flops_per_token(c, 32)
  assert flops.tokens_per_batch({"inputs": (3, 32), "targets": (3, 32)}) == 96


def test_bert_counts_bidirectional_attention_and_its_head():
  # Per token: q, k, v, o 4*D*N*H = 256 and the MLP 2*D*F = 256 multiply-adds,
  # 6 tokens -> 3072; scores + weighted sum over all 6x6 pairs: 2*36*8 = 576.
  body_macs = 6 * (256 + 256) + 2 * 36 * 8
  # MLM head at each position: transform D*D = 64 and logits D*V = 80.
  assert flops.train_flops_per_step(_small("bert"), {"inputs": (2, 6)}) == \
      3 * 2 * 2 * (body_macs + 6 * (64 + 80))
  # Classification: pooler D*D and classifier D*C on the first token only.
  assert flops.train_flops_per_step(_small("bert", num_classes=3), {"inputs": (2, 6)}) == \
      3 * 2 * 2 * (body_macs + 64 + 8 * 3)


def test_t5_counts_encoder_decoder_and_cross_attention():
  s, t = 6, 4
  # Encoder token: q, k, v, o 256 and the gated MLP 3*D*F = 384; scores 2*S*S*N*H.
  encoder_macs = s * (256 + 384) + 2 * s * s * 8
  # Decoder token: self q, k, v, o 256, cross q, o 128, MLP 384; cross k, v on
  # the S encoder positions 2*D*N*H each; causal self scores (half of 2*T*T*N*H);
  # cross scores 2*T*S*N*H; logits D*V.
  decoder_macs = t * (256 + 128 + 384) + s * 128 + 2 * t * t * 8 // 2 + 2 * t * s * 8 + t * 80
  got = flops.train_flops_per_step(_small("t5"), {"encoder_inputs": (2, s),
                                                  "decoder_inputs": (2, t)})
  assert got == 3 * 2 * 2 * (encoder_macs + decoder_macs) == 109056
  assert flops.tokens_per_batch({"encoder_inputs": (2, s), "decoder_inputs": (2, t)}) == 20


def _compiled_step_flops(family, freeze="", lora_targets=""):
  """(XLA's FLOPs of a compiled train step, the analytic count with
  ``trainable_flops_correction``) of an unscanned tiny model (XLA counts a
  scanned stack's loop body once), batch 16 x 64."""
  c = tiny_config(family, scan=False)
  c.data.seq_len = c.model.max_len = 64
  c.optim.freeze = freeze
  if lora_targets:
    c.lora.update(rank=4, alpha=8.0, targets=lora_targets)
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
  model = build_model(c.model, c.lora, training=True)
  optimizer, schedule = make_optimizer(c.optim, 100)
  with sharding.activate(mesh):
    state, shardings = create_sharded_state(c, model, optimizer, mesh)
    step_fn = jit_train_step(model, optimizer, schedule, 1, mesh, shardings)
    batch = sharding.global_batch(
        random_family_batch(family, 16, 64, c.model.vocab_size, seed=0), mesh)
    xla = step_fn.lower(state, batch).compile().cost_analysis()["flops"]
  shapes = {k: v.shape for k, v in batch.items()}
  m = ModelConfig.from_config(c.model)
  return xla, flops.train_flops_per_step(m, shapes) + flops.trainable_flops_correction(
      m, state.params, state.frozen, shapes)


def test_frozen_weights_and_adapters_change_the_step_flops_as_xla_counts_them():
  xla_full, analytic_full = _compiled_step_flops("gpt")
  # Freezing the top layer drops exactly its kernels' weight gradients (every
  # activation gradient is still needed by the layer below): XLA's compiled
  # step loses what the correction subtracts (plus the skipped AdamW update,
  # 2% here).
  xla_top, analytic_top = _compiled_step_flops("gpt", freeze="blocks_1/")
  assert (xla_full - xla_top) / (analytic_full - analytic_top) == pytest.approx(1.0, abs=0.05)
  # LoRA: the frozen base's weight gradients go, the adapters' FLOPs come. XLA
  # also skips the first layer's input gradients (nothing below trains), which
  # the analytic count keeps: the ratios to full training agree to a few %.
  # (T5 measured alike: 0.755 vs 0.702.)
  xla_lora, analytic_lora = _compiled_step_flops("gpt", lora_targets="attn/(query|value)")
  assert analytic_lora / analytic_full == pytest.approx(xla_lora / xla_full, abs=0.05)
  assert analytic_lora / analytic_full < 0.8  # Not full training's count any more.


_XEON = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw amx_tile amx_bf16
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
"""


@pytest.mark.parametrize("cpuinfo, cores, expected", [
    (_XEON, 2, "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz, 2 cores, AMX"),
    (_XEON.replace(" avx512bw amx_tile amx_bf16", "").replace(" avx512f", ""), 16,
     "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz, 16 cores, AVX2"),
    ("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2\n", 2,
     "AMD EPYC, 2 cores, AVX2"),
    ("processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd sve\n", 4, "cores, SVE"),
])
def test_cpu_summary_names_model_cores_and_widest_vector_isa(cpuinfo, cores, expected):
  assert flops.cpu_summary(cpuinfo, cores).endswith(expected)


def test_a_cpu_device_description_names_its_host():
  described = flops.device_description(jax.devices("cpu")[0])
  assert described.startswith("cpu (") and " cores" in described
  peak, source = flops.peak_tflops_per_device(0.0, "float32")
  assert source == f"measured float32 matmul on {described}" and peak > 0
