"""Command-line plumbing shared by the entry points: flag parsing whose every
failure becomes one ``error:`` line and exit status 2 (absl alone would print
usage and a traceback, with status 1)."""
import difflib
import importlib.util
import json
import os
import re
from typing import Any, Optional, Sequence

from absl import flags
import ml_collections

from bigmodel.errors import fail


def _config_keys(config: Any, prefix: str = "") -> list[str]:
  keys = []
  for key, value in config.items():
    path = f"{prefix}{key}"
    keys.append(path)
    if isinstance(value, ml_collections.ConfigDict):
      keys += _config_keys(value, path + ".")
  return keys


def _load_config_file(spec: str) -> Optional[ml_collections.ConfigDict]:
  """Loads ``path.py[:arg]`` without flags, to explain a failed override."""
  path, _, arg = spec.partition(":")
  try:
    module_spec = importlib.util.spec_from_file_location("_bigmodel_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except Exception:  # pylint: disable=broad-except
    return None


def _unknown_key_message(argv: Sequence[str]) -> str:
  """Names the override whose key does not exist, and the keys nearby."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
  config = _load_config_file(spec) if spec else None
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


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl ``flags_parser`` for ``app.run``: parses, or fails with one line."""
  for arg in argv:
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1].partition(":")[0]
      if not os.path.isfile(path):
        # Checked first: ml_collections prints a traceback for a missing file.
        fail(f"cannot load the config file {path}: no such file")
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError):
    fail(_unknown_key_message(argv))
  except flags.Error as e:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    head = lines[0].split(": Error whilst parsing")[0]
    detail = lines[-1] if len(lines) > 1 else ""
    fail(f"{head}: {detail}" if detail else head)
  return []  # Unreachable: fail() exits.


def require_flags(*names: str) -> None:
  for name in names:
    if flags.FLAGS[name].value is None:
      fail(f"--{name} is required")


def write_config(config: ml_collections.ConfigDict, path: str) -> None:
  """Writes the resolved config as JSON (atomically: never a half file)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(config.to_dict(), f, indent=2, sort_keys=True, default=str)
    f.write("\n")
  os.replace(tmp, path)
