"""User-facing errors.

Anything the user can get wrong (configs, command lines, data paths, checkpoints)
raises :class:`UserError`. Entry points catch it and print exactly one line,
``error: <message>``, on stderr and exit with status 2 -- never a traceback.
"""
import contextlib
import sys


class UserError(Exception):
  """Bad input from the user: reported as one ``error:`` line, exit status 2."""


def fail(message: str) -> None:
  """Prints ``error: message`` on stderr and exits with status 2."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


@contextlib.contextmanager
def user_errors_exit():
  """Turns a :class:`UserError` raised inside the block into ``fail``."""
  try:
    yield
  except UserError as e:
    fail(str(e))
