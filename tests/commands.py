"""Running bigmodel's commands from the tests: one helper for every test file.

``run_train`` runs ``python -m bigmodel.train`` to the end, ``start_train``
starts it in the background; ``assert_user_error`` checks the promised answer
to bad input (exit 2, one ``error:`` line last, no traceback); ``flip_a_stored_bit``
damages a checkpoint as a failing disk would.
"""
import os
import subprocess
import sys
from typing import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(devices: int) -> dict:
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def run_train(*args, devices: int = 1, wrapper: Sequence[str] = (),
              timeout: int = 600) -> subprocess.CompletedProcess:
  """Runs the trainer with ``args`` on ``devices`` CPU devices, to the end.

  ``wrapper`` goes before the Python command (e.g. a shell that sets ulimits).
  """
  return subprocess.run([*wrapper, sys.executable, "-m", "bigmodel.train", *args], cwd=ROOT,
                        env=_env(devices), capture_output=True, text=True, timeout=timeout)


def start_train(*args, devices: int = 1) -> subprocess.Popen:
  """Starts the trainer with ``args`` in the background (text pipes)."""
  return subprocess.Popen([sys.executable, "-m", "bigmodel.train", *args], cwd=ROOT,
                          env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


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
