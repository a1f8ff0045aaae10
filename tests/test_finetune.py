"""BERT and T5 end to end: pretrain, fine-tune from the checkpoint, and bad input."""
import json
import os
import sysconfig

import pytest

from commands import run_train

_CORPUS = os.path.join(sysconfig.get_paths()["stdlib"], "email")

# Small shapes shared by pretraining and fine-tuning so parameters carry over.
_SHAPE = ["--config.model.num_layers=2", "--config.model.num_decoder_layers=2",
          "--config.model.embed_dim=128", "--config.model.mlp_dim=256",
          "--config.model.num_heads=4", "--config.model.head_dim=32",
          "--config.model.vocab_size=1024", "--config.data.vocab_size=1000",
          "--config.train.progress=False", "--config.train.sample_tokens=0"]


train = run_train


def last_eval(workdir):
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return [r for r in records if "eval_loss" in r][-1]


@pytest.fixture(name="bert_pretrained", scope="module")
def fixture_bert_pretrained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("bert_pretrain"))
  result = train("--config=configs/bert.py:tiny", f"--workdir={workdir}", *_SHAPE,
                 "--config.model.norm_position=pre", "--config.data.seq_len=64",
                 f"--config.data.paths={_CORPUS}", "--config.train.steps=4",
                 "--config.train.batch_size=8", "--config.train.eval_steps=1")
  assert result.returncode == 0, result.stderr[-3000:]
  record = last_eval(workdir)
  # MLM accuracy on the masked tokens: after 4 steps on real code, frequent
  # pieces (spaces, newlines) are already guessed far above chance.
  assert 0.01 < record["eval_accuracy"] <= 1, record  # Chance: 1 / 1000 pieces.
  return workdir


def test_bert_pretrain_then_classify_beats_the_majority_baseline(tmp_path, bert_pretrained):
  workdir = str(tmp_path / "classify")
  # 300 steps: at 200 the accuracy sat near the bar (+0.095 over the majority
  # with the suite's XLA flags, whose code generation rounds differently);
  # at 300 it is +0.23 (0.413 vs 0.180).
  result = train("--config=configs/bert_classify.py:tiny", f"--workdir={workdir}", *_SHAPE,
                 "--config.model.norm_position=pre", "--config.model.dropout_rate=0.0",
                 "--config.data.seq_len=64", f"--config.init_from={bert_pretrained}",
                 f"--config.data.tokenizer={bert_pretrained}/tokenizer.model",
                 "--config.train.steps=300", "--config.train.eval_every=0",
                 "--config.optim.learning_rate=3e-3", "--config.optim.warmup_steps=10")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "fresh: classifier/bias, classifier/kernel, pooler/bias, pooler/kernel" in result.stdout
  record = last_eval(workdir)
  assert record["eval_examples"] > 100
  assert record["eval_accuracy"] > record["eval_majority_baseline"] + 0.1, record
  assert 0 < record["eval_f1"] <= 1 and 0 < record["eval_precision"] <= 1


@pytest.fixture(name="t5_pretrained", scope="module")
def fixture_t5_pretrained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("t5_pretrain"))
  result = train("--config=configs/t5.py:tiny", f"--workdir={workdir}", *_SHAPE,
                 "--config.data.seq_len=64", f"--config.data.paths={_CORPUS}",
                 "--config.train.steps=3", "--config.train.batch_size=8",
                 "--config.train.eval_steps=1")
  assert result.returncode == 0, result.stderr[-3000:]
  assert last_eval(workdir)["eval_loss"] > 0
  return workdir


@pytest.mark.parametrize("task", ["seq2seq", "classify"])
def test_t5_fine_tunes_from_pretrained(tmp_path, t5_pretrained, task):
  workdir = str(tmp_path / task)
  result = train("--config=configs/t5_finetune.py:tiny", f"--workdir={workdir}", *_SHAPE,
                 f"--config.data.task={task}", "--config.data.seq_len=64",
                 "--config.data.target_len=16", f"--config.init_from={t5_pretrained}",
                 f"--config.data.tokenizer={t5_pretrained}/tokenizer.model",
                 "--config.train.steps=3", "--config.train.batch_size=8",
                 "--config.train.eval_steps=2")
  assert result.returncode == 0, result.stderr[-3000:]
  # Encoder-decoder fine-tuning reuses every parameter.
  assert "initialised" in result.stdout and "fresh:" not in result.stdout
  record = last_eval(workdir)
  assert record["eval_loss"] > 0 and 0 <= record["eval_accuracy"] <= 1
  if task == "classify":
    assert {"eval_f1", "eval_precision", "eval_recall", "eval_majority_baseline"} <= set(record)


def _assert_user_error(result, fragment):
  assert result.returncode == 2, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and fragment in last, last


def test_bad_fine_tuning_inputs(tmp_path, bert_pretrained, t5_pretrained):
  no_label = tmp_path / "no_label.jsonl"
  no_label.write_text("".join(json.dumps({"text": f"x {i}", "tag": "a"}) + "\n"
                              for i in range(20)))
  common = ["--config=configs/bert_classify.py:tiny", *_SHAPE, "--config.data.seq_len=64",
            "--config.model.norm_position=pre", "--config.train.steps=1",
            f"--config.data.tokenizer={bert_pretrained}/tokenizer.model"]
  _assert_user_error(train(*common, f"--workdir={tmp_path / 'a'}",
                           f"--config.data.paths={no_label}"), "label")
  bad_label = tmp_path / "bad_label.jsonl"
  bad_label.write_text("".join(json.dumps({"text": f"x {i}", "label": "ab"[i % 2]}) + "\n"
                               for i in range(20)))
  _assert_user_error(train(*common, f"--workdir={tmp_path / 'b'}",
                           f"--config.data.paths={bad_label}", "--config.data.labels=a,c",
                           "--config.model.num_classes=2"), "'b'")
  # A T5 checkpoint for a BERT run, and a BERT checkpoint of another width.
  _assert_user_error(train(*common, f"--workdir={tmp_path / 'c'}",
                           f"--config.init_from={t5_pretrained}"), "holds a t5 model")
  _assert_user_error(train(*common, f"--workdir={tmp_path / 'd'}", "--config.model.embed_dim=64",
                           "--config.model.head_dim=16", f"--config.init_from={bert_pretrained}"),
                     "has shape")


def test_sequence_level_distillation_targets_are_the_teachers_outputs(
    tmp_path, t5_pretrained, gpt_workdir):
  from bigmodel.distill_targets import write_teacher_targets  # pylint: disable=import-outside-toplevel
  from bigmodel.errors import UserError  # pylint: disable=import-outside-toplevel
  from bigmodel.generation.generator import load  # pylint: disable=import-outside-toplevel
  source = tmp_path / "train.jsonl"
  rows = [{"text": f"def f{i}(x):\n    return x + {i}\n", "target": f"adds {i}"}
          for i in range(12)]
  source.write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = tmp_path / "distilled" / "train.jsonl"
  out.parent.mkdir()
  assert write_teacher_targets(t5_pretrained, str(source), str(out), max_new_tokens=8) == 12
  written = [json.loads(line) for line in out.read_text().splitlines()]
  expected = load(t5_pretrained).generate([r["text"] for r in rows], max_new_tokens=8)
  assert [w["target"] for w in written] == expected
  assert [(w["text"], w["original_target"]) for w in written] == [
      (r["text"], r["target"]) for r in rows]
  with pytest.raises(UserError, match="exists"):
    write_teacher_targets(t5_pretrained, str(source), str(out))
  with pytest.raises(UserError, match="decoder-only"):
    write_teacher_targets(gpt_workdir, str(source), str(tmp_path / "gpt.jsonl"))
  assert not (tmp_path / "gpt.jsonl").exists()
  # The student trains on the teacher's targets like on any seq2seq file.
  result = train("--config=configs/t5_finetune.py:tiny", f"--workdir={tmp_path / 'student'}",
                 *_SHAPE, "--config.data.task=seq2seq", "--config.data.seq_len=64",
                 "--config.data.target_len=16", f"--config.data.paths={out}",
                 f"--config.data.tokenizer={t5_pretrained}/tokenizer.model",
                 "--config.train.steps=2", "--config.train.batch_size=4",
                 "--config.train.eval_steps=1")
  assert result.returncode == 0, result.stderr[-3000:]
