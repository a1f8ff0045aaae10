"""Training never loses a checkpoint, refuses bad input in one line, and survives accidents.

One case per item of the reliability issue that concerns training and
checkpoints: keep < 1, two trainers on one workdir, refused commands and
config.json, network-backed tfds names, corrupt arrays and data states,
setting aside the same step twice, diverged runs, Ctrl-C and early SIGTERM,
a full disk, resuming with a changed config, and the default config on two
processes.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bigmodel import checkpoint
from bigmodel import run as run_lib
from bigmodel.errors import UserError
from bigmodel.state import TrainState
from model_fixtures import tiny_config
from commands import assert_user_error, flip_a_stored_bit, run_train, start_train

# The workdir lock (bigmodel/run_lock.py), by name so that this file also runs,
# and fails case by case, on code from before the lock existed.
_LOCK_FILE = "run.lock"
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LAUNCHER = os.path.join(_ROOT, "launch", "local.py")
_ARGS = [
    "--config=configs/gpt.py:tiny", "--config.train.log_every=1", "--config.train.eval_every=0",
    "--config.train.sample_tokens=0", "--config.train.batch_size=4",
    "--config.model.num_layers=1", "--config.model.embed_dim=32", "--config.model.num_heads=2",
    "--config.model.mlp_dim=64", "--config.model.max_len=32", "--config.model.vocab_size=512",
    "--config.data.seq_len=32", "--config.data.vocab_size=400",
    "--config.checkpoint.save_every=2", "--config.train.progress=False",
]


def train(workdir, *extra, wrapper=()):
  return run_train(f"--workdir={workdir}", *_ARGS, *extra, wrapper=wrapper, timeout=300)


def start(workdir, *extra):
  return start_train(f"--workdir={workdir}", *_ARGS, *extra)


def losses(workdir) -> dict[int, float]:
  """The last logged loss of every step."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def wait_for(predicate, process, timeout=120):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    assert process.poll() is None, process.communicate()[1][-3000:]
    time.sleep(0.02)
  raise TimeoutError


@pytest.fixture(name="corpus", scope="module")
def fixture_corpus(tmp_path_factory):
  corpus = tmp_path_factory.mktemp("corpus")
  stdlib = sysconfig.get_paths()["stdlib"]
  for name in ("json/decoder.py", "json/encoder.py", "textwrap.py", "string.py", "bisect.py"):
    shutil.copy(os.path.join(stdlib, name), corpus / name.replace("/", "_"))
  return str(corpus)


@pytest.fixture(name="base_run", scope="module")
def fixture_base_run(tmp_path_factory, corpus):
  """A 4-step run on files, checkpoints at 2 and 4; tests work on copies."""
  workdir = tmp_path_factory.mktemp("base") / "run"
  result = train(workdir, "--config.train.steps=4", f"--config.data.paths={corpus}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  return workdir


@pytest.fixture(name="run_copy")
def fixture_run_copy(base_run, tmp_path):
  target = tmp_path / "run"
  shutil.copytree(base_run, target)
  return target


# 1. checkpoint.keep < 1 would delete every checkpoint.
def test_keep_below_one_is_refused(tmp_path):
  assert_user_error(train(tmp_path / "w", "--config.checkpoint.keep=0",
                          "--config.data.source=synthetic"), "checkpoint.keep must be positive")
  with pytest.raises(UserError, match="checkpoint.keep=0 must be >= 1"):
    run_lib.checkpointer(str(tmp_path / "direct"), keep=0)
  assert not os.path.exists(tmp_path / "w")


# 2. One trainer per workdir.
def test_a_second_trainer_on_a_live_workdir_is_refused(tmp_path):
  workdir = tmp_path / "run"
  first = start(workdir, "--config.train.steps=100000", "--config.data.source=synthetic")
  try:
    wait_for(lambda: os.path.exists(workdir / "metrics.jsonl"), first)
    config_before = (workdir / "config.json").read_bytes()
    second = train(workdir, "--config.train.steps=5", "--config.data.source=synthetic",
                   "--config.model.embed_dim=64")
    assert_user_error(second, f"another run is training in this workdir (pid {first.pid} on "
                      f"{socket.gethostname()}")
    assert (workdir / "config.json").read_bytes() == config_before
  finally:
    first.send_signal(signal.SIGTERM)
    stdout, stderr = first.communicate(timeout=120)
  assert first.returncode == 0, stderr[-3000:]
  assert "preempted: saved the checkpoint at step" in stdout
  assert not os.path.exists(workdir / _LOCK_FILE)  # Released at exit.


# 3. A refused command leaves config.json as it was.
@pytest.mark.parametrize("args,fragment", [
    (["--config.data.task=foo"], "data.task='foo' is not one of"),
    (["--config.data.num_workers=-1"], "data.num_workers=-1 must be >= 0"),
    (["--config.data.source=tfds"], "data.source='tfds' needs data.tfds_name"),
    (["--config.model.vocab_size=300"], "exceeds model.vocab_size=300"),
    (["--config.optim.warmup_steps=-5"], "optim.warmup_steps must be >= 0"),
    (["--config.train.eval_steps=-1"], "train.eval_steps must be >= 0"),
])
def test_refused_commands_do_not_touch_config_json(base_run, args, fragment):
  before = {name: os.path.getmtime(base_run / name) for name in os.listdir(base_run)}
  config_before = (base_run / "config.json").read_bytes()
  assert_user_error(train(base_run, "--config.train.steps=6", *args), fragment)
  assert (base_run / "config.json").read_bytes() == config_before
  assert {n: os.path.getmtime(base_run / n) for n in os.listdir(base_run)} == before


# 5. Nothing touches the network.
def test_network_backed_tfds_names_are_refused_offline(tmp_path, monkeypatch):
  from bigmodel.data.corpus import open_prepared_tfds  # pylint: disable=g-import-not-at-top
  calls = []

  def no_network(*args, **kwargs):
    calls.append(args)
    raise OSError("the network is off in this test")

  monkeypatch.setattr(socket, "getaddrinfo", no_network)
  monkeypatch.setattr(socket.socket, "connect", no_network)
  for name in ("huggingface:imdb", "kubric:movi_a/256x256", "huggingface:c4/en:1.0.0"):
    with pytest.raises(UserError, match="community dataset"):
      open_prepared_tfds(name, str(tmp_path), "lm1b")
  assert not calls
  result = train(tmp_path / "w", "--config.data.source=tfds",
                 "--config.data.tfds_name=huggingface:imdb")
  assert_user_error(result, "never downloads")
  assert not os.path.exists(tmp_path / "w")


# 7. A flipped bit in an array is detected; the previous checkpoint is used.
def test_a_flipped_bit_is_detected_and_the_previous_checkpoint_used(run_copy, corpus):
  want = losses(run_copy)
  flip_a_stored_bit(run_copy / "checkpoints" / "4" / "state")
  result = train(run_copy, "--config.train.steps=4", f"--config.data.paths={corpus}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "checkpoint at step 4 is unusable" in result.stdout
  assert "resuming from the checkpoint at step 2" in result.stdout
  assert os.path.isdir(run_copy / "checkpoints_unusable" / "4")
  assert losses(run_copy) == want  # Steps 3 and 4 again, from the clean step 2.


# 8. A damaged data-iterator state falls back too; 14. orbax temporaries are removed.
def test_a_damaged_data_state_falls_back_and_temporaries_are_cleaned(run_copy, corpus):
  want = losses(run_copy)
  with open(run_copy / "checkpoints" / "4" / "data" / "metadata", "w") as f:
    json.dump({"grain": 7}, f)  # Valid JSON, not an iterator state.
  leftover = run_copy / "checkpoints" / "6.orbax-checkpoint-tmp-1234567"
  os.makedirs(leftover / "state")
  result = train(run_copy, "--config.train.steps=4", f"--config.data.paths={corpus}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "checkpoint at step 4 is unusable" in result.stdout
  assert "resuming from the checkpoint at step 2" in result.stdout
  assert losses(run_copy) == want
  assert not os.path.exists(leftover)
  with open(run_copy / "metrics.jsonl") as f:  # The restart is marked.
    assert {"step": 2, "resumed_from": 2} in [json.loads(line) for line in f]


# 9. Setting the same step aside again never fails.
def test_setting_the_same_step_aside_twice(tmp_path):
  config = ml_collections.ConfigDict({"x": 1})
  state = TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.arange(4.0)},
                     opt_state={}, rng=jax.random.key(0))
  for attempt in range(3):
    checkpointer = run_lib.checkpointer(str(tmp_path), keep=3, async_save=False)
    checkpointer.save(30, state, {}, config)
    checkpointer.wait()
    checkpointer._move_aside(30)  # pylint: disable=protected-access
    checkpointer.close()
    assert len(os.listdir(tmp_path / "checkpoints_unusable")) == attempt + 1
  assert sorted(os.listdir(tmp_path / "checkpoints_unusable")) == ["30", "30.1", "30.2"]


# 10. A diverged run halts; non-finite updates from finite gradients are caught.
def _trainer(tmp_path, max_nonfinite, max_len=32, eps=1e-8):
  from bigmodel.train import Trainer  # pylint: disable=g-import-not-at-top
  config = tiny_config(max_len=max_len)
  config.data.source = "synthetic"
  config.optim.eps = eps
  config.train.update(steps=12, log_every=1, eval_every=0, sample_tokens=0, progress=False,
                      max_nonfinite=max_nonfinite)
  records = {}
  trainer = Trainer(config, str(tmp_path), on_metrics=lambda s, r: records.__setitem__(s, r))
  return trainer, records


def test_skipping_gives_up_on_a_diverged_run(tmp_path):
  trainer, records = _trainer(tmp_path, max_nonfinite=3)
  inner = trainer.datasets.train_iter

  class NanFromStep4:
    count = 0

    def __next__(self):
      batch = next(inner)
      self.count += 1
      if self.count >= 4:
        batch = dict(batch, loss_mask=np.full_like(batch["loss_mask"], np.nan))
      return batch

    get_state, set_state = inner.get_state, inner.set_state

  trainer.datasets.train_iter = NanFromStep4()
  with pytest.raises(UserError, match="3 in a row; halting: the run diverged"):
    trainer.run()
  assert max(records) == 5  # Steps 4 and 5 skipped; step 6 halts before logging.


def test_a_non_finite_update_from_finite_gradients_is_skipped(tmp_path):
  # Adam with eps=0: 0 / sqrt(0) for the position rows no batch uses.
  trainer, records = _trainer(tmp_path, max_nonfinite=3, max_len=64, eps=0.0)
  with pytest.raises(UserError, match="halting: the run diverged"):
    trainer.run()
  assert records[1]["nonfinite_steps"] == 1.0  # Caught at the update that made it.
  assert all(np.isfinite(r["loss"]) for r in records.values())


# 11. Ctrl-C saves like SIGTERM; a signal during start-up exits 0 with nothing to save.
def test_ctrl_c_saves_and_exits_zero(tmp_path):
  workdir = tmp_path / "run"
  process = start(workdir, "--config.train.steps=100000", "--config.data.source=synthetic",
                  "--config.checkpoint.save_every=0")
  wait_for(lambda: os.path.exists(workdir / "metrics.jsonl") and losses(workdir), process)
  process.send_signal(signal.SIGINT)
  stdout, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr[-3000:]
  assert "Traceback" not in stderr
  saved = int(stdout.split("preempted: saved the checkpoint at step")[1].split(";")[0])
  assert os.listdir(workdir / "checkpoints") == [str(saved)]


def test_sigterm_during_start_up_exits_zero(tmp_path, corpus):
  workdir = tmp_path / "run"
  process = start(workdir, "--config.train.steps=5", f"--config.data.paths={corpus}")
  wait_for(lambda: os.path.exists(workdir / _LOCK_FILE), process)
  process.send_signal(signal.SIGTERM)
  stdout, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr[-3000:]
  assert "stopped by SIGTERM before the first step: nothing to save" in stdout
  assert not os.path.exists(workdir / _LOCK_FILE)


# 12. A full disk: one error line at the save, no partial folder, earlier checkpoints kept.
# Writes past 48 KiB fail ("File too large"), as on a full disk; the tiny
# model's checkpoint is larger, the files written before it are smaller.
_SMALL_DISK = ("bash", "-c", 'ulimit -f 48 && exec "$@"', "bash")


def test_a_failed_checkpoint_write_is_one_error_line(run_copy, corpus):
  result = train(run_copy, "--config.train.steps=6", f"--config.data.paths={corpus}",
                 wrapper=_SMALL_DISK)
  assert result.returncode == 3, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: writing the checkpoint at step 6 to"), result.stderr[-3000:]
  assert "File too large" in last and "earlier checkpoints are intact" in last
  assert "Traceback" not in result.stderr
  assert sorted(os.listdir(run_copy / "checkpoints")) == ["2", "4"]
  resumed = train(run_copy, "--config.train.steps=6", f"--config.data.paths={corpus}")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resuming from the checkpoint at step 4" in resumed.stdout


def test_too_little_free_space_is_refused_before_writing(tmp_path, monkeypatch):
  state = TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.zeros(1000)},
                     opt_state={}, rng=jax.random.key(0))
  checkpointer = run_lib.checkpointer(str(tmp_path), keep=2, async_save=False)
  real = shutil.disk_usage
  monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 20))
  with pytest.raises(checkpoint.CheckpointWriteError, match="1.0 MiB free"):
    checkpointer.save(1, state, {}, ml_collections.ConfigDict({"x": 1}))
  checkpointer.close()
  assert os.listdir(tmp_path / "checkpoints") == []


# 13. Resuming with a changed config.
def test_resuming_with_another_shape_names_the_changed_keys(base_run, corpus):
  result = train(base_run, "--config.train.steps=6", f"--config.data.paths={corpus}",
                 "--config.model.embed_dim=64", "--config.optim.name=sgd")
  assert_user_error(result, "changed: model.embed_dim (32 -> 64), optim.name ('adamw' -> 'sgd')")
  assert len(result.stderr.strip().splitlines()) < 10


def test_resuming_with_other_batches_warns(run_copy, corpus):
  result = train(run_copy, "--config.train.steps=6", f"--config.data.paths={corpus}",
                 "--config.train.batch_size=8", "--config.data.seq_len=16")
  assert result.returncode == 0, result.stderr[-3000:]
  assert ("warning: resuming with changed data settings: data.seq_len (32 -> 16), "
          "train.batch_size (4 -> 8)") in result.stderr
  assert "resuming from the checkpoint at step 4" in result.stdout


# 14. A workdir that cannot be written is one error line.
def test_a_read_only_workdir_is_one_error_line(base_run, tmp_path):
  assert_user_error(train(base_run / "config.json", "--config.data.source=synthetic"),
                    "cannot create the workdir")
  readonly = tmp_path / "readonly"
  readonly.mkdir()
  subprocess.run(["chattr", "+i", str(readonly)], check=True)  # Read-only even for root.
  try:
    assert_user_error(train(readonly, "--config.data.source=synthetic"),
                      "cannot write to the workdir")
  finally:
    subprocess.run(["chattr", "-i", str(readonly)], check=True)
  assert os.listdir(readonly) == []


# 16. The default config (with its end-of-run sample) on two processes.
def test_default_config_on_two_processes_exits_zero(tmp_path, corpus):
  result = subprocess.run(
      [sys.executable, _LAUNCHER, "--num_processes=2", "--devices_per_process=2", "--",
       sys.executable, "-m", "bigmodel.train", f"--workdir={tmp_path / 'run'}",
       "--config=configs/gpt.py:tiny", "--config.train.steps=2", "--config.train.batch_size=4",
       "--config.model.num_layers=1", "--config.model.embed_dim=32",
       "--config.model.max_len=32", "--config.data.seq_len=32", "--config.data.vocab_size=400",
       "--config.model.vocab_size=512", "--config.train.sample_tokens=8",
       "--config.train.progress=False", f"--config.data.paths={corpus}"],
      cwd=_ROOT, capture_output=True, text=True, timeout=400)
  assert result.returncode == 0, result.stderr[-4000:]
  assert result.stdout.count("----- sample -----") == 1, result.stdout[-3000:]
