"""Corpora in object stores (gs://, s3://), against emulators the tests start on 127.0.0.1
(conftest's ``object_stores``)."""
import json
import os
import time

import fsspec
import pytest

from bigmodel.data import corpus as corpus_lib
from bigmodel.errors import UserError
from commands import assert_user_error, free_port, run_train

_DOCS = [f"object {i}: def f():\n    return {i} * \"é\"\n" for i in range(40)]


@pytest.fixture(name="stores", scope="module")
def fixture_stores(object_stores):
  """Both emulators with a ``corpora`` bucket of JSONL shards and text files."""
  fsspec.filesystem("s3").mkdir("corpora")
  fsspec.filesystem("gs").mkdir("corpora")
  for scheme in ("s3", "gs"):
    with fsspec.open(f"{scheme}://corpora/web/part-0.jsonl", "w") as f:
      f.write("".join(json.dumps({"text": d}) + "\n" for d in _DOCS[:20]))
    with fsspec.open(f"{scheme}://corpora/web/part-1.jsonl", "w") as f:
      f.write("".join(json.dumps({"text": d}) + "\n" for d in _DOCS[20:]))
    for i, doc in enumerate(_DOCS[:6]):
      with fsspec.open(f"{scheme}://corpora/notes/n{i}.txt", "w") as f:
        f.write(doc)
  return object_stores


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_a_corpus_in_an_object_store_reads_like_a_local_one(stores, scheme, tmp_path):
  del stores
  data_dir = str(tmp_path / "data")
  source = corpus_lib.load_text_files(f"{scheme}://corpora/web/part-*.jsonl", "*", data_dir)
  texts = sorted(source.text(r) for r in [*source.train, *source.validation])
  assert texts == sorted(_DOCS)
  # A folder: its files matching data.file_pattern; plain files one document each.
  notes = corpus_lib.load_text_files(f"{scheme}://corpora/notes", "*.txt", data_dir)
  assert sorted(notes.text(r) for r in [*notes.train, *notes.validation]) == sorted(_DOCS[:6])
  # Prepared once: the same objects reuse the local copy; a changed object does not.
  files = corpus_lib.resolve_files(f"{scheme}://corpora/web/part-*.jsonl", "*")
  before = corpus_lib.fingerprint(files)
  with fsspec.open(f"{scheme}://corpora/web/part-1.jsonl", "a" if scheme == "s3" else "w") as f:
    f.write("".join(json.dumps({"text": d}) + "\n" for d in _DOCS[20:] + ["more"]))
  assert corpus_lib.fingerprint(corpus_lib.resolve_files(
      f"{scheme}://corpora/web/part-*.jsonl", "*")) != before
  with fsspec.open(f"{scheme}://corpora/web/part-1.jsonl", "w") as f:  # Restored.
    f.write("".join(json.dumps({"text": d}) + "\n" for d in _DOCS[20:]))


def test_missing_objects_and_an_unreachable_store_are_one_error(stores, tmp_path):
  del stores
  with pytest.raises(UserError, match=r"s3://corpora/none-\*\.jsonl.*matches no object"):
    corpus_lib.resolve_files("s3://corpora/none-*.jsonl", "*")
  with pytest.raises(UserError, match="gs://no-such-bucket/x.jsonl"):
    corpus_lib.resolve_files("gs://no-such-bucket/x.jsonl", "*")
  port = free_port()  # Nothing listens there.
  saved = os.environ["AWS_ENDPOINT_URL"]
  os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
  fsspec.config.conf.clear()
  start = time.perf_counter()
  try:
    import s3fs  # pylint: disable=import-outside-toplevel
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(UserError, match=r"s3://corpora/web: cannot reach the object store"):
      corpus_lib.resolve_files("s3://corpora/web", "*")
  finally:
    os.environ["AWS_ENDPOINT_URL"] = saved
    s3fs.S3FileSystem.clear_instance_cache()
  assert time.perf_counter() - start < 60


def test_a_run_trains_on_a_mixture_from_both_stores(stores, tmp_path, tokenizer_file):
  mixture = json.dumps([
      {"name": "s3web", "paths": "s3://corpora/web/part-*.jsonl", "weight": 0.5},
      {"name": "gsweb", "paths": "gs://corpora/web/part-*.jsonl", "weight": 0.3},
      {"name": "gsnotes", "paths": "gs://corpora/notes", "file_pattern": "*.txt", "weight": 0.2}])
  workdir = tmp_path / "run"
  args = [f"--workdir={workdir}", "--config=configs/gpt.py:tiny", "--config.train.steps=3",
          "--config.train.log_every=1", "--config.train.eval_every=0",
          "--config.train.sample_tokens=0", "--config.train.batch_size=4",
          "--config.model.num_layers=1", "--config.model.embed_dim=32",
          "--config.model.num_heads=2", "--config.model.mlp_dim=64",
          "--config.model.max_len=32", "--config.data.seq_len=32",
          f"--config.data.tokenizer={tokenizer_file}", "--config.model.vocab_size=512",
          "--config.train.progress=False"]
  result = run_train(*args, f"--config.data.mixture={mixture}")  # Inherits the endpoints.
  assert result.returncode == 0, result.stderr[-3000:]
  with open(workdir / "metrics.jsonl") as f:
    last = [json.loads(line) for line in f if '"loss"' in line][-1]
  assert last["step"] == 3 and all(last[f"data/tokens/{n}"] > 0 for n in ("s3web", "gsweb"))
  result = run_train(f"--workdir={tmp_path / 'bad'}", *args[1:],
                     "--config.data.paths=s3://corpora/none-*.jsonl")
  assert_user_error(result, "matches no object")
