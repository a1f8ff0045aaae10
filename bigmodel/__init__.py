"""bigmodel: a JAX-native stack for training GPT, BERT and T5 models."""
import os
import re

__version__ = "0.1.0"


def _room_for_simulated_devices() -> None:
  """Gives XLA:CPU threads to spare when XLA_FLAGS simulates several devices.

  XLA:CPU sizes its thread pools to max(cores, simulated devices): 8 threads
  for 8 devices on a 2-core machine. An in-process collective blocks its
  thread until every device has reached it, and a device may start its next
  collective before the last one has ended (the thunk executor orders them by
  start only; jaxlib 0.10.2). Devices that run ahead can so hold every thread
  while a slower one still needs one to get there. That is the likely cause of
  the rare hangs (or SIGABRTs at XLA's collective timeout) of 8-device test
  processes on 2 loaded cores, never seen alone. 16 threads per device
  (``PJRT_NPROC``, read when JAX creates its CPU client) cost nothing
  measurable: tests/sharded_steps.py took 40-53 s with 8, 32 or 128 threads.
  Set at import, before any JAX backend exists; a ``PJRT_NPROC`` or
  ``NPROC`` the user set is kept.
  """
  counts = re.findall(r"--xla_force_host_platform_device_count=(\d+)",
                      os.environ.get("XLA_FLAGS", ""))
  devices = int(counts[-1]) if counts else 1  # XLA takes the last one.
  if devices > 1 and not {"PJRT_NPROC", "NPROC"} & set(os.environ):
    os.environ["PJRT_NPROC"] = str(max(os.cpu_count() or 1, 16 * devices))


_room_for_simulated_devices()
