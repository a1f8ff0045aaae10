"""Joining a multi-process run: one call, before any device is touched.

:func:`initialize` decides from the flags and the environment whether this
process is one of several, and if so joins the others through
``jax.distributed.initialize``. In order of precedence:

1. the flags ``--coordinator_address --num_processes --process_id``
   (``launch/local.py`` appends them; any cluster can pass them);
2. a SLURM job step with several tasks (``srun``): process ``SLURM_PROCID`` of
   ``SLURM_STEP_NUM_TASKS``, coordinator ``JAX_COORDINATOR_ADDRESS`` or the
   first node of ``SLURM_STEP_NODELIST`` on a port derived from the job id;
   with several tasks per node each task drives one GPU (``SLURM_LOCALID``);
3. a Cloud TPU VM (TPU chips on the PCI bus, or GKE's TPU variables): jax
   finds the slice's workers, their ids and the coordinator itself.

Anything else is a single-process run, which is left exactly as before: no
coordination service, no threads, no timeouts. On CPU the processes' devices
talk through gloo.

Hang guards. Joining waits at most ``--distributed_timeout`` seconds, then
every waiting process exits with one ``error:`` line. Once joined, jax's
coordination service aborts every process when one stops sending heartbeats
for ``--distributed_heartbeat_timeout`` seconds (it died, or its machine did).
A process that fails with an exception instead goes through
:func:`failure_guard`: it tells the others, which exit at once with an
``error:`` line naming it, rather than waiting in a collective for a peer
that is gone.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import glob
import os
import re
import sys
import threading
import time
import traceback
from typing import Iterator, Mapping, Optional

from absl import flags
from absl import logging
import jax

from bigmodel.errors import UserError, fail

_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0, where the processes of a multi-process run meet.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes of a multi-process run.", lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process, in [0, num_processes).", lower_bound=0)
_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout", 300,
    "Seconds for all processes to join (and to leave together at the end); past it "
    "every process exits with an error instead of waiting.", lower_bound=1)
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "distributed_heartbeat_timeout", 100,
    "Seconds without a heartbeat after which a process counts as dead and every other "
    "process exits with an error.", lower_bound=1)

# Where a failing process leaves its message for the others.
_FAILURE_KEY = "bigmodel/failure"
# How long process 0 outlives a failure, so the others exit on their own terms.
_LINGER_SECONDS = 1.0
# Set in the process that reports a failure: its own watcher then stays quiet.
_failed_here = threading.Event()
# Google's PCI vendor id, and the device ids of TPU chips (v2/v3 .. TPU7x),
# as jax's own hardware detection reads them, without initialising a backend.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")
_SOURCES = {"flags": "the flags", "slurm": "SLURM", "tpu": "GKE's TPU variables"}
# jax's coordinator port on TPU slices (its GKE and Cloud TPU cluster detection).
_TPU_COORDINATOR_PORT = 8476
# jax's port for SLURM jobs: the job id mod 4096 in [61440, 65535].
_SLURM_PORT_BASE, _SLURM_PORT_RANGE = 61440, 4096


@dataclasses.dataclass(frozen=True)
class Plan:
  """How this process joins a multi-process run.

  Attributes:
    source: "flags", "slurm" or "tpu".
    coordinator_address: host:port of process 0; None when jax finds it (TPU).
    num_processes: None when jax finds it (TPU).
    process_id: None when jax finds it (TPU).
    local_device_ids: The accelerators this process drives; None for all.
  """
  source: str
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  local_device_ids: Optional[tuple[int, ...]] = None

  def describe(self) -> str:
    if self.source == "tpu" and self.coordinator_address is None:
      return "a TPU slice; workers, ids and coordinator from the TPU metadata"
    devices = "" if self.local_device_ids is None else f", devices {list(self.local_device_ids)}"
    return (f"process {self.process_id} of {self.num_processes}, coordinator "
            f"{self.coordinator_address}, from {_SOURCES[self.source]}{devices}")


def _check_address(address: str, where: str) -> str:
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise UserError(f"{where}={address!r} must be host:port, e.g. 10.0.0.2:1234")
  return address


def first_slurm_host(nodelist: str) -> str:
  """The first host of a SLURM node list: 'gpu[017-020,031],cpu1' -> 'gpu017'."""
  match = re.match(r"([^,\[]+)(?:\[([^,\-\]]+))?", nodelist.strip())
  if not match:
    raise UserError(f"cannot read the first host of the SLURM node list {nodelist!r}")
  return match.group(1) + (match.group(2) or "")


def _env_int(environ: Mapping[str, str], name: str) -> int:
  try:
    return int(environ[name])
  except ValueError:
    raise UserError(f"the environment variable {name}={environ[name]!r} is not an integer") \
        from None


def _slurm_plan(environ: Mapping[str, str]) -> Optional[Plan]:
  """A plan from a SLURM job step (srun) of several tasks; None otherwise.

  The batch script itself is one task of the job (no SLURM_STEP_* variables):
  a command run there directly stays single-process.
  """
  if "SLURM_STEP_NODELIST" not in environ or "SLURM_PROCID" not in environ:
    return None
  count_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS"
  if count_var not in environ or _env_int(environ, count_var) <= 1:
    return None
  num_processes = _env_int(environ, count_var)
  process_id = _env_int(environ, "SLURM_PROCID")
  address = environ.get("JAX_COORDINATOR_ADDRESS")
  if address:
    _check_address(address, "JAX_COORDINATOR_ADDRESS")
  else:
    port = environ.get("JAX_COORDINATOR_PORT") or str(
        _SLURM_PORT_BASE + _env_int(environ, "SLURM_JOB_ID") % _SLURM_PORT_RANGE
        if "SLURM_JOB_ID" in environ else _SLURM_PORT_BASE)
    address = f"{first_slurm_host(environ['SLURM_STEP_NODELIST'])}:{port}"
  # Several tasks on a node: each drives the GPU of its local rank, unless
  # SLURM already gave each task its own GPU (--gpus-per-task=1).
  nodes = _env_int(environ, "SLURM_STEP_NUM_NODES") if "SLURM_STEP_NUM_NODES" in environ else 1
  visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
  local_device_ids = None
  if num_processes > nodes and len(visible) != 1 and "SLURM_LOCALID" in environ:
    local_device_ids = (_env_int(environ, "SLURM_LOCALID"),)
  return Plan("slurm", address, num_processes, process_id, local_device_ids)


def _on_cloud_tpu(environ: Mapping[str, str]) -> bool:
  """TPU chips on this machine (read from the PCI bus) or GKE's TPU worker variables."""
  if "TPU_WORKER_HOSTNAMES" in environ or "TPU_WORKER_ID" in environ:
    return True
  for vendor_path in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor_path) as f:
        if f.read().strip() != _GOOGLE_PCI_VENDOR:
          continue
      with open(os.path.join(os.path.dirname(vendor_path), "device")) as f:
        if f.read().strip() in _TPU_PCI_DEVICES:
          return True
    except OSError:
      continue
  return False


def resolve(coordinator_address: Optional[str], num_processes: Optional[int],
            process_id: Optional[int], environ: Mapping[str, str]) -> Optional[Plan]:
  """Decides how this process joins; None for a single-process run.

  Raises:
    UserError: for flags that are incomplete or inconsistent.
  """
  given = {name: value for name, value in (("--coordinator_address", coordinator_address),
                                           ("--num_processes", num_processes),
                                           ("--process_id", process_id)) if value is not None}
  if given:
    if num_processes is None or process_id is None:
      missing = [k for k in ("--num_processes", "--process_id") if k not in given]
      raise UserError(f"{', '.join(f'{k}={v}' for k, v in given.items())} given without "
                      f"{' and '.join(missing)}; a multi-process run needs "
                      "--coordinator_address, --num_processes and --process_id")
    if process_id >= num_processes:
      raise UserError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
    if num_processes == 1:
      return None
    if coordinator_address is None:
      raise UserError(f"--num_processes={num_processes} needs --coordinator_address=host:port "
                      "(process 0's address)")
    return Plan("flags", _check_address(coordinator_address, "--coordinator_address"),
                num_processes, process_id)
  slurm = _slurm_plan(environ)
  if slurm is not None:
    return slurm
  gke = _gke_tpu_plan(environ)
  if gke is not None:
    return gke
  if _on_cloud_tpu(environ):
    return Plan("tpu")
  return None


def _gke_tpu_plan(environ: Mapping[str, str]) -> Optional[Plan]:
  """A plan from GKE's TPU variables, derived as jax's own GKE detection does:
  the first worker host is the coordinator (jax's TPU port), the host count
  is the process count, ``TPU_WORKER_ID`` this process. None without them."""
  hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  if not hosts or "TPU_WORKER_ID" not in environ:
    return None
  process_id = _env_int(environ, "TPU_WORKER_ID")
  if not 0 <= process_id < len(hosts):
    raise UserError(f"TPU_WORKER_ID={process_id} is not in [0, {len(hosts)}) "
                    f"(TPU_WORKER_HOSTNAMES has {len(hosts)} hosts)")
  if len(hosts) == 1:
    return None  # One host: jax's own TPU detection (no coordinator needed).
  return Plan("tpu", f"{hosts[0]}:{_TPU_COORDINATOR_PORT}", len(hosts), process_id)


def _join(plan: Plan, timeout: int, heartbeat_timeout: int) -> None:
  """jax.distributed.initialize, or one ``error:`` line and exit 2 after ``timeout``."""
  # jax's own join timeout aborts with a C++ stack trace; this watchdog fires
  # first with a message that says what to check.
  joined = threading.Event()

  def watchdog():
    if not joined.wait(timeout):
      _exit(2, f"error: not all processes joined within --distributed_timeout={timeout}s "
               f"({plan.describe()}); check that every process was started with the same "
               "--coordinator_address and --num_processes and its own --process_id, and that "
               "the coordinator's port is reachable")

  threading.Thread(target=watchdog, name="bigmodel-join-watchdog", daemon=True).start()
  try:
    jax.distributed.initialize(
        coordinator_address=plan.coordinator_address, num_processes=plan.num_processes,
        process_id=plan.process_id, local_device_ids=plan.local_device_ids,
        initialization_timeout=timeout + 60, heartbeat_timeout_seconds=heartbeat_timeout,
        shutdown_timeout_seconds=timeout)
  except Exception as e:  # pylint: disable=broad-except
    reason = " ".join(str(e).split())[:300] or type(e).__name__
    _exit(2, f"error: could not join the multi-process run ({plan.describe()}): {reason}")
  joined.set()


def _check_num_processes(plan: Plan, timeout: int) -> None:
  """Every process must agree with process 0 on --num_processes.

  The coordination service only knows process 0's count: a process started
  with another one would join and then fail obscurely in its first collective.
  """
  client = _client()
  if plan.process_id == 0:
    client.key_value_set("bigmodel/num_processes", str(plan.num_processes))
    return
  theirs = int(client.blocking_key_value_get("bigmodel/num_processes", timeout * 1000))
  if theirs != plan.num_processes:
    message = (f"--num_processes={plan.num_processes} but process 0 has "
               f"--num_processes={theirs}; give every process the same value")
    _report_failure(f"process {plan.process_id} failed ({message})")
    _exit(2, f"error: {message}")


def initialize() -> Optional[Plan]:
  """Joins the other processes of the run, if any; call before touching devices.

  Reads the flags defined here (absl must have parsed them) and the
  environment. Returns the plan followed, or None for a single process,
  which costs nothing. Bad flags end with one ``error:`` line, exit status 2.
  """
  try:
    plan = resolve(_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                   os.environ)
  except UserError as e:
    fail(str(e))
  if plan is None:
    return None
  # Devices are created on first use; after that it is too late to join.
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    raise RuntimeError("bigmodel.distributed.initialize() must run before any device is used")
  if jax.config.jax_cpu_collectives_implementation != "mpi":  # CPU devices talk through gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  _join(plan, _TIMEOUT.value, _HEARTBEAT_TIMEOUT.value)
  _start_failure_watcher()
  if plan.num_processes is not None:
    _check_num_processes(plan, _TIMEOUT.value)
  logging.info("joined the multi-process run: %s", plan.describe())
  return plan


def _jax_state():
  """jax's distributed state (client, process_id); read without touching devices."""
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  return jax_distributed.global_state


def _client():
  return _jax_state().client


def _exit(code: int, message: Optional[str] = None) -> None:
  """Exits now, skipping atexit: jax's shutdown barrier would wait for peers that are gone."""
  if message:
    print(message, file=sys.stderr, flush=True)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


def _report_failure(message: str) -> None:
  """Tells the other processes' watchers that this one is failing."""
  _failed_here.set()
  try:
    _client().key_value_set(_FAILURE_KEY, message)
  except Exception:  # pylint: disable=broad-except
    return  # Another process reported first; that is enough.
  _linger_if_coordinator()


def _linger_if_coordinator() -> None:
  """Process 0 hosts the coordination service: when it exits, jax aborts every
  other process at once (SIGABRT, a C++ stack trace). Staying a moment lets
  them exit first, with their own status and message."""
  if _jax_state().process_id == 0:
    time.sleep(_LINGER_SECONDS)


def _start_failure_watcher() -> None:
  """A thread that stops this process when another one reports a failure."""
  client, stop = _client(), threading.Event()

  def watch():
    while not stop.is_set():
      try:
        message = client.blocking_key_value_get(_FAILURE_KEY, 1000)
      except Exception:  # pylint: disable=broad-except
        continue  # Not there yet (a timeout), or the client is shutting down.
      if not stop.is_set() and not _failed_here.is_set():
        _linger_if_coordinator()
        _exit(1, f"error: stopping process {_jax_state().process_id} because {message}")
      return

  thread = threading.Thread(target=watch, name="bigmodel-failure-watcher", daemon=True)
  thread.start()

  def stop_watching():  # Before jax's own shutdown (atexit runs last-registered first).
    stop.set()
    thread.join(timeout=5)

  atexit.register(stop_watching)


@contextlib.contextmanager
def failure_guard() -> Iterator[None]:
  """Turns a failure of this process into a fast exit of every process.

  In a multi-process run, an exception or a non-zero ``sys.exit`` inside the
  block is reported to the other processes (which then exit with status 1 and
  an ``error:`` line naming this one) and this process exits with its status
  at once, without jax's shutdown barrier. Single-process runs are unaffected.
  """
  try:
    yield
  except BaseException as e:  # pylint: disable=broad-except
    client = _client()
    if client is None or (isinstance(e, SystemExit) and e.code in (0, None)):
      raise
    if isinstance(e, SystemExit):
      code = e.code if isinstance(e.code, int) else 1
      reason = f"exit status {code}"
    else:
      try:
        earlier = client.key_value_try_get(_FAILURE_KEY)
      except Exception:  # pylint: disable=broad-except
        earlier = None  # Not set: this process is the first to fail.
      if earlier:
        # Usually a collective that lost its peer: the cause is elsewhere.
        _exit(1, f"error: stopping process {_jax_state().process_id} because {earlier}")
      traceback.print_exc()
      code = 130 if isinstance(e, KeyboardInterrupt) else 1
      reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
    _report_failure(f"process {_jax_state().process_id} failed ({reason})")
    _exit(code)
