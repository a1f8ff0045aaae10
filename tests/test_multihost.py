"""Multi-process training on one machine: 2 processes x 4 CPU devices through
launch/local.py against 1 process x 8 devices, resume across process counts,
and no hung runs when a process fails or dies."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import fsspec

from commands import xla_flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LAUNCHER = os.path.join(_ROOT, "launch", "local.py")

# The tiny GPT shrunk, on synthetic tokens (the same global batches whatever
# the process count), with dropout so the dropout key must match too. The
# mesh is the same 2 x 4 (data x fsdp) in both layouts.
_STEPS = 6
_RUN_ARGS = [
    "--config=configs/gpt.py:tiny", f"--config.train.steps={_STEPS}",
    "--config.train.log_every=1", "--config.train.eval_every=0",
    "--config.train.sample_tokens=0", "--config.train.batch_size=8",
    "--config.train.progress=False", "--config.model.num_layers=2",
    "--config.model.embed_dim=64", "--config.model.num_heads=4", "--config.model.mlp_dim=128",
    "--config.model.max_len=32", "--config.model.vocab_size=512",
    "--config.model.dropout_rate=0.1", "--config.data.seq_len=32",
    "--config.data.source=synthetic", "--config.checkpoint.save_every=3",
    "--config.mesh.data=2", "--config.mesh.fsdp=4",
]
# Losses agree to float32 rounding: gloo sums across processes in another order.
_TOLERANCE = 2e-5


def start_single(workdir, *extra, env=None):
  env = dict(os.environ, **(env or {}), XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu")
  return subprocess.Popen(
      [sys.executable, "-m", "bigmodel.train", f"--workdir={workdir}", *_RUN_ARGS, *extra],
      cwd=_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def start_launch(workdir, *extra, env=None):
  return subprocess.Popen(
      [sys.executable, _LAUNCHER, "--num_processes=2", "--devices_per_process=4", "--",
       sys.executable, "-m", "bigmodel.train", f"--workdir={workdir}", *_RUN_ARGS, *extra],
      cwd=_ROOT, env=dict(os.environ, **(env or {})), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)


def finish(process, timeout=400):
  stdout, stderr = process.communicate(timeout=timeout)
  assert process.returncode == 0, stderr[-4000:]
  return stdout


def metric_lines(workdir):
  with fsspec.open(f"{workdir}/metrics.jsonl", "r") as f:  # A folder or a URL.
    return [json.loads(line) for line in f]


def losses(workdir) -> dict[int, float]:
  """The last logged loss of every step."""
  return {r["step"]: r["loss"] for r in metric_lines(workdir) if "loss" in r}


def assert_close(got, want):
  assert sorted(got) == sorted(want)
  diff = max(abs(got[s] - want[s]) for s in want)
  assert diff <= _TOLERANCE, (diff, got, want)
  return diff


def rewind_to_step_3(source, target):
  """A copy of a finished run (a folder or a URL) as if it had stopped after
  saving step 3."""
  fs, source_path = fsspec.core.url_to_fs(str(source))
  target_path = fsspec.core.url_to_fs(str(target))[1]
  fs.copy(source_path, target_path, recursive=True)
  fs.rm(f"{target_path}/checkpoints/{_STEPS}", recursive=True)
  kept = [r for r in metric_lines(target) if r["step"] <= 3]
  fs.pipe_file(f"{target_path}/metrics.jsonl",
               "".join(json.dumps(r) + "\n" for r in kept).encode())


def test_two_processes_match_one_and_resume_across_process_counts(object_stores, tmp_path):
  del object_stores
  try:
    _match_and_resume(tmp_path)
  finally:
    _kill_leftovers(str(tmp_path))


def _match_and_resume(tmp_path):
  # The 2-process run keeps its workdir in gs:// (the emulator): orbax writes
  # the checkpoints there from both processes; each has its own mirror.
  one, two = tmp_path / "one", f"gs://runs/two_processes_{tmp_path.name}"
  # TMPDIR: the launcher keeps process 1's log in a temporary folder (no local workdir).
  runs = [start_single(one), start_launch(two, env={"BIGMODEL_CACHE": str(tmp_path / "a"),
                                                    "TMPDIR": str(tmp_path)})]
  for run in runs:  # Side by side: half the wall time.
    finish(run)
  reference = losses(one)
  assert sorted(reference) == list(range(1, _STEPS + 1))
  print("2 processes x 4 devices vs 1 x 8: max |loss difference|",
        assert_close(losses(two), reference))
  # Only process 0 writes metrics; checkpoints were written by both together.
  assert [r["step"] for r in metric_lines(two) if "loss" in r] == list(range(1, _STEPS + 1))
  gcs = fsspec.filesystem("gs")
  gcs.invalidate_cache()
  root = two[len("gs://"):]
  assert sorted(p.rsplit("/", 1)[1] for p in gcs.ls(f"{root}/checkpoints")) == ["3", "6"]
  for step in (3, 6):  # orbax's mark of a finished save in a bucket.
    assert gcs.exists(f"{root}/checkpoints/{step}/commit_success.txt")
  # Each process's arrays, from its own host (OCDBT keeps them apart).
  assert gcs.exists(f"{root}/checkpoints/6/state/ocdbt.process_1")
  assert "train.process_1.log" in [p.rsplit("/", 1)[1] for p in gcs.ls(root)]

  # 2 -> 1 process from the bucket (a fresh mirror), 1 -> 2 on a local disk.
  two_to_one, one_to_two = f"{two}_to_one", tmp_path / "one_to_two"
  rewind_to_step_3(two, two_to_one)
  rewind_to_step_3(one, one_to_two)
  outputs = [finish(run) for run in [
      start_single(two_to_one, env={"BIGMODEL_CACHE": str(tmp_path / "b")}),
      start_launch(one_to_two)]]
  for output in outputs:
    assert "resuming from the checkpoint at step 3" in output
  assert os.path.exists(one_to_two / "launch_logs" / "process_1.log")
  print("resumed 2 -> 1 and 1 -> 2 processes: max |loss difference|",
        assert_close(losses(two_to_one), reference), assert_close(losses(one_to_two), reference))


def _processes_with(*fragments) -> list[int]:
  """Pids of the processes whose command line holds every fragment."""
  pids = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        command = f.read().decode(errors="replace")
    except OSError:
      continue
    if all(fragment in command for fragment in fragments):
      pids.append(int(pid))
  return pids


def _kill_leftovers(marker: str) -> None:
  """SIGKILLs what a failed test left running (its command lines hold ``marker``)."""
  for pid in _processes_with(marker):
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass


def _find_process(*fragments, timeout=60):
  """The pid of the (first) process whose command line holds every fragment."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    pids = _processes_with(*fragments)
    if pids:
      return pids[0]
    time.sleep(0.1)
  raise TimeoutError(f"no process with {fragments}")


def _alive(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().split(")")[-1].split()[0] != "Z"
  except OSError:
    return False


def start_endless_launch(workdir):
  """A 2-process launch that trains until stopped; returns once it logs steps."""
  launch = start_launch(workdir, "--config.train.steps=100000", "--config.checkpoint.save_every=0")
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
    assert launch.poll() is None, launch.communicate()[1][-3000:]
    assert time.time() < deadline, "training did not start"
    time.sleep(0.1)
  return launch


def test_killing_one_process_stops_the_whole_launch(tmp_path):
  try:
    _kill_one_process(tmp_path)
  finally:
    _kill_leftovers(str(tmp_path))


def _kill_one_process(tmp_path):
  workdir = tmp_path / "run"
  launch = start_endless_launch(workdir)
  victim = _find_process("bigmodel.train", str(workdir), "--process_id=1")
  survivor = _find_process("bigmodel.train", str(workdir), "--process_id=0")
  killed_at = time.time()
  os.kill(victim, signal.SIGKILL)
  _, stderr = launch.communicate(timeout=60)
  elapsed = time.time() - killed_at
  print(f"launch exited {launch.returncode} {elapsed:.2f}s after process 1 was killed")
  assert launch.returncode == 128 + signal.SIGKILL
  assert "error: process 1 of 2 failed (killed by SIGKILL); stopped process(es) 0" in stderr
  assert elapsed < 20
  assert not _alive(survivor)


def test_sigterm_to_one_process_saves_on_all_and_exits_zero(tmp_path):
  try:
    _sigterm_one_process(tmp_path)
  finally:
    _kill_leftovers(str(tmp_path))


def _sigterm_one_process(tmp_path):
  """A preemption notice may reach one host only; the save is collective, so
  every process must agree on the step, save it together, and exit 0."""
  workdir = tmp_path / "run"
  launch = start_endless_launch(workdir)
  os.kill(_find_process("bigmodel.train", str(workdir), "--process_id=1"), signal.SIGTERM)
  stdout, stderr = launch.communicate(timeout=120)
  assert launch.returncode == 0, stderr[-3000:]
  saved_step = int(stdout.split("preempted: saved the checkpoint at step")[1].split(";")[0])
  assert os.listdir(workdir / "checkpoints") == [str(saved_step)]
  process_1_log = (workdir / "launch_logs" / "process_1.log").read_text()
  assert f"preempted: saved the checkpoint at step {saved_step};" in process_1_log


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# Two processes doing a collective per step, without a model: the failure
# paths of bigmodel.distributed in seconds.
_LOOP = textwrap.dedent("""
    import sys, time
    from absl import app
    from bigmodel import distributed

    def main(argv):
      distributed.initialize()
      import jax
      from jax.experimental import multihost_utils
      with distributed.failure_guard():
        for step in range(10**9):
          multihost_utils.sync_global_devices(f"step{step}")
          if step == 20 and sys.argv[2] == "raise" and jax.process_index() == int(sys.argv[1]):
            raise RuntimeError("simulated failure")
          if step == 20 and sys.argv[2] == "sleep":
            print("ready", flush=True)
            time.sleep(3600)  # Outside any collective: only heartbeats tell who died.

    app.run(main, argv=[sys.argv[0]] + sys.argv[3:])
    """)


def _start_loop(victim, mode, process_id, port, *flags):
  return subprocess.Popen(
      [sys.executable, "-c", _LOOP, str(victim), mode, f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", f"--process_id={process_id}", *flags],
      cwd=_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_a_failing_process_stops_the_others_at_once():
  for victim in (1, 0):  # Process 0 also hosts the coordination service.
    port = _free_port()
    try:
      processes = [_start_loop(victim, "raise", i, port) for i in range(2)]
      outs = [p.communicate(timeout=120) for p in processes]
    finally:
      _kill_leftovers(f"--coordinator_address=127.0.0.1:{port}")
    for i, (p, (_, stderr)) in enumerate(zip(processes, outs)):
      assert p.returncode == 1, (i, stderr[-3000:])
      if i != victim:
        assert (f"error: stopping process {i} because process {victim} failed "
                "(RuntimeError: simulated failure)") in stderr, stderr[-3000:]
    assert "RuntimeError: simulated failure" in outs[victim][1]


def test_a_dead_process_stops_the_others_after_the_heartbeat_timeout():
  port = _free_port()
  try:
    processes = [_start_loop(1, "sleep", i, port, "--distributed_heartbeat_timeout=3")
                 for i in range(2)]
    for process in processes:
      while process.stdout.readline().strip() != "ready":  # gloo prints to stdout too.
        assert process.poll() is None, process.communicate()[1][-3000:]
    killed_at = time.time()
    processes[1].kill()
    _, stderr = processes[0].communicate(timeout=60)
    processes[1].communicate()
    elapsed = time.time() - killed_at
  finally:
    _kill_leftovers(f"--coordinator_address=127.0.0.1:{port}")
  print(f"process 0 exited {processes[0].returncode} {elapsed:.2f}s after process 1 was killed")
  assert processes[0].returncode != 0
  assert "stopped sending heartbeats" in stderr or "another task died" in stderr, stderr[-3000:]
  assert elapsed < 20


def test_join_timeout_is_one_error_line(tmp_path):
  started = time.time()
  result = subprocess.run(
      [sys.executable, "-m", "bigmodel.train", "--config=configs/gpt.py:tiny",
       f"--workdir={tmp_path}", f"--coordinator_address=127.0.0.1:{_free_port()}",
       "--num_processes=2", "--process_id=1", "--distributed_timeout=3"],
      cwd=_ROOT, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 2, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: not all processes joined within --distributed_timeout=3s"), last
  assert "Traceback" not in result.stderr
  assert time.time() - started < 60
