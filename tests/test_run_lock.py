"""The workdir lock (``bigmodel.run_lock``), in a folder and in an object store
(``remote_workdir.RemoteRunLock``, against conftest's emulators)."""
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from bigmodel import remote_workdir
from bigmodel import run_lock
from bigmodel.errors import UserError
from bigmodel.train_hooks import LockHook, StepOutcome


def _write_lock(workdir, host, pid, age_seconds=0.0):
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, run_lock.LOCK_FILE)
  with open(path, "w") as f:
    json.dump({"host": host, "pid": pid, "started": time.time() - age_seconds}, f)
  os.utime(path, (time.time() - age_seconds,) * 2)


def test_run_lock_stale_and_live_owners(tmp_path):
  here = socket.gethostname()
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  _write_lock(tmp_path, here, int(dead.stdout))  # A dead owner on this host.
  lock = run_lock.RunLock(str(tmp_path))
  assert "is no longer running" in lock.acquire()
  with pytest.raises(UserError, match=f"pid {os.getpid()} on {here}"):
    run_lock.RunLock(str(tmp_path)).acquire()  # Held by this live process.
  lock.release()
  assert not os.path.exists(tmp_path / run_lock.LOCK_FILE)

  _write_lock(tmp_path, "other-host", 1)  # Another host, recently touched: alive.
  with pytest.raises(UserError, match="other-host"):
    run_lock.RunLock(str(tmp_path)).acquire()
  _write_lock(tmp_path, "other-host", 1, age_seconds=run_lock.STALE_SECONDS + 5)
  lock = run_lock.RunLock(str(tmp_path))
  assert "has not touched it" in lock.acquire()
  lock.release()


def _store_lock(url: str, mirror) -> remote_workdir.RemoteRunLock:
  return remote_workdir.RemoteRunLock(remote_workdir.RemoteWorkdir(url, local=str(mirror)))


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_of_two_runs_starting_at_once_on_a_store_one_gets_the_lock(object_stores, tmp_path,
                                                                   monkeypatch, scheme):
  """Both found no lock (``exists`` says so to both); the store's create-only
  write lets exactly one of them create it."""
  del object_stores
  url = f"{scheme}://runs/race_{scheme}"
  first, second = _store_lock(url, tmp_path / "a"), _store_lock(url, tmp_path / "b")
  # fsspec shares one client per store: monkeypatch puts its exists back.
  monkeypatch.setattr(second._fs, "exists", lambda *args, **kwargs: False)  # pylint: disable=protected-access
  first.acquire()
  with pytest.raises(UserError, match=f"another run is training in this workdir.*{url}"):
    second.acquire()
  first.release()
  second.acquire()  # Free again.
  second.release()


def test_a_lost_race_for_a_stale_lock_is_refused(tmp_path, monkeypatch):
  """Two starters both find a stale lock and remove it; the one whose removal
  came second deletes the other's new lock and creates its own. The first
  sees that in its read-back and gives up, so only one run holds the lock."""
  monkeypatch.setattr(run_lock.RunLock, "confirm_seconds", 0.05)
  _write_lock(tmp_path, "crashed-host", 1, age_seconds=run_lock.STALE_SECONDS + 5)
  first, second = run_lock.RunLock(str(tmp_path)), run_lock.RunLock(str(tmp_path))
  create = first._create  # pylint: disable=protected-access

  def create_then_lose_the_race(text):
    created = create(text)
    if created:  # The second starter's late removal, then its own lock.
      second._remove()  # pylint: disable=protected-access
      assert second._create(json.dumps(second._owner))  # pylint: disable=protected-access
    return created

  first._create = create_then_lose_the_race  # pylint: disable=protected-access
  with pytest.raises(UserError, match=f"another run took over the stale lock .*pid {os.getpid()}"):
    first.acquire()
  first.release()  # Not its lock: left alone.
  with open(tmp_path / run_lock.LOCK_FILE) as f:
    assert json.load(f) == second._owner  # pylint: disable=protected-access


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_a_run_whose_lock_was_taken_over_stops_touching_it(object_stores, tmp_path,
                                                           monkeypatch, where):
  """A run paused past STALE_SECONDS finds another run's lock at its next
  heartbeat: it sets ``lost`` and leaves that lock as it is."""
  del object_stores
  monkeypatch.setattr(run_lock, "HEARTBEAT_SECONDS", 0.05)
  if where == "folder":
    lock = run_lock.RunLock(str(tmp_path))
    write_lock = lambda text: (tmp_path / run_lock.LOCK_FILE).write_text(text)  # noqa: E731
    read_lock = lambda: (tmp_path / run_lock.LOCK_FILE).read_text()  # noqa: E731
  else:
    lock = _store_lock("s3://runs/taken_over", tmp_path / "mirror")
    write_lock = lambda text: lock._fs.pipe_file(lock._key, text.encode())  # noqa: E731  pylint: disable=protected-access
    read_lock = lambda: lock._fs.cat_file(lock._key).decode()  # noqa: E731  pylint: disable=protected-access
  lock.acquire()
  hook = LockHook([None, lock])
  hook(StepOutcome(step=1, state=None, metrics={}, is_last=False, save=True))  # Still ours.
  other = json.dumps({"host": "other-host", "pid": 7, "started": time.time()})
  write_lock(other)
  deadline = time.time() + 30
  while lock.lost is None and time.time() < deadline:
    time.sleep(0.05)
  assert "held by pid 7 on other-host" in lock.lost
  time.sleep(0.3)  # Several heartbeats later, the other run's lock is untouched.
  assert read_lock() == other
  hook(StepOutcome(step=2, state=None, metrics={}, is_last=False, save=False))  # Writes nothing.
  with pytest.raises(UserError, match="this run lost its workdir lock .*other-host.*stops "
                     "without saving"):
    hook(StepOutcome(step=3, state=None, metrics={}, is_last=False, save=False,
                     record={"loss": 1.0}))
  lock.release()
  assert read_lock() == other  # Not removed either.


def test_a_lock_whose_heartbeat_never_started_is_released(tmp_path):
  """SIGTERM at start-up can interrupt acquire() inside Thread.start(); the
  trainer's clean-up then releases a lock whose heartbeat thread was created
  but never started (join() on it raised RuntimeError, which replaced the
  "stopped by SIGTERM" exit)."""
  lock = run_lock.RunLock(str(tmp_path))
  lock.acquire()
  lock._stop.set()  # pylint: disable=protected-access
  lock._thread.join()  # pylint: disable=protected-access
  lock._thread = threading.Thread(target=lambda: None)  # pylint: disable=protected-access
  lock.release()
  assert not os.path.exists(tmp_path / run_lock.LOCK_FILE)
