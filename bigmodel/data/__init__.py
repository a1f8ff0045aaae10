"""The data layer: corpus -> tokenizer -> packed LM batches.

The trainer calls :func:`build_datasets`; everything it needs to know about a
batch is in :mod:`bigmodel.data.pipeline`'s docstring.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

from absl import logging
import ml_collections
import numpy as np

from bigmodel.data import corpus as corpus_lib
from bigmodel.data import pipeline
from bigmodel.data.synthetic import SyntheticIterator
from bigmodel.data.tokenizer import Tokenizer, chars_per_token
from bigmodel.data.tokenizer import load_or_train_tokenizer
from bigmodel.errors import UserError

# Characters of validation text used to report the tokenizer's compression.
_COMPRESSION_SAMPLE_CHARS = 1_000_000

__all__ = ["Datasets", "Tokenizer", "build_datasets"]


@dataclasses.dataclass
class Datasets:
  """What the trainer consumes.

  Attributes:
    tokenizer: Text <-> ids; None for synthetic data.
    train_iter: Endless batches of this host's rows, with get_state() (a
      JSON-safe dict) and set_state() for exact resume.
    make_eval_iter: Returns a fresh iterator over exactly
      ``config.train.eval_steps`` validation batches, the same every call;
      None when there is no validation data or eval_steps is 0.
  """
  tokenizer: Tokenizer | None
  train_iter: Iterator[dict[str, np.ndarray]]
  make_eval_iter: Callable[[], Iterator[dict[str, np.ndarray]]] | None


def _validate(config: ml_collections.ConfigDict, process_count: int) -> None:
  """Data checks beyond ``bigmodel.config.validate``, before touching any data."""
  data, model, train = config.data, config.model, config.train
  if train.batch_size % process_count:
    raise UserError(
        f"train.batch_size={train.batch_size} must be a multiple of"
        f" the number of processes ({process_count})")
  if data.num_workers < 0:
    raise UserError(f"data.num_workers={data.num_workers} must be >= 0")
  if (data.source != "synthetic" and not data.tokenizer
      and data.vocab_size > model.vocab_size):
    raise UserError(
        f"data.vocab_size={data.vocab_size} (tokenizer to train) exceeds"
        f" model.vocab_size={model.vocab_size}; it must be <= that")


def build_datasets(config: ml_collections.ConfigDict, workdir: str,
                   process_index: int = 0,
                   process_count: int = 1) -> Datasets:
  """Builds the tokenizer and the train/eval batch iterators of a run.

  Prepares the corpus (once per distinct file set, under data.data_dir or
  WORKDIR/data), then loads data.tokenizer, reuses WORKDIR/tokenizer.model or
  trains and saves one there.

  Args:
    config: The run's config (``data``, ``model``, ``train`` are read).
    workdir: The run's directory.
    process_index: This host, in [0, process_count).
    process_count: Number of hosts; each gets batch_size // process_count
      rows of every global batch and a disjoint share of the documents.

  Returns:
    The tokenizer and iterators.

  Raises:
    UserError: for a config or corpus that cannot work, with what is allowed.
  """
  _validate(config, process_count)
  data, train = config.data, config.train
  batch_size = train.batch_size // process_count
  if data.source == "synthetic":
    return Datasets(
        tokenizer=None,
        train_iter=SyntheticIterator(
            vocab_size=config.model.vocab_size, seq_len=data.seq_len,
            batch_size=batch_size, seed=train.seed,
            process_index=process_index),
        make_eval_iter=None)

  corpus = corpus_lib.load_corpus(data, workdir)
  if len(corpus.train) < process_count:
    raise UserError(f"the corpus has {len(corpus.train)} train documents,"
                    f" fewer than the {process_count} processes reading it")
  tokenizer = load_or_train_tokenizer(
      data.tokenizer, workdir, data.vocab_size,
      lambda: corpus.shuffled_train_texts(train.seed), seed=train.seed)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise UserError(
        f"the tokenizer has {tokenizer.vocab_size} pieces, more than"
        f" model.vocab_size={config.model.vocab_size}; raise model.vocab_size"
        " or use a smaller tokenizer")
  _log_compression(tokenizer, corpus)

  train_iter = pipeline.make_train_iter(
      corpus.train, tokenizer, text_key=corpus.text_key, seq_len=data.seq_len,
      batch_size=batch_size, seed=train.seed, process_index=process_index,
      process_count=process_count, num_workers=data.num_workers)
  make_eval_iter = None
  if corpus.validation is not None and train.eval_steps > 0:
    def make_eval_iter():
      return pipeline.make_eval_iter(
          corpus.validation, tokenizer, text_key=corpus.text_key,
          seq_len=data.seq_len, batch_size=batch_size,
          num_batches=train.eval_steps, process_index=process_index,
          process_count=process_count)
  else:
    logging.warning("No evaluation: %s", "train.eval_steps is 0"
                    if corpus.validation is not None
                    else "the corpus has no validation split")
  return Datasets(tokenizer=tokenizer, train_iter=train_iter,
                  make_eval_iter=make_eval_iter)


def _log_compression(tokenizer: Tokenizer,
                     corpus: corpus_lib.TextCorpus) -> None:
  """Logs characters per token on (up to 1M characters of) held-out text."""
  records = corpus.validation if corpus.validation else corpus.train
  texts, num_chars = [], 0
  for index in range(min(len(records), 1000)):
    texts.append(corpus.text(records[index]))
    num_chars += len(texts[-1])
    if num_chars >= _COMPRESSION_SAMPLE_CHARS:
      break
  logging.info("Tokenizer: %.2f characters per token on %d %s documents",
               chars_per_token(tokenizer, texts), len(texts),
               "validation" if corpus.validation else "train")
