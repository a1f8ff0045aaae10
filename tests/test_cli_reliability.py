"""Bad input to the entry points (config files, prompts, output paths, launcher
flags): one ``error:`` line, exit status 2, no traceback, refused before any
slow work, and nothing written or left behind."""
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from bigmodel import cli
from bigmodel.errors import UserError
from commands import assert_user_error, run_train

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(module, *args, timeout=120):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=_ROOT, capture_output=True,
                        text=True, timeout=timeout)


# --- a. --config=FILE that is not a loadable config ------------------------------------------

_BROKEN_CONFIGS = [
    ("syntax.py", b"def get_config():\n  return dict(a=1,\n\n", ["syntax error at line 2"]),
    ("binary.py", b"\x00\x01\xff\xfe\x89PNG binary", ["not Python source"]),
    ("latin1.py", b"x = '\xe9t\xe9'\n", ["not Python source"]),
    ("config.json", b'{"model": {"remat": true}}\n', ["NameError", "line 1"]),
    ("raises.py", b"def get_config():\n  x = 1\n  raise RuntimeError('boom')\n",
     ["RuntimeError: boom", "line 3"]),
    ("no_get_config.py", b"x = 1\n", ["defines no get_config()"]),
    ("returns_none.py", b"def get_config():\n  pass\n", ["get_config() returned None"]),
]


@pytest.mark.parametrize("name,content,fragments", _BROKEN_CONFIGS,
                         ids=[name for name, _, _ in _BROKEN_CONFIGS])
def test_broken_config_file_is_one_error_line(tmp_path, name, content, fragments):
  config = tmp_path / name
  config.write_bytes(content)
  workdir = tmp_path / "w"
  result = run_train(f"--config={config}", f"--workdir={workdir}")
  assert_user_error(result, f"cannot load the config file {config}: ")
  for fragment in fragments:
    assert fragment in result.stderr, result.stderr
  assert not workdir.exists()  # Refused before anything is written.


def test_broken_config_file_in_plan(tmp_path):
  config = tmp_path / "syntax.py"
  config.write_text("def get_config(:\n  pass\n")
  result = run_module("bigmodel.plan", f"--config={config}:tiny")
  assert_user_error(result, f"cannot load the config file {config}: syntax error at line 1")


# --- b. --prompts_file that is not UTF-8 -------------------------------------------------------

def test_generate_prompts_file_not_utf8(tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_bytes(b"\xff\xfe\x00bad")
  # The prompts are read before the checkpoint: no trained run is needed.
  result = run_module("bigmodel.generate", f"--workdir={tmp_path}", f"--prompts_file={prompts}")
  assert_user_error(result, f"--prompts_file={prompts} is not UTF-8 text")


# --- c. and d. evaluate's output: --out, and the default one in the workdir ------------------

def test_evaluate_refuses_an_unwritable_out_up_front(tmp_path):
  (tmp_path / "a_folder").mkdir()
  (tmp_path / "a_file").write_text("keep")
  before = sorted(os.listdir(tmp_path))
  # The workdir has no checkpoints: the --out check must come before loading one.
  for out, fragment in [("missing/eval.json", "does not exist"),
                        ("a_folder", "is a folder"),
                        ("a_file/eval.json", "is not a folder")]:
    result = run_module("bigmodel.evaluate", f"--workdir={tmp_path}", f"--out={tmp_path / out}")
    assert_user_error(result, f"--out={tmp_path / out}")
    assert fragment in result.stderr, result.stderr
  assert sorted(os.listdir(tmp_path)) == before  # No stray .tmp file.
  assert os.listdir(tmp_path / "a_folder") == []
  assert (tmp_path / "a_file").read_text() == "keep"


def test_evaluate_refuses_a_workdir_it_cannot_write(tmp_path, monkeypatch):
  from bigmodel import evaluate  # pylint: disable=g-import-not-at-top
  # As root, permissions are not enforced: os.access says what chmod a-w would.
  real_access = os.access
  monkeypatch.setattr(os, "access", lambda path, mode, **kw: (
      False if mode & os.W_OK and os.path.samefile(path, tmp_path) else
      real_access(path, mode, **kw)))
  with pytest.raises(UserError, match=f"cannot write to {tmp_path}"):
    evaluate.check_output(None, str(tmp_path))
  with pytest.raises(UserError, match=f"--out={tmp_path}/eval.json: cannot write to {tmp_path}"):
    evaluate.check_output(str(tmp_path / "eval.json"), "/elsewhere")
  monkeypatch.undo()
  evaluate.check_output(str(tmp_path / "eval.json"), "/elsewhere")  # Once writable again.


def test_evaluate_default_out_taken_by_a_folder(gpt_workdir, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(gpt_workdir, workdir, ignore=shutil.ignore_patterns("eval_*.json"))
  taken = workdir / "eval_validation_step2.json"
  taken.mkdir()
  (taken / "mine.txt").write_text("keep")
  before = sorted(os.listdir(workdir))
  result = run_module("bigmodel.evaluate", f"--workdir={workdir}")
  assert_user_error(result, f"{taken} is a folder")
  assert "eval_loss" not in result.stdout  # Refused before the evaluation.
  assert sorted(os.listdir(workdir)) == before
  assert os.listdir(taken) == ["mine.txt"]


# --- e. launch/local.py -------------------------------------------------------------------------

def run_local(*args):
  return subprocess.run([sys.executable, "launch/local.py", *args], cwd=_ROOT,
                        capture_output=True, text=True, timeout=60)


def _started_pids(pid_dir):
  return [int(name) for name in os.listdir(pid_dir)] if os.path.isdir(pid_dir) else []


def test_local_launch_refuses_a_missing_program_and_a_bad_log_dir(tmp_path):
  pid_dir = tmp_path / "pids"
  pid_dir.mkdir()
  # Process 0 would record its pid and sleep: a launch refused late would leave it running.
  sleeper = [sys.executable, "-c",
             f"import os, time; open(os.path.join({str(pid_dir)!r}, str(os.getpid())), 'w')"
             ".close(); time.sleep(30)"]
  log_file = tmp_path / "log_file"
  log_file.write_text("keep")
  taken = tmp_path / "logs"
  (taken / "process_1.log").mkdir(parents=True)
  try:
    assert_user_error(run_local("--num_processes=2", f"--log_dir={tmp_path / 'l'}", "--",
                                "nonexistent_program_xyz", "--flag"),
                      "nonexistent_program_xyz")
    assert_user_error(run_local("--num_processes=1", f"--log_dir={tmp_path / 'l'}", "--",
                                str(tmp_path / "no_such_script.sh")), "no_such_script.sh")
    assert not (tmp_path / "l").exists()
    assert_user_error(run_local("--num_processes=2", f"--log_dir={log_file}", "--", *sleeper),
                      f"--log_dir={log_file}")
    assert log_file.read_text() == "keep"
    result = run_local("--num_processes=2", f"--log_dir={taken}", "--", *sleeper)
    assert_user_error(result, f"{taken / 'process_1.log'}")
    time.sleep(0.5)  # A process the launcher had started would have written its pid by now.
    assert _started_pids(pid_dir) == []
  finally:
    for pid in _started_pids(pid_dir):  # Only when the launcher left one running.
      try:
        os.killpg(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass


def test_local_launch_stops_the_started_processes_when_one_cannot_start(tmp_path, monkeypatch):
  spec = importlib.util.spec_from_file_location("launch_local", os.path.join(_ROOT, "launch",
                                                                             "local.py"))
  local = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(local)
  real_popen = subprocess.Popen
  started = []

  def popen_once(*args, **kwargs):  # The second start fails, as with too many processes.
    if started:
      raise OSError(11, "Resource temporarily unavailable")
    started.append(real_popen(*args, **kwargs))
    return started[-1]

  monkeypatch.setattr(local.subprocess, "Popen", popen_once)
  args = local.parse_args(["--num_processes=2", f"--log_dir={tmp_path}", "--", sys.executable,
                           "-c", "import time; time.sleep(30)"])
  launch = local.Launch(args)
  try:
    with pytest.raises(local.LaunchError, match="cannot start process 1"):
      launch.start()
    assert started and started[0].poll() is not None  # Killed, and waited for.
  finally:
    for process in started:
      if process.poll() is None:
        process.kill()
        process.wait()


# --- f. export's --out ---------------------------------------------------------------------------

def test_export_refuses_an_out_that_cannot_be_created(gpt_workdir, tmp_path):
  (tmp_path / "file.txt").write_text("keep")
  for out, fragment in [("file.txt/out", "is not a folder"), ("missing/out", "does not exist")]:
    start = time.monotonic()
    result = run_module("bigmodel.export", f"--workdir={gpt_workdir}",
                        f"--out={tmp_path / out}", timeout=60)
    assert_user_error(result, f"--out={tmp_path / out}")
    assert fragment in result.stderr, result.stderr
    assert time.monotonic() - start < 30
  assert sorted(os.listdir(tmp_path)) == ["file.txt"]
  assert (tmp_path / "file.txt").read_text() == "keep"


def test_export_failing_midway_leaves_no_partial_out(gpt_workdir, tmp_path):
  # Runs the export command with the config write failing as a full disk would.
  script = ("import errno, sys\n"
            "from absl import app\n"
            "from bigmodel import cli, export, run\n"
            "def full(config, path):\n"
            "  open(path, 'w').close()\n"
            "  raise OSError(errno.ENOSPC, 'No space left on device', path)\n"
            "run.write_config = full\n"
            "app.run(export.main, flags_parser=cli.parse_flags)\n")
  out = tmp_path / "export"
  result = subprocess.run([sys.executable, "-c", script, f"--workdir={gpt_workdir}",
                           f"--out={out}"], cwd=_ROOT, capture_output=True, text=True,
                          timeout=120)
  assert_user_error(result, "No space left on device")
  assert os.listdir(tmp_path) == []  # Neither PATH nor a temporary folder is left.


def test_cli_output_checks():
  with pytest.raises(UserError, match="is a folder"):
    cli.check_output_file("/", "--out")
  with pytest.raises(UserError, match="already exists"):
    cli.check_new_folder(_ROOT, "--out")
  with pytest.raises(UserError, match="is not a folder"):
    cli.check_new_folder("/etc/passwd/x", "--out")
