"""LoRA adapters (every family) and frozen parameters: what trains, what stays put."""
import json
import os
import shutil
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigmodel import run as run_lib
from bigmodel import sharding
from bigmodel.errors import UserError
from bigmodel.models import build_model, lora
from bigmodel.optim import make_optimizer
from bigmodel.run import load_run
from bigmodel.state import create_sharded_state
from bigmodel.train_step import jit_train_step
from commands import ROOT, run_train
from model_fixtures import apply, init_params, random_family_batch, tiny_config


def _flat(tree):
  return flax.traverse_util.flatten_dict(tree, sep="/")


def _lora_config(family="llama", **lora_overrides):
  config = tiny_config(family)
  config.lora.update(**{"rank": 4, "alpha": 8.0, **lora_overrides})
  config.optim.update(learning_rate=1e-2, warmup_steps=0, weight_decay=0.1)
  return config


def _train(config, steps=3, family="llama"):
  """(first state's params, final state) after ``steps`` updates on random batches."""
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  model = build_model(config.model, config.lora, training=True)
  optimizer, schedule = make_optimizer(config.optim, 100)
  with sharding.activate(mesh):
    state, shardings = create_sharded_state(config, model, optimizer, mesh)
    first = jax.tree_util.tree_map(np.asarray, state.params)
    step_fn = jit_train_step(model, optimizer, schedule, 1, mesh, shardings)
    for i in range(steps):
      batch = sharding.global_batch(random_family_batch(
          family, 4, config.data.seq_len, config.model.vocab_size, seed=i), mesh)
      state, _ = step_fn(state, batch)
  return first, state


@pytest.mark.parametrize("family", ["llama", "bert", "t5"])
def test_fresh_adapters_leave_the_model_unchanged(family):
  """B starts at zero: a LoRA model's logits equal the base model's exactly,
  with adapters on the targeted layers of every family (T5: encoder and
  decoder self- and cross-attention)."""
  config = _lora_config(family, targets="attn/(query|value)|mlp/wo")
  base, adapted = build_model(config.model), build_model(config.model, config.lora)
  batch = random_family_batch(family, 2, config.data.seq_len, config.model.vocab_size, seed=0)
  from bigmodel.models import batch_logits  # pylint: disable=g-import-not-at-top
  from bigmodel.models.families import family_of  # pylint: disable=g-import-not-at-top
  params = sharding.strip_boxes(init_params(
      adapted, *family_of(adapted).example_inputs(adapted.config, 8)))
  adapters = sorted(n for n in _flat(params) if lora.is_adapter(n))
  kernels = {n.rsplit("_lora_", 1)[0] for n in adapters}
  assert all(n.split("/")[-2] in ("query", "value", "wo") for n in kernels), kernels
  if family == "t5":
    assert any("cross" in n for n in kernels) and any(n.startswith("decoder") for n in kernels)
  assert len(adapters) == 2 * len(kernels) > 0
  b = [x for n, x in _flat(params).items() if n.endswith("_lora_b")]
  assert all(not np.asarray(x).any() for x in b)
  logits = lambda model, p: jax.jit(lambda p: batch_logits(model, p, batch, rng=None))(p)  # noqa: E731
  want = logits(base, lora.without_adapters(params))
  got = logits(adapted, params)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_lora_trains_only_adapters_and_merges_exactly():
  config = _lora_config("llama")
  first, state = _train(config)
  before, after = _flat(first), _flat(state.params)
  adapters = [n for n in after if lora.is_adapter(n)]
  assert adapters and set(state.frozen) == set(after) - set(adapters)
  for name in state.frozen:  # The base model, bit for bit.
    assert np.asarray(after[name]).tobytes() == before[name].tobytes(), name
  assert all(not np.array_equal(after[n], before[n]) for n in adapters if n.endswith("_b"))
  # AdamW keeps two moments per adapter element, nothing for the base.
  moments = [x.size for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim]
  assert sum(moments) == 2 * sum(after[n].size for n in adapters)
  # The merged kernels compute what base + adapters compute.
  batch = random_family_batch("llama", 2, config.data.seq_len, config.model.vocab_size, seed=9)
  model = build_model(config.model, config.lora)
  merged = lora.merge(state.params, lora.scale(config.lora))
  assert not any(lora.is_adapter(n) for n in _flat(merged))
  plain = build_model(config.model)
  want = apply(model, state.params, batch["inputs"])
  got = apply(plain, merged, batch["inputs"])
  assert float(jnp.abs(want - apply(plain, lora.without_adapters(state.params),
                                    batch["inputs"])).max()) > 1e-3  # Adapters act.
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


def test_freeze_pattern_keeps_matching_parameters_and_gives_them_no_state():
  config = tiny_config("gpt")
  config.optim.update(freeze="token_embed|blocks/attn/", warmup_steps=0, learning_rate=1e-2)
  first, state = _train(config, family="gpt")
  before, after = _flat(first), _flat(state.params)
  frozen = {n for n in after if n.startswith("token_embed") or n.startswith("blocks/attn/")}
  assert set(state.frozen) == frozen and len(frozen) > 4
  for name in after:
    same = np.asarray(after[name]).tobytes() == before[name].tobytes()
    assert same == (name in frozen), name
  moments = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim)
  assert moments == 2 * sum(after[n].size for n in after if n not in frozen)


@pytest.mark.parametrize("overrides,optim,fragment", [
    (dict(targets="nothing_here"), {}, "matches no dense layer"),
    (dict(rank=64), {}, "lora.rank=64 is not below"),
    ({}, dict(freeze="no_such_parameter"), "matches no parameter"),
    ({}, dict(freeze="_lora_"), "every parameter is frozen"),
    (dict(targets="("), {}, "not a regular expression"),
    (dict(alpha=0.0), {}, "lora.alpha must be positive"),
])
def test_bad_lora_or_freeze_settings_are_one_error(overrides, optim, fragment):
  from bigmodel.config import validate  # pylint: disable=g-import-not-at-top
  config = _lora_config("llama", **overrides)
  config.optim.update(**optim)
  with pytest.raises(UserError, match=fragment):
    validate(config)
    _train(config, steps=0)


def test_lora_on_a_tied_token_table_is_refused():
  # GPT's logits use the token table: Qwix would adapt that matmul.
  config = tiny_config("gpt")
  config.lora.update(rank=4, alpha=8.0, targets="token_embed")
  with pytest.raises(UserError, match="matches token_embed/embedding: adapters go on dense"):
    _train(config, steps=0, family="gpt")


def test_lora_run_from_a_trained_run_then_merged_export(gpt_workdir, tmp_path):
  """Fine-tune a trained run with adapters, resume it, then read it merged:
  the base stays the trained run's, and the merged model (generation,
  evaluation, ``export --merge_lora``) computes what base + adapters do. The
  checkpoints hold the adapters only, with a pointer to the base checkpoint."""
  base_dir = str(tmp_path / "base")  # A copy: this test moves it.
  shutil.copytree(gpt_workdir, base_dir)
  gpt_workdir = base_dir
  workdir = str(tmp_path / "lora")
  args = ["--config=configs/gpt.py:tiny", f"--workdir={workdir}",
          f"--config.init_from={gpt_workdir}", "--config.lora.rank=4",
          "--config.lora.targets=attn/(query|value)|mlp", "--config.lora.dropout=0.1",
          "--config.train.batch_size=4", "--config.train.eval_steps=1",
          "--config.train.sample_tokens=8", "--config.train.progress=False",
          f"--config.data.tokenizer={gpt_workdir}/tokenizer.model", *_same_run(gpt_workdir)]
  result = run_train(*args, "--config.train.steps=2")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "kernel_lora_a" in result.stdout  # Named among the fresh parameters.
  result = run_train(*args, "--config.train.steps=4")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resuming from the checkpoint at step 2" in result.stdout

  base = load_run(gpt_workdir)
  adapted = load_run(workdir, merge_lora=False)
  merged = load_run(workdir)
  assert adapted.config.lora.rank == 4 and merged.config.lora.rank == 0
  for name, value in _flat(lora.without_adapters(adapted.params)).items():
    assert np.asarray(value).tobytes() == np.asarray(_flat(base.params)[name]).tobytes(), name
  tokens = jnp.asarray(random_family_batch("gpt", 2, 32, 400, seed=3)["inputs"])
  want = apply(adapted.model, adapted.params, tokens)
  np.testing.assert_allclose(apply(merged.model, merged.params, tokens), want, atol=2e-5)

  out = str(tmp_path / "export")
  result = run_module("bigmodel.export", f"--workdir={workdir}", f"--out={out}", "--merge_lora")
  assert result.returncode == 0, result.stderr[-3000:]
  exported = json.load(open(os.path.join(out, "config.json")))
  assert exported["lora"]["rank"] == 0

  # Only the adapters (and their optimizer state) were saved; the base is named.
  ckpt = run_lib.checkpointer(workdir, keep=1, read_only=True)
  (pointer,), digests = ckpt.base_sources(4), ckpt.saved_digests(4)
  ckpt.close()
  base_step = load_run(gpt_workdir).step
  assert pointer["workdir"] == os.path.abspath(gpt_workdir) and pointer["step"] == base_step
  assert pointer["params"] == sorted(_flat(lora.without_adapters(adapted.params)))
  saved_params = [k for k in digests if k.startswith(".params")]
  assert saved_params and all("_lora_" in k for k in saved_params), saved_params
  assert not any(k.startswith(".reference") for k in digests)
  # A base that is gone, or another checkpoint in its place: one error line each.
  os.rename(gpt_workdir, gpt_workdir + ".moved")
  with pytest.raises(UserError, match=rf"checkpoint {base_step} of .*base \(its init_from\), "
                                      "which is gone"):
    load_run(workdir)
  os.rename(gpt_workdir + ".moved", gpt_workdir)
  digests_file = os.path.join(gpt_workdir, "checkpoints", str(base_step), "digests", "metadata")
  with open(digests_file) as f:
    base_digests = json.load(f)
  base_digests[sorted(base_digests)[0]][0] += 1
  with open(digests_file, "w") as f:
    json.dump(base_digests, f)
  result = run_module("bigmodel.generate", f"--workdir={workdir}", "--prompt=a")
  assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: ")
  assert "has changed since" in result.stderr, result.stderr[-2000:]


def _same_run(workdir):
  """Flags for a run of ``workdir``'s model shapes on its data."""
  saved = json.load(open(os.path.join(workdir, "config.json")))
  return ([f"--config.model.{k}={saved['model'][k]}" for k in
           ("num_layers", "embed_dim", "num_heads", "mlp_dim", "vocab_size", "max_len")]
          + [f"--config.data.{k}={saved['data'][k]}" for k in ("seq_len", "paths")])


def run_module(module, *args):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)


def test_a_bad_lora_target_on_the_command_line_writes_nothing(tmp_path):
  workdir = tmp_path / "never"
  result = run_train("--config=configs/llama.py:tiny", f"--workdir={workdir}",
                     "--config.lora.rank=4", "--config.lora.targets=attention/nothing")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith("error: lora.targets=")
  assert not workdir.exists()
