"""bigmodel: a JAX-native stack for training GPT, BERT and T5 models."""

__version__ = "0.1.0"
