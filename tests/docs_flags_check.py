"""Parses a documented command's flags and config without running it.

``python tests/docs_flags_check.py MODULE ARG...`` runs MODULE as ``__main__``
with ``absl.app.run`` replaced: the tool's own flag parser runs on ARG..., the
config (if any) is loaded, overridden and validated, then it exits 0 ("flags
ok") instead of training. A stale flag, config file, preset or key fails here
exactly as it would for a user: one ``error:`` line, exit status 2.
"""
import runpy
import sys

from absl import app
from absl import flags


def _check_instead_of_running(main, argv=None, flags_parser=None):
  del main
  from bigmodel.config import validate  # pylint: disable=import-outside-toplevel
  from bigmodel.errors import fail, user_errors_exit  # pylint: disable=import-outside-toplevel
  argv = sys.argv if argv is None else argv
  remaining = flags_parser(argv) if flags_parser else flags.FLAGS(argv)
  if len(remaining) > 1:
    fail(f"unexpected arguments: {' '.join(remaining[1:])}")
  if "config" in flags.FLAGS and flags.FLAGS["config"].value is not None:
    with user_errors_exit():
      validate(flags.FLAGS.config)
  print("flags ok")
  sys.exit(0)


if __name__ == "__main__":
  sys.path.insert(0, "")  # As ``python -m``: modules from the working directory.
  module = sys.argv[1]
  sys.argv = [module] + sys.argv[2:]
  app.run = _check_instead_of_running
  runpy.run_module(module, run_name="__main__", alter_sys=True)
