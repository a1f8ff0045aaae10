"""The notebook API (``bigmodel.api``): configs by name, model description,
train / evaluate / generate."""
import os
import sysconfig

import pytest

from bigmodel import api, flops
from bigmodel.errors import UserError
from bigmodel.models import ModelConfig


def test_get_config_applies_overrides_like_the_flags():
  config = api.get_config("gpt:small", {"train.steps": 7, "model.remat": "full"})
  assert config.preset == "small" and config.train.steps == 7 and config.model.remat == "full"
  assert api.get_config("t5_finetune:tiny").data.task == "seq2seq"
  assert api.get_config("llama:llama3_8b").model.mlp_gated  # Every file in configs/.


@pytest.mark.parametrize("name,overrides,message", [
    ("gpt:huge", None, "unknown GPT preset"),
    ("falcon:tiny", None, "unknown config 'falcon'"),
    ("gpt:tiny", {"train.stepz": 3}, "unknown config key 'train.stepz'"),
    ("gpt:tiny", {"nothing.steps": 3}, "unknown config key 'nothing.steps'"),
    ("gpt:tiny", {"train.steps": "many"}, "config key 'train.steps'"),
])
def test_get_config_rejects_bad_names_keys_and_types(name, overrides, message):
  with pytest.raises(UserError, match=message):
    api.get_config(name, overrides)


def test_describe_counts_parameters_and_shows_their_specs():
  config = api.get_config("gpt:tiny")
  text = api.describe(config)
  count = flops.param_count(ModelConfig.from_config(config.model))
  assert text.splitlines()[0].startswith(f"gpt: {count:,} parameters")
  assert "blocks/mlp/wi/kernel" in text and "'tensor'" in text


def test_train_evaluate_and_generate_share_the_command_line_path(tmp_path):
  workdir = str(tmp_path / "run")
  config = api.get_config("gpt:tiny", {
      "train.steps": 2, "train.batch_size": 4, "train.log_every": 1, "train.eval_steps": 1,
      "train.sample_tokens": 0, "train.progress": False, "model.num_layers": 1,
      "model.embed_dim": 64, "model.num_heads": 4, "model.mlp_dim": 128, "model.max_len": 64,
      "model.vocab_size": 512, "data.vocab_size": 400, "data.seq_len": 64,
      "data.paths": os.path.join(sysconfig.get_paths()["stdlib"], "json")})
  seen = []
  last = api.train(config, workdir, on_metrics=lambda step, record: seen.append((step, record)))
  assert [step for step, _ in seen] == [1, 2] and "loss" in seen[0][1]
  assert last["eval_loss"] == seen[-1][1]["eval_loss"]
  # The notebook's evaluate is the evaluate command's: same checkpoint, same batches.
  assert api.evaluate(workdir)["eval_loss"] == pytest.approx(last["eval_loss"], rel=1e-5)
  generator = api.load_generator(workdir)
  first, second = generator.generate(["import json", ""], max_new_tokens=5)
  # Greedy: the same as decoding the prompt alone, and as the token ids decoded.
  assert generator.generate(["import json"], max_new_tokens=5) == [first]
  ids = generator.generate_ids([generator.prompt_ids("")], max_new_tokens=5)[0]
  assert second == generator.tokenizer.decode(ids) and 0 < len(ids) <= 5
  with pytest.raises(UserError, match="no checkpoints"):
    api.load_generator(str(tmp_path))
