"""Command-line plumbing shared by the entry points: flag parsing whose every
failure becomes one ``error:`` line and exit status 2 (absl alone would print
usage and a traceback, with status 1)."""
import contextlib
import difflib
import os
import re
import shutil
import sys
import tempfile
import traceback
import types
from typing import Any, Iterator, Optional, Sequence

from absl import flags
import ml_collections
# is_config_flag is meant for users but not re-exported by the package.
from ml_collections.config_flags import config_flags

from bigmodel import console
from bigmodel import storage
from bigmodel.errors import UserError, fail


def _config_keys(config: Any, prefix: str = "") -> list[str]:
  keys = []
  for key, value in config.items():
    path = f"{prefix}{key}"
    keys.append(path)
    if isinstance(value, ml_collections.ConfigDict):
      keys += _config_keys(value, path + ".")
  return keys


def _unknown_key_message(argv: Sequence[str], config: Any) -> str:
  """Names the override whose key does not exist in ``config``, and the keys nearby."""
  if config is None:
    return "unknown config key"
  known = _config_keys(config)
  for arg in argv:
    match = re.match(r"--config\.([\w.]+)", arg)
    if match and match.group(1) not in known:
      key = match.group(1)
      parent = key.rpartition(".")[0]
      nearby = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
      siblings = [k for k in known if k.rpartition(".")[0] == parent]
      hint = f"did you mean {', '.join(nearby)}? " if nearby else ""
      return (f"unknown config key --config.{key}; {hint}"
              f"keys under {parent or 'config'}: {', '.join(siblings)}")
  return "unknown config key"


def _config_spec(argv: Sequence[str]) -> Optional[str]:
  """The value of the last ``--config=SPEC`` (or ``--config SPEC``), as absl takes it."""
  spec = None
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      spec = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
  return spec


def _line_in(tb: Optional[types.TracebackType], path: str) -> str:
  """`` (line N)``: the innermost line of ``path`` in the traceback, if any."""
  lines = [line for frame, line in traceback.walk_tb(tb) if frame.f_code.co_filename == path]
  return f" (line {lines[-1]})" if lines else ""


def _check_config_file(spec: str) -> Any:
  """Loads ``path[:arg]`` as ml_collections will; fails with one line on any problem.

  Returns the config (it also explains an unknown override key).

  Done before absl parses the flags: ml_collections lets a SyntaxError or an
  exception of the config's own code escape as a traceback, and turns an
  unreadable file into a config that fails only when the run first uses it.
  """
  path, colon, arg = spec.partition(":")
  where = f"cannot load the config file {path}"
  hint = "" if path.endswith(".py") else "; --config takes a Python file that defines get_config()"
  if not os.path.isfile(path):
    fail(f"{where}: no such file")
  try:
    with open(path, "rb") as f:
      source = f.read()
  except OSError as e:
    fail(f"{where}: {e.strerror or e}")
  try:
    code = compile(source, path, "exec", dont_inherit=True)
  except (SyntaxError, ValueError) as e:
    message = getattr(e, "msg", None) or str(e)
    # Undecodable bytes and null bytes (a binary file) are SyntaxErrors, or ValueErrors
    # before Python 3.12, yet the file is simply not Python source.
    if isinstance(e, ValueError) or "null bytes" in message or "codec can't decode" in message:
      fail(f"{where}: not Python source text ({message.removeprefix('(unicode error) ')}){hint}")
    fail(f"{where}: syntax error at line {e.lineno}: {message}{hint}")
  # Registered while it runs, as an import would: dataclasses look their module up.
  module = types.ModuleType("_bigmodel_config_check")
  module.__file__ = path
  sys.modules[module.__name__] = module
  try:
    exec(code, module.__dict__)  # pylint: disable=exec-used
  except Exception as e:  # pylint: disable=broad-except
    fail(f"{where}: {type(e).__name__}: {e}{_line_in(e.__traceback__, path)}{hint}")
  finally:
    sys.modules.pop(module.__name__, None)
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    fail(f"{where}: it defines no get_config(){hint}")
  call = f"get_config({arg!r})" if colon else "get_config()"
  try:
    config = get_config(arg) if colon else get_config()
  except UserError as e:
    fail(f"{where}: {call}: {e}")
  except Exception as e:  # pylint: disable=broad-except
    fail(f"{where}: {call} raised {type(e).__name__}: {e}{_line_in(e.__traceback__, path)}")
  if config is None:
    fail(f"{where}: {call} returned None, not a config (a missing return?)")
  return config


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl ``flags_parser`` for ``app.run``: parses, or fails with one line."""
  spec, config = _config_spec(argv), None
  if spec is not None:
    if "config" in flags.FLAGS and config_flags.is_config_flag(flags.FLAGS["config"]):
      config = _check_config_file(spec)
    elif not os.path.isfile(spec.partition(":")[0]):
      # Checked first: ml_collections prints a traceback for a missing file.
      fail(f"cannot load the config file {spec.partition(':')[0]}: no such file")
  try:
    remaining = flags.FLAGS(argv)
  except (AttributeError, KeyError):
    fail(_unknown_key_message(argv, config))
  except flags.Error as e:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    head = lines[0].split(": Error whilst parsing")[0]
    detail = lines[-1] if len(lines) > 1 else ""
    fail(f"{head}: {detail}" if detail else head)
  console.quiet_libraries()  # Every command's console: its own lines (see console.py).
  return remaining


def _label(path: str, flag: Optional[str]) -> str:
  return f"{flag}={path}" if flag else path


def _check_parent(path: str, flag: Optional[str]) -> None:
  """The folder that will hold ``path`` exists and can be written to."""
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.exists(parent):
    raise UserError(f"{_label(path, flag)}: the folder {parent} does not exist")
  if not os.path.isdir(parent):
    raise UserError(f"{_label(path, flag)}: {parent} is not a folder")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise UserError(f"{_label(path, flag)}: cannot write to {parent} (permission denied)")


def check_output_file(path: str, flag: Optional[str] = None) -> None:
  """Raises UserError unless the file ``path`` can be written (created or replaced).

  For a command to call before its slow work; ``flag`` (e.g. "--out") names
  where the path came from in the message.
  """
  if not path:
    raise UserError(f"{flag or 'the output path'} is empty; give a file's path")
  if storage.is_url(path):
    return  # An object store answers at the upload (one error line naming the URL).
  if os.path.isdir(path):
    raise UserError(f"{_label(path, flag)} is a folder; give the path of a file")
  _check_parent(path, flag)
  if os.path.exists(path) and not os.access(path, os.W_OK):
    raise UserError(f"{_label(path, flag)}: cannot overwrite it (permission denied)")


def check_new_folder(path: str, flag: Optional[str] = None) -> None:
  """Raises UserError unless the folder ``path`` does not exist and can be created."""
  if not path:
    raise UserError(f"{flag or 'the output path'} is empty; give a new folder's path")
  if os.path.lexists(path):
    raise UserError(f"{_label(path, flag)} already exists; choose a new path")
  _check_parent(path, flag)


@contextlib.contextmanager
def new_folder(out: str, replace_empty: bool = False) -> Iterator[str]:
  """Yields a temporary folder next to ``out`` to write into; renames it
  ``out`` when the block completes, so a failure (any exception) leaves
  nothing at ``out`` and removes the partial folder. The folder gets the
  umask's permissions (not ``mkdtemp``'s 0700). ``out`` created meanwhile by
  someone else stays theirs (a UserError), unless ``replace_empty`` and it is
  an empty folder. An ``OSError`` becomes one UserError line.
  """
  out = os.path.abspath(out)
  partial = None
  try:
    partial = tempfile.mkdtemp(dir=os.path.dirname(out), prefix=f"{os.path.basename(out)}.partial.")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(partial, 0o777 & ~umask)
    yield partial
    if os.path.lexists(out) and not (replace_empty and os.path.isdir(out)
                                     and not os.listdir(out)):
      raise UserError(f"{out} appeared while it was being written; choose a new path")
    os.rename(partial, out)
    partial = None
  except OSError as e:
    raise UserError(f"cannot write {out}: {e.strerror or e}"
                    f"{f': {e.filename}' if e.filename else ''}") from e
  finally:
    if partial is not None:  # Only there still when something failed.
      shutil.rmtree(partial, ignore_errors=True)


def require_flags(*names: str) -> None:
  for name in names:
    if flags.FLAGS[name].value is None:
      fail(f"--{name} is required")

