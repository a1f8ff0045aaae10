"""Chat supervised fine-tuning of a decoder: ``--config=configs/sft.py:PRESET``.

``PRESET`` is a decoder preset of gpt.py, llama.py, qwen.py, mistral.py or
gemma.py, written ``ARCH:PRESET`` (``llama:llama3_8b``; a bare name is a GPT
preset, default ``tiny``). ``data.task=chat`` reads JSONL conversations
(``messages``: system/user/assistant turns) from ``data.paths`` and trains on
the assistant's replies only (docs/post_training.md). With ``data.paths=""``
the conversations are the default offline task: a user asks what a Python
function of the standard library does, the assistant answers with its
docstring's summary. Start from a run with ``--config.init_from=WORKDIR``
(a pretrained or converted model, its tokenizer with
``--config.data.tokenizer``); ``tiny`` also trains from scratch.
"""
import importlib

import configs.gpt as gpt

PRESETS = gpt.PRESETS


def get_config(preset: str = "tiny"):
  arch, _, name = (preset or "tiny").rpartition(":")
  c = importlib.import_module(f"configs.{arch or 'gpt'}").get_config(name)
  c.data.update(task="chat", text_column="messages")
  if name == "tiny":
    c.train.update(steps=300, log_every=25, eval_every=100, sample_tokens=0)
  else:
    # Fine-tuning from a pretrained model: a small constant rate after a warmup.
    c.optim.update(learning_rate=2e-5, schedule="constant", warmup_steps=100,
                   weight_decay=0.0)
    c.train.update(steps=2000, eval_every=200)
  return c
