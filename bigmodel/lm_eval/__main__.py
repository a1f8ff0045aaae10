r"""lm-eval tasks on a run's checkpoint: ``python -m bigmodel.lm_eval --workdir=W --tasks=t1,t2``.

Flags: ``--num_fewshot=k``, ``--limit=n`` (first n documents per task),
``--include_path=DIR[,DIR]`` (folders of task YAML files), ``--step=S``
(default: the latest checkpoint), ``--batch_size=B``, ``--output=FILE.json``
(default ``WORKDIR/lm_eval_stepS.json``). Prints a table (task, metric,
value, stderr) and writes the JSON: ``workdir``, ``step``, ``family``,
``tasks``, ``num_fewshot``, ``limit``, ``metrics`` (flat,
``lm_eval/TASK/METRIC``) and lm-eval's ``results``, ``higher_is_better``,
``n-shot``, ``n-samples`` and ``versions``.

``--make_stdlib_task=DIR`` instead writes the offline multiple-choice task
``stdlib_package_mc`` (``bigmodel.lm_eval.tasks``) into DIR and exits.

Bad input (no such workdir or step, an unknown task, a BERT run, a missing
``--include_path`` folder, a task data file outside it, an output that
cannot be written) is one ``error:`` line on stderr and exit status 2,
reported before the evaluation starts and before anything is written.
"""
import importlib.util
import json
import os
from typing import Any, Optional

from absl import app
from absl import flags

from bigmodel import cli
from bigmodel.errors import UserError, fail, user_errors_exit

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "A training run's directory.")
  flags.DEFINE_list("tasks", None, "lm-eval task names, comma-separated.")
  flags.DEFINE_integer("num_fewshot", None, "Few-shot examples; default: each task's own, else 0.")
  flags.DEFINE_integer("limit", None, "Evaluate the first n documents of each task.")
  flags.DEFINE_string("include_path", None, "Folders of task YAML files, comma-separated.")
  flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
  flags.DEFINE_integer("batch_size", 8, "Rows per compiled forward pass / generation batch.")
  flags.DEFINE_string("output", None, "JSON output; default WORKDIR/lm_eval_stepS.json.")
  flags.DEFINE_string("make_stdlib_task", None,
                      "Write the offline stdlib_package_mc task into this folder and exit.")


def default_output(workdir: str, step: int) -> str:
  return os.path.join(workdir, f"lm_eval_step{step}.json")


def check_flags() -> None:
  """The flag values alone: UserError before anything is loaded."""
  if FLAGS.make_stdlib_task is not None:
    if FLAGS.workdir or FLAGS.tasks:
      raise UserError("--make_stdlib_task writes the task and exits; evaluate in a second "
                      "command with --include_path=DIR")
    return
  for name in ("workdir", "tasks"):
    if not FLAGS[name].value:
      raise UserError(f"--{name} is required (or --make_stdlib_task=DIR)")
  if FLAGS.batch_size < 1:
    raise UserError(f"--batch_size must be at least 1, got {FLAGS.batch_size}")
  if FLAGS.limit is not None and FLAGS.limit < 1:
    raise UserError(f"--limit must be at least 1, got {FLAGS.limit}")
  if FLAGS.num_fewshot is not None and FLAGS.num_fewshot < 0:
    raise UserError(f"--num_fewshot must be >= 0, got {FLAGS.num_fewshot}")
  if FLAGS.output:
    cli.check_output_file(FLAGS.output, "--output")
  elif os.path.isdir(FLAGS.workdir) and not os.access(FLAGS.workdir, os.W_OK | os.X_OK):
    raise UserError(f"cannot write to {FLAGS.workdir} (permission denied), where the results "
                    "go by default; give --output=PATH elsewhere")


def format_table(results: dict[str, Any]) -> str:
  """One line per task and metric: value and stderr (lm-eval's "N/A" without one)."""
  from bigmodel.lm_eval.harness import is_metric  # pylint: disable=g-import-not-at-top
  rows = [("task", "metric", "value", "stderr")]
  for task, values in sorted(results.get("results", {}).items()):
    for key, value in sorted(values.items()):
      metric, _, filter_name = key.partition(",")
      if (not is_metric(results, task, metric) or metric.endswith("_stderr")
          or not isinstance(value, (int, float))):
        continue
      stderr = values.get(f"{metric}_stderr,{filter_name}")
      name = metric if filter_name in ("", "none") else f"{metric} ({filter_name})"
      rows.append((task, name, f"{value:.4f}",
                   f"{stderr:.4f}" if isinstance(stderr, float) else "N/A"))
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def evaluate(workdir: str, tasks: list[str], num_fewshot: Optional[int], limit: Optional[int],
             include_path: Optional[str], step: Optional[int], batch_size: int,
             output: Optional[str]) -> tuple[dict[str, Any], str]:
  """(the JSON record, where it goes): every check first, then the run."""
  # Imported here: they need lm-eval, whose absence main reports in one line.
  from bigmodel import run as run_lib  # pylint: disable=g-import-not-at-top
  from bigmodel.lm_eval import adapter, harness  # pylint: disable=g-import-not-at-top
  from bigmodel.lm_eval import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  # Task names and files before the model: checking them takes seconds,
  # loading a large model minutes.
  tasks_lib.check_tasks(tasks_lib.task_manager(tasks, include_path), tasks, include_path)
  run = run_lib.load_run(workdir, step)
  adapter.check_scorable(run.config, run.tokenizer)
  out = output or default_output(workdir, run.step)
  cli.check_output_file(out, "--output" if output else None)
  lm = adapter.BigmodelLM(run=run, batch_size=batch_size)
  results = harness.run_harness(lm, tasks, num_fewshot, limit, include_path)
  record = dict(workdir=os.path.abspath(workdir), step=run.step,
                family=run.config.model.family, tasks=tasks, num_fewshot=num_fewshot,
                limit=limit, metrics=harness.flat_metrics(results),
                **{k: results.get(k) for k in ("results", "higher_is_better", "n-shot", "n-samples",
                                               "versions")})
  # Through JSON once: lm-eval's values may be numpy scalars.
  return json.loads(json.dumps(record, default=str)), out


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  with user_errors_exit():
    check_flags()
    if importlib.util.find_spec("lm_eval") is None:
      raise UserError("lm-eval is not installed: pip install -e '.[eval]'")
    if FLAGS.make_stdlib_task is not None:
      from bigmodel.lm_eval import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
      first = tasks_lib.write_stdlib_task(FLAGS.make_stdlib_task)
      for info in [first, *first["also"]]:
        print(f"wrote task {info['task']} ({info['test']} questions, {info['train']} few-shot "
              f"examples): {info['yaml']}")
      print(f"evaluate with --tasks={','.join(i['task'] for i in [first, *first['also']])} "
            f"--include_path={os.path.dirname(first['yaml'])}", flush=True)
      return
    record, out = evaluate(FLAGS.workdir, FLAGS.tasks, FLAGS.num_fewshot, FLAGS.limit,
                           FLAGS.include_path, FLAGS.step, FLAGS.batch_size, FLAGS.output)
  from bigmodel.evaluate import write_record  # pylint: disable=g-import-not-at-top
  try:
    write_record(record, out)
  except OSError as e:  # Checked up front, but the disk may fill or the folder go.
    fail(f"cannot write {out}: {e.strerror or e}")
  print(f"{record['family']}, step {record['step']}, lm-eval:")
  print(format_table(record))
  print(f"wrote {out}", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
