"""lm-evaluation-harness on bigmodel runs (docs/evaluation.md).

- ``adapter``: ``BigmodelLM``, lm-eval's ``LM`` registered as ``bigmodel``
  (decoders and T5; BERT refused), and ``ModelPieces``.
- ``scoring``: continuation log-likelihoods with the jitted forward in shape buckets.
- ``harness``: ``run_harness`` (lm-eval's results) and ``evaluate_tasks``
  (flat metrics for a training hook).
- ``tasks``: finding and checking tasks; the offline ``stdlib_package_mc`` task.
- ``__main__``: ``python -m bigmodel.lm_eval``.

Needs the ``eval`` extra (``pip install -e .[eval]``: lm-eval 0.4.13+). The
names below are imported on first use, so that the command line can say so
in one line when lm-eval is missing.
"""
import importlib

_EXPORTS = {"BigmodelLM": "adapter", "ModelPieces": "adapter", "evaluate_tasks": "harness",
            "flat_metrics": "harness", "run_harness": "harness",
            "write_stdlib_task": "tasks"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name not in _EXPORTS:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
