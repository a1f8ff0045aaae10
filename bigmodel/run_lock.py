"""One trainer per workdir: ``WORKDIR/run.lock`` names the run that owns it.

Two trainers writing one workdir destroy each other's checkpoints and
interleave ``metrics.jsonl``, so a run takes the lock before it writes
anything and a second run is refused with one ``error:`` line that names the
owner (host, pid, start time).

The lock is a file created with ``O_CREAT | O_EXCL`` (atomic on local file
systems and on NFS v3+). A dead owner must not hold it forever:

* on the same host, a lock whose pid no longer runs is stale;
* from another host (a shared file system) the pid cannot be checked, so the
  owner touches the file every ``HEARTBEAT_SECONDS`` and a lock untouched for
  ``STALE_SECONDS`` is stale.

A stale lock is replaced (and the replacement says so). Two starters may
both find it stale: each removes it and creates its own, and the one whose
removal came second would delete the other's new lock. So a starter that
replaced a stale lock reads it again a moment later and gives up
if it is no longer its own.

The heartbeat also checks that the lock is still this run's: a run paused
for longer than ``STALE_SECONDS`` (a suspended VM, a network partition) may
find another run holding it. It then stops touching it and sets
:attr:`RunLock.lost`; the trainer stops before its next write
(``train_hooks.LockHook``). Only the coordinator process (process 0) of a
multi-process run takes the lock.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Optional

from bigmodel.errors import UserError

LOCK_FILE = "run.lock"
HEARTBEAT_SECONDS = 20.0
STALE_SECONDS = 120.0


def _pid_running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # Exists, owned by another user.
  return True


def _parse_owner(text: str) -> dict:
  """A lock's owner (host, pid, started); {} if the text is not one."""
  try:
    owner = json.loads(text)
  except ValueError:
    return {}
  return owner if isinstance(owner, dict) else {}


def _describe(owner: dict) -> str:
  started = owner.get("started")
  when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
  return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, started {when}"


class RunLock:
  """Holds ``WORKDIR/run.lock`` from :meth:`acquire` until :meth:`release`."""

  # Longer than another starter's removal and creation of the lock take, so
  # that a lost race for a stale lock shows in the read-back.
  confirm_seconds = 0.5

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None
    self._owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    self.lost: Optional[str] = None  # Set by the heartbeat: who holds the lock now.

  # The lock file's storage: RemoteRunLock (bigmodel.remote_workdir) keeps it
  # in an object store instead.
  def _create(self, text: str) -> bool:
    """Writes the lock if there is none; False if one exists."""
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
      return False
    except OSError as e:
      raise UserError(f"cannot write to the workdir {os.path.dirname(self.path)}: "
                      f"{e.strerror or e}") from None
    with os.fdopen(fd, "w") as f:
      f.write(text)
    return True

  def _read(self) -> tuple[Optional[str], float]:
    """(the lock's text, seconds since it was last touched); (None, 0) if gone."""
    age = 0.0
    try:
      age = time.time() - os.stat(self.path).st_mtime
      with open(self.path) as f:
        return f.read(), age
    except FileNotFoundError:
      return None, 0.0
    except (OSError, UnicodeDecodeError):
      return "", age

  def _touch(self) -> None:
    os.utime(self.path)

  def _remove(self) -> None:
    try:
      os.remove(self.path)
    except FileNotFoundError:
      pass

  def _stale_reason(self) -> Optional[str]:
    """Why the existing lock may be taken over, or None if its owner is alive."""
    text, age = self._read()
    if text is None:
      return "gone"
    owner = _parse_owner(text)
    if owner.get("host") == self._owner["host"] and isinstance(owner.get("pid"), int):
      if not _pid_running(owner["pid"]):
        return f"its owner ({_describe(owner)}) is no longer running"
      raise UserError(f"another run is training in this workdir ({_describe(owner)}); "
                      f"wait for it or stop it (lock: {self.path})")
    if age > STALE_SECONDS:
      return f"its owner ({_describe(owner)}) has not touched it for {age:.0f}s"
    raise UserError(f"another run is training in this workdir ({_describe(owner)}, lock "
                    f"touched {age:.0f}s ago); wait for it or stop it (lock: {self.path})")

  def acquire(self) -> Optional[str]:
    """Takes the lock; returns why an earlier lock was stale, if there was one.

    Raises:
      UserError: another live run holds it (or took it over while this one
        did), or the workdir cannot be written.
    """
    replaced = None
    for _ in range(3):  # Another starter may win the race for a stale lock.
      if self._create(json.dumps(self._owner)):
        break
      replaced = self._stale_reason()
      self._remove()
    else:
      raise UserError(f"could not take the lock {self.path}: other runs keep taking it")
    if replaced not in (None, "gone"):
      time.sleep(self.confirm_seconds)
      other = self._other_owner()
      if other is not None:
        raise UserError(f"another run took over the stale lock {self.path} at the same time "
                        f"({other}); wait for it or stop it")
    self._thread = threading.Thread(target=self._heartbeat, name="bigmodel-run-lock",
                                    daemon=True)
    self._thread.start()
    return None if replaced == "gone" else replaced

  def _other_owner(self) -> Optional[str]:
    """Who holds the lock if not this run ("nobody" if it is gone); None if this run."""
    text, _ = self._read()
    if text is None:
      return "nobody"
    owner = _parse_owner(text)
    if owner == self._owner:
      return None
    return _describe(owner) if owner else "an unreadable lock"

  def _heartbeat(self) -> None:
    while not self._stop.wait(HEARTBEAT_SECONDS):
      try:
        other = self._other_owner()
        if other is not None:
          self.lost = f"{self.path} is now held by {other}"
          return  # Touching it now would keep another run's lock alive.
        self._touch()
      except Exception:  # pylint: disable=broad-except
        pass  # Keep training; a starter may then take the lock over after STALE_SECONDS.

  def release(self) -> None:
    self._stop.set()
    # Not alive: never started, when a signal interrupted acquire() in
    # Thread.start(); join() would raise and hide what stopped the run.
    if self._thread is not None and self._thread.is_alive():
      self._thread.join(timeout=5)
    if self._other_owner() is None:
      self._remove()
