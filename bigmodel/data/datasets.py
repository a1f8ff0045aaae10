"""``build_datasets``: the config's data -> tokenizer and batch iterators.

Stages: a source (:mod:`bigmodel.data.corpus` for text, files or record
shards, :mod:`bigmodel.data.records` for labelled examples, or the default
tasks of :mod:`bigmodel.data.stdlib_tasks` when ``data.paths`` is empty; a
weighted mixture of text corpora, :mod:`bigmodel.data.mixture`) -> the
tokenizer (:mod:`bigmodel.data.tokenizer`) -> the task of ``data.task``
(:mod:`bigmodel.data.registry`: transform, packing, BatchSpec) -> the one
loader (:mod:`bigmodel.data.loader`).

========================  ===================  ==========================
task                      source               batches
========================  ===================  ==========================
lm (default)              text corpus          packed causal LM
mlm                       text corpus          packed, masked
span_corruption           text corpus          packed enc-dec
classify, encoder model   labelled examples    one per row + label
classify, model.family t5 labelled examples    text-to-text enc-dec
seq2seq                   (input, target)      packed enc-dec
chat (decoder)            JSONL conversations  packed causal LM, replies
preference (decoder)      JSONL pairs          one pair per row (DPO)
========================  ===================  ==========================

Evaluation: ``train.eval_steps`` batches; for classify and seq2seq
``train.eval_steps=0`` means the whole validation split, exactly once (the
same number of batches on every host, padding rows masked), for the other
tasks it means no evaluation.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Iterator

from absl import logging
import ml_collections
import numpy as np

from bigmodel.data import chat
from bigmodel.data import corpus as corpus_lib
from bigmodel.data import loader
from bigmodel.data import mixture as mixture_lib
from bigmodel.data import records as records_lib
from bigmodel.data import registry
from bigmodel.data import stdlib_tasks
from bigmodel.data import token_cache
from bigmodel.data.batch_spec import Batch, BatchSpec, lm_spec
from bigmodel.data.sources import Source, check_offline_tfds_name
from bigmodel.data.special import SpecialIds, tokenizer_special_ids
from bigmodel.data.synthetic import SyntheticIterator
from bigmodel.data.tokenizer import Tokenizer, chars_per_token
from bigmodel.data.tokenizer import load_or_train_tokenizer
from bigmodel.errors import UserError

TASKS = tuple(registry.TASKS)
# Characters of validation text used to report the tokenizer's compression.
_COMPRESSION_SAMPLE_CHARS = 1_000_000


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
      ``eval_baseline_loss``, see ``metrics.unigram_baseline_loss``).
    encoder_length: Le of encoder-decoder batches (None otherwise).
    decoder_length: Ld of encoder-decoder batches (None otherwise).
    train_spec: Keys, per-row shapes and dtypes of the train batches.
    eval_spec: The same for the eval batches (None without evaluation).
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
  train_spec: BatchSpec | None = None
  eval_spec: BatchSpec | None = None


@dataclasses.dataclass(frozen=True)
class _Host:
  """This host's coordinates and rows per batch."""
  index: int
  count: int
  batch_size: int


def is_encoder_decoder(config: ml_collections.ConfigDict) -> bool:
  """Whether the task's batches are encoder-decoder ones."""
  task = registry.TASKS.get(config.data.task)
  return task is not None and task.encoder_decoder(config)


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
  from bigmodel.models import families  # pylint: disable=g-import-not-at-top
  if data.task in ("chat", "preference") and not families.get(model.family).is_causal_lm:
    raise UserError(f"data.task={data.task} fine-tunes a decoder-only model (gpt family);"
                    f" model.family={model.family!r} is not one")
  if data.task == "mlm" and not 0.0 < data.mlm_probability < 1.0:
    raise UserError(f"data.mlm_probability={data.mlm_probability} must be in"
                    " (0, 1)")
  sources = mixture_lib.parse(data.mixture)
  if sources and registry.TASKS[data.task].reads != "text":
    raise UserError(f"data.mixture mixes text corpora (data.task lm, mlm or span_corruption),"
                    f" not data.task={data.task!r} records")
  if sources and (data.source == "synthetic" or data.paths or data.tfds_name):
    raise UserError("data.mixture names the sources: leave data.paths and data.tfds_name"
                    " empty and data.source='files'")
  if data.token_cache and registry.TASKS[data.task].reads != "text":
    raise UserError(f"data.token_cache caches text corpora (data.task lm, mlm or"
                    f" span_corruption), not data.task={data.task!r} records")
  if data.cache_workers < 0:
    raise UserError(f"data.cache_workers={data.cache_workers} must be >= 0")
  for source in sources:
    if source.tfds_name:
      check_offline_tfds_name(source.tfds_name)
  if not 0.0 <= data.max_bad_fraction <= 1.0:
    raise UserError(f"data.max_bad_fraction={data.max_bad_fraction} must be in [0, 1]")
  if data.source == "synthetic" and data.task != "lm":
    raise UserError(f"data.source='synthetic' only makes data.task='lm'"
                    f" batches, not {data.task!r}; use a corpus (e.g. the"
                    " default data.source='files' with data.paths='')")
  # Also checks the span settings.
  extra_ids = registry.TASKS[data.task].extra_ids(config)
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
        make_eval_iter=None, train_spec=lm_spec(data.seq_len))
  task = registry.TASKS[data.task]
  mixture = {s.name: (_load_corpus(config, workdir, s.data_config(data)), s.weight)
             for s in mixture_lib.parse(data.mixture)}
  if mixture:
    source = mixture_lib.combined_source({n: s for n, (s, _) in mixture.items()})
  else:
    source = (_load_corpus(config, workdir) if task.reads == "text"
              else _load_records(config, workdir))
  if len(source.train) < host.count:
    raise UserError(f"{source.name} has {len(source.train)} train"
                    f" {'documents' if task.reads == 'text' else 'examples'},"
                    f" fewer than the {host.count} processes reading it")
  tokenizer = load_or_train_tokenizer(
      data.tokenizer, workdir, data.vocab_size,
      lambda: (mixture_lib.training_texts(mixture, train.seed) if mixture
               else _training_texts(source, task, train.seed)), seed=train.seed)
  special = tokenizer_special_ids(tokenizer, config.model.vocab_size)
  extra_ids = task.extra_ids(config)
  if extra_ids:
    special.require(extra_ids, f"data.task={data.task!r}")
  if task.reads == "text":
    _log_compression(tokenizer, source)
  if data.token_cache:
    cache = functools.partial(
        token_cache.cached_source, tokenizer=tokenizer,
        root=token_cache.cache_root(data, workdir),
        workers=data.cache_workers, process_index=host.index, process_count=host.count)
    mixture = {name: (cache(s), weight) for name, (s, weight) in mixture.items()}
    source = (mixture_lib.combined_source({n: s for n, (s, _) in mixture.items()})
              if mixture else cache(source))
  plan = task.plan(registry.Context(config, tokenizer, special, source,
                                    process_index=host.index))
  if mixture:
    train_iter = loader.make_mixture_train_iter(
        [loader.MixtureComponent(name, component.train, weight, task.plan(registry.Context(
            config, tokenizer, special, component, process_index=host.index)).train)
         for name, (component, weight) in mixture.items()],
        batch_size=host.batch_size, seed=train.seed, process_index=host.index,
        process_count=host.count, num_workers=data.num_workers)
  else:
    train_iter = loader.make_train_iter(
        source.train, plan.train, batch_size=host.batch_size, seed=train.seed,
        process_index=host.index, process_count=host.count, num_workers=data.num_workers)
  result = Datasets(
      tokenizer=tokenizer, task=data.task, special_ids=special, train_iter=train_iter,
      make_eval_iter=None, label_names=plan.label_names,
      baseline_accuracy=plan.baseline_accuracy,
      eval_baselines=plan.eval_baselines, encoder_length=plan.encoder_length,
      decoder_length=plan.decoder_length, train_spec=plan.train.spec)
  num_batches = _num_eval_batches(config, source, plan, host)
  if num_batches:
    result.eval_spec = plan.eval.spec
    result.make_eval_iter = lambda: loader.make_eval_iter(  # noqa: E731
        source.validation, plan.eval, batch_size=host.batch_size,
        num_batches=num_batches, seed=train.seed, process_index=host.index,
        process_count=host.count)
  return result


def _num_eval_batches(config: ml_collections.ConfigDict, source: Source,
                      plan: registry.Plan, host: _Host) -> int:
  """Eval batches per evaluation (0: no evaluation), logged."""
  eval_steps = config.train.eval_steps
  if source.validation is None:
    logging.warning("No evaluation: %s has no validation split", source.name)
    return 0
  if plan.one_example_per_row_eval and not eval_steps:
    eval_steps = loader.num_eval_batches(len(source.validation),
                                         host.batch_size, host.count)
  if not eval_steps:
    logging.warning("No evaluation: train.eval_steps is 0")
    return 0
  logging.info("Evaluation: %d batches of %d validation records", eval_steps,
               len(source.validation))
  return eval_steps


def _load_corpus(config: ml_collections.ConfigDict, workdir: str,
                 data: ml_collections.ConfigDict | None = None) -> Source:
  """The corpus of ``config.data`` (or of ``data``, one mixture source)."""
  return corpus_lib.load_corpus(data or config.data, workdir)


def _load_records(config: ml_collections.ConfigDict,
                  workdir: str) -> Source:
  """The examples of a classify / seq2seq / chat task (default task when no paths);
  an empty validation split is None."""
  data = config.data
  kind = data.task
  answer_column = (data.label_column if kind == "classify"
                   else data.target_column)
  if data.source == "tfds":
    task = records_lib.load_tfds_task(data.tfds_name, kind, data.text_column,
                                      answer_column, data.data_dir or None)
  else:
    data_dir = data.data_dir or os.path.join(workdir, "data")
    if not data.paths:
      task_dir = stdlib_tasks.ensure_default_task(kind, data_dir)
      task = records_lib.load_task_files(task_dir, kind,
                                         stdlib_tasks.DEFAULT_TEXT_COLUMNS[kind],
                                         records_lib.answer_feature(kind),
                                         data_dir)
    else:
      task = records_lib.load_task_files(data.paths, kind, data.text_column,
                                         answer_column, data_dir)
  if task.validation is not None and len(task.validation) == 0:
    task = dataclasses.replace(task, validation=None)
  return task


def _training_texts(source: Source, task: registry.Task, seed: int) -> Iterator[str]:
  """Texts to train a tokenizer on, in a seeded random order (records: the
  input, then for seq2seq the target; a chat in the built-in chat format)."""
  if task.reads == "text":
    yield from source.shuffled_train_texts(seed)
    return
  order = np.random.default_rng(seed).permutation(len(source.train))
  for index in order:
    record = source.train[int(index)]
    if task.name == "chat":
      yield chat.builtin_chat_text(json.loads(source.text(record)), False)
      continue
    if task.name == "preference":
      pair = json.loads(source.text(record))
      prompt = pair["prompt"]
      yield from (prompt if isinstance(prompt, str) else chat.builtin_chat_text(prompt, True),
                  pair["chosen"], pair["rejected"])
      continue
    yield source.text(record)
    if task.name == "seq2seq":
      yield source.answer(record)


def _log_compression(tokenizer: Tokenizer,
                     corpus: Source) -> None:
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
