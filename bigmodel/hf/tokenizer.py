"""Hugging Face tokenizers behind bigmodel's tokenizer interface.

A converted model keeps its tokenizer files in ``WORKDIR/tokenizer/`` and its
config points ``data.tokenizer`` there; ``bigmodel.data.tokenizer.Tokenizer.load``
hands such a directory to :class:`HfTokenizer`, so training, sampling and
evaluation tokenize exactly as the original model did:

* ``spiece.model`` (T5) is read with ``sentencepiece``, keeping its own
  special ids (pad 0, eos 1, unk 2; no bos);
* otherwise ``tokenizer.json`` (GPT-2's byte-level BPE, BERT's WordPiece, any
  "fast" tokenizer) is read with the ``tokenizers`` library.

It implements ``bigmodel.data.tokenizer.Tokenizer``: the special ids are data
read from the files (``special_tokens``). ``bos_id`` / ``eos_id`` are what
bigmodel puts around a text: GPT-2's ``<|endoftext|>`` (both), BERT's
``[CLS]`` / ``[SEP]``, T5's pad / ``</s>``. ``decoder_start_id`` is T5's pad
(transformers' ``decoder_start_token_id`` for T5) for a sentencepiece model
without bos, else bos.

Chat models: the Jinja ``chat_template`` (``chat_template.jinja``, else
``tokenizer_config.json``'s, a string or a list of named templates of which
"default" is used) renders a conversation as transformers'
``apply_chat_template(..., tokenize=False)`` does: a sandboxed environment
with ``trim_blocks`` / ``lstrip_blocks``, ``raise_exception``, ``tojson``,
``strftime_now``, the loop controls and the special-token strings. Generation
stops at every id in ``stop_ids``: eos, the other ``eos_token_id`` ids that
``generation_config.json`` / ``config.json`` list, and the special token the
template puts after an assistant message (Llama 3's ``<|eot_id|>``, Gemma's
``<end_of_turn>``, Qwen's ``<|im_end|>``).
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import shutil
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import sentencepiece as spm

from bigmodel.data.tokenizer import SpecialTokens, Tokenizer, sentencepiece_special_tokens
from bigmodel.errors import UserError
from bigmodel.hf.files import load_json, model_file

# Files of a HF tokenizer worth keeping with a converted model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "spiece.model", "vocab.txt", "vocab.json", "merges.txt")
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# Kept along with a tokenizer (never alone): the model's end-of-text ids and
# its chat template.
COMPANION_FILES = ("generation_config.json", CHAT_TEMPLATE_FILE)
# Files whose ``eos_token_id`` (an id or a list of ids) ends generation.
_EOS_LISTS = ("generation_config.json", "config.json")
# The assistant reply rendered to find the token that ends a turn.
_PROBE_REPLY = "bigmodel-probe-reply"
# Special tokens by role, in order of preference, when tokenizer_config.json
# does not name them.
_BOS = ("cls_token", "bos_token", "[CLS]", "<|endoftext|>", "<s>", "<pad>")
_EOS = ("sep_token", "eos_token", "[SEP]", "<|endoftext|>", "</s>")
# Models without a pad token (Llama 3, Mistral) pad with eos, as transformers' generate does.
_PAD = ("pad_token", "[PAD]", "<pad>", "<|endoftext|>", "eos_token")
_UNK = ("unk_token", "[UNK]", "<unk>")


def tokenizer_files(source: str) -> list[str]:
  """The names of the tokenizer files in ``source`` (with ``COMPANION_FILES`` if it
  has a tokenizer); UserError if one resolves outside it."""
  names = [n for n in TOKENIZER_FILES if os.path.isfile(model_file(source, n))]
  if not {"spiece.model", "tokenizer.json"} & set(names):
    return names
  return names + [n for n in COMPANION_FILES if os.path.isfile(model_file(source, n))]


def copy_tokenizer_files(source: str, target: str) -> list[str]:
  """Copies the tokenizer files of ``source`` into ``target``; returns their names."""
  names = tokenizer_files(source)
  if names:
    os.makedirs(target, exist_ok=True)
  for name in names:
    shutil.copyfile(os.path.join(source, name), os.path.join(target, name))
  return names


def has_tokenizer(directory: str) -> bool:
  return any(os.path.isfile(os.path.join(directory, n)) for n in ("spiece.model", "tokenizer.json"))


def _load(path: str, load: Any) -> Any:
  """``load()``; a file the library cannot read is a UserError naming it."""
  try:
    return load()
  except Exception as e:  # pylint: disable=broad-except  (both libraries raise bare errors)
    raise UserError(f"{path} is not a readable tokenizer file: {e}") from e


def _read_chat_template(directory: str, config: dict[str, Any]) -> tuple[Optional[str], str]:
  """(the chat template or None, the file it comes from): ``chat_template.jinja``,
  else tokenizer_config.json's ``chat_template`` (a list: the one named "default")."""
  path = os.path.join(directory, CHAT_TEMPLATE_FILE)
  if os.path.isfile(path):
    try:
      with open(path, encoding="utf-8") as f:
        return f.read(), path
    except (OSError, UnicodeDecodeError) as e:
      raise UserError(f"cannot read the chat template {path}: {e}") from e
  where = os.path.join(directory, "tokenizer_config.json")
  template = config.get("chat_template")
  if isinstance(template, list):
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default")
  if template is not None and not isinstance(template, str):
    raise UserError(f"{where}: chat_template is neither a string nor a list of named templates"
                    " with a \"default\" one")
  return template, where


@functools.lru_cache(maxsize=None)
def _jinja_environment() -> Any:
  """The sandboxed Jinja environment transformers renders chat templates in."""
  import jinja2  # pylint: disable=g-import-not-at-top  (only for chat templates)
  import jinja2.ext  # pylint: disable=g-import-not-at-top
  import jinja2.sandbox  # pylint: disable=g-import-not-at-top

  class GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers marks assistant
    text with it): renders its body."""
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return jinja2.nodes.Scope(body).set_lineno(lineno)

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Like transformers: no HTML escaping, unlike Jinja's own filter.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env


class HfTokenizer(Tokenizer):
  """Text <-> ids with a Hugging Face tokenizer directory (see the module doc)."""

  def __init__(self, directory: str):
    self.directory = directory
    spiece, fast = (os.path.join(directory, n) for n in ("spiece.model", "tokenizer.json"))
    config_path = os.path.join(directory, "tokenizer_config.json")
    self._config = load_json(config_path) if os.path.isfile(config_path) else {}
    self._chat_template, self._template_file = _read_chat_template(directory, self._config)
    self._compiled_template: Any = None
    self._sp: Optional[spm.SentencePieceProcessor] = None
    self._fast: Any = None
    if os.path.isfile(spiece):
      self._sp = _load(spiece, lambda: spm.SentencePieceProcessor(model_file=spiece))
      special = sentencepiece_special_tokens(self._sp, spiece)
    elif os.path.isfile(fast):
      import tokenizers  # pylint: disable=g-import-not-at-top  (only for tokenizer.json)
      self._fast = _load(fast, lambda: tokenizers.Tokenizer.from_file(fast))
      bos = self._find(_BOS)
      special = SpecialTokens(pad=self._find(_PAD), bos=bos, eos=self._find(_EOS),
                              unk=self._find(_UNK, required=False), decoder_start=bos)
    else:
      raise UserError(f"{directory} has neither spiece.model nor tokenizer.json")
    stops = self._listed_eos_ids() + [i for i in [self._end_of_turn_id()] if i is not None]
    self._special = dataclasses.replace(special, extra_stops=tuple(
        i for i in dict.fromkeys(stops) if i != special.eos))

  @classmethod
  def load(cls, directory: str) -> HfTokenizer:
    return cls(directory)

  def _find(self, candidates: Sequence[str], required: bool = True) -> Optional[int]:
    """The id of the first candidate: a tokenizer_config.json role or a token;
    None if there is none and not ``required``."""
    for candidate in candidates:
      token = self._config.get(candidate, candidate)
      token = token.get("content") if isinstance(token, dict) else token
      token_id = self._fast.token_to_id(token) if isinstance(token, str) else None
      if token_id is not None:
        return token_id
    if not required:
      return None
    raise UserError(f"the tokenizer in {self.directory} has none of the special tokens "
                    f"{', '.join(c for c in candidates if not c.endswith('_token'))}")

  def _listed_eos_ids(self) -> list[int]:
    """The ``eos_token_id`` ids (one or a list) of ``_EOS_LISTS`` files in the directory."""
    ids = []
    for name in _EOS_LISTS:
      path = os.path.join(self.directory, name)
      value = load_json(path).get("eos_token_id") if os.path.isfile(path) else None
      ids += [i for i in (value if isinstance(value, list) else [value])
              if isinstance(i, int) and 0 <= i < self.vocab_size]
    return ids

  def _end_of_turn_id(self) -> Optional[int]:
    """The special token the chat template puts right after an assistant message
    (``<|eot_id|>``, ``<end_of_turn>``, ``<|im_end|>``); None without a template,
    if the template renders no such token, or for sentencepiece tokenizers."""
    if self._chat_template is None or self._fast is None:
      return None
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE_REPLY}]
    try:
      text = self.apply_chat_template(messages, add_generation_prompt=False)
    except UserError:  # A broken template: apply_chat_template reports it when used.
      return None
    tail = text[text.rfind(_PROBE_REPLY) + len(_PROBE_REPLY):] if _PROBE_REPLY in text else ""
    ids = self._fast.encode(tail, add_special_tokens=False).ids[:1]
    added = self._fast.get_added_tokens_decoder()
    return ids[0] if ids and ids[0] in added and added[ids[0]].special else None

  @property
  def chat_template(self) -> Optional[str]:
    return self._chat_template

  def apply_chat_template(self, messages: Sequence[dict[str, str]],
                          add_generation_prompt: bool = True) -> str:
    """The conversation rendered by the chat template (see the module doc);
    UserError without a template, for invalid Jinja or when the template
    rejects the conversation (``raise_exception``)."""
    if self._chat_template is None:
      return super().apply_chat_template(messages, add_generation_prompt)
    import jinja2  # pylint: disable=g-import-not-at-top  (only for chat templates)
    if self._compiled_template is None:
      try:
        self._compiled_template = _jinja_environment().from_string(self._chat_template)
      except jinja2.TemplateSyntaxError as e:
        raise UserError(f"the chat template in {self._template_file} is not valid Jinja: "
                        f"{e.message} (template line {e.lineno})") from e
    # As transformers: keys with None values are dropped; special tokens by name.
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    tokens = {k: v.get("content") if isinstance(v, dict) else v
              for k, v in self._config.items()
              if k.endswith("_token") and isinstance(v, (str, dict))}
    try:
      return self._compiled_template.render(
          **tokens, messages=messages, tools=None, documents=None,
          add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as e:
      raise UserError(f"the chat template in {self._template_file} failed: {e}") from e

  def __getstate__(self):
    return {"directory": self.directory}

  def __setstate__(self, state):
    self.__init__(state["directory"])

  @property
  def vocab_size(self) -> int:
    if self._sp is not None:
      return self._sp.get_piece_size()
    return self._fast.get_vocab_size(with_added_tokens=True)

  @property
  def special_tokens(self) -> SpecialTokens:
    return self._special

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text``, without special tokens."""
    if self._sp is not None:
      return self._sp.encode(text)
    return self._fast.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of ``ids``; special tokens decode to nothing."""
    ids = [int(i) for i in ids]
    if self._sp is not None:
      return self._sp.decode(ids)
    return self._fast.decode(ids, skip_special_tokens=True)
