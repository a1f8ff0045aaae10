r"""Where a run's wall time went: the trainer's timeline and ``python -m bigmodel.goodput``.

Each start of the trainer on a workdir (a *session*) keeps a
:class:`Timeline`: seconds by cause since the session started. At every
logging or saving step and when the session ends it appends the running
totals to ``metrics.jsonl`` as ``{"step": S, "event": "timeline", ...}``
records, so a session killed without warning still leaves what it did up to
its last record.

``python -m bigmodel.goodput --workdir=DIR`` reads them across every session
of the run and prints the *goodput*: the time spent on training steps whose
progress was kept, as a share of the wall time from the first session's start
to the last record, and the *badput* by cause:

* ``compile``: the first step of each session (tracing and compiling, then
  the step itself);
* ``startup``: from the trainer's start to the first step: the mesh, the
  data pipelines, the abstract state (not the interpreter start and imports
  before it, a few seconds);
* ``restore``: the checkpoint restored, or the initial state built
  (``init_from`` included);
* ``data wait``: waiting for the next batch;
* ``evaluation``, ``checkpointing`` (the part of a save the step loop waits
  for), ``sampling`` (the end-of-run sample);
* ``lost progress``: steps done after the checkpoint that the next session
  resumed from, done again there (their step time only);
* ``down or unrecorded``: from a session's last record to the next session's
  start: work since the last record of a killed session, and the time no
  trainer ran;
* ``other``: the rest of each session (host work between the measured parts).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Optional

from absl import app
from absl import flags

from bigmodel import cli
from bigmodel.errors import UserError, fail, user_errors_exit

# The causes a session's seconds are counted under, in report order.
CATEGORIES = ("step", "compile", "startup", "restore", "data_wait", "eval", "checkpoint",
              "sample")
_LABELS = {"step": "productive training", "compile": "compile (first step of a run)",
           "startup": "startup", "restore": "restore or initialise", "data_wait": "data wait",
           "eval": "evaluation", "checkpoint": "checkpointing", "sample": "sampling",
           "lost": "lost progress (steps done again after a restart)",
           "down": "down or unrecorded (between runs, after a kill)", "other": "other"}


class Timeline:
  """A session's seconds by cause (:data:`CATEGORIES`), for ``metrics.jsonl``."""

  def __init__(self, start_step: int, start_time: Optional[float] = None):
    self.start_time = time.time() if start_time is None else start_time
    self.start_step = start_step
    self.seconds = dict.fromkeys(CATEGORIES, 0.0)

  def add(self, category: str, seconds: float) -> None:
    self.seconds[category] += seconds

  def record(self, end: str = "") -> dict[str, Any]:
    """The fields of a timeline record; ``end``: "finished" / "preempted" for a
    session's last one."""
    fields = dict(event="timeline", time=time.time(), session_start=self.start_time,
                  start_step=self.start_step, seconds=dict(self.seconds))
    if end:
      fields["end"] = end
    return fields


@dataclasses.dataclass
class Session:
  """One start of the trainer, as its timeline records tell it."""
  start_time: float
  start_step: int
  records: list[dict[str, Any]]  # Its timeline records, in order.

  @property
  def last(self) -> dict[str, Any]:
    return self.records[-1]

  def step_seconds_at(self, step: int) -> float:
    """Step time up to its last record at or before ``step`` (0 before any)."""
    before = [r for r in self.records if r["step"] <= step]
    return before[-1]["seconds"]["step"] if before else 0.0


def read_sessions(metrics_path: str) -> list[Session]:
  """The sessions of a ``metrics.jsonl``, in start order."""
  by_start: dict[float, Session] = {}
  with open(metrics_path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        # A session killed mid-write leaves a partial last line: skip it.
        print(f"warning: {metrics_path}:{number} is not JSON; skipped", file=sys.stderr)
        continue
      if record.get("event") != "timeline":
        continue
      session = by_start.setdefault(record["session_start"], Session(
          record["session_start"], record["start_step"], []))
      session.records.append(record)
  return sorted(by_start.values(), key=lambda s: s.start_time)


def report(workdir: str) -> dict[str, Any]:
  """The goodput of the run in ``workdir`` (see the module doc).

  Returns:
    ``{"wall_seconds", "goodput", "seconds": {cause: seconds}, "sessions",
    "ends": [each session's end: finished / preempted / killed], "lost_steps"}``;
    the causes' seconds add up to the wall time.
  """
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise UserError(f"no metrics.jsonl in {workdir}: not a training run's workdir")
  sessions = read_sessions(path)
  if not sessions:
    raise UserError(f"{path} has no timeline records (a run from before bigmodel recorded "
                    "them, or one that never reached its first step)")
  seconds = dict.fromkeys(CATEGORIES + ("lost", "down", "other"), 0.0)
  lost_steps = 0
  for i, session in enumerate(sessions):
    last = session.last
    for category in CATEGORIES:
      seconds[category] += last["seconds"].get(category, 0.0)
    seconds["other"] += max(0.0, (last["time"] - session.start_time)
                            - sum(last["seconds"].values()))
    if i + 1 < len(sessions):
      following = sessions[i + 1]
      seconds["down"] += max(0.0, following.start_time - last["time"])
      resumed_from = following.start_step
      if last["step"] > resumed_from:  # Steps done here that the next start did again.
        lost = last["seconds"]["step"] - session.step_seconds_at(resumed_from)
        seconds["lost"] += lost
        seconds["step"] -= lost
        lost_steps += last["step"] - max(resumed_from, session.start_step)
  wall = sessions[-1].last["time"] - sessions[0].start_time
  return {"wall_seconds": wall, "goodput": seconds["step"] / wall if wall > 0 else 0.0,
          "seconds": seconds, "sessions": len(sessions), "lost_steps": lost_steps,
          "ends": [s.last.get("end", "killed") for s in sessions[:-1]]
                  + [sessions[-1].last.get("end", "running or killed")]}


def format_report(result: dict[str, Any]) -> str:
  """A table: cause, seconds, share of the wall time."""
  wall = result["wall_seconds"]
  ends = ", ".join(f"{n} {end}" for end, n in sorted(
      {e: result["ends"].count(e) for e in result["ends"]}.items()))
  lines = [f"goodput {result['goodput']:.1%} of {wall:,.1f} s wall time over "
           f"{result['sessions']} run(s) ({ends}); {result['lost_steps']} step(s) done again"]
  width = max(len(label) for label in _LABELS.values())
  for cause, value in sorted(result["seconds"].items(), key=lambda kv: -kv[1]):
    if value > 0 or cause == "step":
      share = value / wall if wall > 0 else 0.0
      lines.append(f"  {_LABELS[cause].ljust(width)}  {value:10,.1f} s  {share:6.1%}")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.require_flags("workdir")
  with user_errors_exit():
    result = report(_WORKDIR.value)
  print(json.dumps(result, indent=2) if _JSON.value else format_report(result))


if __name__ == "__main__":
  # Defined here, not on import: the trainer imports Timeline from this module.
  _WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory.")
  _JSON = flags.DEFINE_bool("json", False, "Print the report as JSON instead of a table.")
  app.run(main, flags_parser=cli.parse_flags)
