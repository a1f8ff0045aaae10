"""A workdir in an object store (``gs://``, ``s3://``, any fsspec URL).

``--workdir=gs://bucket/runs/a`` keeps the whole run in the bucket: config,
``metrics.jsonl``, TensorBoard events, ``train.log``, the tokenizer, the
checkpoints and the lock. The trainer itself works in a local **mirror** of
the URL (``$BIGMODEL_CACHE/workdirs/<hash of the URL>``, by default under
``~/.cache/bigmodel``) and the mirror is synchronised with the store:

* at start-up (:meth:`RemoteWorkdir.pull`) the store is the truth: its files
  and its complete checkpoints are copied down, and anything of the mirror's
  that the store does not have (a checkpoint that a killed run never
  uploaded) is dropped, so any machine resumes exactly where the store says;
* while training (:meth:`RemoteWorkdir.push`, at every logged step and after
  every checkpoint) changed files go up, each checkpoint's files go up before
  its ``checkpoints/STEP.complete`` marker (a step without its marker is not a
  checkpoint yet: a kill -9 during an upload leaves the previous one as the
  latest), and the steps that orbax's retention deleted in the mirror are
  deleted in the store, marker first.

Why a mirror rather than orbax writing to the URL itself: orbax 0.12's array
writer (tensorstore) reaches only ``gs://`` natively and treats every other
URL as a local path; the mirror serves every fsspec store the same way, keeps
the trainer's atomic renames, ``O_EXCL`` lock and append-only logs unchanged,
and never makes a step wait on the store for more than an upload of what
changed. The cost is local disk: the mirror holds the kept checkpoints
(``checkpoint.keep``). Prepared data (``WORKDIR/data``) stays in the mirror;
it is a cache of the sources and is rebuilt from them elsewhere.

One process per run: a multi-process run refuses a URL workdir (each host's
mirror would hold only its own shards of a checkpoint).

Readers (``evaluate``, ``generate``, ``export``, ``init_from``, the Python API)
copy down the config, the tokenizer and the checkpoint they read
(:func:`readable`) and never write to the store.
"""
from __future__ import annotations

import json
import os
import posixpath
import shutil
import time
from typing import Any, Optional

from absl import logging

from bigmodel import storage
from bigmodel.errors import UserError
from bigmodel.run_lock import LOCK_FILE, RunLock

COMPLETE = ".complete"  # checkpoints/STEP.complete: the step's files are all up.
CHECKPOINTS = "checkpoints"
# Never synchronised: the lock has its own object, prepared data is a local cache.
_LOCAL_ONLY = (LOCK_FILE, "data")


def mirror_path(url: str, role: str = "train") -> str:
  """The local mirror of the workdir ``url``: the trainer's, or readers' (``role``
  "read": a reader never touches a live trainer's mirror)."""
  return storage.local_copy_dir("workdirs" if role == "train" else f"workdirs-{role}", url)


def _is_step(name: str) -> bool:
  return name.isdigit()


def _local_files(local: str) -> dict[str, tuple[int, int]]:
  """{relative path: (size, mtime ns)} of the mirror's synchronised files."""
  files = {}
  for folder, dirs, names in os.walk(local):
    rel_folder = os.path.relpath(folder, local)
    if rel_folder == ".":
      dirs[:] = [d for d in dirs if d not in _LOCAL_ONLY and d != CHECKPOINTS]
      names = [n for n in names if n not in _LOCAL_ONLY]
    for name in names:
      if name.endswith(".tmp"):
        continue  # Half-written (renamed into place when done).
      stat = os.stat(os.path.join(folder, name))
      files[os.path.normpath(os.path.join(rel_folder, name))] = (stat.st_size, stat.st_mtime_ns)
  return files


def _step_files(local_step: str) -> list[str]:
  return sorted(os.path.relpath(os.path.join(folder, name), local_step)
                for folder, _, names in os.walk(local_step) for name in names)


class RemoteWorkdir:
  """The object-store workdir ``url`` and its local mirror ``local``."""

  def __init__(self, url: str, local: Optional[str] = None):
    self.url = url.rstrip("/")
    self.local = local or mirror_path(self.url)
    self.fs, self.root = storage.filesystem(self.url)
    self._pushed: dict[str, tuple[int, int]] = {}  # What the store holds of the mirror.
    self._remote_steps: set[int] = set()

  def key(self, rel: str) -> str:
    """The store's path (no scheme) of the workdir's file ``rel``."""
    return posixpath.join(self.root, rel.replace(os.sep, "/"))

  def _request(self, what: str, fn, *args, **kwargs):
    return storage.request(f"{self.url} ({what})", fn, *args, **kwargs)

  def listing(self) -> dict[str, dict[str, Any]]:
    """{relative path: info} of every object under the workdir ([] if none yet)."""
    found = self._request("list", self.fs.find, self.root, detail=True)
    prefix = self.root.rstrip("/") + "/"
    return {info["name"][len(prefix):]: info for info in found.values()
            if info.get("type") == "file" and info["name"].startswith(prefix)}

  def complete_steps(self, listing: Optional[dict[str, Any]] = None) -> list[int]:
    """The store's checkpoints whose upload finished, oldest first."""
    listing = self.listing() if listing is None else listing
    steps = []
    for rel in listing:
      folder, name = posixpath.split(rel)
      if folder == CHECKPOINTS and name.endswith(COMPLETE) and _is_step(name[:-len(COMPLETE)]):
        steps.append(int(name[:-len(COMPLETE)]))
    return sorted(steps)

  def pull(self, steps: Optional[list[int]] = None,
           listing: Optional[dict[str, Any]] = None) -> None:
    """Makes the mirror what the store holds: its files and the checkpoints
    ``steps`` (default: every complete one); drops the mirror's other steps.
    ``listing``: the store's, if the caller has just read it."""
    listing = self.listing() if listing is None else listing
    remote_steps = self.complete_steps(listing)
    wanted = remote_steps if steps is None else [s for s in steps if s in remote_steps]
    os.makedirs(os.path.join(self.local, CHECKPOINTS), exist_ok=True)
    for rel, info in listing.items():
      top = rel.split("/", 1)[0]
      if top in _LOCAL_ONLY or top == CHECKPOINTS:
        continue
      self._download(rel)
    ckpt_dir = os.path.join(self.local, CHECKPOINTS)
    for name in os.listdir(ckpt_dir):
      if not (_is_step(name) and int(name) in wanted):
        if _is_step(name) or ".orbax-checkpoint-tmp" in name:
          shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)  # Never uploaded.
    for step in wanted:
      if not os.path.isdir(os.path.join(ckpt_dir, str(step))):
        self._download_step(step, listing)
    self._remote_steps = set(remote_steps)
    self._pushed = _local_files(self.local)

  def _download(self, rel: str) -> None:
    target = os.path.join(self.local, *rel.split("/"))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    self._request(f"read {rel}", self.fs.get_file, self.key(rel), target + ".tmp")
    os.replace(target + ".tmp", target)

  def _download_step(self, step: int, listing: dict[str, Any]) -> None:
    """Copies checkpoint ``step`` down, into place by one rename."""
    prefix = f"{CHECKPOINTS}/{step}/"
    partial = os.path.join(self.local, CHECKPOINTS, f"{step}.download.tmp")
    shutil.rmtree(partial, ignore_errors=True)
    for rel in listing:
      if rel.startswith(prefix):
        target = os.path.join(partial, *rel[len(prefix):].split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        self._request(f"read {rel}", self.fs.get_file, self.key(rel), target)
    os.rename(partial, os.path.join(self.local, CHECKPOINTS, str(step)))
    logging.info("copied checkpoint %d down from %s", step, self.url)

  def push(self) -> None:
    """Uploads what changed in the mirror; mirrors checkpoint saves and deletions."""
    for rel, stamp in _local_files(self.local).items():
      if self._pushed.get(rel) != stamp:
        self._request(f"write {rel}", self.fs.put_file, os.path.join(self.local, rel),
                      self.key(rel))
        self._pushed[rel] = stamp
    ckpt_dir = os.path.join(self.local, CHECKPOINTS)
    local_steps = {int(n) for n in os.listdir(ckpt_dir) if _is_step(n)} if os.path.isdir(
        ckpt_dir) else set()
    for step in sorted(local_steps - self._remote_steps):
      local_step = os.path.join(ckpt_dir, str(step))
      for rel in _step_files(local_step):
        self._request(f"write checkpoint {step}", self.fs.put_file,
                      os.path.join(local_step, rel), self.key(f"{CHECKPOINTS}/{step}/{rel}"))
      # Last: the marker that makes the step a checkpoint for every reader.
      self._request(f"write checkpoint {step}", self.fs.pipe_file,
                    self.key(f"{CHECKPOINTS}/{step}{COMPLETE}"),
                    json.dumps({"step": step, "time": time.time()}).encode())
      self._remote_steps.add(step)
    for step in sorted(self._remote_steps - local_steps):  # Retention deleted it here.
      self._request(f"delete checkpoint {step}", self.fs.rm_file,
                    self.key(f"{CHECKPOINTS}/{step}{COMPLETE}"))
      self._request(f"delete checkpoint {step}", self.fs.rm,
                    self.key(f"{CHECKPOINTS}/{step}"), recursive=True)
      self._remote_steps.discard(step)


class RemoteRunLock(RunLock):
  """:class:`~bigmodel.run_lock.RunLock` kept as the object ``URL/run.lock``.

  An object store has no exclusive create that fsspec exposes for every
  store, so two runs started within the same second may both see no lock;
  the heartbeat and staleness rules are the shared file system's.
  """

  def __init__(self, remote: RemoteWorkdir):
    super().__init__(remote.local)
    self.path = f"{remote.url}/{LOCK_FILE}"  # What messages name.
    self._fs, self._key = remote.fs, remote.key(LOCK_FILE)
    self._text = ""

  def _create(self, text: str) -> bool:
    if storage.request(self.path, self._fs.exists, self._key):
      return False
    storage.request(self.path, self._fs.pipe_file, self._key, text.encode())
    self._text = text
    return True

  def _read(self) -> tuple[Optional[str], float]:
    try:
      text = self._fs.cat_file(self._key).decode()
      modified = self._fs.modified(self._key).timestamp()
    except FileNotFoundError:
      return None, 0.0
    return text, time.time() - modified

  def _touch(self) -> None:
    self._fs.pipe_file(self._key, self._text.encode())  # A new upload is a new mtime.

  def _remove(self) -> None:
    try:
      self._fs.rm_file(self._key)
    except FileNotFoundError:
      pass


def open_for_training(url: str, process_count: int) -> tuple[RemoteWorkdir, RemoteRunLock,
                                                              Optional[str]]:
  """Takes the store's lock and pulls the workdir ``url`` into its mirror.

  Returns:
    (the workdir, its lock, why an earlier lock was stale or None).

  Raises:
    UserError: several processes, the store unreachable or denied, or
      another live run holding the lock.
  """
  if process_count > 1:
    raise UserError(f"--workdir={url}: a workdir in an object store serves one process; "
                    f"this run has {process_count} (use a shared file system, e.g. a "
                    "gcsfuse mount, on several hosts)")
  remote = RemoteWorkdir(url)
  remote.listing()  # Reachable, before any write.
  lock = RemoteRunLock(remote)
  stale = lock.acquire()
  try:
    remote.pull()
  except BaseException:
    lock.release()
    raise
  return remote, lock, stale


def readable(workdir: str, step: Optional[int] = None) -> str:
  """A local path holding the run ``workdir`` (itself, if local): for a URL,
  its mirror with the files and checkpoint ``step`` (default: the latest)."""
  if not storage.is_url(workdir):
    return workdir
  remote = RemoteWorkdir(workdir, mirror_path(workdir, "read"))
  listing = remote.listing()
  steps = remote.complete_steps(listing)
  if not steps:
    raise UserError(f"no checkpoints in {remote.url}/{CHECKPOINTS}")
  remote.pull([steps[-1] if step is None else step], listing)
  return remote.local
