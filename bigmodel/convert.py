r"""Hugging Face GPT-2 / BERT / T5 / Llama-like weights in and out of bigmodel.

Import: ``python -m bigmodel.convert --from_hf=HF_DIR [--family=NAME] --workdir=OUT``
reads ``config.json`` and ``model.safetensors`` (or shards with
``model.safetensors.index.json``) and writes a bigmodel workdir: ``config.json``,
a step-0 checkpoint and the tokenizer. ``--family`` (gpt2, bert, t5, llama,
mistral, qwen2, qwen3, gemma2, gemma3) defaults to the one ``config.json``'s
``model_type`` (else ``architectures``) names.

Export: ``python -m bigmodel.convert --to_hf=OUT_DIR --workdir=DIR [--step=S]``
writes ``config.json`` + ``model.safetensors`` (+ tokenizer files) that
``transformers``' ``from_pretrained`` loads; a rotary GPT becomes the first
Llama-like architecture that expresses it (``bigmodel.hf.llama``).

PEFT LoRA adapters: ``--to_peft=OUT_DIR --workdir=DIR [--step=S]`` writes a LoRA
run's adapters as ``adapter_config.json`` + ``adapter_model.safetensors`` for
the model ``--to_hf`` writes (``peft.PeftModel.from_pretrained`` loads them);
``--from_hf=BASE --from_peft=ADAPTER_DIR --workdir=OUT`` imports a base model
with a PEFT LoRA adapter as a LoRA run (``bigmodel.hf.peft``).

Bad input (another architecture, a missing tensor, a shape the config does not
imply, a broken file, a file outside the model directory) is one ``error:``
line on stderr and exit status 2, before anything is written. See docs/convert.md.
"""
import ctypes

from absl import app
from absl import flags

from bigmodel import cli
from bigmodel.errors import fail, user_errors_exit

_FROM_HF = flags.DEFINE_string("from_hf", None, "A Hugging Face model directory to import.")
_TO_HF = flags.DEFINE_string("to_hf", None, "Directory to export a Hugging Face model to.")
_FROM_PEFT = flags.DEFINE_string("from_peft", None, "With --from_hf: a PEFT LoRA adapter "
                                 "directory to import with that base model.")
_TO_PEFT = flags.DEFINE_string("to_peft", None, "Directory to export a LoRA run's adapters to, "
                               "as a PEFT LoRA adapter.")
_FAMILY = flags.DEFINE_string(
    "family", None, "gpt2 | bert | t5 | llama | mistral | qwen2 | qwen3 | gemma2 | gemma3 "
    "(import; default: config.json's model_type).")
_WORKDIR = flags.DEFINE_string("workdir", None, "The bigmodel workdir written (import) or read "
                               "(export).")
_STEP = flags.DEFINE_integer("step", None, "Export: checkpoint step; default: the latest.")


def _limit_malloc_arenas(count: int) -> None:
  """At most ``count`` glibc malloc arenas from here on (no-op elsewhere).

  Orbax's and tensorstore's writer threads each get an arena by default and
  keep freed host staging buffers resident: converting a 1.24 B-parameter
  Llama peaked at 1.37x the model's bytes (median of 3, up to 1.64x), 1.29x
  (1.25-1.30) with two arenas (``benchmarks/convert_memory.py``).
  """
  try:
    ctypes.CDLL(None).mallopt(-8, count)  # -8 = M_ARENA_MAX in glibc's malloc.h.
  except (AttributeError, OSError):
    pass


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.require_flags("workdir")
  if _FROM_PEFT.value is not None and _FROM_HF.value is None:
    fail("--from_peft needs --from_hf: the base model the adapter applies to")
  if [_FROM_HF.value, _TO_HF.value, _TO_PEFT.value].count(None) != 2:
    fail("give exactly one of --from_hf (import), --to_hf (export) and --to_peft (adapter "
         "export)")
  _limit_malloc_arenas(2)
  # Imported here so that flag errors answer before JAX starts.
  from bigmodel.hf.interop import export_hf, import_hf  # pylint: disable=g-import-not-at-top
  from bigmodel.hf.peft import export_peft, import_peft  # pylint: disable=g-import-not-at-top
  with user_errors_exit():
    if _TO_PEFT.value is not None:
      summary = export_peft(_WORKDIR.value, _TO_PEFT.value, _STEP.value)
      print(f"exported the LoRA adapters of step {summary['step']} of {_WORKDIR.value} "
            f"({summary['modules']} modules, rank {summary['rank']}) for a "
            f"{summary['family']} model to {_TO_PEFT.value}")
    elif _FROM_HF.value is not None:
      if _FROM_PEFT.value is not None:
        summary = import_peft(_FROM_HF.value, _FROM_PEFT.value, _WORKDIR.value, _FAMILY.value)
      else:
        summary = import_hf(_FROM_HF.value, _FAMILY.value, _WORKDIR.value)
      print(f"imported a {summary['family']} model ({summary['num_params']:,} parameters) "
            f"into {_WORKDIR.value}; tokenizer: {', '.join(summary['tokenizer'] or ['none'])}")
      if _FROM_PEFT.value is not None:
        print(f"with its LoRA adapter from {_FROM_PEFT.value}: {summary['adapted']} adapted "
              f"layers, lora.rank={summary['rank']}, lora.alpha={summary['alpha']:g}")
      if summary.get("replaced"):
        print(f"taken from the adapter (modules_to_save): {', '.join(summary['replaced'])}")
      if summary["unused"]:
        print(f"not imported (no bigmodel parameter): {', '.join(summary['unused'])}")
      if summary["fresh"]:
        print(f"initialised afresh (not in the checkpoint): {', '.join(summary['fresh'])}")
    else:
      summary = export_hf(_WORKDIR.value, _TO_HF.value, _STEP.value)
      print(f"exported step {summary['step']} of {_WORKDIR.value} as a {summary['family']} model "
            f"({summary['num_tensors']} tensors) to {_TO_HF.value}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
