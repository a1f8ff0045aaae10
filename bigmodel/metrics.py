"""Metric sinks: ``metrics.jsonl``, TensorBoard event files, a progress line."""
import json
import os
import sys
import time
from typing import Any



def _summary_writer_class():
  """tensorboardX's ``SummaryWriter``, imported without torch.

  tensorboardX's writer imports torch when it is installed, only to accept
  torch tensors (which bigmodel never logs): 3.4 s of every command's start
  on the development machine. ``import torch`` fails while it loads, and
  works again afterwards.
  """
  blocked = "torch" not in sys.modules
  if blocked:
    sys.modules["torch"] = None  # type: ignore[assignment]
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    if blocked:
      del sys.modules["torch"]
  return SummaryWriter


SummaryWriter = _summary_writer_class()


class MetricsWriter:
  """Writes one JSON line per call and the same scalars to TensorBoard.

  Only the writing process (process 0 on multi-host) should create one.
  """

  def __init__(self, workdir: str, total_steps: int, progress: bool = True):
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
    self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self._total_steps = total_steps
    self._progress = progress and sys.stderr.isatty()
    self._start = time.time()

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)):
        self._tensorboard.add_scalar(key, value, step)
    self._print(record)

  def write_event(self, step: int, **fields: Any) -> None:
    """A record for ``metrics.jsonl`` only, e.g. ``resumed_from``: steps after it
    may repeat ones logged before (keep the last record of each step)."""
    self._jsonl.write(json.dumps({"step": int(step), **fields}) + "\n")

  def _print(self, record: dict[str, Any]) -> None:
    shown = [f"step {record['step']}/{self._total_steps}"]
    for key, fmt in (("loss", ".4f"), ("eval_loss", ".4f"), ("eval_perplexity", ".2f"),
                     ("learning_rate", ".2e"), ("tokens_per_sec", ",.0f"), ("mfu", ".1%")):
      if key in record:
        shown.append(f"{key} {record[key]:{fmt}}")
    shown.append(f"{time.time() - self._start:.0f}s")
    line = " | ".join(shown)
    if self._progress:  # Redraw one line on a terminal; keep eval lines.
      end = "\n" if "eval_loss" in record else ""
      print("\r\033[K" + line, end=end, file=sys.stderr, flush=True)
    else:
      print(line, file=sys.stderr, flush=True)

  def close(self) -> None:
    if self._progress:
      print(file=sys.stderr)
    self._jsonl.close()
    self._tensorboard.close()


def _plain(value: Any) -> Any:
  """numpy / jax scalars -> Python numbers for JSON."""
  try:
    return value.item()
  except AttributeError:
    return value
