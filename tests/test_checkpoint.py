"""Checkpoints: exact resume after SIGKILL / SIGTERM, resharding, corruption, NaNs, export."""
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time

import jax
import numpy as np
import pytest

from bigmodel import goodput
from bigmodel.errors import UserError
from commands import start_train
from model_fixtures import tiny_config

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HERE = os.path.dirname(os.path.abspath(__file__))

# A tiny model with dropout on real files, so resume must restore parameters,
# optimizer state, the dropout key and the data iterator's position.
_STEPS = 10
_RUN_ARGS = [
    "--config=configs/gpt.py:tiny", f"--config.train.steps={_STEPS}",
    "--config.train.log_every=1", "--config.train.eval_every=0",
    "--config.train.sample_tokens=0", "--config.train.batch_size=4",
    "--config.model.num_layers=2", "--config.model.embed_dim=64", "--config.model.num_heads=4",
    "--config.model.mlp_dim=128", "--config.model.max_len=32", "--config.model.vocab_size=512",
    "--config.model.dropout_rate=0.1", "--config.data.seq_len=32", "--config.data.vocab_size=400",
    "--config.checkpoint.save_every=2", "--config.train.progress=False",
]


@pytest.fixture(name="corpus", scope="module")
def fixture_corpus(tmp_path_factory):
  corpus = tmp_path_factory.mktemp("corpus")
  stdlib = sysconfig.get_paths()["stdlib"]
  for name in ("json/__init__.py", "json/decoder.py", "json/encoder.py", "json/scanner.py",
               "textwrap.py", "string.py", "bisect.py", "colorsys.py"):
    shutil.copy(os.path.join(stdlib, name), corpus / name.replace("/", "_"))
  return str(corpus)


def start_run(workdir, corpus, *extra):
  return start_train(f"--workdir={workdir}", *_RUN_ARGS, f"--config.data.paths={corpus}", *extra)


def finish(process, timeout=300):
  stdout, stderr = process.communicate(timeout=timeout)
  return process.returncode, stdout, stderr


def losses_by_step(workdir) -> dict[int, float]:
  """The last logged loss of every step (a resumed run re-logs some steps)."""
  losses = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if "loss" in record:
        losses[record["step"]] = record["loss"]
  return losses


def wait_for_step(workdir, step, process, timeout=300):
  deadline = time.time() + timeout
  path = os.path.join(workdir, "metrics.jsonl")
  while time.time() < deadline:
    assert process.poll() is None, process.communicate()[1][-3000:]
    if os.path.exists(path) and max(losses_by_step(workdir) or {0: 0}) >= step:
      return
    time.sleep(0.05)
  raise TimeoutError(f"step {step} not reached")


@pytest.fixture(name="reference_losses", scope="module")
def fixture_reference_losses(tmp_path_factory, corpus):
  workdir = tmp_path_factory.mktemp("reference")
  code, _, stderr = finish(start_run(workdir, corpus))
  assert code == 0, stderr[-3000:]
  losses = losses_by_step(workdir)
  assert sorted(losses) == list(range(1, _STEPS + 1))
  return losses


@pytest.mark.parametrize("kill_at", [3, 6])
def test_sigkill_then_resume_gives_identical_losses(tmp_path, corpus, reference_losses, kill_at):
  workdir = tmp_path / "run"
  process = start_run(workdir, corpus)
  wait_for_step(workdir, kill_at, process)
  process.send_signal(signal.SIGKILL)  # Often in the middle of an async save.
  process.wait()
  complete = [int(name) for name in os.listdir(workdir / "checkpoints") if name.isdigit()]
  code, stdout, stderr = finish(start_run(workdir, corpus))
  assert code == 0, stderr[-3000:]
  if complete:
    assert f"resuming from the checkpoint at step {max(complete)}" in stdout
  # Bit-for-bit on CPU: same parameters, optimizer state, dropout key and data order.
  assert losses_by_step(workdir) == reference_losses
  # The goodput report counts the steps the second run did again as lost.
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  first_run_steps = []  # Logged before the restart (a resume event, or steps going back).
  for r in records:
    if "resumed_from" in r or ("loss" in r and first_run_steps and r["step"] <= first_run_steps[-1]):
      break
    if "loss" in r:
      first_run_steps.append(r["step"])
  resumed_from = max(complete) if complete else 0
  redone = len([step for step in first_run_steps if step > resumed_from])
  report = goodput.report(str(workdir))
  assert report["ends"] == ["killed", "finished"] and report["sessions"] == 2
  # (Killed between a step's metrics line and its timeline line: one fewer.)
  assert report["lost_steps"] in (redone, redone - 1) and redone >= 1, (report, redone)
  assert (report["seconds"]["lost"] > 0) == (report["lost_steps"] > 0)
  assert abs(sum(report["seconds"].values()) - report["wall_seconds"]) < 1e-6


def test_sigterm_saves_and_exits_zero_then_resumes(tmp_path, corpus, reference_losses):
  workdir = tmp_path / "run"
  process = start_run(workdir, corpus)
  wait_for_step(workdir, 5, process)
  process.send_signal(signal.SIGTERM)
  code, stdout, stderr = finish(process)
  assert code == 0, stderr[-3000:]
  assert "preempted: saved the checkpoint at step" in stdout
  saved_step = int(stdout.split("preempted: saved the checkpoint at step")[1].split(";")[0])
  assert saved_step < _STEPS and os.path.isdir(workdir / "checkpoints" / str(saved_step))
  code, stdout, stderr = finish(start_run(workdir, corpus))
  assert code == 0, stderr[-3000:]
  assert f"resuming from the checkpoint at step {saved_step}" in stdout
  assert losses_by_step(workdir) == reference_losses


def test_corrupt_latest_falls_back_and_none_usable_is_an_error(tmp_path, corpus):
  workdir = tmp_path / "run"
  code, _, stderr = finish(start_run(workdir, corpus, "--config.train.steps=4"))
  assert code == 0, stderr[-3000:]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]

  def corrupt(step):
    for root, _, files in os.walk(workdir / "checkpoints" / str(step) / "state"):
      for name in files:
        path = os.path.join(root, name)
        with open(path, "r+b") as f:
          f.truncate(max(os.path.getsize(path) // 3, 1))

  corrupt(4)
  code, stdout, stderr = finish(start_run(workdir, corpus, "--config.train.steps=6"))
  assert code == 0, stderr[-3000:]
  assert "checkpoint at step 4 is unusable" in stdout
  assert "resuming from the checkpoint at step 2" in stdout
  assert os.path.isdir(workdir / "checkpoints_unusable" / "4")  # Moved aside, not deleted.

  for step in (2, 4, 6):
    if os.path.isdir(workdir / "checkpoints" / str(step)):
      corrupt(step)
  before = sorted(os.listdir(workdir / "checkpoints"))
  code, stdout, stderr = finish(start_run(workdir, corpus, "--config.train.steps=8"))
  assert code == 2
  assert stderr.strip().splitlines()[-1].startswith("error: no usable checkpoint in")
  assert sorted(os.listdir(workdir / "checkpoints")) == before


def test_restore_reshards_from_eight_to_four_to_one_device():
  out = subprocess.run([sys.executable, os.path.join(_HERE, "reshard_checkpoint.py")],
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["saved_shards"] == 8
  assert result["restored_shards"] == {"4": 2, "1": 1}
  assert result["max_abs_difference"] == 0.0


class _NanAt:
  """Wraps a train iterator so batch ``step`` has a NaN loss mask."""

  def __init__(self, inner, step):
    self.inner, self.step, self.count = inner, step, 0

  def __next__(self):
    batch = next(self.inner)
    self.count += 1
    if self.count == self.step:
      batch = dict(batch, loss_mask=np.full_like(batch["loss_mask"], np.nan))
    return batch

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


@pytest.mark.parametrize("policy", ["skip", "halt"])
def test_nonfinite_policy(tmp_path, policy):
  from bigmodel.train import Trainer  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  config.data.source = "synthetic"
  config.train.update(steps=6, log_every=2, eval_every=0, nonfinite=policy, progress=False)
  config.checkpoint.save_every = 2
  trainer = Trainer(config, str(tmp_path))
  trainer.datasets.train_iter = _NanAt(trainer.datasets.train_iter, step=3)
  if policy == "halt":
    with pytest.raises(UserError, match="non-finite.*halting"):
      trainer.run()
    # The step-2 checkpoint is there; nothing after the NaN was checkpointed.
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
    return
  metrics = trainer.run()
  assert metrics["nonfinite_steps"] == 1.0 and np.isfinite(metrics["loss"])
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4", "6"]


def test_sigterm_late_in_a_step_still_saves_what_it_announces(tmp_path, capsys):
  """A SIGTERM after a step decided not to save (here: from the metrics
  callback of step 5) is honoured at the next step, with a save."""
  from bigmodel.train import Trainer  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  config.data.source = "synthetic"
  config.train.update(steps=10, log_every=1, eval_every=0, sample_tokens=0, progress=False)
  config.checkpoint.save_every = 4

  def sigterm_at_step_5(step, record):  # pylint: disable=unused-argument
    if step == 5:
      os.kill(os.getpid(), signal.SIGTERM)

  Trainer(config, str(tmp_path), on_metrics=sigterm_at_step_5).run()
  assert "preempted: saved the checkpoint at step 6;" in capsys.readouterr().out
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "6"]


def test_export_params(tmp_path, corpus):
  workdir = tmp_path / "run"
  code, _, stderr = finish(start_run(workdir, corpus, "--config.train.steps=2"))
  assert code == 0, stderr[-3000:]
  out = tmp_path / "export"
  result = subprocess.run(
      [sys.executable, "-m", "bigmodel.export", f"--workdir={workdir}", f"--out={out}",
       "--dtype=bfloat16"], cwd=_ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  params = ocp.StandardCheckpointer().restore(str(out / "params"))
  leaves = jax.tree_util.tree_leaves(params)
  assert leaves and all(x.dtype == np.dtype("bfloat16") for x in leaves)
  assert json.loads((out / "config.json").read_text())["model"]["embed_dim"] == 64
  again = subprocess.run(
      [sys.executable, "-m", "bigmodel.export", f"--workdir={workdir}", f"--out={out}"],
      cwd=_ROOT, capture_output=True, text=True, timeout=300)
  assert again.returncode == 2 and "already exists" in again.stderr


def test_keeps_the_latest_and_the_best(tmp_path):
  from bigmodel import sharding  # pylint: disable=g-import-not-at-top
  from bigmodel import run as run_lib  # pylint: disable=g-import-not-at-top
  from bigmodel.models import build_model  # pylint: disable=g-import-not-at-top
  from bigmodel.optim import make_optimizer  # pylint: disable=g-import-not-at-top
  from bigmodel.state import create_sharded_state  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  model = build_model(config.model)
  optimizer, _ = make_optimizer(config.optim, 10)
  with sharding.activate(mesh):
    state, _ = create_sharded_state(config, model, optimizer, mesh)
  checkpointer = run_lib.checkpointer(str(tmp_path), keep=1, keep_best=True, async_save=False)
  for step, eval_loss in zip(range(1, 6), [3.0, 1.0, None, 2.0, 4.0]):
    checkpointer.save(step, state, {}, config,
                      metrics=None if eval_loss is None else {"eval_loss": eval_loss})
  checkpointer.wait()
  assert checkpointer.all_steps() == [2, 5]  # The best eval_loss, and the latest.
  checkpointer.close()
