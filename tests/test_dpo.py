"""DPO (data.task=preference): the loss, the reference, the pairs, the run."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigmodel import objectives, sharding
from bigmodel import run as run_lib
from bigmodel.data import preference
from bigmodel.data.records import read_task_file
from bigmodel.data.tokenizer import SentencePieceTokenizer
from bigmodel.errors import UserError
from bigmodel.models import build_model
from bigmodel.optim import make_optimizer
from bigmodel.state import create_sharded_state
from bigmodel.train_step import jit_train_step
from commands import ROOT, assert_user_error, run_train
from model_fixtures import jit_objective, random_batch, tiny_config


def _pairs_batch(batch_size=4, seq_len=32, vocab_size=128, seed=0):
  """Random chosen/rejected rows sharing a 10-token prompt, replies weighted."""
  batch = {}
  for i, side in enumerate(preference.SIDES):
    rows = random_batch(batch_size, seq_len, vocab_size, seed + i)
    rows["inputs"][:, :10] = random_batch(batch_size, seq_len, vocab_size, seed)["inputs"][:, :10]
    mask = np.zeros((batch_size, seq_len), np.float32)
    mask[:, 10:] = 1.0
    batch.update({f"{side}_inputs": rows["inputs"], f"{side}_targets": rows["targets"],
                  f"{side}_segment_ids": np.ones_like(rows["inputs"]),
                  f"{side}_positions": rows["positions"], f"{side}_loss_mask": mask})
  batch["example_mask"] = np.ones(batch_size, np.float32)
  return batch


def _state(config, mesh):
  model = build_model(config.model, config.lora, training=True)
  optimizer, schedule = make_optimizer(config.optim, 100)
  state, shardings = create_sharded_state(config, model, optimizer, mesh)
  return model, optimizer, schedule, state, shardings


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_policy_equal_to_reference_gives_log_2_and_a_step_prefers_the_chosen(lora_rank):
  """At the start the policy is the reference: every pair's loss is log 2 and
  its margin 0. Steps then raise the chosen replies' log-probability
  relative to the rejected ones', and with LoRA leave the base untouched."""
  config = tiny_config("llama")
  config.data.task = "preference"
  config.lora.rank = lora_rank
  config.optim.update(learning_rate=3e-3, warmup_steps=0, weight_decay=0.0)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  batch = _pairs_batch()
  with sharding.activate(mesh):
    model, optimizer, schedule, state, shardings = _state(config, mesh)
    assert (state.reference is None) == bool(lora_rank)
    objective = objectives.for_config(config)
    loss_sum, weights, extras = jit_objective(objective, model, state.params, batch, None,
                                              state.reference)
    np.testing.assert_allclose(loss_sum, np.log(2.0) * weights.sum(), rtol=1e-6)
    np.testing.assert_allclose(extras["reward_margin"], 0.0, atol=1e-6)
    step = jit_train_step(model, optimizer, schedule, 1, mesh, shardings, objective)
    global_batch = sharding.global_batch(batch, mesh)
    before = objective.reply_logps(model, state.params, global_batch, None)
    reference = jax.tree_util.tree_map(np.asarray, state.reference)
    for _ in range(3):
      state, metrics = step(state, global_batch)
    after = objective.reply_logps(model, state.params, global_batch, None)
  gap_before = np.asarray(before[0] - before[1])
  gap_after = np.asarray(after[0] - after[1])
  assert (gap_after > gap_before).all()
  assert float(metrics["reward_margin"]) > 0 and float(metrics["preference_accuracy"]) > 0.5
  assert float(metrics["loss"]) < np.log(2.0)
  if not lora_rank:  # The reference stays the starting model, bit for bit.
    for got, want in zip(jax.tree_util.tree_leaves(state.reference),
                         jax.tree_util.tree_leaves(reference)):
      assert np.asarray(got).tobytes() == want.tobytes()


def test_sft_weight_adds_the_chosen_replies_per_token_nll():
  """RPO: each pair's loss is DPO's plus sft_weight times the chosen reply's
  mean token NLL; the NLL is logged, and a negative weight is refused."""
  from bigmodel.config import validate  # pylint: disable=import-outside-toplevel
  config = tiny_config("llama")
  config.data.task = "preference"
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  batch = _pairs_batch()
  batch["chosen_loss_mask"][0, 20:] = 0.0  # Replies of different lengths.
  with sharding.activate(mesh):
    model, _, _, state, _ = _state(config, mesh)
    plain = objectives.for_config(config)
    config.dpo.sft_weight = 0.5
    rpo = objectives.for_config(config)
    chosen_B, _ = plain.reply_logps(model, state.params, batch, None)
    plain_sum, _, _ = plain(model, state.params, batch, None, state.reference)
    rpo_sum, _, extras = rpo(model, state.params, batch, None, state.reference)
  nll_B = -np.asarray(chosen_B) / batch["chosen_loss_mask"].sum(axis=-1)
  assert nll_B[0] != nll_B[1]
  np.testing.assert_allclose(extras["chosen_nll"], nll_B, rtol=1e-5)
  np.testing.assert_allclose(rpo_sum, plain_sum + 0.5 * nll_B.sum(), rtol=1e-5)
  config.dpo.sft_weight = -1.0
  with pytest.raises(UserError, match="dpo.sft_weight must be >= 0"):
    validate(config)


@pytest.fixture(name="tokenizer", scope="module")
def fixture_tokenizer(tokenizer_file):
  return SentencePieceTokenizer.load(tokenizer_file)


@pytest.mark.parametrize("chat_prompt", [False, True])
def test_pairs_weight_exactly_the_reply_and_its_end(tokenizer, chat_prompt):
  prompt = ([{"role": "user", "content": "Name a colour."},
             {"role": "assistant", "content": "Red."},
             {"role": "user", "content": "Another?"}] if chat_prompt else "Name a colour:")
  ids, trained = preference.encode_reply(tokenizer, prompt, "Blue.")
  assert ids[trained].tolist() == tokenizer.encode("Blue.") + [tokenizer.eos_id]
  assert np.count_nonzero(np.diff(trained.astype(int)) == 1) == 1  # One span: the reply.
  example = preference.EncodePreference(tokenizer, "text", 256).map(
      {"text": json.dumps({"prompt": prompt, "chosen": "Blue.", "rejected": "Green."})})
  assert example["example_weight"] == 1.0
  for side, reply in (("chosen", "Blue."), ("rejected", "Green.")):
    weighted = example[f"{side}_targets"][example[f"{side}_weights"] > 0]
    assert weighted.tolist() == tokenizer.encode(reply) + [tokenizer.eos_id]


@pytest.mark.parametrize("row,fragment", [
    ({"prompt": "q", "chosen": "a"}, "no rejected reply"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, "are the same"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "no prompt"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}],
      "chosen": "a", "rejected": "b"}, "must end with a user message"),
    ({"prompt": [{"role": "robot", "content": "q"}], "chosen": "a", "rejected": "b"},
     "has role 'robot'"),
])
def test_malformed_pairs_name_their_line(tmp_path, row, fragment):
  path = tmp_path / "pairs.jsonl"
  path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n"
                  + json.dumps(row) + "\n")
  with pytest.raises(UserError, match=fragment) as error:
    read_task_file(str(path), "prompt", "target", "preference")
  assert f"{path}:2" in str(error.value)


def test_dpo_run_with_lora_logs_preference_metrics_and_resumes(tmp_path):
  path = tmp_path / "pairs.jsonl"
  pairs = [{"prompt": f"{a} plus {b} is", "chosen": f" {a + b}.", "rejected": f" {a * b + 1}."}
           for a in range(8) for b in range(8) if a + b != a * b + 1]
  path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
  workdir = str(tmp_path / "dpo")
  args = ["--config=configs/dpo.py:tiny", f"--workdir={workdir}", f"--config.data.paths={path}",
          "--config.data.vocab_size=300", "--config.model.num_layers=2",
          "--config.model.embed_dim=64", "--config.model.mlp_dim=128",
          "--config.model.vocab_size=512", "--config.data.seq_len=32",
          "--config.model.max_len=32", "--config.lora.rank=4",
          "--config.train.batch_size=8", "--config.train.eval_every=2",
          "--config.train.log_every=2", "--config.train.progress=False"]
  result = run_train(*args, "--config.train.steps=2")
  assert result.returncode == 0, result.stderr[-3000:]
  result = run_train(*args, "--config.train.steps=4")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resuming from the checkpoint at step 2" in result.stdout
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  last = [r for r in records if r.get("step") == 4 and "loss" in r][-1]
  assert {"preference_accuracy", "reward_margin", "eval_accuracy",
          "eval_reward_margin"} <= set(last)
  assert 0.0 <= last["eval_accuracy"] <= 1.0 and jnp.isfinite(last["loss"])
  # Evaluating it later needs its reference, the starting model: this run has none.
  result = subprocess.run([sys.executable, "-m", "bigmodel.evaluate", f"--workdir={workdir}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert_user_error(result, "no reference model")

  # Full DPO from that run: the frozen reference copy is its starting point,
  # so the checkpoints point to it rather than saving the copy; resuming and
  # evaluating take it from there.
  full = str(tmp_path / "dpo_full")
  args = [a for a in args if not a.startswith(("--workdir", "--config.lora"))]
  args += [f"--workdir={full}", f"--config.init_from={workdir}"]
  result = run_train(*args, "--config.train.steps=2")
  assert result.returncode == 0, result.stderr[-3000:]
  result = run_train(*args, "--config.train.steps=3")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resuming from the checkpoint at step 2" in result.stdout
  ckpt = run_lib.checkpointer(full, keep=1, read_only=True)
  (source,), digests = ckpt.base_sources(3), ckpt.saved_digests(3)
  ckpt.close()
  assert source["params"] == [] and source["reference"]  # Nothing frozen but the copy.
  assert any(k.startswith(".params") for k in digests)
  assert not any(k.startswith(".reference") for k in digests)
  result = subprocess.run([sys.executable, "-m", "bigmodel.evaluate", f"--workdir={full}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "eval_reward_margin" in result.stdout
