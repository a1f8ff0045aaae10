"""The training command end to end, and its answers to bad input."""
import json
import os

import pytest

from commands import assert_user_error, run_train


@pytest.fixture(name="small_corpus")
def fixture_small_corpus(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i in range(6):
    (corpus / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 50)
  return corpus


TINY = ["--config=configs/gpt.py:tiny"]


@pytest.mark.parametrize("args,fragment", [
    (["--config.train.stepz=3"], "unknown config key --config.train.stepz; did you mean train.steps"),
    (["--config.train.steps=abc"], "--config.train.steps=abc"),
    (["--config.model.num_heads=3"], "model.num_heads=3 does not divide model.embed_dim=256"),
    (["--config.mesh.data=3"], "mesh data=3, fsdp=1, expert=1, context=1, tensor=1 has 3 devices but 1 are available"),
    (["--config.data.paths=/nonexistent/corpus"], "/nonexistent/corpus"),
    (["--config.model.remat=sometimes"], "--config.model.remat='sometimes' is not one of"),
    (["--config.data.seq_len=512"], "exceeds model.max_len=256"),
])
def test_bad_config_gives_one_error_line(tmp_path, args, fragment):
  assert_user_error(run_train(*TINY, f"--workdir={tmp_path / 'w'}", *args), fragment)


def test_unknown_preset_and_missing_flags(tmp_path):
  assert_user_error(run_train("--config=configs/gpt.py:huge", f"--workdir={tmp_path}"),
                    "unknown GPT preset 'huge'")
  assert_user_error(run_train("--config=configs/nope.py", f"--workdir={tmp_path}"),
                    "cannot load the config file")
  assert_user_error(run_train(*TINY), "--workdir is required")


def test_empty_corpus(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "notes.txt").write_text("not python")
  result = run_train(*TINY, f"--workdir={tmp_path / 'w'}", f"--config.data.paths={empty}")
  assert_user_error(result, str(empty))


def test_batch_not_divisible_by_data_parallelism(tmp_path):
  result = run_train(*TINY, f"--workdir={tmp_path}", "--config.train.batch_size=12",
                     "--config.mesh.data=8", devices=8)
  assert_user_error(result, "train.batch_size=12")
  assert "data-parallel size 8" in result.stderr


def test_print_sharding_on_eight_devices(tmp_path):
  result = run_train(*TINY, f"--workdir={tmp_path}", "--config.data.source=synthetic",
                     "--config.train.steps=2", "--config.mesh.fsdp=4", "--config.mesh.data=2",
                     "--config.print_sharding=True", devices=8)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.strip()}
  assert rows["blocks/attn/query/kernel"][1:5] == ["(4,", "256,", "4,", "64)"]
  assert "P(None, 'fsdp', 'tensor', None)" in rows["blocks/attn/query/kernel"][-1] + " ".join(
      rows["blocks/attn/query/kernel"][6:])


def test_default_job_runs_end_to_end(tmp_path, small_corpus):
  """The README's job, shortened: real data path, tokenizer, train, eval, sample."""
  workdir = tmp_path / "w"
  result = run_train(*TINY, f"--workdir={workdir}", "--config.train.steps=6",
                     "--config.train.log_every=2", "--config.train.eval_every=3",
                     "--config.train.eval_steps=1", "--config.train.sample_tokens=8",
                     "--config.train.batch_size=4", "--config.data.vocab_size=300",
                     f"--config.data.paths={small_corpus}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "----- sample -----" in result.stdout
  config = json.loads((workdir / "config.json").read_text())
  assert config["train"]["steps"] == 6 and config["data"]["vocab_size"] == 300
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train_records = [r for r in records if "loss" in r]
  assert [r["step"] for r in train_records] == [2, 4, 6]
  for record in train_records:
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_sec", "tflops_per_device",
                "mfu"):
      assert key in record and record[key] == record[key], (key, record)  # Present, not NaN.
    assert 0 < record["mfu"] < 1
  eval_records = [r for r in records if "eval_loss" in r]
  assert [r["step"] for r in eval_records] == [3, 6]
  assert eval_records[-1]["eval_perplexity"] == pytest.approx(
      2.718281828 ** eval_records[-1]["eval_loss"], rel=1e-4)
  assert any(name.startswith("events.out.tfevents")
             for name in os.listdir(workdir / "tensorboard"))
  assert (workdir / "tokenizer.model").exists()
