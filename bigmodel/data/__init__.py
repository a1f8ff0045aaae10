"""The data layer: corpus or task examples -> tokenizer -> batches.

The trainer calls :func:`build_datasets` (in :mod:`bigmodel.data.datasets`);
``data.task`` picks the batch format, documented in the pipeline modules:
``pipeline`` (lm), ``encoder_pipeline`` (mlm, classify for encoder models),
``seq2seq_pipeline`` (span_corruption, seq2seq, classify for T5).
:func:`special_ids` gives the mask and sentinel ids above the tokenizer and
:func:`decode` renders them.
"""
from bigmodel.data.datasets import TASKS, Datasets, build_datasets
from bigmodel.data.datasets import is_encoder_decoder, validate_data_config
from bigmodel.data.seq2seq_pipeline import segment_exact_match
from bigmodel.data.special import SpecialIds, decode, special_ids
from bigmodel.data.tokenizer import Tokenizer

__all__ = ["Datasets", "SpecialIds", "TASKS", "Tokenizer", "build_datasets",
           "decode", "is_encoder_decoder", "segment_exact_match",
           "special_ids", "validate_data_config"]
