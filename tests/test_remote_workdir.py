"""A run whose workdir is in an object store (``bigmodel.remote_workdir``), against
the gs:// and s3:// emulators of conftest's ``object_stores``."""
import json
import os
import signal
import threading
import time

import fsspec
import numpy as np
import pytest

from bigmodel import remote_workdir
from bigmodel import run as run_lib
from bigmodel import storage
from bigmodel.errors import UserError
from commands import TINY_RESUMABLE_RUN, assert_user_error, run_train, start_train

_RUN = TINY_RESUMABLE_RUN + ["--config.checkpoint.keep=2"]


@pytest.fixture(name="corpus", scope="module")
def fixture_corpus(tmp_path_factory):
  """A folder of 40 small Python-like files."""
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  words = "def return self import class lambda yield with for while".split()
  for i in range(40):
    (root / f"doc{i}.py").write_text(" ".join(rng.choice(words, 80)) + f" {i}\n")
  return str(root)


def _by_step(text: str) -> dict[int, dict]:
  by_step = {}
  for line in text.splitlines():
    record = json.loads(line)
    if "loss" in record:
      by_step[record["step"]] = record
  return by_step


@pytest.fixture(name="reference", scope="module")
def fixture_reference(corpus, tmp_path_factory):
  """The same run in a local workdir, uninterrupted: its records by step."""
  workdir = tmp_path_factory.mktemp("reference")
  result = run_train(f"--workdir={workdir}", *_RUN, f"--config.data.paths={corpus}")
  assert result.returncode == 0, result.stderr[-3000:]
  return _by_step((workdir / "metrics.jsonl").read_text())


def _remote_text(url: str) -> str:
  fs, path = fsspec.core.url_to_fs(url)
  fs.invalidate_cache()
  return fs.cat_file(path).decode() if fs.exists(path) else ""


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_a_run_in_an_object_store_resumes_exactly_after_kill_9_on_another_machine(
    object_stores, scheme, corpus, reference, tmp_path):
  del object_stores
  # Workdir, corpus and token cache all in the store.
  fsspec.filesystem(scheme).put(f"{corpus}/", "runs/corpus/", recursive=True)
  url = f"{scheme}://runs/killed"
  remote_data = [f"--config.data.paths={scheme}://runs/corpus",
                 f"--config.data.token_cache={scheme}://runs/token_cache_killed"]
  process = start_train(f"--workdir={url}", *_RUN, *remote_data,
                        env={storage.CACHE_ENV: str(tmp_path / "host_a")})
  # Killed once the checkpoint at step 4 is up (s3: copied up in the
  # background, so after later steps' metrics may be).
  fs = fsspec.filesystem(scheme)
  finished = "runs/killed/checkpoints/" + ("4/commit_success.txt" if scheme == "gs" else
                                           "4.complete")
  deadline = time.time() + 300
  while not (fs.invalidate_cache() or fs.exists(finished)):
    assert process.poll() is None and time.time() < deadline, process.communicate()[1][-3000:]
    time.sleep(0.2)
  process.send_signal(signal.SIGKILL)
  process.wait()
  # A fresh mirror: everything the resumed run knows comes from the store.
  result = run_train(f"--workdir={url}", *_RUN, *remote_data,
                     env={storage.CACHE_ENV: str(tmp_path / "host_b")})
  assert result.returncode == 0, result.stderr[-3000:]
  assert "took over the workdir lock" in result.stdout  # The killed run's, on this host.
  assert "resuming from the checkpoint at step" in result.stdout
  assert "Reusing the token cache" in result.stderr and "tokenizing" not in result.stderr
  resumed = _by_step(_remote_text(f"{url}/metrics.jsonl"))
  assert sorted(resumed) == list(range(1, 9))
  for step in range(1, 9):
    assert resumed[step]["loss"] == reference[step]["loss"], step
  fs, root = fsspec.core.url_to_fs(url)
  names = {p[len(root) + 1:] for p in fs.find(root)}
  assert {"config.json", "tokenizer.model", "train.log"} <= names
  assert any(n.startswith("tensorboard/events.out.tfevents") for n in names)
  assert "run.lock" not in names and not any(n.startswith("data/") for n in names)
  # checkpoint.keep=2: the two newest steps, each complete: written by orbax
  # itself in gs:// (its commit_success.txt), copied up with a marker in s3://.
  steps = sorted({n.split("/")[1] for n in names if n.startswith("checkpoints/")})
  if scheme == "gs":
    assert steps == ["6", "8"]
    assert {"checkpoints/6/commit_success.txt", "checkpoints/8/commit_success.txt"} <= names
  else:
    assert steps == ["6", "6.complete", "8", "8.complete"]
  if scheme == "gs":  # A reader elsewhere: its record goes into the store.
    result = run_train(f"--workdir={url}", module="bigmodel.evaluate",
                       env={storage.CACHE_ENV: str(tmp_path / "host_c")})
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(_remote_text(f"{url}/eval_validation_step8.json"))
    np.testing.assert_allclose(record["metrics"]["eval_loss"], reference[8]["eval_loss"],
                               rtol=1e-6)


def _write(path, text="x"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


def test_push_uploads_a_checkpoint_before_its_marker_and_mirrors_retention(object_stores,
                                                                          tmp_path):
  """The mirror route (any store but gs://, whose checkpoints orbax writes)."""
  del object_stores
  remote = remote_workdir.RemoteWorkdir("s3://runs/unit", local=str(tmp_path / "mirror"))
  remote.pull()  # Nothing there yet: an empty mirror.
  local = tmp_path / "mirror"
  _write(local / "metrics.jsonl", '{"step": 1}\n')
  _write(local / "checkpoints" / "2" / "state" / "a")
  _write(local / "checkpoints" / "2" / "_CHECKPOINT_METADATA")
  _write(local / "checkpoints" / "4.orbax-checkpoint-tmp-1" / "a")  # Being written.
  _write(local / "data" / "prepared")  # A local cache: never uploaded.
  writes = []
  for method in ("put_file", "pipe_file"):
    original = getattr(remote.fs, method)
    def spy(*args, _original=original, **kwargs):
      key = [a for a in args if isinstance(a, str) and a.startswith("runs/unit/")][0]
      writes.append(key[len("runs/unit/"):])
      return _original(*args, **kwargs)
    setattr(remote.fs, method, spy)
  try:
    remote.push()
    remote.wait()  # The checkpoint goes up in the background.
  finally:
    for method in ("put_file", "pipe_file"):
      delattr(remote.fs, method)  # Back to the class's methods.
  assert sorted(writes[:-1]) == ["checkpoints/2/_CHECKPOINT_METADATA", "checkpoints/2/state/a",
                                 "metrics.jsonl"]
  assert writes[-1] == "checkpoints/2.complete"
  assert remote.complete_steps() == [2]
  # Retention deleted step 2 in the mirror, after step 4 was saved: the store follows.
  os.rename(local / "checkpoints" / "4.orbax-checkpoint-tmp-1", local / "checkpoints" / "4")
  os.rename(local / "checkpoints" / "2", tmp_path / "gone")
  remote.push()
  remote.wait()
  assert remote.complete_steps() == [4]
  assert not remote.fs.exists("runs/unit/checkpoints/2")
  # A step whose upload did not finish (no marker) is not a checkpoint: a
  # pull drops it from a mirror, and a mirror's unsent step, too.
  remote.fs.pipe_file("runs/unit/checkpoints/6/state/a", b"x")
  _write(local / "checkpoints" / "8" / "a")
  other = remote_workdir.RemoteWorkdir("s3://runs/unit", local=str(tmp_path / "other"))
  other.pull()
  assert sorted(os.listdir(tmp_path / "other" / "checkpoints")) == ["4"]
  assert (tmp_path / "other" / "metrics.jsonl").read_text() == '{"step": 1}\n'
  remote.pull()
  assert sorted(os.listdir(local / "checkpoints")) == ["4"]


def test_a_checkpoint_goes_up_while_training_goes_on_and_its_failure_is_reported(
    object_stores, tmp_path):
  """push() returns while the checkpoint is still going up; the trainer's next
  save waits for it (wait()); a step saved meanwhile goes up with the next
  push, or the run's last (flush()); a failed copy is raised by the next
  wait or push."""
  del object_stores
  remote = remote_workdir.RemoteWorkdir("s3://runs/background", local=str(tmp_path / "mirror"))
  remote.pull()
  _write(tmp_path / "mirror" / "checkpoints" / "2" / "state")
  release, failing = threading.Event(), []
  put_file = remote.fs.put_file

  def slow_put_file(source, key, **kwargs):
    if "/checkpoints/" in key:
      assert release.wait(60)
      if failing:
        raise ConnectionError("the connection was reset")
    return put_file(source, key, **kwargs)

  remote.fs.put_file = slow_put_file
  try:
    remote.push()
    assert remote.uploading() and remote.complete_steps() == []  # Not waiting on it.
    _write(tmp_path / "mirror" / "checkpoints" / "4" / "state")
    remote.push()  # Step 2 is still going up: step 4 waits for a later push.
    release.set()
    remote.wait()
    assert not remote.uploading() and remote.complete_steps() == [2]
    remote.flush()
    assert remote.complete_steps() == [2, 4]
    failing.append(True)
    _write(tmp_path / "mirror" / "checkpoints" / "6" / "state")
    remote.push()
    with pytest.raises(UserError, match=r"s3://runs/background \(write checkpoint 6\).*reset"):
      remote.wait()
    remote.wait()  # Reported once.
  finally:
    del remote.fs.put_file
  assert remote.complete_steps() == [2, 4]  # Step 6 has no marker: not a checkpoint.


def test_an_unusable_checkpoint_in_a_bucket_is_set_aside_under_its_own_name(object_stores):
  """orbax writes gs:// checkpoints to the bucket itself; setting one aside
  (bigmodel.checkpoint: an older one was restored instead) moves its objects,
  and a step set aside twice keeps both copies."""
  del object_stores
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from bigmodel.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  from bigmodel.config import base_config  # pylint: disable=import-outside-toplevel
  ckpt = Checkpointer("gs://runs/aside/checkpoints", "gs://runs/aside/checkpoints_unusable",
                      keep=3, async_save=False)
  config = base_config()
  for step in (1, 2):
    ckpt.save_params(step, {"w": jnp.full((4,), float(step))}, config)
  fs = fsspec.filesystem("gs")
  set_aside = lambda: sorted(p.rsplit("/", 1)[1] for p in fs.ls("runs/aside/checkpoints_unusable"))  # noqa: E731
  ckpt._move_aside(2)  # pylint: disable=protected-access
  fs.invalidate_cache()
  assert ckpt.all_steps() == [1] and set_aside() == ["2"]
  assert fs.exists("runs/aside/checkpoints_unusable/2/commit_success.txt")
  ckpt.save_params(2, {"w": jnp.full((4,), 5.0)}, config)  # Saved anew, set aside again.
  ckpt._move_aside(2)  # pylint: disable=protected-access
  fs.invalidate_cache()
  assert ckpt.all_steps() == [1] and set_aside() == ["2", "2.1"]
  ckpt.close()


def test_a_live_run_holds_the_store_lock_and_bad_workdirs_are_one_error(object_stores,
                                                                       tmp_path, monkeypatch):
  del object_stores
  monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
  owner = {"host": "another-host", "pid": 1, "started": time.time()}
  fsspec.filesystem("gs").pipe_file("runs/held/run.lock", json.dumps(owner).encode())
  with pytest.raises(UserError, match=r"another run is training in this workdir \(pid 1 on "
                     r"another-host.*lock: gs://runs/held/run.lock"):
    remote_workdir.open_for_training("gs://runs/held", process_count=1)
  with pytest.raises(UserError, match="this run has 2 processes, and only a gs:// workdir"):
    remote_workdir.open_for_training("s3://runs/new", process_count=2)
  assert not (tmp_path / "cache").exists()  # Refused before anything was written.
  with pytest.raises(UserError, match="no checkpoints in gs://runs/held/checkpoints"):
    run_lib.saved_config("gs://runs/held")
  with pytest.raises(UserError, match="no checkpoints in s3://runs/held/checkpoints"):
    remote_workdir.readable("s3://runs/held")
  # Another process of a multi-process gs:// run: process 0 holds the lock;
  # this one has its own mirror and sends up only its own log.
  remote, lock, _ = remote_workdir.open_for_training("gs://runs/held", process_index=1,
                                                     process_count=2)
  assert lock is None and remote.local != remote_workdir.mirror_path("gs://runs/held")
  assert remote.checkpoint_root == "gs://runs/held"
  for name in ("train.process_1.log", "metrics.jsonl", "tokenizer.model"):
    _write(os.path.join(remote.local, name))
  remote.push()
  fs = fsspec.filesystem("gs")
  fs.invalidate_cache()
  assert sorted(p.rsplit("/", 1)[1] for p in fs.ls("runs/held")) == ["run.lock",
                                                                    "train.process_1.log"]


def test_the_trainer_refuses_an_unreachable_store_before_writing(object_stores, corpus,
                                                                tmp_path):
  del object_stores
  cache = tmp_path / "cache"
  result = run_train("--workdir=gs://no-such-bucket/run", *_RUN, f"--config.data.paths={corpus}",
                     env={storage.CACHE_ENV: str(cache)})
  assert_user_error(result, "gs://no-such-bucket/run")
  assert not cache.exists()


def test_a_token_cache_in_an_object_store_is_made_once_and_copied_down_elsewhere(
    object_stores, corpus, tokenizer_file, tmp_path, monkeypatch):
  del object_stores
  from bigmodel.data import corpus as corpus_lib  # pylint: disable=import-outside-toplevel
  from bigmodel.data import token_cache  # pylint: disable=import-outside-toplevel
  from bigmodel.data.tokenizer import Tokenizer  # pylint: disable=import-outside-toplevel
  from bigmodel.data.tokenizer import train_tokenizer  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(token_cache, "DOCUMENTS_PER_SHARD", 8)  # Several shards.
  source = corpus_lib.load_text_files(corpus, "*.py", str(tmp_path / "data"))
  tokenizer = Tokenizer.load(tokenizer_file)
  monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "host_a"))
  made = token_cache.cached_source(source, tokenizer, "gs://runs/token_cache", workers=1)
  fs = fsspec.filesystem("gs")
  (folder,) = [p for p in fs.ls("runs/token_cache") if not p.endswith("/")]
  names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(folder))
  assert names[0] == "cache.json" and len([n for n in names if n.startswith("train-")]) == 5
  # Host B: nothing tokenized, the same ids copied down.
  monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "host_b"))
  monkeypatch.setattr(token_cache, "_write_shard", lambda *args: pytest.fail("tokenized"))
  copied = token_cache.cached_source(source, tokenizer, "gs://runs/token_cache", workers=1)
  assert [bytes(r) for r in copied.train] == [bytes(r) for r in made.train]
  assert [bytes(r) for r in copied.validation] == [bytes(r) for r in made.validation]
  (tmp_path / "other.model").write_bytes(train_tokenizer(
      ["def f(x):\n  return x\n" * 50, "import os\n" * 30], 300).model_proto)
  other = Tokenizer.load(str(tmp_path / "other.model"))
  with pytest.raises(UserError, match="made with another tokenizer"):
    token_cache.cached_source(source, other, f"gs://{folder}", workers=1)
