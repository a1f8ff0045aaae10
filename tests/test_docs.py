"""Every command in README.md and docs/ is exercised, so none can go stale.

Python entry points (``python -m bigmodel.* / benchmarks.*``) have their flags,
config file, preset and overrides parsed and validated by the tool's own
parser (``docs_flags_check.py``); ``launch/local.py`` runs in ``--dry_run``.
What this check leaves out is run for real elsewhere: the install and test
commands by CI itself, the TPU and SLURM scripts' ``--dry_run`` by
``test_launch.py``, and commands on a converted workdir by ``test_convert.py``.
"""
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def documented_commands() -> list[tuple[str, str, str]]:
  """(file, command, expected error) for every command line in the docs' bash
  blocks; a command followed by a ``# error: ...`` line must fail with it."""
  found = []
  for path in DOCS:
    with open(path) as f:
      text = f.read()
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
      lines = [line.split(" # ")[0].strip()
               for line in re.sub(r"\\\n\s*", " ", block).splitlines()]
      for line, following in zip(lines, lines[1:] + [""]):
        if line and not line.startswith("#"):
          error = following[2:].split("...")[0].strip() if following.startswith("# error:") else ""
          found += [(os.path.basename(path), part.strip(), error) for part in line.split(" && ")]
  return found


def _python_commands() -> list[tuple[str, str, str]]:
  commands = []
  for source, command, error in documented_commands():
    command = re.sub(r"\s\[[^\]]*\]", "", command)  # [--optional] flags.
    assigned = re.fullmatch(r"\w+=\"(.*)\"", command)  # CMD="python -m ..."
    command = assigned.group(1) if assigned else command
    if "$" in command or "from_workdir.py" in command or "..." in command:
      continue  # Shell variables or a workdir a test creates: see the module docstring.
    if " -- " in command:  # A launcher: check the wrapped command too.
      command, inner = command.split(" -- ", 1)
      commands.append((source, inner, error))
    if re.search(r"\bpython3? (-m (bigmodel|benchmarks)\.|launch/local\.py)", command):
      commands.append((source, command, error))
  return commands


COMMANDS = _python_commands()
# Quick benchmarks without absl: the check runs them for real.
_ARGPARSE_TOOLS = ("benchmarks.attention",)


def test_the_docs_have_commands_to_check():
  assert len(COMMANDS) >= 15
  assert any("bigmodel.train" in c for _, c, _ in COMMANDS)
  assert any(error for _, _, error in COMMANDS)  # The documented failure is checked too.


@pytest.mark.parametrize("source,command,error", COMMANDS,
                         ids=[f"{s}:{i}" for i, (s, _, _) in enumerate(COMMANDS)])
def test_documented_command_is_current(source, command, error):
  words = shlex.split(command)
  env = dict(os.environ)
  while "=" in words[0] and not words[0].startswith("-"):
    key, value = words.pop(0).split("=", 1)
    env[key] = value
  assert words[0] in ("python", "python3"), command
  if words[1] == "-m":
    argv = [sys.executable, os.path.join(ROOT, "tests", "docs_flags_check.py")] + words[2:]
  else:  # launch/local.py plans its processes and prints them.
    argv = [sys.executable, words[1], "--dry_run"] + words[2:]
  result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  if error:  # Documented as failing: exactly that one line, status 2.
    assert result.returncode == 2 and result.stderr.strip().startswith(error), result.stderr
    return
  assert result.returncode == 0, f"{source}: {command}\n{result.stderr[-2000:]}"
  if words[1] == "-m" and words[2] not in _ARGPARSE_TOOLS:
    assert "flags ok" in result.stdout
