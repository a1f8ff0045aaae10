"""A workdir in an object store (``gs://``, ``s3://``, any fsspec URL).

``--workdir=gs://bucket/runs/a`` keeps the whole run in the bucket: config,
``metrics.jsonl``, TensorBoard events, ``train.log``, the tokenizer, the
checkpoints and the lock. The trainer writes its files in a local **mirror**
of the URL (``$BIGMODEL_CACHE/workdirs/<hash of the URL>``, by default under
``~/.cache/bigmodel``; one per process), synchronised with the store:

* at start-up (:meth:`RemoteWorkdir.pull`) the store is the truth: its files
  are copied down, so any machine resumes exactly where the store says;
* while training (:meth:`RemoteWorkdir.push`, at every logged step and after
  every checkpoint) changed files go up: process 0's, and each other
  process's own ``train.process_N.log``.

Checkpoints take one of two routes:

* ``gs://``: **orbax writes them to the bucket itself** (tensorstore's GCS
  driver, from every process of a multi-host run; a save is finished when
  orbax's ``commit_success.txt`` is up), and restores read them from there.
  Any number of processes.
* any other store: orbax 0.12's array writer reaches only ``gs://`` natively
  and treats every other URL as a local path, so checkpoints are saved in the
  mirror and copied up: each step's files before its
  ``checkpoints/STEP.complete`` marker (a step without its marker is not a
  checkpoint yet: a kill -9 during an upload leaves the previous one as the
  latest), and the steps that orbax's retention deleted in the mirror are
  deleted in the store, marker first. The copy runs in a background thread
  while training goes on; the next save waits for it (:meth:`RemoteWorkdir.wait`),
  as orbax's async saves wait for the previous one, so retention never deletes
  a step that is going up. A pull copies the complete steps down and drops
  the mirror's others. One process: each host's mirror would hold only its
  own shards of a checkpoint.

The mirror keeps the trainer's atomic renames, ``O_EXCL`` lock and
append-only logs unchanged and never makes a step wait on the store for more
than an upload of the small files that changed. Prepared data
(``WORKDIR/data``) stays in the mirror; it is a cache of the sources and is
rebuilt from them elsewhere.

Readers (``evaluate``, ``generate``, ``export``, ``init_from``, the Python API)
copy down the config and the tokenizer (and, off ``gs://``, the checkpoint
they read) (:func:`readable`) and never write to the store.
"""
from __future__ import annotations

import json
import os
import posixpath
import shutil
import threading
import time
from typing import Any, Optional

from absl import logging

from bigmodel import storage
from bigmodel.errors import UserError
from bigmodel.run_lock import LOCK_FILE, RunLock

COMPLETE = ".complete"  # checkpoints/STEP.complete: the step's files are all up.
CHECKPOINTS = "checkpoints"
_UNUSABLE = "checkpoints_unusable"
# Never synchronised: the lock has its own object, prepared data is a local cache.
_LOCAL_ONLY = (LOCK_FILE, "data")


def orbax_writes(url: str) -> bool:
  """Whether orbax reads and writes the checkpoints of the workdir ``url`` in
  the store itself (``gs://``: tensorstore's GCS driver) rather than in the mirror."""
  return url.startswith("gs://")


def mirror_path(url: str, role: str = "train") -> str:
  """The local mirror of the workdir ``url``: the trainer's, another process's
  of the same run (``role`` "process1", ...) or readers' ("read": a reader
  never touches a live trainer's mirror)."""
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
  """The object-store workdir ``url`` and its local mirror ``local``.

  ``process_index``: the run's process that owns this mirror; process 0
  pushes every file, another process only its own log.
  """

  def __init__(self, url: str, local: Optional[str] = None, process_index: int = 0):
    self.url = url.rstrip("/")
    self.local = local or mirror_path(self.url)
    self.fs, self.root = storage.filesystem(self.url)
    self.orbax_writes = orbax_writes(self.url)
    # The workdir whose checkpoints/ the Checkpointer uses (bigmodel.run.RunDir).
    self.checkpoint_root = self.url if self.orbax_writes else self.local
    if process_index:
      from bigmodel.run import RunDir  # pylint: disable=g-import-not-at-top
      self._only = os.path.basename(RunDir(self.local).log(process_index))
    else:
      self._only = None
    self._pushed: dict[str, tuple[int, int]] = {}  # What the store holds of the mirror.
    self._remote_steps: set[int] = set()  # Only the upload thread changes it while it runs.
    self._upload: Optional[threading.Thread] = None
    self._upload_error: Optional[BaseException] = None

  def key(self, rel: str) -> str:
    """The store's path (no scheme) of the workdir's file ``rel``."""
    return posixpath.join(self.root, rel.replace(os.sep, "/"))

  def _request(self, what: str, fn, *args, **kwargs):
    return storage.request(f"{self.url} ({what})", fn, *args, **kwargs)

  def listing(self) -> dict[str, dict[str, Any]]:
    """{relative path: info} of every object under the workdir that the mirror
    synchronises ({} if none yet). Checkpoints that orbax writes to the store
    itself are left out (a large run's are many thousands of objects)."""
    prefix = self.root.rstrip("/") + "/"
    if self.orbax_writes:
      self.fs.invalidate_cache(self.root)  # Other hosts write here too.
      top = self._request("list", self.fs.find, self.root, maxdepth=1, withdirs=True,
                          detail=True)
      found = {}
      for info in top.values():
        name = info["name"].rstrip("/")
        if name[len(prefix):] in ("", CHECKPOINTS, _UNUSABLE):
          continue  # The workdir itself; what orbax keeps.
        found.update(self._request("list", self.fs.find, name, detail=True)
                     if info.get("type") == "directory" else {name: info})
    else:
      found = self._request("list", self.fs.find, self.root, detail=True)
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
    os.makedirs(self.local, exist_ok=True)
    for rel in listing:
      top = rel.split("/", 1)[0]
      if top in _LOCAL_ONLY or top == CHECKPOINTS:
        continue
      self._download(rel)
    self._pushed = _local_files(self.local)
    if not self.orbax_writes:
      self._pull_checkpoints(steps, listing)

  def _pull_checkpoints(self, steps: Optional[list[int]], listing: dict[str, Any]) -> None:
    remote_steps = self.complete_steps(listing)
    wanted = remote_steps if steps is None else [s for s in steps if s in remote_steps]
    os.makedirs(os.path.join(self.local, CHECKPOINTS), exist_ok=True)
    ckpt_dir = os.path.join(self.local, CHECKPOINTS)
    for name in os.listdir(ckpt_dir):
      if not (_is_step(name) and int(name) in wanted):
        if _is_step(name) or ".orbax-checkpoint-tmp" in name:
          shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)  # Never uploaded.
    for step in wanted:
      if not os.path.isdir(os.path.join(ckpt_dir, str(step))):
        self._download_step(step, listing)
    self._remote_steps = set(remote_steps)

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
    """Uploads the files that changed in the mirror, and starts copying its new
    checkpoints up (and its deletions) in the background, unless a copy is
    still running (the next push takes what this one left). Raises the last
    background copy's error, if it failed."""
    self._raise_upload_error()
    for rel, stamp in _local_files(self.local).items():
      if self._only not in (None, rel):
        continue  # Another process's mirror: its log only.
      if self._pushed.get(rel) != stamp:
        self._request(f"write {rel}", self.fs.put_file, os.path.join(self.local, rel),
                      self.key(rel))
        self._pushed[rel] = stamp
    if self.orbax_writes or self._only is not None or self.uploading():
      return
    if self._local_steps() != self._remote_steps:
      self._upload = threading.Thread(target=self._upload_checkpoints,
                                      name="bigmodel-checkpoint-upload", daemon=True)
      self._upload.start()

  def flush(self) -> None:
    """Sends everything up: the running copy, then what changed since, and
    waits for it (a run's end)."""
    self.wait()
    self.push()
    self.wait()

  def uploading(self) -> bool:
    """Whether a background checkpoint copy is running."""
    return self._upload is not None and self._upload.is_alive()

  def wait(self) -> None:
    """Waits for the background checkpoint copy; raises its error, if any."""
    if self._upload is not None:
      self._upload.join()
    self._raise_upload_error()

  def _raise_upload_error(self) -> None:
    error, self._upload_error = self._upload_error, None
    if error is not None:
      raise error

  def _upload_checkpoints(self) -> None:
    try:
      self._push_checkpoints()
    except BaseException as e:  # pylint: disable=broad-except
      self._upload_error = e  # Raised by the trainer's next push or wait.

  def _local_steps(self) -> set[int]:
    ckpt_dir = os.path.join(self.local, CHECKPOINTS)
    return {int(n) for n in os.listdir(ckpt_dir) if _is_step(n)} if os.path.isdir(
        ckpt_dir) else set()

  def _push_checkpoints(self) -> None:
    ckpt_dir = os.path.join(self.local, CHECKPOINTS)
    local_steps = self._local_steps()
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

  The lock is created by a conditional write that fails if the object exists
  (GCS ``ifGenerationMatch=0``, S3 ``If-None-Match: *``; fsspec's
  ``mode="create"``), so of two runs started at once exactly one gets it. A
  store without conditional writes gets fsspec's check-then-write instead.
  """

  confirm_seconds = 3.0  # Two requests of another starter, with room to spare.

  def __init__(self, remote: RemoteWorkdir):
    super().__init__(remote.local)
    self.path = f"{remote.url}/{LOCK_FILE}"  # What messages name.
    self._fs, self._key = remote.fs, remote.key(LOCK_FILE)
    self._text = ""

  def _create(self, text: str) -> bool:
    try:
      self._fs.pipe_file(self._key, text.encode(), mode="create")
    except FileExistsError:
      return False
    except Exception as e:  # pylint: disable=broad-except
      raise storage.store_error(self.path, e) from e
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


def open_for_training(url: str, process_index: int = 0, process_count: int = 1
                      ) -> tuple[RemoteWorkdir, Optional[RemoteRunLock], Optional[str]]:
  """Takes the store's lock (process 0) and pulls the workdir ``url`` into this
  process's mirror.

  Returns:
    (the workdir, its lock (None off process 0), why an earlier lock was stale
    or None).

  Raises:
    UserError: several processes on a store whose checkpoints go through the
      mirror, the store unreachable or denied, or another live run holding
      the lock.
  """
  role = f"process{process_index}" if process_index else "train"
  remote = RemoteWorkdir(url, mirror_path(url, role), process_index)
  if process_count > 1 and not remote.orbax_writes:
    raise UserError(f"--workdir={url}: this run has {process_count} processes, and only a "
                    "gs:// workdir serves several (orbax writes its checkpoints there from "
                    "every process); use gs:// or a shared file system (e.g. a gcsfuse mount)")
  remote.listing()  # Reachable, before any write.
  lock, stale = None, None
  if process_index == 0:
    lock = RemoteRunLock(remote)
    stale = lock.acquire()
  try:
    remote.pull()
  except BaseException:
    if lock:
      lock.release()
    raise
  return remote, lock, stale


def readable(workdir: str, step: Optional[int] = None) -> tuple[str, str]:
  """(a local folder holding the files of the run ``workdir``, the workdir
  whose ``checkpoints/`` to read): the workdir itself twice if local; for a
  URL, its mirror with the files, and the URL itself if orbax reads its
  checkpoints there, else the mirror with checkpoint ``step`` (default: the
  latest) copied down."""
  if not storage.is_url(workdir):
    return workdir, workdir
  remote = RemoteWorkdir(workdir, mirror_path(workdir, "read"))
  listing = remote.listing()
  if remote.orbax_writes:
    remote.pull(listing=listing)
    return remote.local, remote.checkpoint_root
  steps = remote.complete_steps(listing)
  if not steps:
    raise UserError(f"no checkpoints in {remote.url}/{CHECKPOINTS}")
  remote.pull([steps[-1] if step is None else step], listing)
  return remote.local, remote.checkpoint_root
