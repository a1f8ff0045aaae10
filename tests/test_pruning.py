"""Magnitude and N:M pruning: the schedule, exact zeros through updates and a
restore, the 2:4 pattern, sharded masks, the planner, bad settings, the CLI."""
import ast
import json
import os
import re
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigmodel import api, memory, pruning, sharding
from bigmodel import run as run_lib
from bigmodel.config import validate
from bigmodel.errors import UserError
from bigmodel.models import build_model
from bigmodel.optim import make_optimizer
from bigmodel.state import TrainState, abstract_sharded_state
from commands import ROOT, run_train, xla_flags
from model_fixtures import tiny_config

_STEPS = 10
_KERNELS = ("attn/query", "attn/key", "attn/value", "attn/out", "mlp/wi", "mlp/wo")


def _flat(tree):
  return flax.traverse_util.flatten_dict(tree, sep="/")


def _config(**prune):
  config = tiny_config("gpt")
  config.optim.update(learning_rate=1e-2, warmup_steps=0, weight_decay=0.1)  # Decay on.
  config.prune.update(**prune)
  return config


def _setup(config):
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  model = build_model(config.model, training=True)
  optimizer, _ = make_optimizer(config.optim, _STEPS, config.prune)
  return mesh, model, optimizer


def _optimizer_run(optimizer, config, rng):
  """(params, opt_state, jitted update(params, opt_state, grads)): random weights
  of the model's shapes, the optimizer state built as the trainer builds it
  (on parameters boxed with their logical axes). Compiling the optimizer alone
  keeps these tests fast; the CLI test runs the trainer's step."""
  normal = lambda x: rng.normal(size=x.shape).astype(np.float32)  # noqa: E731
  boxed = jax.tree_util.tree_map(normal, memory.boxed_state(config).params)  # Boxes kept.

  @jax.jit
  def update(params, opt_state, grads):
    params, opt_state, _ = optimizer.apply(grads, opt_state, params)
    return params, opt_state

  return (sharding.strip_boxes(boxed), sharding.strip_boxes(optimizer.init(boxed)), update,
          boxed)


def _kernels(params):
  return {n: np.array(x) for n, x in _flat(params).items() if n.endswith("/kernel")}


@pytest.fixture(name="magnitude_run", scope="module")
def fixture_magnitude_run(tmp_path_factory):
  """60% magnitude pruning from step 2 to 8, masks every 3 steps, AdamW with
  weight decay on random gradients: each step's kernels and sparsity metric;
  and the same run saved at step 5, restored in-process (the trainer's
  Checkpointer and restore target) and finished on the same gradients."""
  config = _config(method="magnitude", sparsity=0.6, start_step=2, end_step=8, every=3)
  mesh, model, optimizer = _setup(config)
  rng = np.random.default_rng(0)
  params, opt_state, update, _ = _optimizer_run(optimizer, config, rng)
  grads = {step: jax.tree_util.tree_map(lambda x: rng.normal(size=x.shape).astype(np.float32),
                                        params) for step in range(1, _STEPS + 1)}
  ckpt = run_lib.checkpointer(str(tmp_path_factory.mktemp("pruned")), keep=1, async_save=False)
  kernels, metrics, restored = {}, {}, None
  for step in range(1, _STEPS + 1):
    params, opt_state = update(params, opt_state, grads[step])
    kernels[step] = _kernels(params)
    metrics[step] = float(pruning.step_metrics(opt_state)["sparsity"])
    if step == 5:
      ckpt.save(step, TrainState(step=jnp.int32(step), params=params, opt_state=opt_state,
                                 rng=jax.random.key(0)), {}, config)
      with sharding.activate(mesh):
        abstract_state, _ = abstract_sharded_state(config, model, optimizer, mesh)
      restored, _ = ckpt.restore(5, abstract_state)
    elif step > 5:
      restored = restored.replace(
          **dict(zip(("params", "opt_state"),
                     update(restored.params, restored.opt_state, grads[step]))))
  ckpt.close()
  return config, kernels, metrics, opt_state, restored


def test_cubic_schedule_against_a_hand_computation():
  # Zhu & Gupta with s_i = 0: s_t = s_f (1 - (1 - (t - t0) / (t_end - t0))^3).
  assert float(pruning.cubic_sparsity(3, 0.5, 0, 6)) == pytest.approx(0.5 * (1 - 0.5**3))
  assert float(pruning.cubic_sparsity(0, 0.5, 0, 6)) == 0.0
  assert float(pruning.cubic_sparsity(9, 0.5, 0, 6)) == pytest.approx(0.5)
  assert float(pruning.cubic_sparsity(4, 0.8, 4, 4)) == pytest.approx(0.8)  # One step.
  cfg = _config(method="magnitude", sparsity=0.6, start_step=2, end_step=8, every=3).prune
  # Masks change at steps 2 (s = 0), 5 and 8 (end_step), and hold in between.
  updates = [t for t in range(1, 12) if bool(pruning.is_update_step(t, cfg, _STEPS))]
  assert updates == [2, 5, 8]
  want = {1: 0.0, 4: 0.0, 5: 0.6 * (1 - 0.5**3), 7: 0.525, 8: 0.6, 11: 0.6}
  for step, sparsity in want.items():
    assert pruning.sparsity_after(step, cfg, _STEPS) == pytest.approx(sparsity), step
  cfg.end_step = 0  # 0 = train.steps.
  assert pruning.sparsity_after(_STEPS, cfg, _STEPS) == pytest.approx(0.6)
  assert pruning.sparsity_after(_STEPS - 1, cfg, _STEPS) < 0.6


def test_sparsity_follows_the_schedule_layer_by_layer(magnitude_run):
  config, kernels, metrics, _, _ = magnitude_run
  for step, by_name in kernels.items():
    want = pruning.sparsity_after(step, config.prune, _STEPS)
    zeros = total = 0
    for name, w in by_name.items():
      per_layer = w[0].size
      # Each layer pruned to its own round(s * size): exact, not approximate.
      expected = int(np.floor(np.float32(want) * per_layer + 0.5))
      assert [(layer == 0).sum() for layer in w] == [expected] * len(w), (step, name)
      zeros, total = zeros + (w == 0).sum(), total + w.size
    assert metrics[step] == pytest.approx(zeros / total, abs=1e-6), step
    # Off by at most half an element of the smallest layer.
    assert abs(metrics[step] - want) <= 0.5 / min(w[0].size for w in by_name.values()), step
  assert metrics[1] == metrics[4] == 0.0  # Exactly: counted, not 1 - kept fraction.
  assert metrics[_STEPS] == pytest.approx(0.6, abs=1e-3)


def test_pruned_weights_stay_exactly_zero_through_updates_and_a_restore(magnitude_run):
  _, kernels, _, opt_state, restored = magnitude_run
  for step in range(2, _STEPS + 1):  # Once pruned, zero at every later step (decay on).
    for name, w in kernels[step].items():
      assert not w[kernels[step - 1][name] == 0].any(), (step, name)
  final = kernels[_STEPS]
  assert all(not np.array_equal(kernels[8][n], w) for n, w in final.items())  # Still training.
  for name, w in final.items():
    np.testing.assert_array_equal(w == 0, kernels[8][name] == 0)
  # The masks live in the optimizer state, so the restored run is the same run.
  after_restore = _kernels(restored.params)
  for name, w in final.items():
    assert after_restore[name].tobytes() == w.tobytes(), name
  masks = lambda s: [np.array(m.keep) for m in jax.tree_util.tree_leaves(  # noqa: E731
      pruning.find_state(s).masks, is_leaf=pruning._is_mask)]  # pylint: disable=protected-access
  assert all(np.array_equal(a, b) for a, b in zip(masks(opt_state), masks(restored.opt_state)))


def test_two_of_four_along_each_kernels_input_dimension():
  """The optimizer alone, on random weights and gradients (the model's own
  shapes and logical axes): the pattern holds after it is applied and after
  further updates; the report agrees."""
  config = _config(method="n_m", n=2, m=4, start_step=1)
  _, _, optimizer = _setup(config)
  rng = np.random.default_rng(0)
  params, opt_state, update, boxed = _optimizer_run(optimizer, config, rng)
  for _ in range(3):
    params, opt_state = update(params, opt_state, jax.tree_util.tree_map(
        lambda x: rng.normal(size=x.shape).astype(np.float32), params))
  assert float(pruning.step_metrics(opt_state)["sparsity"]) == 0.5
  kernels = _kernels(params)
  # [L, D, ...] inputs along D (axis 1); the attention output [L, N, H, D] along H.
  axes = {"attn/query": 1, "attn/key": 1, "attn/value": 1, "attn/out": 2, "mlp/wi": 1,
          "mlp/wo": 1}
  for short, axis in axes.items():
    w = kernels[f"blocks/{short}/kernel"]
    groups = w.reshape(w.shape[:axis] + (w.shape[axis] // 4, 4) + w.shape[axis + 1:])
    assert ((groups != 0).sum(axis=axis + 1) == 2).all(), short
  report = pruning.sparsity_report(params, boxed, config.prune)
  assert report.count("2:4 ok") == len(_KERNELS) and "0 groups break 2:4" in report


def test_masks_are_sharded_like_their_kernels_and_counted_by_the_planner():
  config = _config(method="magnitude")
  mesh_shape = dict(data=1, fsdp=4, tensor=2)
  boxed = memory.boxed_state(config)
  shardings = sharding.logical_to_shardings(boxed, memory.abstract_mesh(mesh_shape))
  params = _flat(shardings.params)
  found = 0
  for path, mask in jax.tree_util.tree_flatten_with_path(
      pruning.find_state(shardings.opt_state).masks)[0]:
    name = sharding.path_name(path).rsplit("/", 1)[0]  # .../kernel/keep -> .../kernel
    assert mask.spec == params[name].spec, name
    found += 1
  assert found == len(_KERNELS)
  assert any(m.spec != jax.sharding.PartitionSpec() for m in params.values())
  # One byte per targeted weight (bool masks) plus the step count and sparsity.
  targeted = sum(x.size for n, x in _flat(sharding.strip_boxes(boxed.params)).items()
                 if n.endswith("/kernel"))
  one = dict(data=1, fsdp=1, tensor=1)
  dense = memory.state_bytes(_config(), one)[2]
  assert memory.state_bytes(config, one)[2] - dense == targeted + 8


_COLLECTIVES = r"""
import re, sys
sys.path.insert(0, "tests")
import jax
from model_fixtures import tiny_config
from bigmodel import memory, sharding
from bigmodel.optim import make_optimizer
for method in ("magnitude", "n_m"):
  c = tiny_config("gpt")
  c.mesh.update(data=1, fsdp=4, tensor=2)
  c.prune.method = method
  mesh = sharding.make_mesh(c.mesh)
  optimizer, _ = make_optimizer(c.optim, 10, c.prune)
  boxed = memory.boxed_state(c)
  shardings = sharding.logical_to_shardings(boxed, mesh)
  abstract = lambda tree, s: jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, s)
  params = abstract(sharding.strip_boxes(boxed.params), shardings.params)
  opt_state = abstract(sharding.strip_boxes(boxed.opt_state), shardings.opt_state)
  with sharding.activate(mesh):
    apply = lambda grads, state, params: optimizer.apply(grads, state, params)[:2]
    hlo = jax.jit(apply, out_shardings=(shardings.params, shardings.opt_state)).lower(
        params, opt_state, params).compile().as_text()
  # (opcode, the shapes of its results) of every collective.
  ops = re.findall(r"= (.*?) (all-gather|all-to-all|collective-permute|reduce-scatter|"
                   r"all-reduce)(?:-start)?\(", hlo)
  print(method, sorted((kind, re.findall(r"\w+\[[\d,]*\]", shapes)) for shapes, kind in ops))
"""


def test_pruning_gathers_nothing_on_eight_devices():
  """The optimizer update compiled on 8 devices (fsdp 4 x tensor 2), its state
  kept in place: no all-gather, all-to-all, permute or reduce-scatter; the
  only collectives are all-reduces of scalars (the gradient norm, the finite
  check, the sparsity) and of magnitude's per-layer counts [L] (bisection)."""
  result = subprocess.run([sys.executable, "-c", _COLLECTIVES], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(
                              os.environ, XLA_FLAGS=xla_flags(8)))
  assert result.returncode == 0, result.stderr[-3000:]
  ops = {line.split(" ", 1)[0]: ast.literal_eval(line.split(" ", 1)[1])
         for line in result.stdout.splitlines()}
  assert set(ops) == {"magnitude", "n_m"}
  for method, found in ops.items():
    assert found and {kind for kind, _ in found} == {"all-reduce"}, (method, found)
    shapes = {shape for _, result in found for shape in result}
    assert all(re.fullmatch(r"\w+\[2?\]", shape) for shape in shapes), (method, shapes)
  assert any("s32[2]" in result for _, result in ops["magnitude"])


@pytest.mark.parametrize("prune,fragment", [
    (dict(method="magnitude", sparsity=1.0), "prune.sparsity must be in [0, 1), got 1.0"),
    (dict(method="magnitude", sparsity=-0.1), "prune.sparsity must be in [0, 1)"),
    (dict(method="n_m", n=4, m=4), "needs 1 <= n < m"),
    (dict(method="magnitude", start_step=8, end_step=4), "prune.end_step=4 is before"),
    (dict(method="magnitude", start_step=2000), "(train.steps) is before prune.start_step=2000"),
    (dict(method="magnitude", every=0), "prune.every must be >= 1"),
    (dict(method="magnitude", targets="("), "is not a regular expression"),
    (dict(method="structured"), "is not one of"),
    (dict(method="magnitude", targets="no_such_kernel"), "matches no trainable parameter"),
    (dict(method="magnitude", targets="ln_attn/scale"), "which is not a matrix"),
    (dict(method="n_m", n=2, m=32),
     "prune.m=32 does not divide the input dimension of blocks/attn/out/kernel"),
    (dict(method="n_m", n=1, m=3), "prune.m=3 does not divide"),
])
def test_bad_pruning_settings_are_one_error(prune, fragment):
  config = _config(**prune)
  with pytest.raises(UserError, match=re.escape(fragment)):
    validate(config)
    mesh, model, optimizer = _setup(config)  # Those that need the parameters' shapes.
    with sharding.activate(mesh):
      abstract_sharded_state(config, model, optimizer, mesh)


def test_a_bad_setting_stops_the_trainer_before_it_writes(tmp_path):
  config = _config(method="magnitude", targets="nothing_matches")
  config.data.vocab_size = 100  # A tokenizer the tiny model fits.
  workdir = str(tmp_path / "run")
  with pytest.raises(UserError, match="prune.targets='nothing_matches' matches no trainable"):
    api.train(config, workdir)
  assert not os.path.exists(workdir)


def test_cli_run_logs_sparsity_and_reports_it(tmp_path, tokenizer_file):
  workdir = str(tmp_path / "run")
  args = ["--config=configs/gpt.py:tiny", f"--workdir={workdir}", "--config.train.steps=4",
          "--config.train.batch_size=4", "--config.train.log_every=2",
          "--config.train.eval_steps=1", "--config.train.sample_tokens=0",
          "--config.train.progress=False", "--config.model.num_layers=2",
          "--config.model.embed_dim=64", "--config.model.num_heads=4",
          "--config.model.mlp_dim=128", "--config.model.max_len=32",
          "--config.model.vocab_size=512", "--config.data.seq_len=32",
          f"--config.data.tokenizer={tokenizer_file}", "--config.data.paths=" + os.path.join(
              os.path.dirname(json.__file__)), "--config.prune.method=magnitude",
          "--config.prune.end_step=2", "--config.prune.every=1"]
  result = run_train(*args)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if '"loss"' in line]
  assert [r["step"] for r in records] == [2, 4]
  assert all(r["sparsity"] == pytest.approx(0.5, abs=1e-6) for r in records)
  report = pruning.run_report(workdir)  # What export --sparsity_report prints.
  rows = [line for line in report.splitlines() if line.startswith("blocks/")]
  assert len(rows) == len(_KERNELS) and all(" 0.5000 " in row for row in rows), report
  assert report.startswith(f"step 4 of {workdir}") and "total: 0.5000 of" in report
