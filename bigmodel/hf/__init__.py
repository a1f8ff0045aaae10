"""Hugging Face interoperability: GPT-2, BERT, T5 and Llama-like weights in and out.

``files`` reads/writes model directories (safetensors only), ``mapping`` turns
a family's name map into parameters and back, ``tokenizer`` adapts HF
tokenizers, ``interop`` ties them to bigmodel checkpoints; ``python -m
bigmodel.convert`` is the command line.

A name map (a value of ``FAMILIES``) has ``MODEL_TYPE`` (``config.json``'s
``model_type``), ``ARCHITECTURE`` (the class ``architectures`` names),
``FAMILY`` (bigmodel's ``model.family``), ``IGNORED`` (HF tensor name patterns
that are not weights), ``TIED`` ((copy, original) tensor pairs),
``model_config(hf)`` (``config.model`` fields from a ``config.json``),
``hf_config(m)`` (the reverse) and ``rules(m, hf)`` (``mapping.Rule``s).
``gpt2``, ``bert`` and ``t5`` are modules; Llama, Qwen2, Qwen3, Mistral,
Gemma 2 and Gemma 3 are rows of one table (``llama.ARCHITECTURES``).
"""
from typing import Any, Optional

from bigmodel.errors import UserError
from bigmodel.hf import bert, gpt2, llama, t5
from bigmodel.models.config import ModelConfig

# --family name -> name map.
FAMILIES: dict[str, Any] = {"gpt2": gpt2, "bert": bert, "t5": t5, **llama.ARCHITECTURES}


def describes(name_map: Any, hf: dict[str, Any]) -> bool:
  """Whether a ``config.json`` is of this name map's architecture.

  ``model_type`` decides; a config without one, by its ``architectures``.
  """
  if hf.get("model_type") is not None:
    return hf["model_type"] == name_map.MODEL_TYPE
  return name_map.ARCHITECTURE in (hf.get("architectures") or [])


def family_of_config(hf: dict[str, Any]) -> Optional[str]:
  """The ``--family`` name a ``config.json`` describes (None: no supported one)."""
  return next((name for name, name_map in FAMILIES.items() if describes(name_map, hf)), None)


def exporter(m: ModelConfig) -> tuple[str, Any]:
  """(--family name, name map) that exports a model; UserError if none can.

  A decoder with rotary positions is whichever Llama-like architecture
  expresses it (``llama.for_model``); otherwise each family has one.
  """
  if m.family == llama.Architecture.FAMILY and m.position_embedding == "rope":
    architecture = llama.for_model(m)
    return architecture.name, architecture
  name = next((f for f, name_map in FAMILIES.items() if name_map.FAMILY == m.family), None)
  if name is None:
    raise UserError(f"a {m.family} model has no Hugging Face export")
  return name, FAMILIES[name]
