"""Tests of bigmodel.data on small corpora written into tmp_path."""
import glob
import json
import os
import pickle
import sysconfig
import tempfile

from etils import epath
import numpy as np
import pytest
import tensorflow_datasets as tfds

from bigmodel.config import base_config, validate
from bigmodel.data import build_datasets, train_batch_spec
from bigmodel.data import validate_data_config
from bigmodel.data import corpus as corpus_lib
from bigmodel.data import loader
from bigmodel.data import registry
from bigmodel.data import sources
from bigmodel.data import tokenizer as tokenizer_lib
from bigmodel.errors import UserError

SEQ_LEN = 16
BOS, EOS = tokenizer_lib.BOS_ID, tokenizer_lib.EOS_ID


def _fake_module(rng: np.random.Generator, num_functions: int) -> str:
  """Python-looking text: indentation, blank lines, tabs, non-ASCII."""
  words = ["alpha", "beta", "gamma", "delta", "value", "index", "result",
           "count", "name", "items", "total", "π", "größe"]
  lines = [f'"""Module {rng.integers(1000)}."""', "import os", ""]
  for _ in range(num_functions):
    a, b, c = rng.choice(words, 3)
    lines += [f"def {a}_{b}({c}, *args):",
              f"    {a} = {c} + {int(rng.integers(100))}",
              f"    for {b} in range(len({c})):",
              f"        if {b} % 2:\t# odd",
              f"            {a} += {b}",
              f"    return {a}  # {c}", "", ""]
  return "\n".join(lines)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> str:
  """16 .py files of varied length (one empty, one with invalid UTF-8), plus
  files that must be ignored."""
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  for i in range(14):
    path = root / ("pkg" if i % 2 else "") / f"mod_{i}.py"
    path.parent.mkdir(exist_ok=True)
    path.write_text(_fake_module(rng, num_functions=1 + 3 * (i % 5)),
                    encoding="utf-8")
  (root / "empty.py").write_bytes(b"")
  (root / "latin1.py").write_bytes(b"x = '\xe9t\xe9'\n")
  (root / "notes.txt").write_text("not python\n")
  (root / ".hidden").mkdir()
  (root / ".hidden" / "skip.py").write_text("skip = True\n")
  return str(root)


def _config(workdir, **overrides):
  config = base_config()
  config.data.vocab_size = 400
  config.data.seq_len = SEQ_LEN
  config.model.vocab_size = 512
  config.train.batch_size = 4
  config.train.eval_steps = 2
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("work"))


@pytest.fixture(scope="module")
def datasets(corpus_dir, workdir):
  return build_datasets(_config(workdir, **{"data.paths": corpus_dir}),
                        workdir)


@pytest.fixture(scope="module")
def corpus(corpus_dir, datasets, workdir):
  del datasets  # Prepares the corpus that this opens again.
  return corpus_lib.load_text_files(corpus_dir, "*.py",
                                    os.path.join(workdir, "data"))


def _documents_in_stream(batches) -> list[tuple[int, ...]]:
  """Documents, in order, of the token stream that packed batches carry.

  A row of L + 1 stream tokens is its inputs plus the last target; padding
  is 0 and never a real token. Documents are BOS ... EOS (a trailing partial
  one is kept).
  """
  stream = []
  for batch in batches:
    rows = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
    stream.extend(int(t) for t in rows.reshape(-1) if t != 0)
  documents, current = [], None
  for token in stream:
    if token == BOS:
      current = []
    elif token == EOS:
      documents.append(tuple(current))
      current = None
    else:
      current.append(token)
  if current is not None:
    documents.append(tuple(current))
  return documents


def _lm_stages(datasets, corpus) -> loader.Stages:
  """The lm task's stages, as the registry makes them for the loader."""
  config = _config("unused", **{"data.paths": "unused"})
  context = registry.Context(config, datasets.tokenizer, datasets.special_ids,
                             corpus)
  return registry.TASKS["lm"].plan(context).train


def _encoded(corpus, tokenizer, records) -> list[tuple[int, ...]]:
  return [tuple(tokenizer.encode(corpus.text(r))) for r in records]


def test_tokenizer_round_trips_stdlib_code(tmp_path):
  json_dir = os.path.join(sysconfig.get_paths()["stdlib"], "json")
  texts = []
  for path in sorted(glob.glob(os.path.join(json_dir, "*.py"))):
    with open(path, encoding="utf-8") as f:
      texts.append(f.read())
  tokenizer = tokenizer_lib.train_tokenizer(texts, vocab_size=400)
  assert tokenizer.vocab_size == 400
  tricky = ["\tif  x:\r\n\t\treturn  'é' \n\n\n   ", "  leading", "trailing  ",
            "emoji 🙂 and \x00 nul", ""]
  for text in texts + tricky:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert min(ids, default=4) > EOS  # Never pad/bos/eos from text.
  assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
  assert len(tokenizer.encode("\n")) == 1
  assert len(tokenizer.encode("        ")) == 1  # Indentation is one piece.
  assert tokenizer.decode([BOS] + tokenizer.encode("a = 1") + [EOS, 0]) == (
      "a = 1")
  # Deterministic, and picklable for grain workers.
  assert tokenizer_lib.train_tokenizer(texts, 400).model_proto == (
      tokenizer.model_proto)
  clone = pickle.loads(pickle.dumps(tokenizer))
  assert clone.encode(texts[0]) == tokenizer.encode(texts[0])


def test_packed_batch_invariants(datasets):
  batches = [next(datasets.train_iter) for _ in range(30)]
  for batch in batches:
    assert sorted(batch) == ["inputs", "loss_mask", "positions",
                             "segment_ids", "targets"]
    for key, value in batch.items():
      assert value.shape == (4, SEQ_LEN)
      assert value.dtype == (np.float32 if key == "loss_mask" else np.int32)
    inputs, targets = batch["inputs"], batch["targets"]
    segments, positions = batch["segment_ids"], batch["positions"]
    mask = batch["loss_mask"]
    np.testing.assert_array_equal(targets[:, :-1], inputs[:, 1:])
    assert positions.min() >= 0 and positions.max() < SEQ_LEN
    for row in range(4):
      seg, pos = segments[row], positions[row]
      assert seg[0] == 1 and pos[0] == 0
      for i in range(1, SEQ_LEN):
        if seg[i] == seg[i - 1]:
          assert pos[i] == pos[i - 1] + 1
        else:
          assert seg[i] == seg[i - 1] + 1 and pos[i] == 0
          assert inputs[row, i] == BOS and mask[row, i - 1] == 0
          assert inputs[row, i - 1] == EOS
      # Positions > 0 inside a row only continue a segment.
    assert np.all(mask[targets == BOS] == 0)
    assert np.all(mask[inputs == EOS] == 0)
    assert np.all(np.isin(mask, [0.0, 1.0]))
  # Loss is on almost every token: only document boundaries are masked.
  assert np.mean([b["loss_mask"].mean() for b in batches]) > 0.9


def test_eval_pass_loses_and_duplicates_no_token(corpus, datasets):
  tokenizer = datasets.tokenizer
  batches = list(loader.make_eval_iter(
      corpus.train, _lm_stages(datasets, corpus), batch_size=3,
      num_batches=200))
  assert len(batches) == 200
  assert batches[-1]["loss_mask"].sum() == 0  # The split ran out: padding.
  for batch in batches:  # No loss on padding, nor on predicting padding.
    assert not np.any(batch["loss_mask"][batch["segment_ids"] == 0])
    assert not np.any(batch["loss_mask"][batch["targets"] == 0])
  assert _documents_in_stream(batches) == _encoded(corpus, tokenizer,
                                                   corpus.train)


def test_train_epochs_cover_documents_and_reshuffle(corpus, datasets):
  tokenizer = datasets.tokenizer
  iterator = loader.make_train_iter(
      corpus.train, _lm_stages(datasets, corpus), batch_size=4, seed=0)
  documents = _documents_in_stream(next(iterator) for _ in range(150))
  expected = _encoded(corpus, tokenizer, corpus.train)
  count = len(expected)
  assert len(documents) > 2 * count
  first_epoch, second_epoch = documents[:count], documents[count:2 * count]
  assert sorted(first_epoch) == sorted(expected)
  assert sorted(second_epoch) == sorted(expected)
  assert first_epoch != expected  # Shuffled ...
  assert second_epoch != first_epoch  # ... differently each epoch.


def test_hosts_read_disjoint_shards_that_cover_the_split(corpus, datasets):
  tokenizer = datasets.tokenizer
  seen = []
  for process_index in range(2):
    iterator = loader.make_train_iter(
        corpus.train, _lm_stages(datasets, corpus), batch_size=2, seed=0,
        process_index=process_index, process_count=2)
    shard_size = len(range(process_index, len(corpus.train), 2))
    documents = _documents_in_stream(next(iterator) for _ in range(150))
    seen.append(documents[:shard_size])
  expected = _encoded(corpus, tokenizer, corpus.train)
  assert len(set(expected)) == len(expected)  # All documents differ.
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == sorted(expected)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_train_iterator_resumes_exactly(corpus, datasets, num_workers):
  def make():
    return loader.make_train_iter(
        corpus.train, _lm_stages(datasets, corpus), batch_size=2, seed=3,
        num_workers=num_workers)
  iterator = make()
  states, batches = [], []
  for _ in range(12):
    # Through JSON, as a checkpoint would store it.
    states.append(json.loads(json.dumps(iterator.get_state())))
    batches.append(next(iterator))
  iterator.close()
  for step in (1, 7) if num_workers else range(12):
    restored = make()
    restored.set_state(states[step])
    for expected in batches[step:step + 3]:
      actual = next(restored)
      for key in expected:
        np.testing.assert_array_equal(actual[key], expected[key])
    restored.close()


def test_eval_iterator_is_deterministic_and_finite(datasets):
  first = list(datasets.make_eval_iter())
  second = list(datasets.make_eval_iter())
  assert len(first) == 2
  for a, b in zip(first, second):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
    assert a["inputs"].shape == (4, SEQ_LEN)
  assert first[0]["loss_mask"].sum() > 0


def test_synthetic_batches(tmp_path):
  config = _config(tmp_path, **{"data.source": "synthetic",
                                "model.vocab_size": 50})
  first = build_datasets(config, str(tmp_path))
  assert first.tokenizer is None and first.make_eval_iter is None
  batches = [next(first.train_iter) for _ in range(3)]
  state = first.train_iter.get_state()
  after = next(first.train_iter)
  again = build_datasets(config, str(tmp_path))
  np.testing.assert_array_equal(next(again.train_iter)["inputs"],
                                batches[0]["inputs"])
  again.train_iter.set_state(json.loads(json.dumps(state)))
  np.testing.assert_array_equal(next(again.train_iter)["inputs"],
                                after["inputs"])
  other_host = build_datasets(config, str(tmp_path), process_index=1,
                              process_count=2)
  assert next(other_host.train_iter)["inputs"].shape == (2, SEQ_LEN)
  batch = batches[0]
  assert first.train_spec.mismatches(batch, 4) == []
  assert train_batch_spec(config) == first.train_spec
  assert batch["inputs"].min() >= 3 and batch["inputs"].max() < 50
  np.testing.assert_array_equal(batch["targets"][:, :-1],
                                batch["inputs"][:, 1:])
  assert batch["loss_mask"].min() == 1 and batch["segment_ids"].min() == 1
  np.testing.assert_array_equal(batch["positions"][1], np.arange(SEQ_LEN))


def test_prepared_corpus_and_tokenizer_are_reused(corpus_dir, tmp_path,
                                                  monkeypatch):
  corpus_copy = tmp_path / "corpus"
  corpus_copy.mkdir()
  for path in glob.glob(os.path.join(corpus_dir, "*.py")):
    (corpus_copy / os.path.basename(path)).write_bytes(
        epath.Path(path).read_bytes())
  generated = []
  original = sources.PreparedRecords._generate_examples

  def counting(self, files):
    generated.append(len(files))
    return original(self, files)
  monkeypatch.setattr(sources.BigmodelTextFiles, "_generate_examples",
                      counting)
  temporary = tmp_path / "tmp"  # Preparing leaves nothing in the temporary folder.
  temporary.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(temporary))
  config = _config(tmp_path, **{"data.paths": str(corpus_copy)})
  workdir = str(tmp_path / "work")
  build_datasets(config, workdir)
  assert len(generated) == 2  # Train and validation.

  def no_training(*args, **kwargs):
    raise AssertionError("the tokenizer was trained again")
  monkeypatch.setattr(tokenizer_lib, "train_tokenizer", no_training)
  build_datasets(config, workdir)
  assert len(generated) == 2  # Reused.

  (corpus_copy / "mod_0.py").write_text("changed = True\n")
  build_datasets(config, workdir)
  assert len(generated) == 4  # A changed corpus is prepared again.
  prepared = glob.glob(os.path.join(workdir, "data", "*", "files_*"))
  assert len(prepared) == 2
  assert not list(temporary.iterdir())


def test_paths_as_file_glob_and_default_stdlib(corpus_dir):
  files = corpus_lib.resolve_files(corpus_dir, "*.py")
  names = sorted(f.relpath for f in files)
  assert len(names) == 16 and "notes.txt" not in names
  assert not any(".hidden" in n for n in names)
  globbed = corpus_lib.resolve_files(os.path.join(corpus_dir, "**", "*.py"),
                                     "unused")
  assert sorted(f.relpath for f in globbed) == names
  single = corpus_lib.resolve_files(os.path.join(corpus_dir, "mod_0.py"), "")
  assert [f.relpath for f in single] == ["mod_0.py"]
  train, validation = corpus_lib.assign_splits(files)
  assert validation and train and len(train) + len(validation) == 16
  assert corpus_lib.assign_splits(files[:2])[1]
  stdlib = corpus_lib.resolve_files("", "*.py")
  assert len(stdlib) > 500
  assert not any("site-packages" in f.path for f in stdlib)


def test_single_file_corpus_has_no_eval(corpus_dir, tmp_path):
  config = _config(tmp_path, **{
      "data.paths": os.path.join(corpus_dir, "mod_8.py")})
  result = build_datasets(config, str(tmp_path))
  assert result.make_eval_iter is None
  assert next(result.train_iter)["inputs"].shape == (4, SEQ_LEN)


class TinyLines(tfds.core.GeneratorBasedBuilder):
  """A registered tfds text dataset (``tiny_lines``) standing in for lm1b."""

  VERSION = tfds.core.Version("1.0.0")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return epath.Path(__file__)

  def _info(self):
    features = tfds.features.FeaturesDict({"sentence": tfds.features.Text()})
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(40),
            "test": self._generate_examples(5)}

  def _generate_examples(self, count):
    for i in range(count):
      yield i, {"sentence": f"sentence number {i} says hello to {i * 7}."}


def test_tfds_dataset_by_name(tmp_path):
  data_dir = str(tmp_path / "tfds")
  builder = TinyLines(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  config = _config(tmp_path, **{
      "data.source": "tfds", "data.tfds_name": "tiny_lines",
      "data.text_key": "sentence", "data.data_dir": data_dir})
  result = build_datasets(config, str(tmp_path / "work"))
  batch = next(result.train_iter)
  assert batch["inputs"].shape == (4, SEQ_LEN)
  assert "hello" in result.tokenizer.decode(batch["inputs"].reshape(-1))
  eval_batches = list(result.make_eval_iter())  # From the "test" split.
  assert len(eval_batches) == 2 and eval_batches[0]["loss_mask"].sum() > 0
  config.data.text_key = "text"
  with pytest.raises(UserError, match="text_key"):
    build_datasets(config, str(tmp_path / "work"))


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory, datasets) -> str:
  path = tmp_path_factory.mktemp("tok") / "t.model"
  path.write_bytes(datasets.tokenizer.model_proto)  # 400 pieces.
  return str(path)


def _overridden(tmp_path, corpus_dir, tokenizer_file, overrides):
  """_config with "{empty}", "{corpus}", "{tokenizer}" replaced."""
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "a.py").write_bytes(b"")
  replacements = {"{empty}": str(empty), "{corpus}": corpus_dir,
                  "{tokenizer}": tokenizer_file}
  return _config(tmp_path, **{
      k: replacements.get(v, v) if isinstance(v, str) else v
      for k, v in overrides.items()})


@pytest.mark.parametrize("overrides, message", [
    ({"data.source": "hdf5"}, "data.source"),
    ({"data.seq_len": 300}, "max_len"),
])
def test_config_errors(overrides, message, tmp_path):
  """Settings that bigmodel.config.validate refuses (the trainer's first
  check), before the data layer is reached."""
  with pytest.raises(UserError, match=message):
    validate(_config(tmp_path, **overrides))


@pytest.mark.parametrize("overrides, message", [
    ({"data.vocab_size": 600}, "model.vocab_size"),
    ({"train.batch_size": 3}, "multiple"),
    ({"data.task": "bert"}, "data.task"),
    ({"data.source": "tfds", "data.tfds_name": "huggingface:imdb"},
     "community dataset"),
])
def test_data_config_errors(overrides, message, tmp_path):
  """Settings the data layer refuses before touching any data (a valid
  config otherwise); build_datasets refuses them the same way."""
  config = _config(tmp_path, **overrides)
  validate(config)
  with pytest.raises(UserError, match=message):
    validate_data_config(config, process_count=2)
  with pytest.raises(UserError, match=message):
    build_datasets(config, str(tmp_path), process_count=2)


@pytest.mark.parametrize("overrides, message", [
    ({"data.paths": "/no/such/dir"}, "data.paths"),
    ({"data.paths": "{empty}"}, "empty"),
    ({"data.paths": "{corpus}", "data.file_pattern": "*.rs"}, "file_pattern"),
    ({"data.source": "tfds", "data.tfds_name": "no_such_dataset"},
     "no_such_dataset"),
    ({"data.source": "tfds", "data.tfds_name": "lm1b",
      "data.data_dir": "{empty}"}, "not prepared"),
    ({"data.paths": "{corpus}", "data.tokenizer": "/no/such.model"},
     "does not exist"),
    ({"data.paths": "{corpus}", "data.tokenizer": "{tokenizer}",
      "model.vocab_size": 399}, "model.vocab_size"),
])
def test_data_errors(overrides, message, tmp_path, corpus_dir,
                     tokenizer_file):
  """Data that cannot work, found by build_datasets: the config itself
  passes both validations."""
  config = _overridden(tmp_path, corpus_dir, tokenizer_file, overrides)
  validate(config)
  validate_data_config(config, process_count=2)
  with pytest.raises(UserError, match=message):
    build_datasets(config, str(tmp_path), process_count=2)


def test_rope_allows_seq_len_beyond_max_len(tmp_path):
  config = _config(tmp_path, **{
      "data.source": "synthetic", "data.seq_len": 300,
      "model.position_embedding": "rope"})
  batch = next(build_datasets(config, str(tmp_path)).train_iter)
  assert batch["inputs"].shape == (4, 300)
