"""DPO of a decoder on preference pairs: ``--config=configs/dpo.py:PRESET``.

``PRESET`` is a decoder preset, ``ARCH:PRESET`` as in configs/sft.py.
``data.task=preference`` reads JSONL pairs (``prompt``: text or chat
messages; ``chosen``, ``rejected``: replies) from ``data.paths``; with
``data.paths=""`` the pairs are the default offline task: the question of
configs/sft.py's default task, the function's own docstring summary chosen,
another module's function's rejected. Start from a fine-tuned run with
``--config.init_from=WORKDIR`` (it is also the reference model); with
``--config.lora.rank`` only adapters train and the base is the reference
(docs/post_training.md).
"""
import importlib

import configs.gpt as gpt

PRESETS = gpt.PRESETS


def get_config(preset: str = "tiny"):
  arch, _, name = (preset or "tiny").rpartition(":")
  c = importlib.import_module(f"configs.{arch or 'gpt'}").get_config(name)
  c.data.update(task="preference", text_column="prompt")
  c.dpo.beta = 0.1
  # DPO moves a fine-tuned model a little: a small constant rate, no decay.
  c.optim.update(learning_rate=1e-4 if name == "tiny" else 5e-7, schedule="constant",
                 warmup_steps=10 if name == "tiny" else 100, weight_decay=0.0)
  c.model.dropout_rate = 0.0
  c.train.update(steps=200 if name == "tiny" else 1000, batch_size=16 if name == "tiny" else 64,
                 log_every=20, eval_every=100, eval_steps=0, sample_tokens=0)
  return c
