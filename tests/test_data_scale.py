"""Record shards (JSON lines, .gz, .zst, Parquet, ArrayRecord) and weighted mixtures."""
import gzip
import json
import os
import signal
import time

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from array_record.python import array_record_module

from bigmodel.data import corpus as corpus_lib
from bigmodel.data import loader
from bigmodel.data import mixture as mixture_lib
from bigmodel.data.batch_spec import BatchSpec
from bigmodel.errors import UserError
from commands import TINY_RESUMABLE_RUN, assert_user_error, run_train, start_train

# Documents with what breaks naive readers: newlines, quotes, non-ASCII, a
# brace at the start (ArrayRecord tells JSON from text by it), an empty one.
_DOCS = [f"doc {i}: line one\nline \"two\" é {'x' * (i % 7)}\n" for i in range(60)]
_DOCS += ["{not json, plain text", "", "tail"]


def _texts(source) -> list[str]:
  records = list(source.train) + list(source.validation or [])
  return sorted(source.text(r) for r in records)


def _write_jsonl(path, docs, key="text", opener=open):
  with opener(path, "wt", encoding="utf-8") as f:
    for doc in docs:
      f.write(json.dumps({key: doc, "id": 0}) + "\n")


def _write_shards(folder, fmt, docs):
  """``docs`` in two shards of ``fmt`` in ``folder``; returns a glob of them."""
  os.makedirs(folder)
  halves = (docs[:len(docs) // 2], docs[len(docs) // 2:])
  for part, half in enumerate(halves):
    path = os.path.join(folder, f"part-{part}")
    if fmt == "txt":
      for i, doc in enumerate(half):
        with open(f"{path}-{i}.txt", "w", encoding="utf-8") as f:
          f.write(doc)
    elif fmt == "jsonl":
      _write_jsonl(f"{path}.jsonl", half)
    elif fmt == "jsonl.gz":
      _write_jsonl(f"{path}.jsonl.gz", half, opener=gzip.open)
    elif fmt == "jsonl.zst":
      with open(f"{path}.jsonl.zst", "wb") as raw:
        with zstandard.ZstdCompressor().stream_writer(raw) as f:
          f.write("".join(json.dumps({"text": d}) + "\n" for d in half).encode())
    elif fmt == "parquet":
      pq.write_table(pa.table({"text": half}), f"{path}.parquet", row_group_size=7)
    elif fmt == "array_record":
      writer = array_record_module.ArrayRecordWriter(f"{path}.array_record", "group_size:1")
      for i, doc in enumerate(half):  # JSON records and plain-text records alike.
        writer.write((json.dumps({"text": doc}) if i % 2 else doc).encode())
      writer.close()
  return os.path.join(folder, "part-*")


def test_every_shard_format_reads_the_same_documents(tmp_path):
  data_dir = str(tmp_path / "prepared")
  expected = sorted(d for d in _DOCS if d)  # An empty file is still a document;
  for fmt in ("txt", "jsonl", "jsonl.gz", "jsonl.zst", "parquet", "array_record"):
    paths = _write_shards(str(tmp_path / fmt.replace(".", "_")), fmt, [d for d in _DOCS if d])
    source = corpus_lib.load_text_files(paths, "*", data_dir)
    assert _texts(source) == expected, fmt
    if fmt != "txt":  # Records are split one by one: even one shard has both splits.
      assert len(source.validation) >= 1 and len(source.train) > 50, fmt
  # The text field by data.text_key.
  _write_jsonl(str(tmp_path / "content.jsonl"), _DOCS, key="content")
  source = corpus_lib.load_text_files(str(tmp_path / "content.jsonl"), "*", data_dir,
                                      text_key="content")
  assert _texts(source) == sorted(_DOCS)


def test_bad_records_are_skipped_up_to_the_limit_then_stop_the_run(tmp_path):
  data_dir = str(tmp_path / "prepared")
  lines = [json.dumps({"text": d}) for d in _DOCS[:50]]
  few = tmp_path / "few_bad.jsonl"
  few.write_text("\n".join(lines[:25] + ["{broken", '{"text": 3}'] + lines[25:]) + "\n")
  source = corpus_lib.load_text_files(str(few), "*", data_dir, max_bad_fraction=0.01)
  assert _texts(source) == sorted(_DOCS[:50])  # 2 bad of 52: fewer than 10, skipped.
  many = tmp_path / "many_bad.jsonl"
  many.write_text("\n".join(lines + ["not json"] * 12) + "\n")
  before = sorted(os.listdir(os.path.join(data_dir, "bigmodel_text_files")))
  with pytest.raises(UserError, match=r"12 of 62 records .*\(the first is record 50\)"):
    corpus_lib.load_text_files(str(many), "*", data_dir, max_bad_fraction=0.1)
  # Nothing half-prepared is left behind, nothing there before is gone.
  assert sorted(os.listdir(os.path.join(data_dir, "bigmodel_text_files"))) == before
  # The same file with a looser limit prepares (a new fingerprint is not needed:
  # the failed attempt left nothing to reuse).
  assert len(_texts(corpus_lib.load_text_files(str(many), "*", data_dir,
                                               max_bad_fraction=0.5))) == 50
  with pytest.raises(UserError, match="'body' field"):
    corpus_lib.load_text_files(str(few), "*", str(tmp_path / "other"), text_key="body")


def test_unreadable_shards_are_user_errors(tmp_path):
  data_dir = str(tmp_path / "prepared")
  (tmp_path / "corrupt.jsonl.gz").write_bytes(b"this is not gzip data at all")
  with pytest.raises(UserError, match=r"corrupt\.jsonl\.gz: cannot read it as jsonl"):
    corpus_lib.load_text_files(str(tmp_path / "corrupt.jsonl.gz"), "*", data_dir)
  whole = gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in _DOCS).encode())
  truncated = whole[:len(whole) // 2]
  (tmp_path / "truncated.jsonl.gz").write_bytes(truncated)
  with pytest.raises(UserError, match="cannot read it as jsonl"):
    corpus_lib.load_text_files(str(tmp_path / "truncated.jsonl.gz"), "*", data_dir)
  pq.write_table(pa.table({"body": ["a", "b"]}), str(tmp_path / "t.parquet"))
  with pytest.raises(UserError, match=r"no column data.text_key='text' \(columns: body\)"):
    corpus_lib.load_text_files(str(tmp_path / "t.parquet"), "*", data_dir)
  with pytest.raises(UserError, match="matches no file"):
    corpus_lib.load_text_files(str(tmp_path / "nothing-*.jsonl"), "*", data_dir)


@pytest.mark.parametrize("mixture, message", [
    ("not json", "not JSON"),
    ("[]", "non-empty JSON list"),
    ('[{"name": "a", "paths": "x", "weight": -1}]', "finite number >= 0"),
    ('[{"name": "a", "paths": "x", "weight": 0}, {"name": "b", "paths": "y", "weight": 0}]',
     "every weight is 0"),
    ('[{"name": "a", "paths": "x", "weight": 1}, {"name": "a", "paths": "y", "weight": 1}]',
     "repeats"),
    ('[{"name": "a/b", "paths": "x", "weight": 1}]', "letters, digits"),
    ('[{"name": "a", "paths": "x", "weight": 1, "wieght": 2}]', "unknown keys ['wieght']"),
    ('[{"name": "a", "weight": 1}]', "exactly one of paths"),
])
def test_bad_mixtures_are_refused(mixture, message):
  with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
    mixture_lib.parse(mixture)


def test_a_zero_weight_leaves_its_source_out():
  sources = mixture_lib.parse('[{"name": "a", "paths": "x", "weight": 2},'
                              ' {"name": "b", "tfds_name": "lm1b", "weight": 0}]')
  assert [(s.name, s.weight) for s in sources] == [("a", 2.0)]


class _Letters(grain.transforms.Map):
  """A record {"n": k} -> k tokens, each = the record's source letter code."""

  def map(self, record):
    return {"tokens": np.full(record["n"], record["code"], np.int32)}


def _toy_stages():
  spec = BatchSpec.of(tokens=((8,), np.int32), segment_ids=((8,), np.int32))
  return loader.Stages(_Letters(), packing="concat", lengths={"tokens": 8},
                       to_batch=lambda rows: {"tokens": rows["tokens"],
                                              "segment_ids": rows["tokens_segment_ids"]},
                       spec=spec)


def _toy_mixture(weights):
  # Sources of very different document lengths: the weights are token shares anyway.
  sizes = {"a": 1, "b": 5, "c": 13}
  return [loader.MixtureComponent(name, [{"n": sizes[name], "code": code}] * 7, weight,
                                  _toy_stages())
          for code, (name, weight) in enumerate(weights.items(), start=1)]


def test_a_mixture_gives_its_weights_as_token_shares_and_resumes_exactly():
  weights = {"a": 0.5, "b": 0.3, "c": 0.2}
  iterator = loader.make_mixture_train_iter(_toy_mixture(weights), batch_size=5, seed=3)
  batches, states = [], []
  for _ in range(40):
    states.append(json.loads(json.dumps(iterator.get_state())))
    batches.append(next(iterator))
  tokens = np.concatenate([b["tokens"].ravel() for b in batches])
  shares = np.bincount(tokens, minlength=4)[1:] / len(tokens)
  np.testing.assert_allclose(shares, list(weights.values()), atol=0.02)
  counted = iterator.source_tokens()
  assert counted == {name: int((tokens == code).sum())
                     for code, name in enumerate(weights, start=1)}
  assert all(len(set(row[row > 0])) == 1 for b in batches for row in b["tokens"])  # One source.
  restored = loader.make_mixture_train_iter(_toy_mixture(weights), batch_size=5, seed=3)
  restored.set_state(states[17])
  for expected in batches[17:]:
    np.testing.assert_array_equal(next(restored)["tokens"], expected["tokens"])
  assert restored.source_tokens() == counted
  # New weights on resume: each source continues where it was, at the new shares.
  reweighted = loader.make_mixture_train_iter(
      _toy_mixture({"a": 0.1, "b": 0.1, "c": 0.8}), batch_size=5, seed=3)
  reweighted.set_state(states[-1])
  later = np.concatenate([next(reweighted)["tokens"].ravel() for _ in range(40)])
  assert abs((later == 3).mean() - 0.8) < 0.03


# -- The trainer on a mixture of three formats: shares logged, kill -9 and resume exact.

_RUN = TINY_RESUMABLE_RUN


@pytest.fixture(name="three_sources", scope="module")
def fixture_three_sources(tmp_path_factory):
  root = tmp_path_factory.mktemp("mix")
  words = "def return self import class lambda yield with".split()
  rng = np.random.default_rng(0)
  docs = [" ".join(rng.choice(words, 60)) + f" {i}\n" for i in range(90)]
  gz = _write_shards(str(root / "gz"), "jsonl.gz", docs[:30])
  parquet = _write_shards(str(root / "parquet"), "parquet", docs[30:60])
  txt = _write_shards(str(root / "txt"), "txt", docs[60:])
  return json.dumps([{"name": "gz", "paths": gz, "weight": 0.6},
                     {"name": "parquet", "paths": parquet, "weight": 0.3},
                     {"name": "txt", "paths": txt, "weight": 0.1}])


def _records(workdir):
  by_step = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if "loss" in record:
        by_step[record["step"]] = record
  return by_step


def test_a_mixture_run_logs_its_shares_and_resumes_exactly_after_kill(tmp_path, three_sources):
  reference = tmp_path / "reference"
  result = run_train(f"--workdir={reference}", *_RUN, f"--config.data.mixture={three_sources}")
  assert result.returncode == 0, result.stderr[-3000:]
  expected = _records(reference)
  assert sorted(expected) == list(range(1, 9))
  last = expected[8]
  # 32 rows of one source each: the shares are the weights to a row (1/32).
  shares = [last[f"data/share/{n}"] for n in ("gz", "parquet", "txt")]
  np.testing.assert_allclose(shares, [0.6, 0.3, 0.1], atol=1 / 32)
  killed = tmp_path / "killed"
  process = start_train(f"--workdir={killed}", *_RUN, f"--config.data.mixture={three_sources}")
  deadline = time.time() + 300
  while not (os.path.exists(killed / "metrics.jsonl") and max(_records(killed) or [0]) >= 5):
    assert process.poll() is None and time.time() < deadline, process.communicate()[1][-3000:]
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  result = run_train(f"--workdir={killed}", *_RUN, f"--config.data.mixture={three_sources}")
  assert result.returncode == 0, result.stderr[-3000:]
  resumed = _records(killed)
  for step in range(1, 9):
    for key in ("loss", "data/tokens/gz", "data/tokens/parquet", "data/tokens/txt"):
      assert resumed[step][key] == expected[step][key], (step, key)


def test_a_bad_mixture_or_shard_is_one_error_line_before_anything_is_written(tmp_path):
  workdir = tmp_path / "run"
  result = run_train(f"--workdir={workdir}", *_RUN,
                     '--config.data.mixture=[{"name": "a", "paths": "x", "weight": -1}]')
  assert_user_error(result, "data.mixture[0].weight=-1 must be a finite number >= 0")
  assert not workdir.exists()
  (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
  result = run_train(f"--workdir={workdir}", *_RUN, f"--config.data.paths={tmp_path}/*.gz")
  assert_user_error(result, "bad.jsonl.gz: cannot read it as jsonl")


# -- The token cache.


def _cache_config(tokenizer, corpus, workdir_cache, task="lm", **data):
  from bigmodel.config import base_config  # pylint: disable=import-outside-toplevel
  config = base_config()
  config.model.vocab_size = 512
  config.data.update(seq_len=32, tokenizer=tokenizer, paths=corpus, task=task,
                     token_cache=workdir_cache, cache_workers=2, **data)
  config.train.update(batch_size=4, eval_steps=2)
  return config


def _first_batches(datasets, n=6):
  train = [next(datasets.train_iter) for _ in range(n)]
  evaluation = list(datasets.make_eval_iter())
  datasets.train_iter.close()
  return train + evaluation


@pytest.fixture(name="cache_corpus", scope="module")
def fixture_cache_corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("cache_corpus")
  rng = np.random.default_rng(1)
  words = "import json def class return yield self value key".split()
  docs = [" ".join(rng.choice(words, int(rng.integers(5, 80)))) + "\n" for i in range(120)]
  return _write_shards(str(root / "shards"), "jsonl.gz", docs)


@pytest.mark.parametrize("task", ["lm", "mlm", "span_corruption"])
def test_the_token_cache_gives_the_text_pipelines_batches(tmp_path, tokenizer_file,
                                                          cache_corpus, task, monkeypatch):
  from bigmodel.data import build_datasets  # pylint: disable=import-outside-toplevel
  from bigmodel.data import token_cache  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(token_cache, "DOCUMENTS_PER_SHARD", 32)  # 4 train shards.
  plain = _first_batches(build_datasets(
      _cache_config(tokenizer_file, cache_corpus, "", task=task), str(tmp_path / "a")))
  config = _cache_config(tokenizer_file, cache_corpus, str(tmp_path / "cache"), task=task)
  cached = _first_batches(build_datasets(config, str(tmp_path / "b")))
  assert len(plain) == len(cached) == 8
  for want, got in zip(plain, cached):
    assert want.keys() == got.keys()
    for key in want:
      np.testing.assert_array_equal(want[key], got[key], err_msg=key)
  if task != "lm":
    return
  (folder,) = os.listdir(tmp_path / "cache")
  names = sorted(os.listdir(tmp_path / "cache" / folder))
  assert names[0] == "cache.json" and len([n for n in names if n.startswith("train-")]) == 4


def test_the_token_cache_is_reused_and_a_new_tokenizer_gets_its_own(tmp_path, tokenizer_file,
                                                                     cache_corpus, monkeypatch):
  from bigmodel.data import build_datasets  # pylint: disable=import-outside-toplevel
  from bigmodel.data import token_cache  # pylint: disable=import-outside-toplevel
  from bigmodel.data.tokenizer import train_tokenizer  # pylint: disable=import-outside-toplevel
  root = tmp_path / "cache"
  build_datasets(_cache_config(tokenizer_file, cache_corpus, str(root)),
                 str(tmp_path / "a")).train_iter.close()
  (folder,) = os.listdir(root)
  written = {n: os.stat(root / folder / n).st_mtime_ns for n in os.listdir(root / folder)}
  tokenized = []
  monkeypatch.setattr(token_cache, "_write_shard",
                      lambda *args: tokenized.append(args) or (0, 0, 0))
  # Reused: by the folder of caches and by the cache's own folder; nothing rewritten.
  for cache in (root, root / folder):
    build_datasets(_cache_config(tokenizer_file, cache_corpus, str(cache)),
                   str(tmp_path / "b")).train_iter.close()
  assert not tokenized
  assert {n: os.stat(root / folder / n).st_mtime_ns for n in written} == written
  monkeypatch.undo()
  # Another tokenizer: its own folder beside the first, which stays.
  other = tmp_path / "other.model"
  other.write_bytes(train_tokenizer(["def f(x):\n  return x\n" * 50, "import os\n" * 30],
                                    300).model_proto)
  build_datasets(_cache_config(str(other), cache_corpus, str(root)),
                 str(tmp_path / "c")).train_iter.close()
  assert len(os.listdir(root)) == 2 and folder in os.listdir(root)
  # Named directly, the first tokenizer's cache refuses the other tokenizer.
  with pytest.raises(UserError, match="made with another tokenizer"):
    build_datasets(_cache_config(str(other), cache_corpus, str(root / folder)),
                   str(tmp_path / "d"))
  with pytest.raises(UserError, match="caches text corpora"):
    build_datasets(_cache_config(str(other), cache_corpus, str(root), task="classify"),
                   str(tmp_path / "e"))


def test_prepare_tokenizes_once_for_the_run_that_follows(tmp_path, cache_corpus):
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from commands import ROOT  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / "run"
  args = [f"--workdir={workdir}", *_RUN, f"--config.data.paths={cache_corpus}",
          "--config.data.cache_workers=2", "--config.data.vocab_size=300"]
  prepared = subprocess.run([sys.executable, "-m", "bigmodel.prepare", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
  assert prepared.returncode == 0, prepared.stderr[-3000:]
  assert f"token cache in {workdir}/data/token_cache" in prepared.stdout
  (folder,) = os.listdir(workdir / "data" / "token_cache")
  assert "cache.json" in os.listdir(workdir / "data" / "token_cache" / folder)
  trained = run_train(*args, "--config.data.token_cache=auto", "--config.train.steps=2")
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert "Reusing the token cache" in trained.stderr and "tokenizing" not in trained.stderr
  refused = subprocess.run([sys.executable, "-m", "bigmodel.prepare", f"--workdir={workdir}",
                            "--config=configs/gpt.py:tiny", "--config.data.source=synthetic"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert_user_error(refused, "nothing to prepare")


def test_hosts_tokenize_their_own_shares_of_the_cache(tmp_path, tokenizer_file, cache_corpus,
                                                      monkeypatch):
  import threading  # pylint: disable=import-outside-toplevel
  from bigmodel.data import token_cache  # pylint: disable=import-outside-toplevel
  from bigmodel.data.tokenizer import Tokenizer  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(token_cache, "DOCUMENTS_PER_SHARD", 16)
  monkeypatch.setattr(token_cache, "_WAIT_SECONDS", 60.0)
  source = corpus_lib.load_text_files(cache_corpus, "*", str(tmp_path / "data"))
  tokenizer = Tokenizer.load(tokenizer_file)
  written, results = {}, {}
  real_write = token_cache._write_shard  # pylint: disable=protected-access

  def write_and_note(records, text_key, tok, start, stop, path):
    written[os.path.basename(path)] = threading.current_thread().name
    return real_write(records, text_key, tok, start, stop, path)
  monkeypatch.setattr(token_cache, "_write_shard", write_and_note)

  def host(index):
    results[index] = token_cache.cached_source(source, tokenizer, str(tmp_path / "cache"),
                                               workers=1, process_index=index, process_count=2)
  threads = [threading.Thread(target=host, args=(i,), name=f"host{i}") for i in (1, 0)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  train_shards = sorted(name for name in written if name.startswith("train-"))
  assert len(train_shards) == 8  # 119 documents, 16 per shard.
  assert [written[name] for name in train_shards] == ["host0", "host1"] * 4
  for index in (0, 1):
    assert [bytes(r) for r in results[index].train] == [bytes(r) for r in results[0].train]
  assert len(results[0].train) == len(source.train)


@pytest.mark.parametrize("fmt", ["jsonl.gz", "jsonl.zst", "parquet"])
def test_labelled_tasks_read_compressed_jsonl_and_parquet(tmp_path, fmt):
  from bigmodel.data import records  # pylint: disable=import-outside-toplevel
  rows = [{"text": f"review {i} é", "label": "good" if i % 3 else "bad"} for i in range(30)]
  plain = tmp_path / "plain" / "train.jsonl"
  plain.parent.mkdir()
  plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
  other = tmp_path / "other" / f"train.{fmt}"
  other.parent.mkdir()
  if fmt == "parquet":
    pq.write_table(pa.table({"text": [r["text"] for r in rows],
                             "label": [r["label"] for r in rows], "unused": [1] * 30}),
                   str(other), row_group_size=8)
  elif fmt == "jsonl.gz":
    with gzip.open(other, "wt", encoding="utf-8") as f:
      f.write("".join(json.dumps(r) + "\n" for r in rows))
  else:
    with open(other, "wb") as raw, zstandard.ZstdCompressor().stream_writer(raw) as f:
      f.write("".join(json.dumps(r) + "\n" for r in rows).encode())
  want = records.read_task_file(str(plain), "text", "label", "classify")
  assert records.read_task_file(str(other), "text", "label", "classify") == want
  source = records.load_task_files(str(other.parent), "classify", "text", "label",
                                   str(tmp_path / "data"))
  assert len(source.train) + len(source.validation) == 30
  if fmt == "parquet":
    with pytest.raises(UserError, match=r"no column data.label_column='stars'"):
      records.read_task_file(str(other), "text", "stars", "classify")
