r"""Eval loss of a student trained alone and distilled from a teacher, same data and seed.

    python -m benchmarks.distillation [--config=configs/gpt.py:tiny] \
        [--student=configs/distill.py:gpt:tiny] [--teacher=W] [--steps=300] \
        [--teacher_steps=STEPS] [--evals=3] [--eval_steps=16] [--runs_dir=/tmp/distillation_bench]

Trains the teacher ``--config`` (default ``configs/gpt.py:tiny``; any family's,
e.g. ``configs/bert.py:tiny`` or ``configs/t5.py:tiny``, with
``--config.KEY=VALUE`` overrides) for ``--teacher_steps`` (default ``--steps``:
a teacher trained several times longer than its students is the usual
setting) in ``RUNS_DIR/teacher``, or
takes the trained run ``--teacher=W`` (e.g. the float run of
``benchmarks.quantization``); then trains the student ``--student`` (default
``configs/distill.py:FAMILY:tiny``, the teacher family's tiny preset at half
its depth and width) twice for ``--steps``, with the teacher's tokenizer and
prepared records, the same data order and seed: alone (``RUNS_DIR/alone``)
and with ``distill.teacher`` (``RUNS_DIR/distilled``, the student preset's
``distill.alpha`` and ``temperature``). Each run is the trainer's own
(``bigmodel.train.Trainer``); a run already there is resumed, not retrained.
Prints a Markdown table of the students' eval loss (``--eval_steps``
validation batches) at ``--evals`` evenly spaced steps, their parameter
counts and training times, and the teacher's eval loss.
"""
import json
import os
import tempfile
import time

from absl import app
from absl import flags
from ml_collections import config_flags

# The trainer's own --config (the teacher to train; default configs/gpt.py:tiny):
# it defines it (and --workdir, unused here) when imported.
from bigmodel import train as train_lib

_STUDENT = config_flags.DEFINE_config_file(
    "student", None, "Config file and preset of the student (default: "
    "configs/distill.py:FAMILY:tiny of the teacher's family).", lock_config=True)
_TEACHER = flags.DEFINE_string("teacher", None, "A trained teacher run to distil from "
                               "instead of training --config.")
_STEPS = flags.DEFINE_integer("steps", 300, "Training steps of every run.")
_TEACHER_STEPS = flags.DEFINE_integer("teacher_steps", None, "Training steps of the teacher "
                                      "that --config trains (default: --steps).")
_EVALS = flags.DEFINE_integer("evals", 3, "Evaluations per student run (the last at --steps).")
_EVAL_STEPS = flags.DEFINE_integer("eval_steps", 16, "Validation batches per evaluation.")
_RUNS_DIR = flags.DEFINE_string("runs_dir", None, "Where the runs go (default: a temporary "
                                "folder); a run already there is resumed, not retrained.")


def _train(config, workdir: str) -> float:
  """Trains (or resumes) ``config`` in ``workdir``; returns the seconds it took."""
  start = time.perf_counter()
  train_lib.Trainer(config, workdir).run()
  return time.perf_counter() - start


def _eval_losses(workdir: str) -> dict[int, float]:
  """Step -> eval loss, from the run's ``metrics.jsonl`` (the last record of a step)."""
  from bigmodel import run as run_lib  # pylint: disable=g-import-not-at-top
  losses = {}
  with open(run_lib.RunDir(workdir).metrics) as f:
    for line in f:
      record = json.loads(line)
      if "eval_loss" in record:
        losses[int(record["step"])] = float(record["eval_loss"])
  return losses


def _param_count(workdir: str) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  from bigmodel import run as run_lib  # pylint: disable=g-import-not-at-top
  return sum(x.size for x in jax.tree_util.tree_leaves(run_lib.load_run(workdir).params))


def run(teacher_config, student_config, steps: int, evals: int, eval_steps: int,
        workdir: str, teacher: str = "", teacher_steps: int | None = None) -> dict:
  """Trains the teacher (unless ``teacher``; ``teacher_steps``, default ``steps``) and
  both students (``steps``); returns the results."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from bigmodel import run as run_lib  # pylint: disable=g-import-not-at-top
  from bigmodel.evaluate import evaluate_run  # pylint: disable=g-import-not-at-top
  every = max(steps // max(evals, 1), 1)
  seconds = {}
  if not teacher:
    teacher = os.path.join(workdir, "teacher")
    config = ml_collections.ConfigDict(teacher_config.to_dict())
    config.train.update(steps=teacher_steps or steps, eval_every=every, eval_steps=eval_steps,
                        sample_tokens=0, progress=False)
    seconds["teacher"] = _train(config, teacher)
  source = run_lib.RunDir(teacher)
  shared = dict(tokenizer=os.path.abspath(source.tokenizer_model))
  if os.path.isdir(source.data):  # Its prepared records: the same tokens, nothing prepared again.
    shared["data_dir"] = os.path.abspath(source.data)
  students = {}
  for name, distil_from in (("alone", ""), ("distilled", os.path.abspath(teacher))):
    config = ml_collections.ConfigDict(student_config.to_dict())
    config.train.update(steps=steps, eval_every=every, eval_steps=eval_steps, sample_tokens=0,
                        progress=False)
    config.data.update(**shared)
    config.distill.teacher = distil_from
    run_dir = os.path.join(workdir, name)
    seconds[name] = _train(config, run_dir)
    students[name] = dict(losses=_eval_losses(run_dir), params=_param_count(run_dir),
                          seconds=seconds[name])
  teacher_config, trained_steps = run_lib.saved_config(teacher)
  return dict(teacher=dict(path=teacher, steps=trained_steps, params=_param_count(teacher),
                           model=teacher_config.model, seconds=seconds.get("teacher"),
                           loss=evaluate_run(teacher, eval_steps=eval_steps)[0]["eval_loss"]),
              students=students, student_model=student_config.model,
              alpha=student_config.distill.alpha, temperature=student_config.distill.temperature,
              steps=steps, eval_steps=eval_steps)


def table(results: dict) -> str:
  t, s = results["teacher"], results["student_model"]
  steps = sorted(set().union(*(r["losses"] for r in results["students"].values())))
  trained = f", trained {t['seconds']:.0f} s" if t["seconds"] is not None else ""
  lines = [f"teacher: {t['model'].family}, {t['model'].num_layers} layers x "
           f"{t['model'].embed_dim} wide, {t['params'] / 1e6:.2f}M parameters, "
           f"{t['steps']} steps, eval loss {t['loss']:.4f} ({t['path']}{trained})",
           f"student: {s.family}, {s.num_layers} layers x {s.embed_dim} wide; "
           f"{results['steps']} steps each; eval loss over {results['eval_steps']} "
           "validation batches", "",
           "| student | params | " + " | ".join(f"eval loss at {n}" for n in steps)
           + " | train s |",
           "|---|---:|" + "---:|" * len(steps) + "---:|"]
  for name, r in results["students"].items():
    label = (f"distilled (alpha {results['alpha']:g}, T {results['temperature']:g})"
             if name == "distilled" else "alone (no `distill.teacher`)")
    lines.append(f"| {label} | {r['params'] / 1e6:.2f}M | "
                 + " | ".join(f"{r['losses'][n]:.4f}" if n in r["losses"] else "-" for n in steps)
                 + f" | {r['seconds']:.0f} |")
  alone, distilled = (results["students"][k]["losses"] for k in ("alone", "distilled"))
  last = steps[-1]
  if last in alone and last in distilled:
    better = distilled[last] < alone[last]
    lines += ["", f"distilled student better than alone at step {last}: "
              f"{'yes' if better else 'NO'} ({distilled[last] - alone[last]:+.4f})"]
  return "\n".join(lines)


def default_student(family: str):
  """``configs/distill.py:FAMILY:tiny``."""
  import configs.distill as distill_presets  # pylint: disable=g-import-not-at-top
  return distill_presets.get_config(f"{family}:tiny")


def main(argv):
  from bigmodel import run as run_lib  # pylint: disable=g-import-not-at-top
  from bigmodel.errors import fail, user_errors_exit  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if _TEACHER_STEPS.value is not None and (_TEACHER.value or _TEACHER_STEPS.value < 1):
    fail("--teacher_steps needs a teacher to train (no --teacher) and a positive count")
  workdir = _RUNS_DIR.value or tempfile.mkdtemp(prefix="distillation_bench_")
  with user_errors_exit():
    if _TEACHER.value:
      teacher_config = run_lib.saved_config(_TEACHER.value)[0]
    elif flags.FLAGS.config is not None:
      teacher_config = flags.FLAGS.config
    else:
      import configs.gpt as gpt  # pylint: disable=g-import-not-at-top
      teacher_config = gpt.get_config("tiny")
    student = (default_student(teacher_config.model.family) if _STUDENT.value is None
               else _STUDENT.value)
    results = run(teacher_config, student, _STEPS.value, _EVALS.value, _EVAL_STEPS.value,
                  workdir, _TEACHER.value or "", _TEACHER_STEPS.value)
  print(table(results), flush=True)


if __name__ == "__main__":
  from bigmodel import cli  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=cli.parse_flags)
