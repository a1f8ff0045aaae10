"""Running bigmodel's commands from the tests: one helper for every test file.

``run_train`` runs ``python -m bigmodel.train`` to the end, ``start_train``
starts it in the background; ``assert_user_error`` checks the promised answer
to bad input (exit 2, one ``error:`` line last, no traceback); ``flip_a_stored_bit``
damages a checkpoint as a failing disk would.
"""
import faulthandler
import os
import socket
import subprocess
import sys
from typing import Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A very small GPT run of 8 steps, saved every 2 (with dropout, so that resuming
# must restore its keys): the resume tests' run.
TINY_RESUMABLE_RUN = [
    "--config=configs/gpt.py:tiny", "--config.train.steps=8", "--config.train.log_every=1",
    "--config.train.eval_every=0", "--config.train.sample_tokens=0",
    "--config.train.batch_size=4", "--config.model.num_layers=1", "--config.model.embed_dim=32",
    "--config.model.num_heads=2", "--config.model.mlp_dim=64", "--config.model.max_len=32",
    "--config.model.vocab_size=512", "--config.model.dropout_rate=0.1",
    "--config.data.seq_len=32", "--config.data.vocab_size=400",
    "--config.checkpoint.save_every=2", "--config.train.progress=False"]


# The suite's XLA flags (conftest sets them for every process the tests start).
# - Its programs are tiny models whose time goes to compiling, not running:
#   skipping LLVM's optimisation made compile-bound test files ~25% faster
#   (tests/test_chunked_loss.py + test_encoders.py: 140-151 s -> 104-110 s).
#   Only code generation changes; the HLO (collectives, buffers) is the same.
# - XLA:CPU aborts a process (SIGABRT, "Termination timeout ... exceeded")
#   whose simulated devices do not all reach a collective within its timeout:
#   8 device threads on 2 loaded cores can take longer (tests/sharded_steps.py
#   died so in two full runs and passed alone). 15 minutes: a real hang still
#   ends, within the tests' own timeouts.
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                  "--xla_cpu_collective_call_terminate_timeout_seconds=900 "
                  "--xla_cpu_collective_call_warn_stuck_timeout_seconds=300")


def xla_flags(devices: int) -> str:
  """The suite's XLA flags with ``devices`` simulated CPU devices."""
  return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"


def simulate_devices(devices: int, watchdog_seconds: int = 540) -> None:
  """For a script a test runs: ``devices`` simulated CPU devices (call it
  before JAX is imported). If the script is still running after
  ``watchdog_seconds``, every thread's Python stack goes to stderr and it
  exits 1: the tests' 600 s timeout would kill a hung script without a word.
  """
  os.environ["XLA_FLAGS"] = xla_flags(devices)
  faulthandler.dump_traceback_later(watchdog_seconds, exit=True)


def _env(devices: int, env: Optional[dict] = None) -> dict:
  return dict(os.environ, XLA_FLAGS=xla_flags(devices), **(env or {}))


def run_train(*args, devices: int = 1, wrapper: Sequence[str] = (), timeout: int = 600,
              env: Optional[dict] = None, module: str = "bigmodel.train"
              ) -> subprocess.CompletedProcess:
  """Runs the trainer (or another ``module``) with ``args`` on ``devices`` CPU
  devices, to the end; ``env`` adds environment variables.

  ``wrapper`` goes before the Python command (e.g. a shell that sets ulimits).
  """
  return subprocess.run([*wrapper, sys.executable, "-m", module, *args], cwd=ROOT,
                        env=_env(devices, env), capture_output=True, text=True, timeout=timeout)


def start_train(*args, devices: int = 1, env: Optional[dict] = None) -> subprocess.Popen:
  """Starts the trainer with ``args`` in the background (text pipes)."""
  return subprocess.Popen([sys.executable, "-m", "bigmodel.train", *args], cwd=ROOT,
                          env=_env(devices, env), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def assert_user_error(result: subprocess.CompletedProcess, fragment: str) -> None:
  """Exit status 2, the last stderr line ``error: ...`` containing ``fragment``, no traceback."""
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2, result.stderr[-2000:]
  assert lines and lines[-1].startswith("error: "), result.stderr[-2000:]
  assert fragment in lines[-1], lines[-1]
  assert "Traceback" not in result.stderr


def flip_a_stored_bit(state_dir) -> None:
  """Flips one bit in the middle of the largest array file of a checkpoint's
  ``state`` item (orbax's ``d/`` chunk files), as a failing disk would."""
  files = [os.path.join(root, name) for root, _, names in os.walk(state_dir)
           for name in names if "/d/" in os.path.join(root, name)]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.seek(os.path.getsize(largest) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x10]))


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]
