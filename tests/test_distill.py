"""Knowledge distillation (``config.distill``): the loss, the frozen teacher,
checkpoints that point to it, and refused teachers."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from bigmodel import objectives, sharding
from bigmodel import run as run_lib
from bigmodel.errors import UserError
from bigmodel.models import build_model
from bigmodel.optim import make_optimizer
from bigmodel.train_step import jit_train_step
from bigmodel.state import create_sharded_state
from commands import assert_user_error, run_train
from model_fixtures import jit_objective, random_family_batch, tiny_config


@pytest.mark.parametrize("family", ["gpt", "bert", "t5"])
def test_kl_is_zero_for_the_teachers_own_weights_and_a_step_lowers_it(family):
  config = tiny_config(family)
  config.optim.update(learning_rate=1e-3, warmup_steps=0)
  model = build_model(config.model)
  objective = objectives.Distill(alpha=0.5, temperature=2.0, teacher_model=model)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  optimizer, schedule = make_optimizer(config.optim, 100)
  batch = random_family_batch(family, 4, config.data.seq_len, config.model.vocab_size, seed=0)
  with sharding.activate(mesh):
    state, shardings = create_sharded_state(config, model, optimizer, mesh)
    _, weights, extras = jit_objective(objective, model, state.params, batch, None,
                                       state.params)
    assert float(jax.numpy.abs(extras["distill_kl"] * weights).max()) < 1e-6
    # Another teacher (its weights perturbed): training on the KL alone moves
    # the student towards it.
    leaves, tree = jax.tree_util.tree_flatten(state.params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    teacher = [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    state = state.replace(reference=jax.tree_util.tree_unflatten(tree, teacher))
    shardings = shardings.replace(reference=shardings.params)
    kl_only = objectives.Distill(alpha=1.0, temperature=2.0, teacher_model=model)
    step_fn = jit_train_step(model, optimizer, schedule, 1, mesh, shardings, kl_only)
    kls = []
    for _ in range(4):
      state, metrics = step_fn(state, sharding.global_batch(batch, mesh))
      kls.append(float(metrics["distill_kl"]))
  assert kls[-1] < kls[0], kls


def _student_args(teacher, workdir):
  """A student half the teacher's width on the teacher's data and tokenizer."""
  saved = json.load(open(os.path.join(teacher, "config.json")))
  return ["--config=configs/distill.py:tiny", f"--workdir={workdir}",
          f"--config.distill.teacher={teacher}", f"--config.data.tokenizer={teacher}/tokenizer.model",
          f"--config.data.paths={saved['data']['paths']}",
          f"--config.data.seq_len={saved['data']['seq_len']}",
          f"--config.model.max_len={saved['model']['max_len']}",
          f"--config.model.vocab_size={saved['model']['vocab_size']}",
          "--config.model.num_layers=1", "--config.model.embed_dim=32",
          "--config.model.mlp_dim=64", "--config.train.batch_size=4",
          "--config.train.eval_steps=1", "--config.train.eval_every=0",
          "--config.train.sample_tokens=0", "--config.train.progress=False"]


def test_a_distilled_run_resumes_from_a_checkpoint_that_points_to_its_teacher(gpt_workdir,
                                                                             tmp_path):
  workdir = str(tmp_path / "student")
  args = _student_args(gpt_workdir, workdir)
  result = run_train(*args, "--config.train.steps=2")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"distilling from {gpt_workdir}" in result.stdout
  result = run_train(*args, "--config.train.steps=3", "--config.train.log_every=1")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resuming from the checkpoint at step 2" in result.stdout
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  last = [r for r in records if r.get("step") == 3 and "loss" in r][-1]
  # The logged loss is the mix of its parts (alpha 0.5, T 2).
  assert last["loss"] == pytest.approx(0.5 * 4 * last["distill_kl"] + 0.5 * last["task_loss"],
                                       rel=1e-4)
  # Evaluation is the student's own cross-entropy, the teacher's is not saved.
  assert last["eval_loss"] == pytest.approx(np.log(last["eval_perplexity"]), rel=1e-4)
  ckpt = run_lib.checkpointer(workdir, keep=1, read_only=True)
  (source,), digests = ckpt.base_sources(3), ckpt.saved_digests(3)
  ckpt.close()
  assert source["role"] == "teacher" and source["workdir"] == os.path.abspath(gpt_workdir)
  assert source["params"] == [] and source["reference"]
  assert not any(k.startswith(".reference") for k in digests)
  # The student alone loads without reading the teacher's arrays.
  student = run_lib.load_run(workdir)
  assert student.config.model.embed_dim == 32


def test_a_teacher_that_does_not_fit_is_one_error(gpt_workdir, tmp_path):
  workdir = tmp_path / "never"
  result = run_train(*_student_args(gpt_workdir, str(workdir)), "--config.model.vocab_size=300")
  assert_user_error(result, "has model.vocab_size=512, the student 300")
  assert not workdir.exists()


def test_a_student_needs_the_teachers_family_and_tokenizer(gpt_workdir, tmp_path):
  from bigmodel.config import base_config  # pylint: disable=g-import-not-at-top
  from bigmodel import distill  # pylint: disable=g-import-not-at-top
  config = base_config()
  saved = json.load(open(os.path.join(gpt_workdir, "config.json")))
  config.model.update(saved["model"])
  config.distill.teacher = gpt_workdir
  config.distill.alpha = 1.5
  with pytest.raises(UserError, match=r"distill.alpha must be in \[0, 1\]"):
    distill.validate(config)
  config.model.family = "bert"
  with pytest.raises(UserError, match="is a gpt model; the student is bert"):
    distill.teacher_config(config)
  config.model.family = "gpt"
  with pytest.raises(UserError, match="give the student the teacher's tokenizer"):
    distill.teacher_config(config)
  other = tmp_path / "other.model"
  other.write_bytes(b"another tokenizer")
  config.data.tokenizer = str(other)
  with pytest.raises(UserError, match="the token ids would not match"):
    distill.teacher_config(config)
  # The planner counts the teacher's parameters in the state.
  from bigmodel import memory  # pylint: disable=g-import-not-at-top
  config.data.tokenizer = os.path.join(gpt_workdir, "tokenizer.model")
  config.distill.alpha, config.model.embed_dim = 0.5, 32
  mesh = {"data": 1, "fsdp": 1, "tensor": 1}
  with_teacher = memory.state_bytes(config, mesh)[1]
  config.distill.teacher = ""
  teacher_bytes = sum(x.size * 4 for x in jax.tree_util.tree_leaves(
      run_lib.load_run(gpt_workdir).params))
  assert with_teacher - memory.state_bytes(config, mesh)[1] == teacher_bytes


def test_a_checkpoint_saved_before_the_distill_settings_existed_loads(gpt_workdir, tmp_path):
  old = str(tmp_path / "old")
  shutil.copytree(gpt_workdir, old)
  step = run_lib.load_run(old).step
  saved_config = os.path.join(old, "checkpoints", str(step), "config", "metadata")
  with open(saved_config) as f:
    config = json.load(f)
  for key in ("distill", "lm_eval", "wandb"):  # Settings this version added.
    config.pop(key, None)
  with open(saved_config, "w") as f:
    json.dump(config, f)
  run = run_lib.load_run(old)
  assert run.config.distill.teacher == "" and run.step == step
