"""What the trainer does between steps, as small hooks (in the manner of
``clu.periodic_actions`` and Levanter's trainer hooks).

The loop is "next batch -> step -> hooks": after every step each hook looks
at a :class:`StepOutcome` and may add to its ``record`` (what gets logged) or
act (evaluate, save). The trainer runs them in order: metrics (which also
applies the non-finite policy), evaluation, the lock check, logging,
checkpointing, and the object-store sync.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from bigmodel import flops
from bigmodel.errors import UserError


@dataclasses.dataclass
class StepOutcome:
  """One finished step, as the hooks see it.

  Attributes:
    step: The step just taken (1-based).
    state: The train state after it.
    metrics: The step's metrics, still on the devices.
    is_last: Whether it is the run's last step.
    save: Whether the state is checkpointed after this step.
    record: What to log for this step; hooks add to it.
  """
  step: int
  state: Any
  metrics: dict[str, jax.Array]
  is_last: bool
  save: bool
  record: dict[str, float] = dataclasses.field(default_factory=dict)


class MetricsHook:
  """Fetches the metrics at logging and saving steps; adds throughput and MFU.

  Also applies ``train.nonfinite`` / ``train.max_nonfinite`` to the updates
  skipped since the previous fetch: fetching is a device sync, so it happens
  only at those steps.
  """

  def __init__(self, train_config, tokens_per_step: int, flops_per_step: float,
               peak: flops.DevicePeak, nonfinite_at_start: int):
    """``nonfinite_at_start``: updates skipped before this run started (resumed)."""
    self.train_config = train_config
    self.tokens_per_step, self.flops_per_step = tokens_per_step, flops_per_step
    self.peak = peak
    self._nonfinite_seen = nonfinite_at_start
    self._interval_start = None  # Seconds (perf_counter) when the interval began.
    self._interval_steps = 0

  def restart_interval(self) -> None:
    """Time from now on (e.g. after an evaluation, which is not step time)."""
    self._interval_start, self._interval_steps = time.perf_counter(), 0

  def __call__(self, outcome: StepOutcome) -> None:
    self._interval_steps += 1
    if self._interval_start is None:
      # The first step includes compilation: time from its end instead.
      jax.block_until_ready(outcome.metrics)
      self.restart_interval()
    log_now = outcome.step % self.train_config.log_every == 0 or outcome.is_last
    if not (log_now or outcome.save):
      return
    fetched = {k: float(v) for k, v in jax.device_get(outcome.metrics).items()}
    self._check_nonfinite(fetched, outcome.step)
    if not log_now:
      return
    outcome.record.update(fetched)
    if self._interval_steps:
      elapsed = time.perf_counter() - self._interval_start
      tflops = (self._interval_steps * self.flops_per_step / elapsed / jax.device_count()
                / 1e12)
      peak = self.peak.observe(tflops)  # May probe: after the interval's time is taken.
      outcome.record.update(
          tokens_per_sec=self._interval_steps * self.tokens_per_step / elapsed,
          tflops_per_device=tflops, mfu=tflops / peak, peak_tflops_per_device=peak)
    self.restart_interval()

  def _check_nonfinite(self, metrics: dict[str, float], step: int) -> None:
    """Applies ``train.nonfinite`` to the updates skipped since the last check."""
    count, in_a_row = int(metrics["nonfinite_steps"]), int(metrics["nonfinite_in_a_row"])
    seen, self._nonfinite_seen = self._nonfinite_seen, count
    if count <= seen:
      return
    message = (f"{count - seen} update(s) with a non-finite loss, gradient or update up to "
               f"step {step} (loss {metrics['loss']})")
    limit = self.train_config.max_nonfinite
    if self.train_config.nonfinite == "halt":
      raise UserError(message + "; halting (train.nonfinite=halt)")
    if in_a_row >= limit or count - seen >= limit:
      raise UserError(f"{message}, {in_a_row} in a row; halting: the run diverged "
                      f"(train.max_nonfinite={limit})")
    logging.warning("%s; skipped them (train.nonfinite=skip)", message)


class SourceTokensHook:
  """Adds, at logging steps, each mixture source's tokens read so far
  (``data/tokens/NAME``, this host's share of the batches) and its share of
  them (``data/share/NAME``): the weights as the run actually saw them."""

  def __init__(self, log_every: int, source_tokens: Callable[[], dict[str, int]]):
    self.log_every, self.source_tokens = log_every, source_tokens

  def __call__(self, outcome: StepOutcome) -> None:
    if not (outcome.step % self.log_every == 0 or outcome.is_last):
      return
    counts = self.source_tokens()
    total = sum(counts.values()) or 1
    for name, tokens in counts.items():
      outcome.record[f"data/tokens/{name}"] = tokens
      outcome.record[f"data/share/{name}"] = tokens / total


class EvalHook:
  """Evaluates every ``train.eval_every`` steps and at the last one."""

  timeline_category = "eval"  # Where its time goes in bigmodel.goodput.

  def __init__(self, eval_every: int, run_eval: Callable[[Any], dict[str, float]],
               after: Callable[[], None]):
    """``run_eval(state)`` returns the eval metrics of the train state."""
    self.eval_every, self.run_eval, self.after = eval_every, run_eval, after

  def __call__(self, outcome: StepOutcome) -> None:
    if outcome.is_last or (self.eval_every and outcome.step % self.eval_every == 0):
      outcome.record.update(self.run_eval(outcome.state))
      self.after()


class LogHook:
  """Hands a non-empty record to the sinks (metrics.jsonl, TensorBoard, a callback)."""

  def __init__(self, sinks: list[Callable[[int, dict], None]]):
    self.sinks = sinks
    self.last_metrics: dict[str, float] = {}

  def __call__(self, outcome: StepOutcome) -> None:
    if outcome.record:
      self.last_metrics.update(outcome.record)
      for sink in self.sinks:
        sink(outcome.step, dict(outcome.record))


class LockHook:
  """Stops the run before it writes again once another run has taken over its
  workdir lock (``RunLock.lost``, found by the lock's heartbeat), so that two
  runs never save into one workdir.

  One process checks before every logged and saved step. Several check at
  saved steps only, where all of them take part: process 0 (the only one
  holding a lock) tells the others, so they stop together.
  """

  def __init__(self, locks: list[Any]):
    self.locks = [lock for lock in locks if lock is not None]

  def __call__(self, outcome: StepOutcome) -> None:
    several = jax.process_count() > 1
    if not (outcome.save or (outcome.record and not several)):
      return
    lost = next((lock.lost for lock in self.locks if lock.lost), None)
    if several and multihost_utils.broadcast_one_to_all(np.int32(lost is not None)):
      lost = lost or "process 0's lock is held by another run"
    if lost:
      raise UserError(f"this run lost its workdir lock ({lost}); another run is writing "
                      "this workdir, so this one stops without saving")


class CheckpointHook:
  """Saves where ``outcome.save`` says (every ``checkpoint.save_every`` steps,
  the last step, and on a stop request)."""

  timeline_category = "checkpoint"

  def __init__(self, save: Callable[[Any, int, dict], None]):
    self.save = save

  def __call__(self, outcome: StepOutcome) -> None:
    if outcome.save:
      self.save(outcome.state, outcome.step, outcome.record)


class SyncHook:
  """Copies the run up to its object-store workdir (``push``) at every logged
  and every saved step (``bigmodel.remote_workdir``)."""

  timeline_category = "checkpoint"

  def __init__(self, push: Callable[[], None]):
    self.push = push

  def __call__(self, outcome: StepOutcome) -> None:
    if outcome.record or outcome.save:
      self.push()


# Where a profiled step's time goes: compute (dispatch until the step's results
# are ready: the profiled steps wait for them), data wait, host (the hooks:
# metrics, logging), and evaluation and saving when the step has them.
PROFILE_PARTS = ("compute", "data_wait", "host", "eval_and_save")


class StepProfiler:
  """A ``jax.profiler`` trace of steps ``first..last`` (``train.profile_steps``)
  and where their time went (:data:`PROFILE_PARTS`).

  The trace goes to ``trace_dir`` in TensorBoard's profile plugin layout
  (``plugins/profile/RUN/``), viewable in TensorBoard or XProf.
  """

  def __init__(self, steps: Optional[tuple[int, int]], trace_dir: str):
    self.steps, self.trace_dir = steps, trace_dir
    self._tracing, self._first = False, 0
    self._seconds = dict.fromkeys(PROFILE_PARTS, 0.0)

  def active(self, step: int) -> bool:
    return self.steps is not None and self.steps[0] <= step <= self.steps[1]

  def start(self, step: int) -> None:
    """Starts the trace before the first profiled step (or a resumed run's first step inside)."""
    if self.active(step) and not self._tracing:
      jax.profiler.start_trace(self.trace_dir)
      self._tracing, self._first = True, step

  def add(self, step: int, **seconds: float) -> None:
    """Adds a step's seconds by part (:data:`PROFILE_PARTS`)."""
    if self._tracing and self.active(step):
      for key, value in seconds.items():
        self._seconds[key] += value

  def finish(self, step: int) -> Optional[dict[str, Any]]:
    """After the last profiled step: stops the trace; returns the time split."""
    if not (self._tracing and step == self.steps[1]):
      return None
    self.close()
    total = sum(self._seconds.values())
    return {"profile_steps": f"{self._first}-{step}", "profile_trace": self.trace_dir,
            "profile_step_seconds": total / (step - self._first + 1),
            **{f"profile_{k}_share": v / total if total else 0.0
               for k, v in self._seconds.items()}}

  def close(self) -> None:
    if self._tracing:
      jax.profiler.stop_trace()
      self._tracing = False

