"""Hugging Face interoperability: GPT-2, BERT and T5 weights in and out.

``files`` reads/writes model directories (safetensors only), ``mapping`` turns
a family's name map (``gpt2``, ``bert``, ``t5``) into parameters and back,
``tokenizer`` adapts HF tokenizers, ``interop`` ties them to bigmodel
checkpoints; ``python -m bigmodel.convert`` is the command line.
"""
from bigmodel.hf import bert, gpt2, t5

# --family name -> name map module.
FAMILIES = {"gpt2": gpt2, "bert": bert, "t5": t5}
