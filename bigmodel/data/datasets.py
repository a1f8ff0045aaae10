"""``build_datasets``: the config's data -> tokenizer and batch iterators.

``data.task`` picks the batch format (see the module docstring of the
pipeline named for each):

========================  ===================  ==================================
task                      source               batches (pipeline module)
========================  ===================  ==================================
lm (default)              text corpus          packed causal LM (pipeline)
mlm                       text corpus          packed, masked (encoder_pipeline)
span_corruption           text corpus          packed enc-dec (seq2seq_pipeline)
classify, encoder model   labelled examples    one per row + label (encoder_pipeline)
classify, model.family t5 labelled examples    text-to-text enc-dec (seq2seq_pipeline)
seq2seq                   (input, target)      packed enc-dec (seq2seq_pipeline)
========================  ===================  ==================================

Text corpora come from :mod:`bigmodel.data.corpus`, examples from
:mod:`bigmodel.data.records` (or the default tasks of
:mod:`bigmodel.data.tasks` when ``data.paths`` is empty).

Evaluation: ``train.eval_steps`` batches; for classify and seq2seq
``train.eval_steps=0`` means the whole validation split, exactly once (the
same number of batches on every host, padding rows masked), for the other
tasks it means no evaluation.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator

from absl import logging
import ml_collections
import numpy as np

from bigmodel.data import corpus as corpus_lib
from bigmodel.data import encoder_pipeline
from bigmodel.data import pipeline
from bigmodel.data import records as records_lib
from bigmodel.data import seq2seq_pipeline
from bigmodel.data import tasks as tasks_lib
from bigmodel.data.objectives import SpanCorruptionLengths
from bigmodel.data.objectives import span_corruption_lengths
from bigmodel.data.special import SpecialIds, special_ids
from bigmodel.data.synthetic import SyntheticIterator
from bigmodel.data.tokenizer import Tokenizer, chars_per_token
from bigmodel.data.tokenizer import load_or_train_tokenizer
from bigmodel.data.corpus import check_offline_tfds_name
from bigmodel.errors import UserError

TASKS = ("lm", "mlm", "span_corruption", "classify", "seq2seq")
_CORPUS_TASKS = ("lm", "mlm", "span_corruption")
# Characters of validation text used to report the tokenizer's compression.
_COMPRESSION_SAMPLE_CHARS = 1_000_000

Batch = pipeline.Batch


@dataclasses.dataclass
class Datasets:
  """What the trainer consumes.

  Attributes:
    tokenizer: Text <-> ids; None for synthetic data.
    train_iter: Endless batches of this host's rows, with get_state() (a
      JSON-safe dict) and set_state() for exact resume.
    make_eval_iter: Returns a fresh iterator over the validation batches, the
      same every call (see the module docstring for how many); None when
      there is no validation data or no evaluation.
    task: ``data.task``.
    special_ids: The mask / sentinel ids above the tokenizer (None for
      synthetic data).
    label_names: Class names (class id = index) of a classify task.
    baseline_accuracy: Validation accuracy of always predicting the most
      frequent train class (classify), to compare a fine-tuned model with.
    eval_baselines: Metrics of a predictor that ignores the input, added to
      every evaluation to compare the model with (seq2seq:
      ``eval_baseline_loss``, see ``seq2seq_pipeline.unigram_baseline_loss``).
    encoder_length: Le of encoder-decoder batches (None otherwise).
    decoder_length: Ld of encoder-decoder batches (None otherwise).
  """
  tokenizer: Tokenizer | None
  train_iter: Iterator[Batch]
  make_eval_iter: Callable[[], Iterator[Batch]] | None
  task: str = "lm"
  special_ids: SpecialIds | None = None
  label_names: tuple[str, ...] | None = None
  baseline_accuracy: float | None = None
  eval_baselines: dict[str, float] = dataclasses.field(default_factory=dict)
  encoder_length: int | None = None
  decoder_length: int | None = None


@dataclasses.dataclass(frozen=True)
class _Host:
  """This host's coordinates and rows per batch."""
  index: int
  count: int
  batch_size: int


def is_encoder_decoder(config: ml_collections.ConfigDict) -> bool:
  """Whether the task's batches are encoder-decoder ones."""
  task = config.data.task
  return task in ("span_corruption", "seq2seq") or (
      task == "classify" and config.model.family == "t5")


def _span_lengths(config: ml_collections.ConfigDict) -> SpanCorruptionLengths:
  data = config.data
  return span_corruption_lengths(data.seq_len, data.target_len,
                                 data.noise_density, data.mean_span_length)


def _extra_ids_needed(config: ml_collections.ConfigDict) -> int:
  """Ids the task needs above the tokenizer: the mask, then sentinels."""
  if config.data.task == "mlm":
    return 1
  if config.data.task == "span_corruption":
    return 1 + _span_lengths(config).max_spans
  return 0


def validate_data_config(config: ml_collections.ConfigDict, process_count: int) -> None:
  """Data checks beyond ``bigmodel.config.validate``, before touching any data.

  Raises:
    UserError: naming the first setting that cannot work.
  """
  data, model, train = config.data, config.model, config.train
  if data.task not in TASKS:
    raise UserError(f"--config.data.task={data.task!r} is not one of:"
                    f" {', '.join(TASKS)}")
  if train.batch_size % process_count:
    raise UserError(
        f"train.batch_size={train.batch_size} must be a multiple of"
        f" the number of processes ({process_count})")
  if data.source == "tfds":
    check_offline_tfds_name(data.tfds_name)
  if data.num_workers < 0:
    raise UserError(f"data.num_workers={data.num_workers} must be >= 0")
  if data.target_len < 0:
    raise UserError(f"data.target_len={data.target_len} must be >= 0")
  if data.task == "mlm" and not 0.0 < data.mlm_probability < 1.0:
    raise UserError(f"data.mlm_probability={data.mlm_probability} must be in"
                    " (0, 1)")
  if data.source == "synthetic" and data.task != "lm":
    raise UserError(f"data.source='synthetic' only makes data.task='lm'"
                    f" batches, not {data.task!r}; use a corpus (e.g. the"
                    " default data.source='files' with data.paths='')")
  extra_ids = _extra_ids_needed(config)  # Also checks the span settings.
  if (data.source != "synthetic" and not data.tokenizer
      and data.vocab_size + extra_ids > model.vocab_size):
    needs = f" + {extra_ids} special ids" if extra_ids else ""
    raise UserError(
        f"data.vocab_size={data.vocab_size} (tokenizer to train){needs}"
        f" exceeds model.vocab_size={model.vocab_size}; it must be <= that")


def build_datasets(config: ml_collections.ConfigDict, workdir: str,
                   process_index: int = 0,
                   process_count: int = 1) -> Datasets:
  """Builds the tokenizer and the train/eval batch iterators of a run.

  Prepares the corpus or task examples (once per distinct file set, under
  data.data_dir or WORKDIR/data), then loads data.tokenizer, reuses
  WORKDIR/tokenizer.model or trains and saves one there.

  Args:
    config: The run's config (``data``, ``model``, ``train`` are read).
    workdir: The run's directory.
    process_index: This host, in [0, process_count).
    process_count: Number of hosts; each gets batch_size // process_count
      rows of every global batch and a disjoint share of the documents.

  Returns:
    The tokenizer, iterators and what describes their batches.

  Raises:
    UserError: for a config or data that cannot work, with what is allowed.
  """
  validate_data_config(config, process_count)
  data, train = config.data, config.train
  host = _Host(index=process_index, count=process_count,
               batch_size=train.batch_size // process_count)
  if data.source == "synthetic":
    return Datasets(
        tokenizer=None,
        train_iter=SyntheticIterator(
            vocab_size=config.model.vocab_size, seq_len=data.seq_len,
            batch_size=host.batch_size, seed=train.seed,
            process_index=process_index),
        make_eval_iter=None)
  if data.task in _CORPUS_TASKS:
    return _corpus_datasets(config, workdir, host)
  return _task_datasets(config, workdir, host)


def _tokenizer_and_ids(config: ml_collections.ConfigDict, workdir: str,
                       training_texts) -> tuple[Tokenizer, SpecialIds]:
  tokenizer = load_or_train_tokenizer(
      config.data.tokenizer, workdir, config.data.vocab_size, training_texts,
      seed=config.train.seed)
  special = special_ids(tokenizer.vocab_size, config.model.vocab_size)
  extra_ids = _extra_ids_needed(config)
  if extra_ids:
    special.require(extra_ids, f"data.task={config.data.task!r}")
  return tokenizer, special


def _corpus_datasets(config: ml_collections.ConfigDict, workdir: str,
                     host: _Host) -> Datasets:
  """lm, mlm and span_corruption: batches of a text corpus."""
  data, train = config.data, config.train
  corpus = corpus_lib.load_corpus(data, workdir)
  if len(corpus.train) < host.count:
    raise UserError(f"the corpus has {len(corpus.train)} train documents,"
                    f" fewer than the {host.count} processes reading it")
  tokenizer, special = _tokenizer_and_ids(
      config, workdir, lambda: corpus.shuffled_train_texts(train.seed))
  _log_compression(tokenizer, corpus)
  has_eval = corpus.validation is not None and train.eval_steps > 0
  if not has_eval:
    logging.warning("No evaluation: %s", "train.eval_steps is 0"
                    if corpus.validation is not None
                    else "the corpus has no validation split")
  common = dict(process_count=host.count)
  result = Datasets(tokenizer=tokenizer, train_iter=None,
                    make_eval_iter=None, task=data.task,
                    special_ids=special)

  if data.task == "lm":
    result.train_iter = pipeline.make_train_iter(
        corpus.train, tokenizer, text_key=corpus.text_key,
        seq_len=data.seq_len, batch_size=host.batch_size, seed=train.seed,
        process_index=host.index, num_workers=data.num_workers, **common)
    make_eval_iter = lambda: pipeline.make_eval_iter(  # noqa: E731
        corpus.validation, tokenizer, text_key=corpus.text_key,
        seq_len=data.seq_len, batch_size=host.batch_size,
        num_batches=train.eval_steps, process_index=host.index, **common)
  elif data.task == "mlm":
    mlm = dict(text_key=corpus.text_key, seq_len=data.seq_len,
               batch_size=host.batch_size,
               probability=data.mlm_probability, process_index=host.index,
               **common)
    result.train_iter = encoder_pipeline.make_mlm_train_iter(
        corpus.train, tokenizer, special, seed=train.seed,
        num_workers=data.num_workers, **mlm)
    make_eval_iter = lambda: encoder_pipeline.make_mlm_eval_iter(  # noqa: E731
        corpus.validation, tokenizer, special,
        num_batches=train.eval_steps, seed=train.seed, **mlm)
  else:
    lengths = _span_lengths(config)
    decoder_length = data.target_len or lengths.targets_length
    logging.info("Span corruption: chunks of %d tokens -> %d inputs and %d"
                 " targets (rows of %d and %d), up to %d spans",
                 lengths.raw_length, lengths.inputs_length,
                 lengths.targets_length, data.seq_len, decoder_length,
                 lengths.max_spans)

    def corrupt(seed: int) -> seq2seq_pipeline.SpanCorruptDocument:
      return seq2seq_pipeline.SpanCorruptDocument(
          tokenizer, corpus.text_key, special, lengths, data.noise_density,
          data.mean_span_length, seed, host.index)
    shapes = dict(encoder_length=data.seq_len, decoder_length=decoder_length,
                  batch_size=host.batch_size, **common)
    result.train_iter = seq2seq_pipeline.make_span_corruption_train_iter(
        corpus.train, corrupt(train.seed), num_workers=data.num_workers,
        **shapes)
    make_eval_iter = lambda: (  # noqa: E731
        seq2seq_pipeline.make_span_corruption_eval_iter(
            corpus.validation, corrupt(train.seed),
            num_batches=train.eval_steps, **shapes))
    result.encoder_length, result.decoder_length = (data.seq_len,
                                                    decoder_length)
  if has_eval:
    result.make_eval_iter = make_eval_iter
  return result


def _load_task(config: ml_collections.ConfigDict,
               workdir: str) -> records_lib.TaskRecords:
  """The examples of a classify / seq2seq task (default task when no paths)."""
  data = config.data
  kind = data.task
  answer_column = (data.label_column if kind == "classify"
                   else data.target_column)
  if data.source == "tfds":
    return records_lib.load_tfds_task(data.tfds_name, kind, data.text_column,
                                      answer_column, data.data_dir or None)
  data_dir = data.data_dir or os.path.join(workdir, "data")
  if not data.paths:
    task_dir = tasks_lib.ensure_default_task(kind, data_dir)
    return records_lib.load_task_files(task_dir, kind, "text",
                                       records_lib.answer_feature(kind),
                                       data_dir)
  return records_lib.load_task_files(data.paths, kind, data.text_column,
                                     answer_column, data_dir)


def _task_datasets(config: ml_collections.ConfigDict, workdir: str,
                   host: _Host) -> Datasets:
  """classify and seq2seq: batches of (text, label) or (text, target)."""
  data, train = config.data, config.train
  task = _load_task(config, workdir)
  if len(task.train) < host.count:
    raise UserError(f"{task.name} has {len(task.train)} train examples,"
                    f" fewer than the {host.count} processes reading it")
  stats = None
  if data.task == "classify":
    stats = records_lib.label_stats(task, data.labels)
    logging.info("Classes of %s (train / validation examples): %s", task.name,
                 ", ".join(f"{name} {n_train}/{n_val}" for name, n_train, n_val
                           in zip(stats.names, stats.train_counts,
                                  stats.validation_counts)))
    if stats.majority_baseline is not None:
      logging.info("Majority-class baseline: %.4f validation accuracy",
                   stats.majority_baseline)
    num_classes = config.model.get("num_classes", 0)
    if (num_classes and not is_encoder_decoder(config)
        and num_classes != len(stats.names)):
      raise UserError(
          f"model.num_classes={num_classes} but {task.name} has"
          f" {len(stats.names)} classes ({', '.join(stats.names)}); set"
          f" model.num_classes={len(stats.names)}")

  def training_texts():
    order = np.random.default_rng(train.seed).permutation(len(task.train))
    for index in order:
      record = task.train[int(index)]
      yield task.text(record)
      if data.task == "seq2seq":
        yield task.answer(record)
  tokenizer, special = _tokenizer_and_ids(config, workdir, training_texts)

  validation = task.validation
  if validation is None or len(validation) == 0:
    logging.warning("No evaluation: %s has no validation split", task.name)
    validation = None
  num_eval_batches = train.eval_steps or (
      encoder_pipeline.num_eval_batches(len(validation), host.batch_size,
                                        host.count) if validation else 0)
  label_ids = ({name: i for i, name in enumerate(stats.names)}
               if stats else None)
  result = Datasets(
      tokenizer=tokenizer, train_iter=None, make_eval_iter=None,
      task=data.task, special_ids=special,
      label_names=stats.names if stats else None,
      baseline_accuracy=stats.majority_baseline if stats else None)
  common = dict(batch_size=host.batch_size, process_index=host.index,
                process_count=host.count)
  if is_encoder_decoder(config):
    decoder_length = data.target_len or data.seq_len
    if stats:  # Text-to-text classification: the target is the label name.
      decoder_length = _label_decoder_length(tokenizer, stats.names,
                                             data.target_len)
    encode = seq2seq_pipeline.EncodePair(
        tokenizer, task.text_key, task.answer_key, task.class_names,
        encoder_length=data.seq_len, decoder_length=decoder_length,
        label_ids=label_ids)
    make_train_iter = (seq2seq_pipeline.make_per_example_train_iter if stats
                       else seq2seq_pipeline.make_seq2seq_train_iter)
    result.train_iter = make_train_iter(
        task.train, encode, seed=train.seed, num_workers=data.num_workers,
        **common)
    make_eval_iter = lambda: seq2seq_pipeline.make_seq2seq_eval_iter(  # noqa: E731
        validation, encode, num_batches=num_eval_batches, **common)
    if validation is not None and data.task == "seq2seq":
      result.eval_baselines["eval_baseline_loss"] = (
          seq2seq_pipeline.unigram_baseline_loss(encode, task.train, validation))
      logging.info("Unigram (input-ignoring) baseline: %.4f validation loss",
                   result.eval_baselines["eval_baseline_loss"])
    result.encoder_length = encode.encoder_length
    result.decoder_length = encode.decoder_length
  else:
    encode = encoder_pipeline.EncodeForClassification(
        tokenizer, task.text_key, task.answer_key, task.class_names,
        label_ids, data.seq_len)
    result.train_iter = encoder_pipeline.make_classify_train_iter(
        task.train, encode, seed=train.seed, num_workers=data.num_workers,
        **common)
    make_eval_iter = lambda: encoder_pipeline.make_classify_eval_iter(  # noqa: E731
        validation, encode, num_batches=num_eval_batches, **common)
  if validation is not None and num_eval_batches:
    logging.info("Evaluation: %d batches of %d validation examples",
                 num_eval_batches, len(validation))
    result.make_eval_iter = make_eval_iter
  return result


def _label_decoder_length(tokenizer: Tokenizer, label_names: tuple[str, ...],
                          target_len: int) -> int:
  """Decoder length of text-to-text classification: ``target_len``, or with
  0 the longest label's tokens + EOS rounded up to a multiple of 8.

  Raises:
    UserError: if ``target_len`` is too short for a label.
  """
  lengths = {name: len(tokenizer.encode(name)) + 1 for name in label_names}
  longest = max(lengths, key=lengths.__getitem__)
  if target_len and target_len < lengths[longest]:
    raise UserError(f"data.target_len={target_len} cannot hold label"
                    f" {longest!r} ({lengths[longest]} tokens with EOS); raise"
                    " it or set 0 to fit the longest label")
  return target_len or -(-lengths[longest] // 8) * 8


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
