"""A sentencepiece tokenizer that round-trips source code exactly.

Trained here (BPE) with settings for code rather than prose:

* identity normalisation, no removal of extra whitespace and no dummy prefix,
  so ``decode(encode(text)) == text`` for any text without U+2581 ("▁", which
  sentencepiece uses for the space);
* newline (and tab) as user-defined pieces: training sentences are lines, so
  "\\n" is never learned, yet must be one cheap token;
* whitespace-only pieces allowed, so indentation is one token ("▁▁▁▁");
* byte fallback: any character outside the vocabulary becomes UTF-8 bytes
  instead of ``<unk>``.

Special ids of a tokenizer trained here: pad=0, bos=1, eos=2, unk=3, and
the decoder of an encoder-decoder model starts from bos (1).

Every tokenizer implements :class:`Tokenizer`: encode, decode, vocab_size and
its special ids as data (:class:`SpecialTokens`: pad, bos, eos, unk,
decoder_start, and the extra ids that end generation, ``stop_ids``), plus a
chat format (``apply_chat_template``: a Hugging Face tokenizer's Jinja
``chat_template``, else the built-in format of ``bigmodel.data.chat``). The data layer and generation read the ids from there, never
from constants, so an imported model keeps its own (T5: pad 0, eos 1, unk 2,
decoder start = pad). Two implementations: :class:`SentencePieceTokenizer`
(this module) and ``bigmodel.hf.tokenizer.HfTokenizer`` (a Hugging Face
tokenizer directory), which :meth:`Tokenizer.load` imports only when given a
directory.

Training is deterministic: the same corpus and seed give the same pieces and
scores, across processes and for any thread count (the model bytes differ
only in the recorded ``num_threads``), so every host of a multi-host job
trains the same tokenizer. This is why the training sentences are sampled
here with a seeded numpy generator and sentencepiece's own
``shuffle_input_sentence`` stays off: measured with sentencepiece 0.2.3, that
sampling is random per run even after ``set_random_generator_seed``.
"""
from __future__ import annotations

import abc
import dataclasses
import io
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence

from absl import logging
import numpy as np
import sentencepiece as spm

from bigmodel import storage
from bigmodel.errors import UserError

# The ids of tokenizers trained here (train_tokenizer).
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

# Caps on what the trainer reads: the default stdlib corpus (~730k non-blank
# lines) fits entirely and trains in ~6 s on 2 cores with vocab 4096; a large
# tfds corpus is subsampled to these.
MAX_TRAINING_CHARS = 100_000_000
MAX_TRAINING_SENTENCES = 1_000_000
# sentencepiece skips longer sentences (bytes) outright.
_MAX_SENTENCE_BYTES = 8192


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
  """The special ids of a tokenizer: data, so that nothing assumes 0/1/2/3.

  Attributes:
    pad: Padding (and what padding rows hold).
    bos: Put before a text (GPT, BERT's [CLS]); pad when the tokenizer has
      none (T5).
    eos: Put after a text (BERT's [SEP], T5's </s>).
    unk: Unknown piece; None when the tokenizer has none (byte-level BPE).
    decoder_start: First input of an encoder-decoder decoder (T5: pad).
    extra_stops: Ids besides eos that end generation: more end-of-text ids a
      model lists (Llama 3's ``eos_token_id: [128001, 128008, 128009]``) and
      its chat template's end-of-turn token (``<|eot_id|>``,
      ``<end_of_turn>``, ``<|im_end|>``).
  """
  pad: int
  bos: int
  eos: int
  unk: int | None
  decoder_start: int
  extra_stops: tuple[int, ...] = ()

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """Every id that ends generation: eos first, then ``extra_stops``, no repeats."""
    return tuple(dict.fromkeys((self.eos, *self.extra_stops)))


class Tokenizer(abc.ABC):
  """Text <-> token ids, with the special ids as data (``special_tokens``).

  Implementations must be picklable (grain worker processes get a copy).
  """

  @property
  @abc.abstractmethod
  def special_tokens(self) -> SpecialTokens:
    """The special ids."""

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Ids the tokenizer produces: [0, vocab_size)."""

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Token ids of ``text``, without special tokens."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of ``ids``; special tokens decode to nothing."""

  @property
  def pad_id(self) -> int:
    return self.special_tokens.pad

  @property
  def bos_id(self) -> int:
    return self.special_tokens.bos

  @property
  def eos_id(self) -> int:
    return self.special_tokens.eos

  @property
  def unk_id(self) -> int | None:
    return self.special_tokens.unk

  @property
  def decoder_start_id(self) -> int:
    """The first decoder input of an encoder-decoder model."""
    return self.special_tokens.decoder_start

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """The ids that end generation (``SpecialTokens.stop_ids``)."""
    return self.special_tokens.stop_ids

  @property
  def chat_template(self) -> str | None:
    """The Jinja chat template (Hugging Face's format); None without one."""
    return None

  def apply_chat_template(self, messages: Sequence[dict[str, str]],
                          add_generation_prompt: bool = True) -> str:
    """The text of a conversation in the model's chat format: its template's,
    or without one the built-in format of ``bigmodel.data.chat``.

    Args:
      messages: ``{"role": "system" | "user" | "assistant", "content": text}``.
      add_generation_prompt: End with the start of an assistant turn, so that
        generation continues as the assistant.

    Raises:
      UserError: The template rejects the conversation.
    """
    from bigmodel.data.chat import builtin_chat_text  # pylint: disable=g-import-not-at-top
    return builtin_chat_text(messages, add_generation_prompt)

  @staticmethod
  def load(path: str) -> Tokenizer:
    """Loads a sentencepiece ``.model`` file; UserError if missing or not a
    model.

    A directory is a Hugging Face tokenizer kept by ``bigmodel.convert``
    (``bigmodel.hf.tokenizer``): it keeps that tokenizer's own special ids.
    """
    if os.path.isdir(path):
      # Imported here: only converted models need it.
      from bigmodel.hf.tokenizer import HfTokenizer  # pylint: disable=g-import-not-at-top
      return HfTokenizer.load(path)
    return SentencePieceTokenizer.load(path)


def sentencepiece_special_tokens(processor: spm.SentencePieceProcessor,
                                 where: str) -> SpecialTokens:
  """The special ids a sentencepiece model declares.

  A model without bos (T5's) puts nothing before texts and starts the decoder
  from pad, as T5 does; otherwise the decoder starts from bos (models
  trained here: 1, as always).
  """
  pad, bos, eos, unk = (processor.pad_id(), processor.bos_id(),
                        processor.eos_id(), processor.unk_id())
  if pad < 0 or eos < 0:
    raise UserError(f"the sentencepiece model {where} has no pad or eos piece"
                    f" (pad_id={pad}, eos_id={eos}); bigmodel needs both")
  start = bos if bos >= 0 else pad
  return SpecialTokens(pad=pad, bos=start, eos=eos,
                       unk=unk if unk >= 0 else None, decoder_start=start)


class SentencePieceTokenizer(Tokenizer):
  """Text <-> token ids with a sentencepiece model.

  Picklable: it pickles the serialized model, not the C++ processor.

  Attributes:
    model_proto: The serialized sentencepiece model.
  """

  def __init__(self, model_proto: bytes, where: str = "in memory"):
    self.model_proto = model_proto
    self._processor = spm.SentencePieceProcessor(model_proto=model_proto)
    self._special = sentencepiece_special_tokens(self._processor, where)

  @classmethod
  def load(cls, path: str) -> SentencePieceTokenizer:
    """Loads a ``.model`` file (a local path or a URL); UserError if missing or
    not a model."""
    if not storage.is_url(path) and not os.path.isfile(path):
      raise UserError(f"tokenizer file {path!r} does not exist; set data.tokenizer to a "
                      "sentencepiece .model file or '' to train one")
    model_proto = storage.read_bytes(path)  # A missing object: the store's one-line error.
    try:
      return cls(model_proto, where=path)
    except RuntimeError as e:  # sentencepiece's "failed to parse" error.
      raise UserError(f"tokenizer file {path!r} is not a sentencepiece"
                      f" model: {e}") from e

  def __getstate__(self):
    return {"model_proto": self.model_proto}

  def __setstate__(self, state):
    self.__init__(state["model_proto"])

  @property
  def special_tokens(self) -> SpecialTokens:
    return self._special

  @property
  def vocab_size(self) -> int:
    return self._processor.get_piece_size()

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text``, without BOS/EOS."""
    return self._processor.encode(text)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of ``ids``; pad/bos/eos ids decode to nothing."""
    return self._processor.decode([int(i) for i in ids])


def training_sentences(texts: Iterable[str], seed: int,
                       max_chars: int = MAX_TRAINING_CHARS,
                       max_sentences: int = MAX_TRAINING_SENTENCES
                       ) -> tuple[list[str], int]:
  """Non-blank lines of ``texts`` to train on, capped and sampled by ``seed``.

  Args:
    texts: Documents, best in a random order (reading stops at max_chars).
    seed: Seed of the sampling when there are more than max_sentences lines.
    max_chars: Characters read at most.
    max_sentences: Lines kept at most.

  Returns:
    (sentences, number of characters read).
  """
  sentences, num_chars = [], 0
  # sentencepiece skips sentences over its byte limit outright: longer lines
  # (minified code, a text without newlines) are cut into pieces that fit.
  max_len = _MAX_SENTENCE_BYTES // 4
  for text in texts:
    num_chars += len(text)
    for line in text.split("\n"):
      if line.strip():
        sentences.extend(line[i:i + max_len] for i in range(0, len(line), max_len))
    if num_chars >= max_chars:
      break
  if len(sentences) > max_sentences:
    keep = np.random.default_rng(seed).choice(len(sentences), max_sentences,
                                              replace=False)
    sentences = [sentences[i] for i in np.sort(keep)]
  return sentences, num_chars


def train_tokenizer(texts: Iterable[str], vocab_size: int, seed: int = 0,
                    num_threads: int | None = None) -> SentencePieceTokenizer:
  """Trains a BPE sentencepiece model for code on ``texts``.

  Args:
    texts: Training documents (see :func:`training_sentences`).
    vocab_size: Pieces in the model, special and byte pieces included (so at
      least 4 + 2 + 256 = 262).
    seed: Seed of the sentence sampling; training is deterministic.
    num_threads: sentencepiece threads; default: all cores.

  Returns:
    The trained tokenizer.
  """
  start = time.perf_counter()
  sentences, num_chars = training_sentences(texts, seed)
  if not sentences:
    raise UserError("the corpus has no non-blank line to train a tokenizer on")
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=False,  # Measured: 5% more characters per token.
        byte_fallback=True,
        character_coverage=0.9995,
        user_defined_symbols=["\n", "\t"],
        input_sentence_size=0,  # Already capped by training_sentences.
        shuffle_input_sentence=False,  # Nondeterministic; see module doc.
        max_sentence_length=_MAX_SENTENCE_BYTES,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,
    )
  except RuntimeError as e:  # E.g. "Vocabulary size is smaller than required".
    reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    match = re.search(r"required_chars\.\s*(\d+) vs (\d+)", str(e))
    if match:
      reason = (f"the corpus has {match.group(2)} distinct characters to cover, more than "
                f"the {match.group(1)} pieces data.vocab_size leaves for them; raise "
                "data.vocab_size or remove files that are not text of one language")
    raise UserError(f"cannot train a tokenizer with data.vocab_size={vocab_size} on this "
                    f"corpus: {reason}") from e
  tokenizer = SentencePieceTokenizer(model.getvalue())
  logging.info("Trained a %d-piece tokenizer on %d lines (%d characters read)"
               " in %.1f s", tokenizer.vocab_size, len(sentences), num_chars,
               time.perf_counter() - start)
  return tokenizer


def chars_per_token(tokenizer: Tokenizer, texts: Iterable[str]) -> float:
  """Average compression of ``tokenizer`` on ``texts``."""
  num_chars = num_tokens = 0
  for text in texts:
    num_chars += len(text)
    num_tokens += len(tokenizer.encode(text))
  return num_chars / max(num_tokens, 1)


def load_or_train_tokenizer(tokenizer_path: str, workdir: str,
                            vocab_size: int,
                            training_texts: Callable[[], Iterable[str]],
                            seed: int = 0) -> Tokenizer:
  """The tokenizer of a run: given, reused from ``workdir``, or trained.

  Args:
    tokenizer_path: ``data.tokenizer``; "" = ``WORKDIR/tokenizer.model``,
      trained and saved there on the first run and reused afterwards.
    workdir: The run's directory.
    vocab_size: Size of a newly trained tokenizer.
    training_texts: Returns the training documents, called only when training.
    seed: Seed of the training-sentence sampling.

  Returns:
    The tokenizer.
  """
  if tokenizer_path:
    tokenizer = Tokenizer.load(tokenizer_path)
    logging.info("Loaded tokenizer %s (%d pieces)", tokenizer_path,
                 tokenizer.vocab_size)
    return tokenizer
  saved_path = os.path.join(workdir, "tokenizer.model")
  if os.path.isfile(saved_path):
    tokenizer = Tokenizer.load(saved_path)
    logging.info("Reusing tokenizer %s (%d pieces)", saved_path,
                 tokenizer.vocab_size)
    return tokenizer
  logging.info("Training a tokenizer with %d pieces", vocab_size)
  tokenizer = train_tokenizer(training_texts(), vocab_size, seed)
  os.makedirs(workdir, exist_ok=True)
  # Written under a temporary name and renamed, so that an interrupted run
  # never leaves a truncated model that the next run would reuse.
  partial_path = f"{saved_path}.partial.{os.getpid()}"
  with open(partial_path, "wb") as f:
    f.write(tokenizer.model_proto)
  os.replace(partial_path, saved_path)
  logging.info("Saved tokenizer to %s", saved_path)
  return tokenizer
