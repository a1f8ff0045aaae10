"""What a command prints: bigmodel's own lines on the console, everything in a log file.

Libraries log a great deal at INFO and WARNING (orbax's option dumps and
per-save lines, "Unable to initialize backend 'tpu'", tfds's builder notes,
asyncio's copies of an exception that bigmodel already reports in one
line). By default the console shows only records logged by bigmodel itself;
``--verbosity=N`` (absl's flag, given explicitly) shows every library's
records again, as absl would. A run's log file keeps every record either way.
"""
import logging as std_logging
import os
import sys
import threading
import traceback

from absl import flags
from absl import logging

_OWN_DIRS = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), name)
                  + os.sep for name in ("bigmodel", "pallas_kernels", "configs", "launch"))


# Exceptions that libraries' background threads print themselves (orbax's
# writer threads after a failed save: "Event loop is closed", ...), logged here.
_THREAD_ERRORS = "bigmodel.thread_errors"


class _OwnRecords(std_logging.Filter):
  """Passes records logged from bigmodel's own files."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.name != _THREAD_ERRORS and record.pathname.startswith(_OWN_DIRS)


_FILTER = _OwnRecords()


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
  name = args.thread.name if args.thread is not None else "?"
  std_logging.getLogger(_THREAD_ERRORS).error(
      "exception in thread %s", name, exc_info=(args.exc_type, args.exc_value,
                                                args.exc_traceback))


def _log_unraisable(unraisable) -> None:
  """``sys.unraisablehook``: tensorstore reports exceptions of its callbacks
  into asyncio this way (e.g. "Event loop is closed" after orbax gave up on a
  failed write); those without a frame of bigmodel's go to the log file."""
  frames = traceback.extract_tb(unraisable.exc_traceback)
  if any(frame.filename.startswith(_OWN_DIRS) for frame in frames):
    sys.__unraisablehook__(unraisable)
    return
  std_logging.getLogger(_THREAD_ERRORS).error(
      "exception ignored in %r", unraisable.object,
      exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback))


def quiet_libraries() -> None:
  """Hides other libraries' log records and thread tracebacks from the console
  (the log file keeps them), unless ``--verbosity`` was given."""
  verbosity = flags.FLAGS["verbosity"] if "verbosity" in flags.FLAGS else None
  if verbosity is not None and verbosity.present:
    return
  handler = logging.get_absl_handler()
  if _FILTER not in handler.filters:
    handler.addFilter(_FILTER)
  threading.excepthook = _log_thread_exception
  sys.unraisablehook = _log_unraisable


class _LogFile(std_logging.FileHandler):
  """A log file that goes quiet when it cannot be written (e.g. a full disk),
  instead of printing a traceback for every record; the run reports the
  failure that matters itself."""

  def handleError(self, record: std_logging.LogRecord) -> None:
    self.setLevel(std_logging.CRITICAL + 1)

  def flush(self) -> None:
    try:
      super().flush()
    except OSError:
      self.setLevel(std_logging.CRITICAL + 1)

  def close(self) -> None:
    try:
      super().close()
    except OSError:
      pass


def add_log_file(path: str) -> std_logging.Handler:
  """Appends every log record (all libraries, INFO and up) to ``path``; returns the handler."""
  handler = _LogFile(path)
  handler.setFormatter(logging.PythonFormatter())
  handler.setLevel(std_logging.INFO)
  std_logging.getLogger().addHandler(handler)
  return handler
