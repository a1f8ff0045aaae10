"""The data tasks: name -> how records become batches.

Each :class:`Task` declares what it reads (a text corpus or labelled
records), the ids it needs above the tokenizer, and a ``plan`` that, given
the tokenizer and the source, returns the :class:`Plan` of its batches: the
train and eval :class:`~bigmodel.data.loader.Stages` (transform, packing,
rows -> batch, :class:`~bigmodel.data.batch_spec.BatchSpec`) and what the
trainer reports with them. :func:`bigmodel.data.build_datasets` runs every
task through the one loader of :mod:`bigmodel.data.loader`.

Adding a task: a transform (and rows -> batch function) in
:mod:`bigmodel.data.transforms`, and ``plan`` and ``spec`` functions
registered in ``TASKS`` below (docs/data.md, "Adding a data task").
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

from absl import logging
import ml_collections

from bigmodel.data import batch_spec
from bigmodel.data import chat
from bigmodel.data import metrics
from bigmodel.data import preference
from bigmodel.data import transforms
from bigmodel.data.loader import Stages
from bigmodel.data.objectives import SpanCorruptionLengths
from bigmodel.data.objectives import span_corruption_lengths
from bigmodel.data.records import label_stats
from bigmodel.data.sources import Source
from bigmodel.data.special import SpecialIds
from bigmodel.data.tokenizer import Tokenizer
from bigmodel.errors import UserError


@dataclasses.dataclass(frozen=True)
class Context:
  """What a task's plan is made of.

  Attributes:
    config: The run's config.
    tokenizer: The run's tokenizer.
    special: Its special ids and the ids above it (mask, sentinels).
    source: The records: a text corpus, or labelled records (with
      ``answer_key`` and ``class_names``).
    process_index: This host.
  """
  config: ml_collections.ConfigDict
  tokenizer: Tokenizer
  special: SpecialIds
  source: Source
  process_index: int = 0


@dataclasses.dataclass
class Plan:
  """A task's batches.

  Attributes:
    train: Stages of the train batches.
    eval: Stages of the eval batches.
    one_example_per_row_eval: Eval rows hold one example each, so
      ``train.eval_steps=0`` means the whole validation split, exactly once.
    encoder_length, decoder_length: Le and Ld of encoder-decoder batches.
    label_names: Class names (class id = index) of classification.
    baseline_accuracy: Validation accuracy of the majority train class.
    eval_baselines: Metrics of an input-ignoring predictor.
  """
  train: Stages
  eval: Stages
  one_example_per_row_eval: bool = False
  encoder_length: int | None = None
  decoder_length: int | None = None
  label_names: tuple[str, ...] | None = None
  baseline_accuracy: float | None = None
  eval_baselines: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Task:
  """A registered data task.

  Attributes:
    name: ``data.task``.
    reads: ``"text"`` (a corpus: data.paths files or a tfds text dataset) or
      ``"records"`` (labelled examples: CSV/JSONL, tfds, a default task).
    plan: Context -> Plan.
    spec: config -> the BatchSpec of the train batches, without data (for
      compiling and benchmarks); UserError when it depends on the data.
    extra_ids: config -> ids needed above the tokenizer (mask, sentinels);
      may raise UserError for settings that cannot work.
    encoder_decoder: config -> whether the batches are encoder-decoder ones.
  """
  name: str
  reads: str
  plan: Callable[[Context], Plan]
  spec: Callable[[ml_collections.ConfigDict], batch_spec.BatchSpec]
  extra_ids: Callable[[ml_collections.ConfigDict], int] = lambda config: 0
  encoder_decoder: Callable[[ml_collections.ConfigDict], bool] = (
      lambda config: False)


def _same(stages: Stages) -> tuple[Stages, Stages]:
  """The same stages for train and eval."""
  return stages, stages


# --------------------------------------------------------------------------
# lm, mlm, span_corruption: text corpora.


def _lm_spec(config: ml_collections.ConfigDict) -> batch_spec.BatchSpec:
  return batch_spec.lm_spec(config.data.seq_len)


def _lm_plan(ctx: Context) -> Plan:
  seq_len = ctx.config.data.seq_len
  stages = Stages(
      transforms.TokenizeDocument(ctx.tokenizer, ctx.source.text_key),
      packing="concat", lengths={"tokens": seq_len + 1},
      to_batch=transforms.rows_to_lm_batch, spec=_lm_spec(ctx.config))
  return Plan(*_same(stages))


def _mlm_spec(config: ml_collections.ConfigDict) -> batch_spec.BatchSpec:
  return batch_spec.mlm_spec(config.data.seq_len)


def _mlm_plan(ctx: Context) -> Plan:
  data = ctx.config.data
  mask = transforms.MaskDocument(
      ctx.tokenizer, ctx.source.text_key, ctx.special, data.mlm_probability,
      ctx.config.train.seed, ctx.process_index)
  stages = Stages(mask, packing="concat", lengths={"tokens": data.seq_len},
                  to_batch=transforms.rows_to_mlm_batch,
                  spec=_mlm_spec(ctx.config))
  return Plan(*_same(stages))


def span_lengths(config: ml_collections.ConfigDict) -> SpanCorruptionLengths:
  """Raw chunk, corrupted lengths and spans of data.task=span_corruption."""
  data = config.data
  return span_corruption_lengths(data.seq_len, data.target_len,
                                 data.noise_density, data.mean_span_length)


def _span_corruption_spec(config: ml_collections.ConfigDict
                          ) -> batch_spec.BatchSpec:
  decoder_length = config.data.target_len or span_lengths(
      config).targets_length
  return batch_spec.encoder_decoder_spec(config.data.seq_len, decoder_length)


def _span_corruption_plan(ctx: Context) -> Plan:
  data = ctx.config.data
  lengths = span_lengths(ctx.config)
  decoder_length = data.target_len or lengths.targets_length
  logging.info("Span corruption: chunks of %d tokens -> %d inputs and %d"
               " targets (rows of %d and %d), up to %d spans",
               lengths.raw_length, lengths.inputs_length,
               lengths.targets_length, data.seq_len, decoder_length,
               lengths.max_spans)
  corrupt = transforms.SpanCorruptDocument(
      ctx.tokenizer, ctx.source.text_key, ctx.special, lengths,
      data.noise_density, data.mean_span_length, ctx.config.train.seed,
      ctx.process_index)
  stages = Stages(
      corrupt, packing="first_fit", fan_out=True,
      lengths={"encoder": data.seq_len, "decoder": decoder_length},
      to_batch=transforms.ToEncoderDecoderBatch(ctx.special.decoder_start_id),
      spec=_span_corruption_spec(ctx.config))
  return Plan(*_same(stages), encoder_length=data.seq_len,
              decoder_length=decoder_length)


# --------------------------------------------------------------------------
# classify, seq2seq: labelled records.


def _encode_pair(ctx: Context, decoder_length: int,
                 label_ids: Mapping[str, int] | None = None
                 ) -> transforms.EncodePair:
  source = ctx.source
  return transforms.EncodePair(
      ctx.tokenizer, source.text_key, source.answer_key, source.class_names,
      encoder_length=ctx.config.data.seq_len, decoder_length=decoder_length,
      label_ids=label_ids)


def _per_example_stages(ctx: Context, encode: transforms.EncodePair,
                        with_label: bool) -> Stages:
  """Encoder-decoder rows of one example each (padded, example_mask)."""
  return Stages(
      encode, packing="pad",
      lengths={"encoder": encode.encoder_length,
               "decoder": encode.decoder_length},
      to_batch=transforms.ToEncoderDecoderBatch(
          ctx.special.decoder_start_id, per_example=True),
      spec=batch_spec.encoder_decoder_spec(
          encode.encoder_length, encode.decoder_length, per_example=True,
          with_label=with_label))


def _seq2seq_spec(config: ml_collections.ConfigDict) -> batch_spec.BatchSpec:
  data = config.data
  return batch_spec.encoder_decoder_spec(data.seq_len,
                                         data.target_len or data.seq_len)


def _seq2seq_plan(ctx: Context) -> Plan:
  data = ctx.config.data
  encode = _encode_pair(ctx, data.target_len or data.seq_len)
  train = Stages(
      encode, packing="first_fit",
      lengths={"encoder": encode.encoder_length,
               "decoder": encode.decoder_length},
      to_batch=transforms.ToEncoderDecoderBatch(ctx.special.decoder_start_id),
      spec=_seq2seq_spec(ctx.config))
  plan = Plan(train, _per_example_stages(ctx, encode, with_label=False),
              one_example_per_row_eval=True,
              encoder_length=encode.encoder_length,
              decoder_length=encode.decoder_length)
  if ctx.source.validation is not None:
    plan.eval_baselines["eval_baseline_loss"] = metrics.unigram_baseline_loss(
        encode, ctx.source.train, ctx.source.validation)
    logging.info("Unigram (input-ignoring) baseline: %.4f validation loss",
                 plan.eval_baselines["eval_baseline_loss"])
  return plan


def label_decoder_length(tokenizer: Tokenizer, label_names: Sequence[str],
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


def _is_t5_classify(config: ml_collections.ConfigDict) -> bool:
  """Classification as text-to-text: the label is the decoder's target."""
  from bigmodel.models import families  # pylint: disable=g-import-not-at-top
  return families.get(config.model.family).encoder_decoder


def _classify_spec(config: ml_collections.ConfigDict) -> batch_spec.BatchSpec:
  data = config.data
  if not _is_t5_classify(config):
    return batch_spec.classify_spec(data.seq_len)
  if not data.target_len:
    raise UserError("the decoder length of text-to-text classification with"
                    " data.target_len=0 depends on the label names; set"
                    " data.target_len")
  return batch_spec.encoder_decoder_spec(data.seq_len, data.target_len,
                                         per_example=True, with_label=True)


def _classify_plan(ctx: Context) -> Plan:
  config, source = ctx.config, ctx.source
  stats = label_stats(source, config.data.labels)
  logging.info("Classes of %s (train / validation examples): %s", source.name,
               ", ".join(f"{name} {n_train}/{n_val}" for name, n_train, n_val
                         in zip(stats.names, stats.train_counts,
                                stats.validation_counts)))
  if stats.majority_baseline is not None:
    logging.info("Majority-class baseline: %.4f validation accuracy",
                 stats.majority_baseline)
  label_ids = {name: i for i, name in enumerate(stats.names)}
  extras = dict(one_example_per_row_eval=True, label_names=stats.names,
                baseline_accuracy=stats.majority_baseline)
  if _is_t5_classify(config):  # Text-to-text: the target is the label name.
    encode = _encode_pair(ctx, label_decoder_length(
        ctx.tokenizer, stats.names, config.data.target_len), label_ids)
    return Plan(*_same(_per_example_stages(ctx, encode, with_label=True)),
                encoder_length=encode.encoder_length,
                decoder_length=encode.decoder_length, **extras)
  num_classes = config.model.get("num_classes", 0)
  if num_classes and num_classes != len(stats.names):
    raise UserError(
        f"model.num_classes={num_classes} but {source.name} has"
        f" {len(stats.names)} classes ({', '.join(stats.names)}); set"
        f" model.num_classes={len(stats.names)}")
  seq_len = config.data.seq_len
  encode = transforms.EncodeForClassification(
      ctx.tokenizer, source.text_key, source.answer_key, source.class_names,
      label_ids, seq_len)
  stages = Stages(encode, packing="pad", lengths={"inputs": seq_len},
                  to_batch=transforms.rows_to_classify_batch,
                  spec=_classify_spec(config))
  return Plan(*_same(stages), **extras)


# --------------------------------------------------------------------------
# chat: conversations, the loss on the assistant's replies only.


def _chat_plan(ctx: Context) -> Plan:
  seq_len = ctx.config.data.seq_len
  encode = chat.EncodeChat(ctx.tokenizer, ctx.source.text_key, seq_len)
  _log_chat_lengths(encode, ctx.source.train)
  stages = Stages(encode, packing="first_fit", fan_out=True,
                  lengths={"inputs": seq_len, "targets": seq_len, "weights": seq_len},
                  to_batch=chat.rows_to_chat_batch, spec=_lm_spec(ctx.config))
  return Plan(*_same(stages))


def _log_chat_lengths(encode: chat.EncodeChat, records, sample: int = 1000) -> None:
  """How many of the first ``sample`` conversations ``seq_len`` cuts, and how
  many it leaves without a reply token (those are skipped)."""
  total, cut, skipped, kept = min(len(records), sample), 0, 0, encode.seq_len + 1
  for index in range(total):
    tokens, trained = encode.encode(records[index])
    cut += len(tokens) > kept
    skipped += not trained[1:kept].any()
  logging.info("Chat: of the first %d train conversations, %d exceed data.seq_len + 1 = %d"
               " tokens and are cut there, %d of them with no reply left (skipped)", total,
               cut, kept, skipped)
  if total and skipped == total:  # Training would wait forever for a batch.
    raise UserError(f"none of the first {total} train conversations keeps a reply token"
                    f" within data.seq_len + 1 = {kept} tokens; raise data.seq_len")


# --------------------------------------------------------------------------
# preference: prompt + chosen and rejected replies, for DPO.


def _preference_spec(config: ml_collections.ConfigDict) -> batch_spec.BatchSpec:
  return batch_spec.preference_spec(config.data.seq_len)


def _preference_plan(ctx: Context) -> Plan:
  seq_len = ctx.config.data.seq_len
  stages = Stages(
      preference.EncodePreference(ctx.tokenizer, ctx.source.text_key, seq_len),
      packing="pad", lengths={f"{side}_{key}": seq_len for side in preference.SIDES
                              for key in preference.ROW_KEYS},
      to_batch=preference.rows_to_preference_batch, spec=_preference_spec(ctx.config))
  return Plan(*_same(stages), one_example_per_row_eval=True)


TASKS: Mapping[str, Task] = {task.name: task for task in (
    Task("lm", reads="text", plan=_lm_plan, spec=_lm_spec),
    Task("mlm", reads="text", plan=_mlm_plan, spec=_mlm_spec,
         extra_ids=lambda config: 1),
    Task("span_corruption", reads="text", plan=_span_corruption_plan,
         spec=_span_corruption_spec,
         # The mask id stays reserved, so that sentinel ids never move.
         extra_ids=lambda config: 1 + span_lengths(config).max_spans,
         encoder_decoder=lambda config: True),
    Task("classify", reads="records", plan=_classify_plan,
         spec=_classify_spec, encoder_decoder=_is_t5_classify),
    Task("seq2seq", reads="records", plan=_seq2seq_plan, spec=_seq2seq_spec,
         encoder_decoder=lambda config: True),
    Task("chat", reads="records", plan=_chat_plan, spec=_lm_spec),
    Task("preference", reads="records", plan=_preference_plan, spec=_preference_spec),
)}


def train_batch_spec(config: ml_collections.ConfigDict) -> batch_spec.BatchSpec:
  """The BatchSpec of the train batches of ``config``, without any data: for
  abstract batches (state init, AOT compilation), FLOP counts, benchmarks.
  ``data.source="synthetic"`` makes lm batches.

  Raises:
    UserError: when the shapes depend on the data (text-to-text
      classification with ``data.target_len=0``) or the task is unknown.
  """
  if config.data.source == "synthetic":
    return _lm_spec(config)
  if config.data.task not in TASKS:
    raise UserError(f"--config.data.task={config.data.task!r} is not one of:"
                    f" {', '.join(TASKS)}")
  return TASKS[config.data.task].spec(config)
