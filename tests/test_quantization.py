"""Quantized training (QAT) and weight-only post-training quantization (PTQ) through Qwix."""
import json
import os
import subprocess
import sys

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import qwix

from bigmodel import checkpoint
from bigmodel import memory
from bigmodel import quantize
from bigmodel import run as run_lib
from bigmodel import sharding
from bigmodel.config import validate
from bigmodel.errors import UserError
from bigmodel.models import ModelConfig, batch_logits, build_model, quantization
from bigmodel.models.layers import DenseGeneral
from commands import ROOT, assert_user_error, xla_flags
from model_fixtures import random_batch, tiny_config

_ONE_DEVICE = dict(os.environ, XLA_FLAGS=xla_flags(1))
# Qwix's symmetric int8 bound (numerics.get_symmetric_bound): scale = absmax / 127.5.
_INT8_BOUND = 127.5


def _flat(tree):
  return flax.traverse_util.flatten_dict(tree, sep="/", is_leaf=lambda _, x: (
      quantization.is_quantized(x) or not isinstance(x, dict)))


def _model_cfg(**values):
  defaults = dict(quantization="none", quantize_activations=True, quantize_gradients=False)
  return ml_collections.ConfigDict({**defaults, **values})


# --- Every family's dense layers -------------------------------------------------------------

@pytest.mark.parametrize("name,overrides", [("gpt", dict(tie_embeddings=False)),
                                            ("llama", {}), ("bert", dict(num_classes=3)),
                                            ("t5", {})])
def test_every_dense_kernel_is_quantized_and_nothing_else(name, overrides):
  """The PTQ model (its abstract init: Qwix swaps what its rules match) holds
  every kernel quantized (DENSE_LAYERS covers the families' dense layers) and
  no embedding table, norm or bias."""
  config = tiny_config(name, weight_bits=8, **overrides)
  flat = _flat(quantization.abstract_boxed_params(build_model(config.model), 32))
  quantized = sorted(path for path, x in flat.items() if quantization.is_quantized(x))
  kernels = sorted(path for path in flat if path.endswith("/kernel"))
  assert quantized == kernels and kernels, (quantized, kernels)


# --- Quantized training ----------------------------------------------------------------------

class _Layer(nn.Module):
  """One dense layer named like an MLP's input projection (``mlp/wi``)."""

  @nn.compact
  def __call__(self, x):
    return DenseGeneral((64,), ("embed", "mlp"), use_bias=False, name="wi")(x)


def _dense_outputs(model_cfg, key=0):
  """(x [B, K], W [K, F], float x W, the QAT layer's output, QAT model, params)."""
  kx, kw = jax.random.split(jax.random.key(key))
  x_BxK = jax.random.normal(kx, (64, 256))
  w_KxF = 0.05 * jax.random.normal(kw, (256, 64))
  params = {"wi": {"kernel": w_KxF}}
  model = quantization.with_quantization(_Layer(), model_cfg, ("__call__",))
  quantized = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x_BxK)
  return x_BxK, w_KxF, x_BxK @ w_KxF, quantized, model, params


def test_int8_matmul_error_is_within_the_rounding_bound():
  """QAT's int8 matmul (weights per output column, activations per row):
  each operand is rounded to s * round(v / s) with s = absmax / 127.5 (the
  absmax element saturates at 127), so |dv| <= s / 2 elementwise and

      |y_hat - y|_ij <= s_w[j]/2 sum_k |x_ik| + s_x[i]/2 sum_k |w_kj| + K s_x[i] s_w[j] / 4.

  As rounding errors (~uniform, variance s^2 / 12) the typical error is
  sqrt(s_w[j]^2 sum_k x_ik^2 / 12 + s_x[i]^2 sum_k w_kj^2 / 12): the measured
  RMS is that (int8 granularity: int4 would be ~17x larger), a few 1/127 of
  the operands' scale."""
  x, w, y, y_hat, _, _ = _dense_outputs(_model_cfg(quantization="int8"))
  s_x = jnp.max(jnp.abs(x), axis=1, keepdims=True) / _INT8_BOUND  # [B, 1]
  s_w = jnp.max(jnp.abs(w), axis=0, keepdims=True) / _INT8_BOUND  # [1, F]
  bound = (s_w / 2 * jnp.abs(x).sum(1, keepdims=True) + s_x / 2 * jnp.abs(w).sum(0, keepdims=True)
           + x.shape[1] * s_x * s_w / 4)
  error = jnp.abs(y_hat - y)
  assert bool(jnp.all(error <= bound * (1 + 1e-5) + 1e-6))
  expected_rms = jnp.sqrt(jnp.mean(s_w ** 2 * (x ** 2).sum(1, keepdims=True) / 12
                                   + s_x ** 2 * (w ** 2).sum(0, keepdims=True) / 12))
  rms = jnp.sqrt(jnp.mean(error ** 2))
  assert 0.7 < float(rms / expected_rms) < 1.3, (float(rms), float(expected_rms))
  # Relative to the output: ~ a few / 127.
  assert 0.1 / _INT8_BOUND < float(rms / jnp.sqrt(jnp.mean(y ** 2))) < 5 / _INT8_BOUND


def test_qat_gradients_are_straight_through_and_fp8_runs():
  """Float gradients: Qwix's straight-through estimator with the float
  operands as residuals gives d sum(y) / dW = x^T 1 exactly; with
  ``quantize_gradients`` the backward pass is quantized too (close, not
  equal). fp8 (e4m3: 3 mantissa bits, relative rounding <= 1/16) runs on CPU."""
  x, w, y, _, model, params = _dense_outputs(_model_cfg(quantization="int8"))
  grad = lambda m: jax.grad(lambda p: m.apply({"params": p}, x).sum())(params)["wi"]["kernel"]  # pylint: disable=unnecessary-lambda-assignment
  float_grad = jnp.broadcast_to(x.sum(0)[:, None], w.shape)
  np.testing.assert_allclose(grad(model), float_grad, rtol=1e-5, atol=1e-4)
  _, _, _, _, bwd_model, _ = _dense_outputs(_model_cfg(quantization="int8",
                                                       quantize_gradients=True))
  bwd = grad(bwd_model)
  assert not np.allclose(bwd, float_grad, rtol=1e-6, atol=0)
  np.testing.assert_allclose(bwd, float_grad, rtol=0.05, atol=0.05 * float(jnp.abs(float_grad).max()))
  _, _, _, y_fp8, _, _ = _dense_outputs(_model_cfg(quantization="fp8"))
  relative = float(jnp.linalg.norm(y_fp8 - y) / jnp.linalg.norm(y))
  assert 1e-4 < relative < 1 / 16


def test_qat_steps_run_sharded_and_match_one_device():
  """int8 QAT train steps (scanned, rematerialised layers) run for GPT, BERT
  (fsdp 8) and T5 (data 4 x tensor 2) on 8 simulated devices, their programs
  hold int8 matmuls, and GPT's losses on data x fsdp x tensor = 2 x 2 x 2
  are its losses on one device (per-row and per-column scales do not depend
  on the layout; only float summation order does). Each extra compile costs
  seconds: the other families' single-device twins are left out."""
  runs = ["gpt", "gpt@2,2,2", "bert@1,8,1", "t5@4,1,2"]
  result = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "quantized_steps.py"),
                           *runs], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  for name in runs:
    assert out[name]["int8_matmuls"] and np.all(np.isfinite(out[name]["losses"])), name
  np.testing.assert_allclose(out["gpt@2,2,2"]["losses"], out["gpt"]["losses"], rtol=2e-4)


def test_config_checks():
  for values, fragment in [(dict(quantization="int4"), "is not one of: none, int8, fp8"),
                           (dict(weight_bits=3), "weight_bits=3 is not one of"),
                           (dict(weight_bits=8), "nothing trains")]:
    with pytest.raises(UserError, match=fragment):
      validate(tiny_config("gpt", **values))
  config = tiny_config("gpt", quantization="int8")
  config.lora.rank = 4
  with pytest.raises(UserError, match="does not combine with LoRA"):
    validate(config)


# --- Post-training quantization --------------------------------------------------------------

@pytest.fixture(name="quantized", scope="module")
def fixture_quantized(gpt_workdir, tmp_path_factory):
  """{8: int8 workdir, 4: int4 workdir (groups of 64)} of the session's GPT
  run: int8 in this process, int4 by the command line."""
  root = tmp_path_factory.mktemp("quantized")
  out = {8: str(root / "int8"), 4: str(root / "int4")}
  quantize.quantize_run(gpt_workdir, out[8], 8)
  result = subprocess.run([sys.executable, "-m", "bigmodel.quantize", f"--workdir={gpt_workdir}",
                           f"--out={out[4]}", "--bits=4", "--group_size=64"], cwd=ROOT,
                          env=_ONE_DEVICE, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "as int4" in result.stdout
  return out


@pytest.fixture(name="runs", scope="module")
def fixture_runs(gpt_workdir, quantized):
  """{0: the float run, 8: its int8 copy, 4: its int4 copy}, loaded."""
  return {0: run_lib.load_run(gpt_workdir), **{bits: run_lib.load_run(workdir)
                                               for bits, workdir in quantized.items()}}


def _forward(model):
  return jax.jit(lambda p, b: batch_logits(model, p, b, rng=None))


def _dequantized(params):
  """The float parameters a quantized tree stands for (Qwix's dequantize
  broadcasts the scales over stacked layers and groups alike)."""
  return jax.tree_util.tree_map(
      lambda x: qwix.dequantize(x.array) if quantization.is_quantized(x) else x,
      params, is_leaf=quantization.is_quantized)


def test_ptq_logits_close_to_float_int4_looser(runs):
  """On the trained GPT: int8 logits within 2% of float's (relative RMS),
  int4 in groups of 64 within 25% and strictly worse. A weight rounds by at
  most half a step, absmax / 255 (int8) or absmax / 15 (int4), uniformly:
  an RMS of step / sqrt(12), i.e. ~0.7% (int8) and ~10% (int4) of the RMS of
  near-Gaussian weights (absmax ~ 2.5-3 RMS), which the logits inherit
  (measured 0.5% and 8%). The PTQ model computes exactly the float model on
  the dequantized kernels: Qwix dequantizes inside the jitted step."""
  batch = random_batch(4, 64, 400, seed=3)
  float_forward = _forward(runs[0].model)
  reference = float_forward(runs[0].params, batch)
  errors, logits = {}, {}
  for bits in (8, 4):
    assert runs[bits].config.model.weight_bits == bits
    logits[bits] = _forward(runs[bits].model)(runs[bits].params, batch)
    errors[bits] = float(jnp.linalg.norm(logits[bits] - reference) / jnp.linalg.norm(reference))
  # The quantized model is the float model on the dequantized weights (int4:
  # groups, and the attention output's groups of whole heads).
  np.testing.assert_allclose(logits[4], float_forward(_dequantized(runs[4].params), batch),
                             rtol=1e-4, atol=1e-4)
  assert 0 < errors[8] < 0.02, errors
  assert errors[8] < errors[4] < 0.25, errors


def test_ptq_checkpoint_is_smaller_and_sharded_like_float(runs, quantized):
  """Dense kernels: int8 per channel ~4x, int4 in groups of 64 ~7x smaller than
  float32 (qvalues 1 and 1/2 byte, float32 scales); every qvalue sharded like
  its float kernel; the planner's generation/eval bytes are these exactly."""
  float_run = runs[0]
  float_kernels = quantization.param_bytes(float_run.params, kernels_only=True)
  float_flat = _flat(float_run.params)
  for bits, low, high in ((8, 3.5, 4.0), (4, 6.5, 8.0)):
    run = runs[bits]
    ratio = float_kernels / quantization.param_bytes(run.params, kernels_only=True)
    assert low < ratio < high, (bits, ratio)
    for path, x in _flat(run.params).items():
      if quantization.is_quantized(x):
        assert x.array.qvalue.dtype == quantization.WEIGHT_TYPES[bits]
        assert x.array.qvalue.sharding.spec == float_flat[path].sharding.spec, path
    one = dict(data=1, fsdp=1, tensor=1)
    config = ml_collections.ConfigDict(float_run.config.to_dict())
    assert memory.inference_param_bytes(
        config, one, bits, run.config.model.weight_group_size) == quantization.param_bytes(
            run.params)
  disk = {bits: sum(os.path.getsize(os.path.join(d, f)) for d, _, files in
                    os.walk(run_lib.RunDir(quantized[bits]).checkpoints) for f in files)
          for bits in quantized}
  assert disk[4] < disk[8] < quantization.param_bytes(float_run.params), disk


def test_quantized_workdir_evaluates_and_generates(gpt_workdir, quantized):
  """``bigmodel.evaluate`` and ``bigmodel.generate`` load a quantized workdir
  directly, with its own copy of the run's tokenizer."""
  from bigmodel.evaluate import evaluate_run  # pylint: disable=import-outside-toplevel
  float_loss = evaluate_run(gpt_workdir)[0]["eval_loss"]
  int8_loss = evaluate_run(quantized[8])[0]["eval_loss"]
  assert abs(int8_loss / float_loss - 1) < 0.01
  assert os.path.isfile(run_lib.RunDir(quantized[4]).tokenizer_model)
  result = subprocess.run([sys.executable, "-m", "bigmodel.generate", f"--workdir={quantized[4]}",
                           "--prompt=def ", "--max_new_tokens=8"], cwd=ROOT, env=_ONE_DEVICE,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]


def test_bad_input_is_one_error_before_reading(gpt_workdir, quantized, tmp_path, monkeypatch):
  """Bits other than 8 / 4 (the command: one error line, exit 2), a group size
  that cannot tile a kernel, an existing --out, an already quantized run:
  refused before the checkpoint is read, nothing written."""
  out = str(tmp_path / "q")
  result = subprocess.run([sys.executable, "-m", "bigmodel.quantize", f"--workdir={gpt_workdir}",
                           f"--out={out}", "--bits=3"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
  assert_user_error(result, "--bits=3")
  assert not os.path.exists(out)

  def no_reading(*args, **kwargs):
    raise AssertionError("the checkpoint was read")

  monkeypatch.setattr(run_lib, "load_run", no_reading)
  for bits, group, fragment in [(4, 48, "does not divide model.embed_dim=64"),
                                (8, -1, "must be >= 0")]:
    with pytest.raises(UserError, match=fragment):
      quantize.quantize_run(gpt_workdir, out, bits, group)
  assert not os.path.exists(out)
  os.makedirs(out)
  with pytest.raises(UserError, match="already exists"):
    quantize.quantize_run(gpt_workdir, out, 8)
  with pytest.raises(UserError, match="already weight-quantized"):
    quantize.quantize_run(quantized[8], str(tmp_path / "again"), 8)
  assert not os.path.exists(tmp_path / "again")
  # The attention output's input is N x H = 3 x 16: groups within a head, or
  # of whole heads (48), not 32 (two heads split unevenly).
  c = ModelConfig.from_config(tiny_config("gpt", num_heads=3, head_dim=16, embed_dim=96,
                                          mlp_dim=96).model)
  assert "attention output" in quantization.group_size_problem(c, 32)
  assert not quantization.group_size_problem(c, 48)
  assert not quantization.group_size_problem(c, 8)


def test_training_refuses_a_quantized_checkpoint(quantized):
  """Resuming it, or starting from it (init_from): one UserError each."""
  with pytest.raises(UserError, match="weight-quantized"):
    checkpoint.check_resumable(run_lib.RunDir(quantized[8]).checkpoints)
  config = tiny_config("gpt")
  config.init_from = quantized[8]
  with pytest.raises(UserError, match="weight-quantized"):
    validate(config)
  with pytest.raises(UserError, match="weight-quantized"):
    run_lib.restore_params(quantized[8], sharding.make_mesh(config.mesh, jax.devices()[:1]))


def test_exports_refuse_quantized_weights(runs, tmp_path):
  """Float exports of a quantized run would need the scales it keeps apart."""
  from bigmodel.hf.interop import export_hf  # pylint: disable=g-import-not-at-top
  from bigmodel.hf.peft import export_peft  # pylint: disable=g-import-not-at-top
  with pytest.raises(UserError, match="8-bit quantized weights .* --to_hf needs float"):
    export_hf(runs[8].workdir, str(tmp_path / "hf"))
  with pytest.raises(UserError, match="8-bit quantized weights .* --to_peft needs float"):
    export_peft(runs[8].workdir, str(tmp_path / "peft"))
  # bigmodel.export defines its flags on import: its command line, in a process of its own.
  result = subprocess.run([sys.executable, "-m", "bigmodel.export", f"--workdir={runs[8].workdir}",
                           f"--out={tmp_path / 'params'}"], cwd=ROOT, env=_ONE_DEVICE,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and "bigmodel.export needs float weights" in result.stderr
  assert not os.listdir(tmp_path)
