"""Fine-tune a converted (or any) run: ``--config=configs/from_workdir.py:WORKDIR``.

The config is ``WORKDIR/config.json`` (e.g. written by ``python -m
bigmodel.convert --from_hf=...``) with ``init_from=WORKDIR``, so the model's
shape, activation, norms and tokenizer match the pretrained parameters.
Override anything else as usual, e.g. ``--config.train.steps=100``.
"""
import json
import os

import ml_collections

from bigmodel.config import base_config


def _update(target: ml_collections.ConfigDict, values: dict) -> None:
  """Copies ``values`` into ``target``, keeping only keys the schema knows."""
  for key, value in values.items():
    if key not in target:
      continue  # A key of another version of the schema.
    if isinstance(target[key], ml_collections.ConfigDict):
      _update(target[key], value)
    else:
      target[key] = value


def get_config(workdir: str):
  if not workdir:
    raise ValueError("usage: --config=configs/from_workdir.py:WORKDIR")
  c = base_config()
  with open(os.path.join(workdir, "config.json")) as f:
    _update(c, json.load(f))
  c.init_from = os.path.abspath(workdir)
  return c
