r"""Runs a command as N cooperating processes on this machine (CPU devices, loopback).

    python launch/local.py --num_processes=2 --devices_per_process=4 -- \
        python -m bigmodel.train --config=configs/gpt.py:tiny --workdir=/tmp/run2

Each process gets ``--devices_per_process`` simulated CPU devices (XLA_FLAGS)
and the flags ``--coordinator_address=127.0.0.1:PORT --num_processes=N
--process_id=I`` appended to the command (PORT: a free loopback port). Process
0's output streams here; the others write to ``WORKDIR/launch_logs/process_I.log``
(``--workdir=`` read from the command, unless it is a URL) or a temporary
directory. If one process fails or dies, the others are killed at once, its
log's tail is printed, and the launcher exits with its status: a launch never
hangs on a dead process.
SIGINT / SIGTERM are passed on to every process.

Exit status: 0 when every process exited 0; otherwise the first failure's
status (128 + signal number for a process killed by a signal); 2 for bad
launcher flags, a program that cannot be run or logs that cannot be written
(checked before any process starts).
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
_POLL_SECONDS = 0.1
_TAIL_LINES = 30


class LaunchError(Exception):
  """The processes cannot be started: reported as one ``error:`` line, exit status 2."""


class _Parser(argparse.ArgumentParser):
  """argparse whose errors are one ``error:`` line and exit status 2."""

  def error(self, message):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = _Parser(prog="launch/local.py", description=__doc__.split("\n")[0])
  parser.add_argument("--num_processes", type=int, required=True,
                      help="Processes to start (>= 1).")
  parser.add_argument("--devices_per_process", type=int, default=1,
                      help="Simulated CPU devices per process (XLA_FLAGS).")
  parser.add_argument("--port", type=int, default=0,
                      help="Coordinator port on 127.0.0.1 (0: a free one).")
  parser.add_argument("--log_dir", default=None,
                      help="Where processes 1.. log (default WORKDIR/launch_logs or a temp dir).")
  parser.add_argument("--dry_run", action="store_true",
                      help="Print each process's environment and command; start nothing.")
  if "--" not in argv:
    parser.error("give the command after --, e.g. -- python -m bigmodel.train --config=...")
  split = list(argv).index("--")
  args = parser.parse_args(argv[:split])
  args.command = list(argv[split + 1:])
  if not args.command:
    parser.error("the command after -- is empty")
  if args.num_processes < 1:
    parser.error(f"--num_processes={args.num_processes} must be >= 1")
  if args.devices_per_process < 1:
    parser.error(f"--devices_per_process={args.devices_per_process} must be >= 1")
  if not 0 <= args.port < 65536:
    parser.error(f"--port={args.port} must be in [0, 65535]")
  if args.log_dir and os.path.exists(args.log_dir) and not os.path.isdir(args.log_dir):
    parser.error(f"--log_dir={args.log_dir} is an existing file; give a folder")
  taken = [a for a in args.command
           if re.match(r"--(coordinator_address|num_processes|process_id)(=|$)", a)]
  if taken:
    parser.error(f"the command already has {' '.join(taken)}; the launcher sets these")
  return args


def free_port() -> int:
  """A port that nothing listens on now (process 0 binds it a moment later)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(base: dict[str, str], devices: int) -> dict[str, str]:
  """``base`` with XLA_FLAGS giving ``devices`` CPU devices (replacing any count there)."""
  flags = [f for f in base.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT_FLAG)]
  env = dict(base, XLA_FLAGS=" ".join(flags + [f"{_DEVICE_COUNT_FLAG}={devices}"]))
  env.setdefault("JAX_PLATFORMS", "cpu")  # Simulated devices: never grab a local GPU/TPU.
  env["PYTHONUNBUFFERED"] = "1"  # Logs up to the moment a process dies.
  return env


def process_command(command: Sequence[str], address: str, num_processes: int,
                    process_id: int) -> list[str]:
  return [*command, f"--coordinator_address={address}", f"--num_processes={num_processes}",
          f"--process_id={process_id}"]


def check_program(program: str, env: dict[str, str]) -> None:
  """Raises LaunchError unless ``program`` can be run (as Popen would find it)."""
  if os.sep in program:
    if not os.path.isfile(program):
      raise LaunchError(f"cannot run {program}: no such file")
    if not os.access(program, os.X_OK):
      raise LaunchError(f"cannot run {program}: not executable")
  elif shutil.which(program, path=env.get("PATH", os.defpath)) is None:
    raise LaunchError(f"cannot run {program}: no such program on PATH")


def default_log_dir(command: Sequence[str]) -> str:
  for arg in command:
    # A URL workdir (gs://...) is no folder here; each process's train log goes up to it.
    if arg.startswith("--workdir=") and "://" not in arg:
      return os.path.join(arg.split("=", 1)[1], "launch_logs")
  return tempfile.mkdtemp(prefix="bigmodel_launch_")


def describe_status(code: int) -> str:
  if code < 0:
    try:
      return f"killed by {signal.Signals(-code).name}"
    except ValueError:
      return f"killed by signal {-code}"
  return f"exit status {code}"


def exit_code(code: int) -> int:
  """A child's returncode as a shell exit status (128 + N for signal N)."""
  return 128 - code if code < 0 else code


def tail(path: str, lines: int = _TAIL_LINES) -> str:
  try:
    with open(path, errors="replace") as f:
      return "".join(f.readlines()[-lines:])
  except OSError:
    return ""


class Launch:
  """The running processes: started together, stopped together."""

  def __init__(self, args: argparse.Namespace):
    self.args = args
    self.port = args.port or free_port()
    self.address = f"127.0.0.1:{self.port}"
    self.log_dir = args.log_dir or default_log_dir(args.command)
    self.processes: list[subprocess.Popen] = []
    self.log_paths: list[Optional[str]] = []
    self.logs: list = []  # Opened by prepare(): process i's stdout (None: this terminal).

  def commands(self) -> list[tuple[dict[str, str], list[str]]]:
    env = process_env(dict(os.environ), self.args.devices_per_process)
    return [(env, process_command(self.args.command, self.address, self.args.num_processes, i))
            for i in range(self.args.num_processes)]

  def prepare(self) -> None:
    """Checks the program and opens the logs, before any process starts: a launch
    refused later would leave the started processes waiting for their peers."""
    env, command = self.commands()[0]
    check_program(command[0], env)
    logs = [None]  # Process 0 streams to this terminal.
    try:
      if self.args.num_processes > 1:
        os.makedirs(self.log_dir, exist_ok=True)
      for i in range(1, self.args.num_processes):
        path = os.path.join(self.log_dir, f"process_{i}.log")
        logs.append(open(path, "w"))  # pylint: disable=consider-using-with
    except OSError as e:
      for log in logs[1:]:
        log.close()
      raise LaunchError(f"cannot write the logs in {self.log_dir}: {e.strerror or e}"
                        f"{f': {e.filename}' if e.filename else ''}") from e
    self.logs = logs

  def start(self) -> None:
    """Starts every process (after prepare()), or none: stopped if one fails to start."""
    if not self.logs:
      self.prepare()
    commands, logs = self.commands(), self.logs
    try:
      for i, (env, command) in enumerate(commands):
        stdout = logs[i]
        # Own process group: stopping a process also stops its children (grain workers).
        self.processes.append(subprocess.Popen(command, env=env, stdout=stdout,
                                               stderr=subprocess.STDOUT if stdout else None,
                                               start_new_session=True))
        self.log_paths.append(stdout.name if stdout else None)
    except OSError as e:
      # Without all of them the started ones would wait for their peers for ever.
      self.signal_all(signal.SIGKILL)
      for process in self.processes:
        process.wait()
      raise LaunchError(f"cannot start process {len(self.processes)} "
                        f"({shlex.join(commands[len(self.processes)][1])}): "
                        f"{e.strerror or e}") from e
    finally:
      for log in logs[1:]:
        log.close()  # The processes hold their own copies.
      self.logs = []

  def signal_all(self, signum: int) -> None:
    for process in self.processes:
      if process.poll() is None:
        try:
          os.killpg(process.pid, signum)
        except ProcessLookupError:
          pass

  def wait(self) -> int:
    """Waits for all; on the first failure kills the rest. Returns the exit status."""
    while True:
      codes = [p.poll() for p in self.processes]
      failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        index, code = failed[0]
        running = [i for i, c in enumerate(codes) if c is None]
        # SIGKILL, not SIGTERM: without their peer the others cannot even save.
        self.signal_all(signal.SIGKILL)
        for process in self.processes:
          process.wait()
        self.report_failure(index, code, running)
        return exit_code(code)
      if all(c == 0 for c in codes):
        return 0
      time.sleep(_POLL_SECONDS)

  def report_failure(self, index: int, code: int, stopped: list[int]) -> None:
    path = self.log_paths[index]
    if path:
      print(f"----- last lines of process {index} ({path}) -----\n{tail(path)}"
            "-----", file=sys.stderr)
    stopped_text = (f"stopped process(es) {', '.join(map(str, stopped))}" if stopped
                    else "no other process was running")
    print(f"error: process {index} of {len(self.processes)} failed ({describe_status(code)}); "
          f"{stopped_text}"
          + (f"; logs in {self.log_dir}" if len(self.processes) > 1 else ""),
          file=sys.stderr, flush=True)


def main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  launch = Launch(args)
  if args.dry_run:
    for i, (env, command) in enumerate(launch.commands()):
      where = "this terminal" if i == 0 else os.path.join(launch.log_dir, f"process_{i}.log")
      print(f"# process {i} -> {where}")
      print(f"XLA_FLAGS={shlex.quote(env['XLA_FLAGS'])} JAX_PLATFORMS={env['JAX_PLATFORMS']} "
            + shlex.join(command))
    return 0

  def forward(signum, frame):  # pylint: disable=unused-argument
    launch.signal_all(signum)  # SIGTERM: each trainer saves and exits 0.

  signal.signal(signal.SIGINT, forward)
  signal.signal(signal.SIGTERM, forward)
  try:
    launch.prepare()
    print(f"launch: {args.num_processes} processes x {args.devices_per_process} CPU devices, "
          f"coordinator {launch.address}; processes 1.. log to {launch.log_dir}",
          file=sys.stderr, flush=True)
    launch.start()
  except LaunchError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  return launch.wait()


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
