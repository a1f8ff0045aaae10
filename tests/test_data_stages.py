"""Tests of the data layer's stages: the task registry and its BatchSpecs, the
one loader (eval padding, exact resume), and the tokenizer interface."""
import glob
import json
import os
import pickle
import shutil
import subprocess
import sys
import sysconfig

import grain
import numpy as np
import pytest

from bigmodel.config import base_config
from bigmodel.data import build_datasets, train_batch_spec
from bigmodel.data import loader
from bigmodel.data import registry
from bigmodel.data import tokenizer as tokenizer_lib
from bigmodel.data.batch_spec import BatchSpec
from bigmodel.errors import UserError
from bigmodel.hf.tokenizer import HfTokenizer

SEQ_LEN = 32
BATCH = 4
STDLIB = sysconfig.get_paths()["stdlib"]
HF_FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
ROWS = [(f"review number {i}: " + ("great fun" if i % 3 else "dull slow"),
         "pos" if i % 3 else "neg", f"Add {i}.") for i in range(42)]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> str:
  root = tmp_path_factory.mktemp("corpus")
  for path in sorted(glob.glob(os.path.join(STDLIB, "json", "*.py"))):
    shutil.copy(path, root / os.path.basename(path))
  return str(root)


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> str:
  """42 rows of text, label and target: 10% or so held out, by content."""
  path = tmp_path_factory.mktemp("task") / "rows.jsonl"
  with open(path, "w", encoding="utf-8") as f:
    for text, label, target in ROWS:
      f.write(json.dumps({"text": text, "label": label, "target": target})
              + "\n")
  return str(path)


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> str:
  """42 conversations (the ROWS as question and reply), and as preference pairs."""
  root = tmp_path_factory.mktemp("chat")
  with open(root / "chats.jsonl", "w", encoding="utf-8") as chats, \
       open(root / "pairs.jsonl", "w", encoding="utf-8") as pairs:
    for i, (text, label, target) in enumerate(ROWS):
      chats.write(json.dumps({"messages": [{"role": "user", "content": text},
                                           {"role": "assistant", "content": target}]}) + "\n")
      prompt = [{"role": "user", "content": text}] if i % 2 else text
      pairs.write(json.dumps({"prompt": prompt, "chosen": label, "rejected": target}) + "\n")
  return str(root)


# Every registered task (classify once per kind of model): its settings.
CASES = {
    "lm": {"data.task": "lm"},
    "mlm": {"data.task": "mlm"},
    "span_corruption": {"data.task": "span_corruption"},
    "classify": {"data.task": "classify", "data.paths": "{task}",
                 "train.eval_steps": 0},
    "classify_t5": {"data.task": "classify", "data.paths": "{task}",
                    "model.family": "t5", "train.eval_steps": 0},
    "seq2seq": {"data.task": "seq2seq", "data.paths": "{task}",
                "data.target_len": 16, "train.eval_steps": 0},
    "chat": {"data.task": "chat", "data.paths": "{chat}/chats.jsonl",
             "data.text_column": "messages", "data.seq_len": 64},
    "preference": {"data.task": "preference", "data.paths": "{chat}/pairs.jsonl",
                   "data.text_column": "prompt", "data.seq_len": 64, "train.eval_steps": 0},
}


def _config(tokenizer, corpus_dir, task_file, chat_dir="", **overrides):
  config = base_config()
  config.data.seq_len = SEQ_LEN
  config.data.tokenizer = tokenizer
  config.data.paths = corpus_dir
  config.model.vocab_size = 512
  config.train.batch_size = BATCH
  config.train.eval_steps = 2
  for key, value in overrides.items():
    section, name = key.split(".")
    if isinstance(value, str):
      value = value.replace("{task}", task_file).replace("{chat}", chat_dir)
    config[section][name] = value
  return config


def test_every_registered_task_is_covered():
  assert {c["data.task"] for c in CASES.values()} == set(registry.TASKS)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_task_batches_match_its_batch_spec(case, tmp_path,
                                                 tokenizer_file, corpus_dir,
                                                 task_file, chat_file):
  config = _config(tokenizer_file, corpus_dir, task_file, chat_file, **CASES[case])
  datasets = build_datasets(config, str(tmp_path))
  for spec in (datasets.train_spec, datasets.eval_spec):
    assert isinstance(spec, BatchSpec)
    assert spec.mismatches(spec.empty_batch(BATCH), BATCH) == []
    abstract = spec.abstract_batch(BATCH * 2)
    assert {k: (v.shape, v.dtype) for k, v in abstract.items()} == {
        k: ((BATCH * 2, *shape), dtype)
        for k, (shape, dtype) in spec.fields.items()}
  for _ in range(3):
    assert datasets.train_spec.mismatches(next(datasets.train_iter),
                                          BATCH) == []
  eval_batches = list(datasets.make_eval_iter())
  assert eval_batches
  for batch in eval_batches:
    assert datasets.eval_spec.mismatches(batch, BATCH) == []
  # Known from the config alone (to compile or benchmark without data),
  # except a decoder length that the label names decide.
  if case == "classify_t5":
    with pytest.raises(UserError, match="data.target_len"):
      train_batch_spec(config)
    config.data.target_len = datasets.decoder_length
  assert train_batch_spec(config) == datasets.train_spec
  # The spec is what the trainer's consumers (FLOPs, benchmark) read.
  lengths = {key: shape for key, (shape, _) in datasets.train_spec.fields.items()}
  if datasets.encoder_length:
    assert lengths["encoder_inputs"] == (datasets.encoder_length,)
    assert lengths["decoder_targets"] == (datasets.decoder_length,)
  else:
    side = "chosen_" if case == "preference" else ""
    assert lengths[f"{side}inputs"] == (config.data.seq_len,)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_task_resumes_exactly(case, tmp_path, tokenizer_file,
                                    corpus_dir, task_file, chat_file):
  config = _config(tokenizer_file, corpus_dir, task_file, chat_file, **CASES[case])
  iterator = build_datasets(config, str(tmp_path)).train_iter
  states, batches = [], []
  for _ in range(5):
    states.append(json.loads(json.dumps(iterator.get_state())))
    batches.append(next(iterator))
  restored = build_datasets(config, str(tmp_path)).train_iter
  restored.set_state(states[2])
  for expected in batches[2:]:
    actual = next(restored)
    assert sorted(actual) == sorted(expected)
    for key in expected:
      np.testing.assert_array_equal(actual[key], expected[key])


def test_one_example_per_row_eval_is_padded_to_whole_batches(
    tmp_path, tokenizer_file, corpus_dir, task_file):
  """classify with eval_steps=0: the whole split once, every batch full, the
  rows past the split all zeros with example_mask 0."""
  config = _config(tokenizer_file, corpus_dir, task_file, **CASES["classify"])
  datasets = build_datasets(config, str(tmp_path))
  batches = list(datasets.make_eval_iter())
  examples = int(sum(b["example_mask"].sum() for b in batches))
  assert len(batches) == -(-examples // BATCH)
  padded_rows = len(batches) * BATCH - examples
  last = batches[-1]
  assert padded_rows < BATCH
  assert last["example_mask"].tolist() == [1] * (BATCH - padded_rows) + [0] * padded_rows
  for key, value in last.items():
    assert not np.any(value[BATCH - padded_rows:]), key


@pytest.mark.parametrize("packing", ["concat", "first_fit", "pad"])
def test_loader_pads_eval_to_whole_batches_and_resumes(packing):
  """The loader on its own, with a toy task: 7 records of 1 to 5 tokens."""
  records = [{"n": i % 5 + 1} for i in range(7)]

  class Count(grain.transforms.Map):
    def map(self, record):
      return {"tokens": np.arange(1, record["n"] + 1, dtype=np.int32)}

  def to_batch(rows):
    return {"tokens": rows["tokens"].astype(np.int32),
            "segment_ids": rows["tokens_segment_ids"].astype(np.int32)}
  spec = BatchSpec.of(tokens=((5,), np.int32), segment_ids=((5,), np.int32))
  stages = loader.Stages(Count(), packing=packing, lengths={"tokens": 5},
                         to_batch=to_batch, spec=spec)
  batches = list(loader.make_eval_iter(records, stages, batch_size=3,
                                       num_batches=6))
  assert len(batches) == 6
  for batch in batches:
    assert spec.mismatches(batch, 3) == []
    assert not np.any(batch["tokens"][batch["segment_ids"] == 0])
  # Every token once, then all-padding batches.
  real = np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in batches])
  assert len(real) == sum(r["n"] for r in records)
  assert not np.any(batches[-1]["segment_ids"])
  # Train: endless, and exactly resumable from a state through JSON.
  iterator = loader.make_train_iter(records, stages, batch_size=3, seed=1)
  states, train = [], []
  for _ in range(6):
    states.append(json.loads(json.dumps(iterator.get_state())))
    train.append(next(iterator))
  restored = loader.make_train_iter(records, stages, batch_size=3, seed=1)
  restored.set_state(states[3])
  for expected_batch in train[3:]:
    np.testing.assert_array_equal(next(restored)["tokens"],
                                  expected_batch["tokens"])


# --------------------------------------------------------------------------
# Tokenizers.


@pytest.mark.parametrize("name", ["t5", "bert", "gpt2"])
def test_both_tokenizer_implementations_share_the_interface(name,
                                                            tokenizer_file):
  sp = tokenizer_lib.Tokenizer.load(tokenizer_file)
  hf = tokenizer_lib.Tokenizer.load(os.path.join(HF_FIXTURES, name))
  assert isinstance(hf, HfTokenizer)
  assert (sp.pad_id, sp.bos_id, sp.eos_id, sp.unk_id,
          sp.decoder_start_id) == (0, 1, 2, 3, 1)  # As before: old runs agree.
  for tokenizer in (sp, hf):
    assert isinstance(tokenizer, tokenizer_lib.Tokenizer)
    tokens = tokenizer.special_tokens
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id,
            tokenizer.unk_id, tokenizer.decoder_start_id) == (
                tokens.pad, tokens.bos, tokens.eos, tokens.unk,
                tokens.decoder_start)
    for token in (tokens.pad, tokens.bos, tokens.eos, tokens.decoder_start):
      assert 0 <= token < tokenizer.vocab_size
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.special_tokens == tokens
    assert clone.encode("the lazy fox") == tokenizer.encode("the lazy fox")
  expected = {"t5": (0, 0, 1, 2, 0),  # T5: no bos, decoder starts at pad.
              "bert": (0, 2, 3, 1, 2),  # [PAD], [CLS], [SEP], [UNK].
              "gpt2": (299, 299, 299, 299, 299)}[name]
  assert (hf.pad_id, hf.bos_id, hf.eos_id, hf.unk_id,
          hf.decoder_start_id) == expected


def _hf_t5_config(corpus_dir, task_file, **overrides):
  return _config(os.path.join(HF_FIXTURES, "t5"), corpus_dir, task_file,
                 **{"model.family": "t5", "model.vocab_size": 128,
                    **overrides})


def test_hf_t5_span_corruption_ends_with_its_own_eos(tmp_path, corpus_dir,
                                                     task_file):
  config = _hf_t5_config(corpus_dir, task_file,
                         **{"data.task": "span_corruption"})
  datasets = build_datasets(config, str(tmp_path))
  tokenizer = datasets.tokenizer
  assert (tokenizer.eos_id, tokenizer.unk_id) == (1, 2)
  for _ in range(3):
    batch = next(datasets.train_iter)
    for row in range(BATCH):
      segments = batch["decoder_segment_ids"][row]
      for segment in range(1, segments.max() + 1):
        targets = batch["decoder_targets"][row][segments == segment]
        encoder = batch["encoder_inputs"][row][
            batch["encoder_segment_ids"][row] == segment]
        assert targets[-1] == encoder[-1] == tokenizer.eos_id
    starts = (batch["decoder_positions"] == 0) & (batch["decoder_segment_ids"] > 0)
    assert np.all(batch["decoder_inputs"][starts] == tokenizer.decoder_start_id)


@pytest.mark.parametrize("case", ["seq2seq", "classify_t5"])
def test_hf_t5_decoder_starts_with_its_decoder_start(case, tmp_path,
                                                     corpus_dir, task_file):
  config = _hf_t5_config(corpus_dir, task_file, **CASES[case])
  datasets = build_datasets(config, str(tmp_path))
  assert datasets.tokenizer.decoder_start_id == 0  # T5's pad.
  batches = [next(datasets.train_iter), next(datasets.make_eval_iter())]
  for batch in batches:
    segments, positions = (batch["decoder_segment_ids"],
                           batch["decoder_positions"])
    starts = (positions == 0) & (segments > 0)
    assert starts.any()
    np.testing.assert_array_equal(batch["decoder_inputs"][starts], 0)
    inner = positions[:, 1:] > 0
    np.testing.assert_array_equal(batch["decoder_inputs"][:, 1:][inner],
                                  batch["decoder_targets"][:, :-1][inner])
    ends = np.flatnonzero(segments[0] > 0)[-1]
    assert batch["decoder_targets"][0, ends] == datasets.tokenizer.eos_id


def test_the_data_layer_never_imports_the_hf_packages():
  code = ("import sys, bigmodel.data; bad = [m for m in sys.modules if"
          " m.split('.')[0] in ('tokenizers', 'transformers') or"
          " m.startswith('bigmodel.hf')]; print(bad); assert not bad")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
