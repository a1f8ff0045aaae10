"""Fine-tune a converted (or any) run: ``--config=configs/from_workdir.py:WORKDIR``.

The config is ``WORKDIR/config.json`` (e.g. written by ``python -m
bigmodel.convert --from_hf=...``) with ``init_from=WORKDIR``, so the model's
shape, activation, norms and tokenizer match the pretrained parameters.
Override anything else as usual, e.g. ``--config.train.steps=100``.
"""
import json
import os

from bigmodel.config import config_from_dict


def get_config(workdir: str):
  if not workdir:
    raise ValueError("usage: --config=configs/from_workdir.py:WORKDIR")
  with open(os.path.join(workdir, "config.json")) as f:
    c = config_from_dict(json.load(f))
  c.init_from = os.path.abspath(workdir)
  return c
