"""Benchmarks: ``python -m benchmarks.train_step``, ``python benchmarks/attention.py``, ..."""
