"""The data layer, as stages: source -> tokenizer -> task -> loader.

* sources: :mod:`~bigmodel.data.corpus` (text files, tfds text by name) and
  :mod:`~bigmodel.data.records` (labelled CSV/JSONL records, tfds by name),
  prepared once into ArrayRecord; :mod:`~bigmodel.data.stdlib_tasks` writes
  the default fine-tuning tasks;
* :mod:`~bigmodel.data.tokenizer`: the :class:`Tokenizer` interface (special
  ids as data) and its sentencepiece implementation;
* :mod:`~bigmodel.data.transforms` (tokenize, mask, span-corrupt, encode
  pair, classify) and :mod:`~bigmodel.data.objectives` (the numpy maths);
* :mod:`~bigmodel.data.registry`: the tasks, each a transform and a
  :class:`BatchSpec` (:mod:`~bigmodel.data.batch_spec`);
* :mod:`~bigmodel.data.loader`: the one grain pipeline (host shard, shuffle,
  pack, batch, workers, exact-resume state, eval padding).

The trainer calls :func:`build_datasets` (in :mod:`bigmodel.data.datasets`).
:func:`special_ids` gives the mask and sentinel ids above the tokenizer and
:func:`decode` renders them.
"""
from bigmodel.data.batch_spec import BatchSpec
from bigmodel.data.datasets import TASKS, Datasets, build_datasets
from bigmodel.data.datasets import is_encoder_decoder, validate_data_config
from bigmodel.data.metrics import segment_exact_match
from bigmodel.data.registry import train_batch_spec
from bigmodel.data.special import SpecialIds, decode, special_ids
from bigmodel.data.tokenizer import SpecialTokens, Tokenizer

__all__ = ["BatchSpec", "Datasets", "SpecialIds", "SpecialTokens", "TASKS",
           "Tokenizer", "build_datasets", "decode", "is_encoder_decoder",
           "segment_exact_match", "special_ids", "train_batch_spec",
           "validate_data_config"]
