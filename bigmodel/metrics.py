"""Metric sinks: ``metrics.jsonl``, TensorBoard event files, Weights & Biases, a progress line."""
import json
import os
import secrets
import sys
import time
from typing import Any, Optional

from bigmodel.errors import UserError


def _summary_writer(logdir: str):
  """A tensorboardX ``SummaryWriter`` on ``logdir``, tensorboardX imported on
  first use and without torch or boto3.

  Its writer imports torch when it is installed, only to accept torch
  tensors (which bigmodel never logs): 3.4 s of every command's start on the
  development machine; and boto3 (0.75 s) for its own S3 client, which
  bigmodel does not use. Both imports fail while it loads, and work again
  afterwards; commands that write no events never import it at all.
  """
  blocked = [name for name in ("torch", "boto3") if name not in sys.modules]
  for name in blocked:
    sys.modules[name] = None  # type: ignore[assignment]
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    for name in blocked:
      del sys.modules[name]
  return SummaryWriter(logdir)


class WandbTracker:
  """A Weights & Biases run for a workdir: the same run on every resume.

  The run id is kept in ``WORKDIR/wandb_run_id``; a resumed run passes it
  back (``resume="allow"``), so its metrics continue that run's charts. W&B
  keeps a step's first values: steps a resumed run repeats (done after the
  checkpoint it restored) keep the values logged before the restart.
  """

  @staticmethod
  def load():
    """The ``wandb`` module; UserError if it is not installed (checked before
    a run writes anything)."""
    try:
      import wandb  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise UserError("train.trackers names wandb, but the wandb package is not installed "
                      "(pip install wandb)") from e
    return wandb

  def __init__(self, workdir: str, wandb_config, run_config: dict[str, Any]):
    wandb = self.load()
    id_path = os.path.join(workdir, "wandb_run_id")
    if os.path.isfile(id_path):
      with open(id_path, encoding="utf-8") as f:
        run_id = f.read().strip()
    else:
      run_id = secrets.token_hex(6)  # W&B run ids: lowercase letters and digits.
      with open(id_path + ".tmp", "w", encoding="utf-8") as f:
        f.write(run_id + "\n")
      os.replace(id_path + ".tmp", id_path)
    tags = [t.strip() for t in wandb_config.tags.split(",") if t.strip()]
    # silent: W&B's own banner lines would crowd the console (train.log keeps
    # the library's log records).
    self.run = wandb.init(
        project=wandb_config.project, entity=wandb_config.entity or None,
        name=wandb_config.name or os.path.basename(os.path.abspath(workdir)), tags=tags or None,
        id=run_id, resume="allow", dir=workdir, config=run_config,
        mode=wandb_config.mode or None, settings=wandb.Settings(silent=True))
    self.run_id = run_id

  def write(self, step: int, scalars: dict[str, float]) -> None:
    self.run.log(scalars, step=step)

  def close(self) -> None:
    self.run.finish()


class MetricsWriter:
  """Writes one JSON line per call and the same scalars to the trackers
  (TensorBoard, Weights & Biases).

  Only the writing process (process 0 on multi-host) should create one.
  """

  def __init__(self, workdir: str, total_steps: int, progress: bool = True,
               trackers: tuple[str, ...] = ("tensorboard",), wandb_config=None,
               run_config: Optional[dict[str, Any]] = None):
    # W&B first: its failure to start (no package, no login) leaves nothing open.
    self._wandb = (WandbTracker(workdir, wandb_config, run_config or {})
                   if "wandb" in trackers else None)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
    self._tensorboard = (_summary_writer(os.path.join(workdir, "tensorboard"))
                         if "tensorboard" in trackers else None)
    self._total_steps = total_steps
    self._progress = progress and sys.stderr.isatty()
    self._line_open = False  # A progress line without its newline yet.
    self._start = time.time()

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    scalars = {k: v for k, v in record.items()
               if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    if self._tensorboard is not None:
      for key, value in scalars.items():
        self._tensorboard.add_scalar(key, value, step)
    if self._wandb is not None:
      self._wandb.write(step, scalars)
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
      self._line_open = "eval_loss" not in record
      print("\r\033[K" + line, end="" if self._line_open else "\n", file=sys.stderr,
            flush=True)
    else:
      print(line, file=sys.stderr, flush=True)

  def end_line(self) -> None:
    """Ends the progress line being redrawn, so that other output starts below it."""
    if self._line_open:
      print(file=sys.stderr, flush=True)
      self._line_open = False

  def close(self) -> None:
    self.end_line()
    self._jsonl.close()
    if self._tensorboard is not None:
      self._tensorboard.close()
    if self._wandb is not None:
      self._wandb.close()


def _plain(value: Any) -> Any:
  """numpy / jax scalars -> Python numbers for JSON."""
  try:
    return value.item()
  except AttributeError:
    return value
