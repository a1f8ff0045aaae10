"""Tests of the BERT / T5 data tasks: mlm, span_corruption, classify, seq2seq."""
import collections
import csv
import glob
import json
import os
import shutil
import sysconfig

from etils import epath
import numpy as np
import pytest
import tensorflow_datasets as tfds

from bigmodel.config import base_config
from bigmodel.data import build_datasets, decode
from bigmodel.data import corpus as corpus_lib
from bigmodel.data import loader
from bigmodel.data import records as records_lib
from bigmodel.data import registry
from bigmodel.data.objectives import span_corruption_lengths
from bigmodel.data.transforms import ENCODER_DECODER_KEYS
from bigmodel.errors import UserError

SEQ_LEN = 32
BATCH = 4
PAD, BOS, EOS = 0, 1, 2
STDLIB = sysconfig.get_paths()["stdlib"]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> str:
  """Real text: the .py files of two small stdlib packages."""
  root = tmp_path_factory.mktemp("corpus")
  for package in ("json", "concurrent/futures"):
    for path in sorted(glob.glob(os.path.join(STDLIB, package, "*.py"))):
      shutil.copy(path, root / f"{package.replace('/', '_')}_"
                  f"{os.path.basename(path)}")
  return str(root)


def _config(tokenizer_file, **overrides):
  config = base_config()
  config.data.seq_len = SEQ_LEN
  config.data.tokenizer = tokenizer_file
  config.model.vocab_size = 512
  config.train.batch_size = BATCH
  config.train.eval_steps = 2
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def _assert_resumes_exactly(make_iterator, steps=6):
  """Batches after set_state(state through JSON) equal the originals."""
  iterator = make_iterator()
  states, batches = [], []
  for _ in range(steps):
    states.append(json.loads(json.dumps(iterator.get_state())))
    batches.append(next(iterator))
  for step in (1, steps - 2):
    restored = make_iterator()
    restored.set_state(states[step])
    for expected in batches[step:]:
      actual = next(restored)
      assert sorted(actual) == sorted(expected)
      for key in expected:
        np.testing.assert_array_equal(actual[key], expected[key])


def _assert_segments_well_formed(segment_ids, positions):
  for seg, pos in zip(segment_ids, positions):
    real = seg > 0
    assert np.all(pos[~real] == 0)
    starts = np.flatnonzero(real & (pos == 0))
    assert list(seg[starts]) == list(range(1, len(starts) + 1))
    for i in np.flatnonzero(real & (pos > 0)):
      assert seg[i] == seg[i - 1] and pos[i] == pos[i - 1] + 1


# --------------------------------------------------------------------------
# MLM.


def test_mlm_batches(tmp_path, tokenizer_file, corpus_dir):
  config = _config(tokenizer_file, **{"data.task": "mlm",
                                      "data.paths": corpus_dir})
  datasets = build_datasets(config, str(tmp_path))
  assert datasets.special_ids.mask_id == 400
  chosen = eligible = 0
  for _ in range(40):
    batch = next(datasets.train_iter)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "inputs": ((BATCH, SEQ_LEN), np.int32),
        "targets": ((BATCH, SEQ_LEN), np.int32),
        "loss_mask": ((BATCH, SEQ_LEN), np.float32),
        "segment_ids": ((BATCH, SEQ_LEN), np.int32),
        "positions": ((BATCH, SEQ_LEN), np.int32),
        "type_ids": ((BATCH, SEQ_LEN), np.int32)}
    mask = batch["loss_mask"] > 0
    targets, inputs = batch["targets"], batch["inputs"]
    assert not np.any(mask & np.isin(targets, [PAD, BOS, EOS]))
    np.testing.assert_array_equal(inputs[~mask], targets[~mask])
    assert np.all(batch["type_ids"] == 0)
    _assert_segments_well_formed(batch["segment_ids"], batch["positions"])
    chosen += mask.sum()
    eligible += np.sum(targets > EOS)
  assert chosen / eligible == pytest.approx(0.15, abs=0.03)
  assert "<mask>" in decode(datasets.tokenizer, inputs.reshape(-1),
                            datasets.special_ids)
  eval_batches = list(datasets.make_eval_iter())
  assert len(eval_batches) == 2 and eval_batches[0]["loss_mask"].sum() > 0
  again = list(datasets.make_eval_iter())
  np.testing.assert_array_equal(eval_batches[1]["inputs"], again[1]["inputs"])
  _assert_resumes_exactly(
      lambda: build_datasets(config, str(tmp_path)).train_iter)


# --------------------------------------------------------------------------
# Span corruption.


def _chunks_of(tokens, raw_length):
  return [tuple(tokens[i:i + raw_length])
          for i in range(0, len(tokens), raw_length)]


def _examples_in(batch):
  """(encoder tokens, decoder tokens) of every packed segment."""
  examples = []
  for row in range(len(batch["encoder_inputs"])):
    for segment in range(1, batch["encoder_segment_ids"][row].max() + 1):
      encoder = batch["encoder_inputs"][row][
          batch["encoder_segment_ids"][row] == segment]
      decoder = batch["decoder_targets"][row][
          batch["decoder_segment_ids"][row] == segment]
      examples.append((encoder, decoder))
  return examples


def _uncorrupt(encoder, decoder, first_sentinel):
  spans, current = {}, None
  assert encoder[-1] == EOS and decoder[-1] == EOS
  for token in decoder[:-1]:
    if token >= first_sentinel:
      current = spans.setdefault(int(token), [])
    else:
      current.append(int(token))
  chunk = []
  for token in encoder[:-1]:
    chunk.extend(spans.pop(int(token)) if token >= first_sentinel
                 else [int(token)])
  assert not spans  # Every target span was used once.
  sentinels = [int(t) for t in encoder if t >= first_sentinel]
  assert sentinels == list(range(first_sentinel,
                                 first_sentinel + len(sentinels)))
  return tuple(chunk)


def _assert_encoder_decoder_batch(batch, decoder_length):
  for key in ENCODER_DECODER_KEYS:
    length = SEQ_LEN if key.startswith("encoder") else decoder_length
    assert batch[key].shape == (BATCH, length) and batch[key].dtype == np.int32
  assert batch["loss_mask"].dtype == np.float32
  np.testing.assert_array_equal(batch["loss_mask"],
                                batch["decoder_segment_ids"] > 0)
  for prefix in ("encoder", "decoder"):
    _assert_segments_well_formed(batch[f"{prefix}_segment_ids"],
                                 batch[f"{prefix}_positions"])
  # The same examples in both streams: segment k of a row is one example.
  np.testing.assert_array_equal(batch["encoder_segment_ids"].max(axis=1),
                                batch["decoder_segment_ids"].max(axis=1))
  segments, positions = batch["decoder_segment_ids"], batch["decoder_positions"]
  targets, inputs = batch["decoder_targets"], batch["decoder_inputs"]
  assert np.all(inputs[(positions == 0) & (segments > 0)] == BOS)
  assert np.all(inputs[segments == 0] == 0)
  inner = (positions[:, 1:] > 0)
  np.testing.assert_array_equal(inputs[:, 1:][inner], targets[:, :-1][inner])


def test_span_corruption_batches_reconstruct_the_documents(
    tmp_path, tokenizer_file, corpus_dir):
  config = _config(tokenizer_file, **{"data.task": "span_corruption",
                                      "data.paths": corpus_dir})
  datasets = build_datasets(config, str(tmp_path))
  decoder_length = datasets.decoder_length
  assert datasets.encoder_length == SEQ_LEN
  first_sentinel = datasets.special_ids.first_sentinel_id
  for _ in range(10):
    _assert_encoder_decoder_batch(next(datasets.train_iter), decoder_length)

  # One pass over a split, in eval order: every chunk of every document
  # comes back exactly once, whole, from one row.
  corpus = corpus_lib.load_text_files(corpus_dir, "*.py",
                                      str(tmp_path / "data"))
  tokenizer, special = datasets.tokenizer, datasets.special_ids
  span_lengths = span_corruption_lengths(SEQ_LEN, 0, 0.15, 3.0)
  stages = registry.TASKS["span_corruption"].plan(registry.Context(
      config, tokenizer, special, corpus)).eval
  batches = list(loader.make_eval_iter(
      corpus.validation, stages, batch_size=BATCH, num_batches=400))
  assert batches[-1]["loss_mask"].sum() == 0  # Ran out: padding.
  found, noise, total = [], 0, 0
  for batch in batches:
    _assert_encoder_decoder_batch(batch, decoder_length)
    for encoder, decoder in _examples_in(batch):
      found.append(_uncorrupt(encoder, decoder, first_sentinel))
      noise += np.sum(decoder < first_sentinel) - 1
      total += len(found[-1])
  expected = []
  for index in range(len(corpus.validation)):
    expected += _chunks_of(tokenizer.encode(corpus.text(
        corpus.validation[index])), span_lengths.raw_length)
  assert sorted(found) == sorted(expected)
  assert noise / total == pytest.approx(0.15, abs=0.02)
  _assert_resumes_exactly(
      lambda: build_datasets(config, str(tmp_path)).train_iter)


# --------------------------------------------------------------------------
# Local classify / seq2seq files.


ROWS = [(f"review number {i}: " + ("great fun" if i % 3 else "dull slow"),
         "pos" if i % 3 else "neg") for i in range(60)]


def _write(path, rows, columns=("text", "label"), fmt=None):
  fmt = fmt or os.path.splitext(path)[1][1:]
  with open(path, "w", newline="", encoding="utf-8") as f:
    if fmt == "csv":
      writer = csv.writer(f)
      writer.writerow(columns)
      writer.writerows(rows)
    else:
      for row in rows:
        f.write(json.dumps(dict(zip(columns, row))) + "\n")
  return str(path)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_classify_from_a_directory(tmp_path, tokenizer_file, fmt):
  task_dir = tmp_path / "task"
  task_dir.mkdir()
  _write(task_dir / f"train.{fmt}", ROWS[:50])
  _write(task_dir / f"validation.{fmt}", ROWS[50:])
  config = _config(tokenizer_file, **{
      "data.task": "classify", "data.paths": str(task_dir),
      "train.eval_steps": 0})  # 0: the whole validation split.
  datasets = build_datasets(config, str(tmp_path / "work"))
  assert datasets.label_names == ("neg", "pos")
  assert datasets.baseline_accuracy == pytest.approx(7 / 10)
  batch = next(datasets.train_iter)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      "inputs": ((BATCH, SEQ_LEN), np.int32),
      "segment_ids": ((BATCH, SEQ_LEN), np.int32),
      "positions": ((BATCH, SEQ_LEN), np.int32),
      "type_ids": ((BATCH, SEQ_LEN), np.int32),
      "label": ((BATCH,), np.int32),
      "example_mask": ((BATCH,), np.float32)}
  eval_batches = list(datasets.make_eval_iter())
  assert len(eval_batches) == 3  # 10 examples in batches of 4.
  labels, texts = [], []
  for batch in eval_batches:
    for row in np.flatnonzero(batch["example_mask"]):
      inputs = batch["inputs"][row][batch["segment_ids"][row] > 0]
      assert inputs[0] == BOS and inputs[-1] == EOS
      np.testing.assert_array_equal(batch["positions"][row][:len(inputs)],
                                    np.arange(len(inputs)))
      texts.append(datasets.tokenizer.decode(inputs))
      labels.append(datasets.label_names[batch["label"][row]])
  assert list(zip(texts, labels)) == ROWS[50:]
  assert eval_batches[-1]["example_mask"].tolist() == [1, 1, 0, 0]
  _assert_resumes_exactly(
      lambda: build_datasets(config, str(tmp_path / "work")).train_iter)


def test_classify_single_file_holds_out_validation(tmp_path, tokenizer_file):
  path = _write(tmp_path / "all.csv", ROWS, columns=("sentence", "y"))
  config = _config(tokenizer_file, **{
      "data.task": "classify", "data.paths": path,
      "data.text_column": "sentence", "data.label_column": "y",
      "data.labels": "pos,neg", "train.eval_steps": 0})
  datasets = build_datasets(config, str(tmp_path / "work"))
  assert datasets.label_names == ("pos", "neg")  # Declared order.
  examples = sum(b["example_mask"].sum() for b in datasets.make_eval_iter())
  assert 1 <= examples <= 15  # About 10% of 60, by content hash.


def test_t5_classify_is_text_to_text(tmp_path, tokenizer_file):
  path = _write(tmp_path / "train.jsonl", ROWS)
  config = _config(tokenizer_file, **{
      "data.task": "classify", "data.paths": path, "model.family": "t5"})
  datasets = build_datasets(config, str(tmp_path / "work"))
  assert datasets.decoder_length == 8
  batch = next(datasets.train_iter)
  _assert_encoder_decoder_batch(batch, 8)
  assert batch["example_mask"].tolist() == [1] * BATCH
  for row in range(BATCH):
    target = batch["decoder_targets"][row][batch["loss_mask"][row] > 0]
    assert target[-1] == EOS
    assert (datasets.tokenizer.decode(target)
            == datasets.label_names[batch["label"][row]])
  eval_batch = next(datasets.make_eval_iter())
  _assert_encoder_decoder_batch(eval_batch, 8)
  _assert_resumes_exactly(
      lambda: build_datasets(config, str(tmp_path / "work")).train_iter)


def test_seq2seq_packs_pairs(tmp_path, tokenizer_file):
  pairs = [(f"return x + {i}", f"Add {i}.")
           for i in range(40)]
  path = _write(tmp_path / "pairs.jsonl", pairs, columns=("code", "doc"))
  config = _config(tokenizer_file, **{
      "data.task": "seq2seq", "data.paths": path, "data.text_column": "code",
      "data.target_column": "doc", "data.target_len": 16,
      "train.eval_steps": 0})
  datasets = build_datasets(config, str(tmp_path / "work"))
  assert (datasets.encoder_length, datasets.decoder_length) == (SEQ_LEN, 16)
  expected = {(s, t) for s, t in pairs}
  for _ in range(5):
    batch = next(datasets.train_iter)
    assert sorted(batch) == sorted(ENCODER_DECODER_KEYS
                                   + ("loss_mask",))
    _assert_encoder_decoder_batch(batch, 16)
    assert batch["encoder_segment_ids"].max() > 1  # Packed.
    for encoder, decoder in _examples_in(batch):
      assert (datasets.tokenizer.decode(encoder[:-1]),
              datasets.tokenizer.decode(decoder[:-1])) in expected
  held_out = records_lib.hold_out(pairs)[1]
  eval_batches = list(datasets.make_eval_iter())
  assert len(eval_batches) == -(-len(held_out) // BATCH)
  evaluated = []
  for batch in eval_batches:
    _assert_encoder_decoder_batch(batch, 16)
    for row in np.flatnonzero(batch["example_mask"]):
      (encoder, decoder), = _examples_in({k: v[row:row + 1]
                                          for k, v in batch.items()})
      evaluated.append((datasets.tokenizer.decode(encoder[:-1]),
                        datasets.tokenizer.decode(decoder[:-1])))
  assert evaluated == held_out
  # The input-ignoring baseline by hand: add-half smoothed train target
  # unigrams, scored on the held-out targets (EOS included).
  tokenizer = datasets.tokenizer
  targets = lambda rows: [tokenizer.encode(t) + [tokenizer.eos_id] for _, t in rows]  # noqa: E731
  counts = np.full(tokenizer.vocab_size, 0.5)
  for ids in targets(records_lib.hold_out(pairs)[0]):
    for i in ids:
      counts[i] += 1
  held_out_ids = np.concatenate(targets(held_out))
  expected_loss = -np.log(counts[held_out_ids] / counts.sum()).mean()
  assert datasets.eval_baselines == {"eval_baseline_loss": pytest.approx(expected_loss)}
  _assert_resumes_exactly(
      lambda: build_datasets(config, str(tmp_path / "work")).train_iter)


@pytest.mark.parametrize("task, files, overrides, message", [
    ("classify", {"train.csv": ("text,y\na,1\n")}, {},
     r"data.label_column='label' is not a column of .*train.csv"
     r" \(columns: text, y\)"),
    ("classify", {"train.jsonl": '{"body": "a", "label": "x"}\n'}, {},
     r"data.text_column='text' is not a column .*\(columns: body, label\)"),
    ("classify", {"train.csv": "text,label\na,x\nb,y\nc,z\n"},
     {"data.labels": "x,y"}, r"label 'z' .* not in data.labels='x,y'"),
    ("classify", {"train.jsonl": ""}, {}, "is empty"),
    ("classify", {"train.jsonl": '{"text": "a", "label": "x"}\n'}, {},
     "1 class"),
    ("seq2seq", {"train.csv": "text,label\na,x\n"}, {},
     r"data.target_column='target' is not a column .*\(columns: text, label\)"),
    ("classify", {"train.txt": "a\n"}, {}, r"task files end in one of \.jsonl, .*\.parquet"),
    ("classify", {"other.csv": "a\n"}, {}, r"no train file \(train.jsonl, train.csv"),
    ("mlm", {}, {"model.vocab_size": 400}, r"mlm.*needs 1 ids"),
    ("span_corruption", {}, {"model.vocab_size": 402}, r"needs 3 ids"),
    ("span_corruption", {}, {"data.tokenizer": "", "data.vocab_size": 510},
     r"data.vocab_size=510 .* \+ 3 special ids exceeds"),
    ("classify", {"train.csv": "text,label\na,x\nb,y\nc,x\n"},
     {"model.num_classes": 3, "data.labels": "x,y"},
     r"model.num_classes=3 .* 2 classes \(x, y\)"),
    ("classify", {}, {"data.source": "synthetic"}, "synthetic"),
    ("bert", {}, {}, "data.task"),
])
def test_user_errors(task, files, overrides, message, tmp_path,
                     tokenizer_file, corpus_dir):
  task_dir = tmp_path / "task"
  task_dir.mkdir()
  for name, text in files.items():
    (task_dir / name).write_text(text)
  if task in ("mlm", "span_corruption"):
    paths = corpus_dir
  elif "train.txt" in files:
    paths = str(task_dir / "train.txt")
  else:
    paths = str(task_dir)
  config = _config(tokenizer_file, **{"data.task": task, "data.paths": paths,
                                      **overrides})
  with pytest.raises(UserError, match=message):
    build_datasets(config, str(tmp_path / "work"))


class TinySentiment(tfds.core.GeneratorBasedBuilder):
  """A registered tfds classification dataset (``tiny_sentiment``), like
  glue/sst2: a ``sentence`` and a ClassLabel ``label``."""

  VERSION = tfds.core.Version("1.0.0")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return epath.Path(__file__)

  def _info(self):
    features = tfds.features.FeaturesDict({
        "sentence": tfds.features.Text(),
        "label": tfds.features.ClassLabel(names=["negative", "positive"])})
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(30),
            "validation": self._generate_examples(6)}

  def _generate_examples(self, count):
    for i in range(count):
      yield i, {"sentence": f"sentence {i} is {'good' if i % 2 else 'bad'}",
                "label": i % 2}


def test_classify_a_tfds_dataset_by_name(tmp_path, tokenizer_file):
  data_dir = str(tmp_path / "tfds")
  TinySentiment(data_dir=data_dir, file_format="array_record"
                ).download_and_prepare()
  config = _config(tokenizer_file, **{
      "data.task": "classify", "data.source": "tfds",
      "data.tfds_name": "tiny_sentiment", "data.data_dir": data_dir,
      "data.text_column": "sentence", "train.eval_steps": 0})
  datasets = build_datasets(config, str(tmp_path / "work"))
  assert datasets.label_names == ("negative", "positive")
  batch = next(datasets.make_eval_iter())
  for row in range(BATCH):
    text = datasets.tokenizer.decode(batch["inputs"][row])
    assert text.endswith("good" if batch["label"][row] else "bad")
  config.data.text_column = "text"
  with pytest.raises(UserError, match=r"features: label, sentence"):
    build_datasets(config, str(tmp_path / "work"))


# --------------------------------------------------------------------------
# Default tasks built from the standard library.


@pytest.mark.parametrize("task", ["classify", "seq2seq"])
def test_default_tasks(task, tmp_path, tokenizer_file):
  config = _config(tokenizer_file, **{"data.task": task,
                                      "model.family": "bert"})
  workdir = tmp_path / "work"
  datasets = build_datasets(config, str(workdir))
  name = "stdlib_package" if task == "classify" else "docstring"
  splits = {}
  for split in ("train", "validation"):
    with open(workdir / "data" / "tasks" / name / f"{split}.jsonl") as f:
      splits[split] = [json.loads(line) for line in f]
  train_files = {row["path"] for row in splits["train"]}
  assert not train_files & {row["path"] for row in splits["validation"]}
  if task == "classify":
    assert len(datasets.label_names) >= 2
    assert datasets.baseline_accuracy < 0.5
    counts = collections.Counter(row["label"] for row in splits["train"])
    assert sum(counts.values()) >= 1000
    assert max(counts.values()) <= 3 * min(counts.values())  # Balanced-ish.
    assert next(datasets.train_iter)["label"].max() < len(
        datasets.label_names)
  else:
    assert len(splits["train"]) >= 1000
    for row in splits["validation"]:
      assert row["target"].strip()
      assert row["text"].startswith(("def ", "async def ", "@"))
    _assert_encoder_decoder_batch(next(datasets.train_iter), SEQ_LEN)
