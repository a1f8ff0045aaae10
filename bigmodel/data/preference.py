"""Preference pairs for DPO (``data.task=preference``; the loss: ``bigmodel.objectives``).

A record is a prompt with two replies, ``chosen`` (preferred) and
``rejected``. The prompt is text (the reply continues it: ``[BOS] prompt
reply [EOS]``) or chat ``messages`` ending with a user turn (the reply is the
assistant's next turn, in the chat format of :mod:`bigmodel.data.chat`).
Each reply becomes one row: ids, next-token targets and weights that are 1
on the reply's tokens (and its end token) only, so a row's weighted
log-probability is log pi(reply | prompt).
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from bigmodel.data import chat
from bigmodel.data.batch_spec import Batch
from bigmodel.data.sources import record_text
from bigmodel.data.tokenizer import Tokenizer
from bigmodel.errors import UserError

SIDES = ("chosen", "rejected")
# Per side, the packed keys of a row.
ROW_KEYS = ("inputs", "targets", "weights")


def check_preference(row: Mapping[str, Any], prompt_column: str, where: str) -> dict[str, Any]:
  """{prompt, chosen, rejected} of a JSONL row; UserError naming ``where``:
  a missing or empty prompt or reply, two equal replies, chat messages that
  do not end with a user turn."""
  prompt = row.get(prompt_column)
  if isinstance(prompt, list):
    prompt = chat.check_messages(prompt, where, needs_reply=False)
    if prompt[-1]["role"] != "user":
      raise UserError(f"{where}: a chat prompt must end with a user message")
  elif not isinstance(prompt, str) or not prompt.strip():
    raise UserError(f"{where}: no prompt (column {prompt_column!r}: text or chat messages)")
  replies = {}
  for side in SIDES:
    reply = row.get(side)
    if not isinstance(reply, str) or not reply.strip():
      raise UserError(f"{where}: no {side} reply (column {side!r}, text)")
    replies[side] = reply
  if replies["chosen"] == replies["rejected"]:
    raise UserError(f"{where}: the chosen and rejected replies are the same")
  return {"prompt": prompt, **replies}


def encode_reply(tokenizer: Tokenizer, prompt: str | list[dict[str, str]], reply: str
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(ids int32 [n], trained bool [n]) of the prompt followed by ``reply``,
  trained on the reply and its end token only."""
  if isinstance(prompt, str):
    prompt_ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    reply_ids = tokenizer.encode(reply) + [tokenizer.eos_id]
    return (np.asarray(prompt_ids + reply_ids, np.int32),
            np.arange(len(prompt_ids) + len(reply_ids)) >= len(prompt_ids))
  ids, trained = chat.encode_chat(tokenizer, prompt + [{"role": "assistant", "content": reply}])
  # Only the last reply: earlier assistant turns of the prompt are context.
  starts = np.flatnonzero(trained & ~np.concatenate([[False], trained[:-1]]))
  trained[:starts[-1]] = False
  return ids, trained


@dataclasses.dataclass(frozen=True)
class EncodePreference(grain.transforms.Map):
  """Record (``text_key``: {prompt, chosen, rejected} as JSON) -> per side
  ``{side}_inputs``, ``{side}_targets``, ``{side}_weights`` [n - 1] and
  ``example_weight``.

  A row longer than ``seq_len`` + 1 tokens keeps its first ``seq_len`` + 1;
  a pair that keeps no token of one of its replies weighs 0.
  """
  tokenizer: Tokenizer
  text_key: str
  seq_len: int

  def map(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    pair = json.loads(record_text(record, self.text_key))
    example, kept = {}, True
    for side in SIDES:
      ids, trained = (x[:self.seq_len + 1] for x in encode_reply(
          self.tokenizer, pair["prompt"], pair[side]))
      kept = kept and bool(trained[1:].any())
      example.update({f"{side}_inputs": ids[:-1], f"{side}_targets": ids[1:],
                      f"{side}_weights": trained[1:].astype(np.float32)})
    example["example_weight"] = np.float32(kept)
    return example


def rows_to_preference_batch(rows: Mapping[str, np.ndarray]) -> Batch:
  """Padded rows, one pair each -> ``{side}_{inputs,targets,segment_ids,
  positions,loss_mask}`` [B, L] and ``example_mask`` [B]."""
  batch = {"example_mask": rows["example_weight"].astype(np.float32)}
  for side in SIDES:
    segment_ids = rows[f"{side}_inputs_segment_ids"].astype(np.int32)
    batch.update({
        f"{side}_inputs": rows[f"{side}_inputs"].astype(np.int32),
        f"{side}_targets": rows[f"{side}_targets"].astype(np.int32),
        f"{side}_segment_ids": segment_ids,
        f"{side}_positions": rows[f"{side}_inputs_positions"].astype(np.int32),
        f"{side}_loss_mask": (rows[f"{side}_weights"] * (segment_ids > 0)).astype(np.float32),
    })
  return batch
