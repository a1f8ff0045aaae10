"""An imported Hugging Face T5 keeps its own special ids everywhere.

T5 starts decoding from pad (id 0, ``decoder_start_token_id``) and ends with
``</s>`` (id 1), unlike bigmodel's own tokenizers (bos 1, eos 2). Fine-tuning
an imported T5 must use the same decoder start and end-of-sequence ids in
training batches (seq2seq and span corruption), generation, evaluation and
the export, and the exported model must decode greedily in ``transformers``
exactly as ``bigmodel.generate`` does.
"""
import json
import os

import numpy as np
import pytest
import torch
import transformers

from bigmodel import run as run_lib
from bigmodel.data import build_datasets
from bigmodel.evaluate import evaluate_run
from bigmodel.generation.generator import load
from bigmodel.hf.interop import export_hf, import_hf
from commands import run_train

_FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hf", "t5")
_WORDS = "the quick brown fox jumps over lazy dog sum of squares returns".split()


def _write_task(directory):
  """A tiny seq2seq task: the target is the input's first two words, reversed."""
  os.makedirs(directory)
  rng = np.random.default_rng(0)
  for split, rows in (("train", 48), ("validation", 8)):
    with open(os.path.join(directory, f"{split}.jsonl"), "w") as f:
      for _ in range(rows):
        words = list(rng.choice(_WORDS, size=5))
        f.write(json.dumps({"text": " ".join(words), "target": " ".join(words[1::-1])}) + "\n")


@pytest.fixture(name="finetuned", scope="module")
def fixture_finetuned(tmp_path_factory):
  root = tmp_path_factory.mktemp("t5_ids")
  imported, finetuned, task = str(root / "imported"), str(root / "ft"), str(root / "task")
  import_hf(_FIXTURE, "t5", imported)
  _write_task(task)
  result = run_train(
      f"--config=configs/from_workdir.py:{imported}", f"--workdir={finetuned}",
      "--config.data.task=seq2seq", f"--config.data.paths={task}", "--config.data.seq_len=32",
      "--config.data.target_len=8", "--config.train.steps=3", "--config.train.batch_size=4",
      "--config.train.eval_steps=1", "--config.train.progress=False",
      "--config.train.sample_tokens=0", "--config.optim.warmup_steps=1")
  assert result.returncode == 0, result.stderr[-3000:]
  return finetuned


def _segment_starts_and_ends(segment_ids):
  """(row, column) of every segment's first and last token in a [B, T] array."""
  starts, ends = [], []
  for row, ids in enumerate(segment_ids):
    for column, segment in enumerate(ids):
      if segment and (column == 0 or ids[column - 1] != segment):
        starts.append((row, column))
      if segment and (column == len(ids) - 1 or ids[column + 1] != segment):
        ends.append((row, column))
  return starts, ends


def test_training_generation_evaluation_and_export_agree(finetuned, tmp_path):
  hf_config = json.load(open(os.path.join(_FIXTURE, "config.json")))
  start_id, eos_id = hf_config["decoder_start_token_id"], hf_config["eos_token_id"]
  assert (start_id, eos_id) == (0, 1)

  run = run_lib.load_run(finetuned)
  assert (run.tokenizer.decoder_start_id, run.tokenizer.eos_id) == (start_id, eos_id)

  # Training: every decoder segment starts from the decoder start and ends with eos.
  datasets = build_datasets(run.config, finetuned)
  batch = next(datasets.train_iter)
  datasets.train_iter.close()
  starts, ends = _segment_starts_and_ends(batch["decoder_segment_ids"])
  assert starts and all(batch["decoder_inputs"][rc] == start_id for rc in starts)
  assert all(batch["decoder_targets"][rc] == eos_id for rc in ends)

  # Generation, and the same generator inside evaluation.
  generator = load(finetuned)
  prompts = [generator.prompt_ids(" ".join(_WORDS[i:i + 3])) for i in range(4)]
  # Whole prompts: bigmodel keeps the last data.seq_len tokens, transformers all.
  assert all(p[-1] == eos_id and len(p) <= run.config.data.seq_len for p in prompts)
  ours = generator.generate_ids(prompts, max_new_tokens=8)
  metrics, _, _ = evaluate_run(finetuned)
  assert 0.0 <= metrics["eval_exact_match"] <= 1.0 and metrics["eval_generated_examples"] > 0

  # Export: the ids in config.json, and transformers' greedy decoding equals ours.
  out = str(tmp_path / "hf")
  export_hf(finetuned, out)
  exported = json.load(open(os.path.join(out, "config.json")))
  assert (exported["decoder_start_token_id"], exported["eos_token_id"]) == (start_id, eos_id)
  model = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
  for prompt, mine in zip(prompts, ours):
    with torch.no_grad():
      # use_cache=False: transformers 5.24 sizes T5's decoder cache by the encoder's
      # depth (IndexError with num_decoder_layers > num_layers, as in this fixture).
      # bigmodel never emits ids past the tokenizer's; nor may transformers here.
      theirs = model.generate(
          torch.tensor([prompt]), max_new_tokens=8, do_sample=False, num_beams=1,
          use_cache=False, suppress_tokens=list(range(generator.num_valid_ids,
                                                      run.config.model.vocab_size)))[0].tolist()
    assert theirs[0] == start_id
    theirs = theirs[1:]
    theirs = theirs[:theirs.index(eos_id)] if eos_id in theirs else theirs
    assert mine == theirs, (prompt, mine, theirs)


def test_span_corruption_targets_end_with_the_tokenizers_eos(finetuned, tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i in range(4):
    (corpus / f"doc{i}.txt").write_text((" ".join(_WORDS) + "\n") * 20)
  run = run_lib.load_run(finetuned)
  config = run.config
  config.data.update(task="span_corruption", paths=str(corpus), file_pattern="*.txt",
                     seq_len=32, target_len=0)
  datasets = build_datasets(config, str(tmp_path / "work"))
  batch = next(datasets.train_iter)
  datasets.train_iter.close()
  _, ends = _segment_starts_and_ends(batch["decoder_segment_ids"])
  assert ends and all(batch["decoder_targets"][rc] == run.tokenizer.eos_id for rc in ends)
  assert run.tokenizer.eos_id == 1  # T5's </s>, not bigmodel's own eos (2).
