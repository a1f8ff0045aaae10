"""Launchers (local, TPU pod, SLURM) and how a process decides to join a run."""
import os
import shlex
import subprocess
import sys

import pytest

from bigmodel import distributed
from bigmodel.errors import UserError

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TRAIN = ["python", "-m", "bigmodel.train", "--config=configs/gpt.py:small",
          "--workdir=/gcs/bucket/runs/it's small"]


def run(*command, env=None):
  return subprocess.run(list(command), cwd=_ROOT, capture_output=True, text=True, timeout=120,
                        env=env)


def assert_user_error(result, fragment):
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2, result.stderr[-2000:]
  assert lines and lines[-1].startswith("error: ") and fragment in lines[-1], result.stderr
  assert "Traceback" not in result.stderr


# --- bigmodel.distributed.resolve -------------------------------------------------------

def test_flags_plan_and_single_process():
  assert distributed.resolve(None, None, None, {}) is None
  assert distributed.resolve(None, 1, 0, {}) is None
  plan = distributed.resolve("10.0.0.2:1234", 4, 3, {"SLURM_PROCID": "7"})
  assert plan == distributed.Plan("flags", "10.0.0.2:1234", 4, 3)  # Flags win over SLURM.


@pytest.mark.parametrize("address,num,pid,fragment", [
    (None, 2, 0, "needs --coordinator_address"),
    ("h:1", None, 0, "without --num_processes"),
    ("h:1", 2, None, "without --process_id"),
    ("h:1", 2, 2, "--process_id=2 must be in [0, --num_processes=2)"),
    ("h", 2, 1, "must be host:port"),
    ("h:99999", 2, 1, "must be host:port"),
])
def test_bad_flags(address, num, pid, fragment):
  with pytest.raises(UserError, match=fragment.replace("[", r"\[").replace("(", r"\(")
                     .replace(")", r"\)")):
    distributed.resolve(address, num, pid, {})


_SRUN = {  # What srun sets for task 11 of 16 (2 nodes x 8 GPUs), job 4242.
    "SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[017-018]", "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_NUM_TASKS": "16", "SLURM_NTASKS": "16", "SLURM_PROCID": "11",
    "SLURM_LOCALID": "3",
}


def test_slurm_plans():
  plan = distributed.resolve(None, None, None, _SRUN)
  assert plan == distributed.Plan("slurm", "gpu017:61586", 16, 11, (3,))  # One GPU per task.
  per_node = dict(_SRUN, SLURM_STEP_NUM_TASKS="2", SLURM_NTASKS="2", SLURM_PROCID="1",
                  SLURM_LOCALID="0")
  assert distributed.resolve(None, None, None, per_node).local_device_ids is None  # All GPUs.
  bound = dict(_SRUN, CUDA_VISIBLE_DEVICES="3")  # srun --gpus-per-task=1 did the binding.
  assert distributed.resolve(None, None, None, bound).local_device_ids is None
  given = dict(_SRUN, JAX_COORDINATOR_ADDRESS="10.1.2.3:5555")
  assert distributed.resolve(None, None, None, given).coordinator_address == "10.1.2.3:5555"
  # The batch script itself (no job step) and one-task steps stay single-process.
  batch_script = {k: v for k, v in _SRUN.items() if not k.startswith("SLURM_STEP")}
  assert distributed.resolve(None, None, None, batch_script) is None
  one_task = dict(_SRUN, SLURM_STEP_NUM_TASKS="1", SLURM_PROCID="0")
  assert distributed.resolve(None, None, None, one_task) is None
  with pytest.raises(UserError, match="SLURM_PROCID='x' is not an integer"):
    distributed.resolve(None, None, None, dict(_SRUN, SLURM_PROCID="x"))


@pytest.mark.parametrize("nodelist,first", [
    ("node001", "node001"), ("node001,node002", "node001"), ("gpu[017-020,031],cpu1", "gpu017"),
    ("gpu[3,5]", "gpu3"), ("a-b[09-10]", "a-b09"),
])
def test_first_slurm_host(nodelist, first):
  assert distributed.first_slurm_host(nodelist) == first


def test_tpu_plan_from_gke_variables():
  environ = {"TPU_WORKER_HOSTNAMES": "w-0.svc,w-1.svc,w-2.svc,w-3.svc", "TPU_WORKER_ID": "2"}
  plan = distributed.resolve(None, None, None, environ)
  assert (plan.source, plan.coordinator_address, plan.num_processes, plan.process_id) == (
      "tpu", "w-0.svc:8476", 4, 2)
  assert "process 2 of 4, coordinator w-0.svc:8476" in plan.describe()
  one_host = distributed.resolve(None, None, None, {"TPU_WORKER_HOSTNAMES": "w-0",
                                                    "TPU_WORKER_ID": "0"})
  assert (one_host.source, one_host.coordinator_address) == ("tpu", None)  # jax's own.
  with pytest.raises(UserError, match="TPU_WORKER_ID=4 is not in"):
    distributed.resolve(None, None, None, dict(environ, TPU_WORKER_ID="4"))


def test_train_rejects_bad_distributed_flags(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  base = [sys.executable, "-m", "bigmodel.train", "--config=configs/gpt.py:tiny",
          f"--workdir={tmp_path}"]
  assert_user_error(run(*base, "--num_processes=2", "--process_id=0", env=env),
                    "--num_processes=2 needs --coordinator_address")
  assert_user_error(run(*base, "--process_id=-1", env=env), "--process_id")


# --- launch/local.py -----------------------------------------------------------------------

def test_local_dry_run_and_bad_flags(tmp_path):
  local = [sys.executable, "launch/local.py"]
  result = run(*local, "--num_processes=2", "--devices_per_process=4", "--port=1234",
               "--dry_run", "--", "python", "-m", "bigmodel.train", f"--workdir={tmp_path}")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert lines[0] == "# process 0 -> this terminal"
  assert lines[2] == f"# process 1 -> {tmp_path}/launch_logs/process_1.log"
  for i in (0, 1):
    words = shlex.split(lines[2 * i + 1])
    assert "--xla_force_host_platform_device_count=4" in words[0]
    assert words[2:] == ["python", "-m", "bigmodel.train", f"--workdir={tmp_path}",
                         "--coordinator_address=127.0.0.1:1234", "--num_processes=2",
                         f"--process_id={i}"]
  assert_user_error(run(*local, "--num_processes=2"), "give the command after --")
  assert_user_error(run(*local, "--num_processes=0", "--", "x"), "--num_processes=0 must be >= 1")
  assert_user_error(run(*local, "--", "x"), "--num_processes")
  assert_user_error(run(*local, "--num_processes=2", "--", "x", "--process_id=0"),
                    "the launcher sets these")


def test_local_launch_reports_a_failing_process(tmp_path):
  script = "import sys; sys.exit(3 if '--process_id=1' in sys.argv else 0)"
  result = run(sys.executable, "launch/local.py", "--num_processes=2",
               f"--log_dir={tmp_path}", "--", sys.executable, "-c", script)
  assert result.returncode == 3
  assert "error: process 1 of 2 failed (exit status 3)" in result.stderr


@pytest.mark.parametrize("flags,user_setting,expected", [
    ("--xla_force_host_platform_device_count=8", {}, max(os.cpu_count(), 128)),
    # XLA takes the last count; one device needs no room.
    ("--xla_force_host_platform_device_count=8 --xla_force_host_platform_device_count=1", {}, None),
    ("", {}, None),
    ("--xla_force_host_platform_device_count=8", {"PJRT_NPROC": "5"}, 5),
    ("--xla_force_host_platform_device_count=8", {"NPROC": "6"}, None),
])
def test_simulated_devices_get_threads_to_spare(flags, user_setting, expected):
  """A process that imports bigmodel with simulated devices gets 16 XLA:CPU
  threads per device (bigmodel/__init__.py says why), unless the user chose."""
  env = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "NPROC")}
  env.update(user_setting, XLA_FLAGS=flags)
  result = run(sys.executable, "-c", "import os, bigmodel; print(os.environ.get('PJRT_NPROC'))",
               env=env)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == str(expected)


# --- launch/tpu_pod.sh and launch/slurm.sbatch ------------------------------------------

def test_tpu_pod_dry_run():
  result = run("bash", "launch/tpu_pod.sh", "--tpu=pod1", "--zone=us-east5-a",
               "--project=proj", "--create", "--accelerator_type=v5p-32",
               "--version=v2-alpha-tpuv5", "--install", "--config_from=gs://bucket/my.py",
               "--dry_run", "--", *_TRAIN)
  assert result.returncode == 0, result.stderr
  commands = [shlex.split(line) for line in result.stdout.strip().splitlines()]
  target = ["pod1", "--zone=us-east5-a", "--project=proj"]
  assert commands[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", *target,
                         "--accelerator-type=v5p-32", "--version=v2-alpha-tpuv5"]
  assert commands[1][:2] == ["tar", "-czf"]
  assert commands[2][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert commands[2][-1] == "--worker=all"
  ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", *target, "--worker=all"]
  remote = {}
  for command in commands[3:]:
    if command[:len(ssh)] == ssh:
      remote[len(remote)] = command[-1].removeprefix("--command=")
  assert "pip install" in remote[0] and "jax[tpu]" in remote[0]
  assert shlex.split(remote[1]) == ["gcloud", "storage", "cp", "gs://bucket/my.py",
                                    "~/bigmodel/configs/"]
  # The same command on every worker, word for word, inside the installed checkout.
  words = shlex.split(remote[2])
  assert words[:6] == ["cd", "~/bigmodel", "&&", ".", ".venv/bin/activate", "&&"]
  assert words[6:] == _TRAIN
  assert_user_error(run("bash", "launch/tpu_pod.sh", "--zone=z", "--dry_run", "--", "x"),
                    "--tpu=NAME is required")
  assert_user_error(run("bash", "launch/tpu_pod.sh", "--tpu=t", "--zone=z", "--create",
                        "--dry_run", "--", "x"), "--create needs --accelerator_type")


@pytest.mark.parametrize("with_scontrol", [False, True])
def test_slurm_dry_run(tmp_path, with_scontrol):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  if with_scontrol:  # A stand-in: the real one expands the list the same way. A long
    # list (more than a pipe holds) must not fail the script (SIGPIPE under pipefail).
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho gpu017\necho gpu018\n"
                                      "seq 100000 | sed 's/^/node/'\n")
    (bin_dir / "scontrol").chmod(0o755)
  env = {"PATH": f"{bin_dir}:/usr/bin:/bin" if with_scontrol else str(bin_dir),
         "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[017-018]", "SLURM_NTASKS": "16",
         "SLURM_JOB_NUM_NODES": "2"}
  result = run("/bin/bash", "launch/slurm.sbatch", "--dry_run", "--", *_TRAIN, env=env)
  assert result.returncode == 0, result.stderr
  export, srun = result.stdout.strip().splitlines()
  assert export == "export JAX_COORDINATOR_ADDRESS=gpu017:61586"
  assert shlex.split(srun) == ["srun", "--kill-on-bad-exit=1", "--wait=120", *_TRAIN]
  # What each task then resolves, from srun's variables and that address.
  plan = distributed.resolve(None, None, None,
                             dict(_SRUN, JAX_COORDINATOR_ADDRESS="gpu017:61586"))
  assert (plan.coordinator_address, plan.num_processes, plan.process_id) == ("gpu017:61586", 16, 11)
  assert_user_error(run("/bin/bash", "launch/slurm.sbatch", "--dry_run", "--", "x",
                        env={"PATH": str(bin_dir)}), "not inside a SLURM job")
