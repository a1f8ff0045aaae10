"""``python -m bigmodel.evaluate``: metrics of a run's checkpoint, JSON, table, bad input."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from bigmodel.evaluate import exact_match

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_evaluate(*args):
  return subprocess.run([sys.executable, "-m", "bigmodel.evaluate", *args], cwd=_ROOT,
                        capture_output=True, text=True, timeout=300)


def test_lm_loss_and_perplexity_match_the_trainer(gpt_workdir, tmp_path):
  out = tmp_path / "eval.json"
  result = run_evaluate(f"--workdir={gpt_workdir}", "--split=validation", "--step=2",
                        f"--out={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  record = json.loads(out.read_text())
  assert (record["step"], record["split"], record["family"], record["task"]) == (
      2, "validation", "gpt", "lm")
  metrics = record["metrics"]
  assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-6)
  # Same checkpoint, same eval batches (train.eval_steps=1): the trainer's numbers.
  logged = [json.loads(line) for line in open(os.path.join(gpt_workdir, "metrics.jsonl"))]
  last_eval = [r for r in logged if "eval_loss" in r][-1]
  assert metrics["eval_loss"] == pytest.approx(last_eval["eval_loss"], rel=1e-5)
  assert metrics["eval_accuracy"] == pytest.approx(last_eval["eval_accuracy"], rel=1e-5)
  table = result.stdout.splitlines()
  assert table[0] == "gpt / lm, step 2, validation:"
  assert any(line.split()[:1] == ["eval_perplexity"] for line in table)


def test_default_output_path_and_bad_input(gpt_workdir, tmp_path):
  result = run_evaluate(f"--workdir={gpt_workdir}", "--eval_steps=1")
  assert result.returncode == 0, result.stderr[-3000:]
  assert os.path.isfile(os.path.join(gpt_workdir, "eval_validation_step2.json"))
  for args, fragment in [((f"--workdir={tmp_path / 'missing'}",), "does not exist"),
                         ((f"--workdir={tmp_path}",), "no checkpoints in"),
                         ((f"--workdir={gpt_workdir}", "--step=7"), "no checkpoint at step 7")]:
    result = run_evaluate(*args)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and fragment in last, last


class _FakeGenerator:
  """Answers each prompt with a fixed continuation (ids), as greedy decoding would."""
  eos_id = 2

  def __init__(self, answers):
    self.answers, self.seen = answers, []

  def generate_ids(self, prompts, max_new_tokens):
    self.seen.append((prompts, max_new_tokens))
    return [self.answers[tuple(p)] for p in prompts]


def test_exact_match_compares_generations_with_targets():
  batch = dict(
      encoder_inputs=np.array([[5, 6, 2, 0], [7, 2, 0, 0], [0, 0, 0, 0]]),
      encoder_segment_ids=np.array([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]]),
      decoder_targets=np.array([[9, 9, 2], [8, 2, 0], [0, 0, 0]]),
      loss_mask=np.array([[1, 1, 1], [1, 1, 0], [0, 0, 0]], np.float32),
      example_mask=np.array([1, 1, 0], np.float32))
  generator = _FakeGenerator({(5, 6, 2): [9, 9], (7, 2): [8, 8]})
  metrics = exact_match(generator, [batch], decoder_length=3)
  assert metrics == {"eval_exact_match": 0.5, "eval_generated_examples": 2.0}
  assert generator.seen == [([[5, 6, 2], [7, 2]], 3)]  # Padding rows are not generated.
