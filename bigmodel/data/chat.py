"""Chat conversations for supervised fine-tuning (``data.task=chat``).

A conversation is OpenAI-style ``messages``: ``{"role": "system" | "user" |
"assistant", "content": text}``, an optional system message first, at least
one assistant message. :func:`encode_chat` turns it into token ids and a
per-token *trained* flag: true exactly on the assistant replies and the
token that ends each reply, so the loss teaches the replies only.

The format comes from the tokenizer's chat template (a Hugging Face model's
Jinja ``chat_template``): the template renders the conversation up to each
assistant reply (with the generation prompt) and through it; the text
between the two is the reply as the model must produce it (content and
end-of-turn token). A tokenizer without a template (the sentencepiece ones
trained here) uses the built-in format, which generation renders the same
way (``Tokenizer.apply_chat_template``)::

    [BOS] <|system|>\\n{system}\\n<|user|>\\n{user}\\n<|assistant|>\\n{reply}[EOS]\\n ...

(``[BOS]``/``[EOS]`` are the tokenizer's ids; the reply and its ``[EOS]``
are trained). Each segment is tokenized on its own, as generation tokenizes
a rendered prompt, so a prompt and its reply never merge into one token.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from bigmodel.data.batch_spec import Batch
from bigmodel.data.sources import record_text
from bigmodel.data.tokenizer import Tokenizer
from bigmodel.errors import UserError

ROLES = ("system", "user", "assistant")


def builtin_chat_text(messages: Sequence[Mapping[str, str]],
                      add_generation_prompt: bool) -> str:
  """The built-in format as text (no BOS; an assistant reply's end is the EOS
  id, which text cannot hold: prompts render replies followed by a newline)."""
  text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
  return text + ("<|assistant|>\n" if add_generation_prompt else "")


def check_messages(messages: Any, where: str, needs_reply: bool = True) -> list[dict[str, str]]:
  """The conversation as role/content dicts; UserError naming ``where`` and
  the problem: not a list of objects, a role outside ``ROLES`` or missing, a
  system message after the first, content that is not text, an empty
  assistant message, or (``needs_reply``) no assistant message."""
  if not isinstance(messages, list) or not messages:
    raise UserError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
  checked = []
  for i, message in enumerate(messages):
    if not isinstance(message, dict) or message.get("role") not in ROLES:
      role = message.get("role") if isinstance(message, dict) else None
      raise UserError(f"{where}: message {i} has role {role!r}; roles: {', '.join(ROLES)}")
    content = message.get("content")
    if not isinstance(content, str):
      raise UserError(f"{where}: message {i} ({message['role']}) has no text content")
    if message["role"] == "system" and i:
      raise UserError(f"{where}: message {i} is a system message; only the first may be")
    if message["role"] == "assistant" and not content.strip():
      raise UserError(f"{where}: message {i} is an empty assistant message")
    checked.append({"role": message["role"], "content": content})
  if needs_reply and not any(m["role"] == "assistant" for m in checked):
    raise UserError(f"{where}: the conversation has no assistant message to learn")
  return checked


def _template_segments(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]]
                       ) -> list[tuple[str, bool]]:
  """(text, trained) pieces of the conversation as the chat template renders it."""
  segments, done = [], ""
  for i, message in enumerate(messages):
    if message["role"] != "assistant":
      continue
    prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
    through = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
    if not (prompt.startswith(done) and through.startswith(prompt)):
      raise UserError("the chat template renders a conversation differently from its "
                      "beginning (a prefix of it); its replies cannot be told apart")
    segments += [(prompt[len(done):], False), (through[len(prompt):], True)]
    done = through
  rest = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
  return segments + [(rest[len(done):], False)]


def _builtin_ids(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]]
                 ) -> list[tuple[list[int], bool]]:
  """(ids, trained) pieces of the conversation in the built-in format."""
  pieces = [([tokenizer.bos_id], False)]
  for message in messages:
    if message["role"] == "assistant":
      pieces += [(tokenizer.encode("<|assistant|>\n"), False),
                 (tokenizer.encode(message["content"]) + [tokenizer.eos_id], True),
                 (tokenizer.encode("\n"), False)]
    else:
      pieces.append((tokenizer.encode(builtin_chat_text([message], False)), False))
  return pieces


def encode_chat(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]]
                ) -> tuple[np.ndarray, np.ndarray]:
  """(token ids int32 [n], trained bool [n]) of a checked conversation."""
  if tokenizer.chat_template is not None:
    pieces = [(tokenizer.encode(text) if text else [], trained)
              for text, trained in _template_segments(tokenizer, messages)]
  else:
    pieces = _builtin_ids(tokenizer, messages)
  ids = [i for piece, _ in pieces for i in piece]
  trained = [flag for piece, flag in pieces for _ in piece]
  return np.asarray(ids, np.int32), np.asarray(trained, bool)


def encode_chat_prompt(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]]
                       ) -> list[int]:
  """The ids of a conversation followed by the start of an assistant reply:
  what generation continues, tokenized as training tokenized it."""
  if tokenizer.chat_template is not None:
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
  pieces = _builtin_ids(tokenizer, messages) + [(tokenizer.encode("<|assistant|>\n"), False)]
  return [i for piece, _ in pieces for i in piece]


@dataclasses.dataclass(frozen=True)
class EncodeChat(grain.transforms.Map):
  """Record (``text_key``: the conversation as JSON) -> ``{"examples": [...]}``
  of at most one example: ``inputs``, ``targets`` (the next token) and
  ``weights`` (1 where the target is trained) [n - 1].

  A conversation longer than ``seq_len`` + 1 tokens keeps its first
  ``seq_len`` + 1; one left with no trained target is dropped.
  """
  tokenizer: Tokenizer
  text_key: str
  seq_len: int

  def encode(self, record: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The whole conversation's (ids, trained), before the cut."""
    return encode_chat(self.tokenizer, json.loads(record_text(record, self.text_key)))

  def map(self, record: Mapping[str, Any]) -> dict[str, list[dict[str, np.ndarray]]]:
    tokens, trained = (x[:self.seq_len + 1] for x in self.encode(record))
    if len(tokens) < 2 or not trained[1:].any():
      return {"examples": []}
    return {"examples": [{"inputs": tokens[:-1], "targets": tokens[1:],
                          "weights": trained[1:].astype(np.float32)}]}


def rows_to_chat_batch(rows: Mapping[str, np.ndarray]) -> Batch:
  """Packed conversations [B, L] (+ segment ids, positions) -> the lm batch,
  ``loss_mask`` 1 on the replies' targets only."""
  segment_ids = rows["inputs_segment_ids"].astype(np.int32)
  return {
      "inputs": rows["inputs"].astype(np.int32),
      "targets": rows["targets"].astype(np.int32),
      "segment_ids": segment_ids,
      "positions": rows["inputs_positions"].astype(np.int32),
      "loss_mask": (rows["weights"] * (segment_ids > 0)).astype(np.float32),
  }
