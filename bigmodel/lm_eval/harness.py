"""Running lm-eval tasks on an ``LM``: the harness call the CLI and training hooks share.

``run_harness`` loads the tasks (``bigmodel.lm_eval.tasks``), applies
``num_fewshot`` as lm-eval's ``simple_evaluate`` does (a task whose config
says 0 shots keeps 0), and calls ``lm_eval.evaluator.evaluate``. It calls
that rather than ``simple_evaluate`` because the latter also runs
``git describe``, collects torch's environment report and reseeds the
process-wide ``random``, numpy and torch generators: wrong for a trainer.
``evaluate_tasks`` wraps a run or a trainer's pieces as ``BigmodelLM`` and
returns flat metrics, ``{"lm_eval/TASK/METRIC": value}``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from bigmodel.errors import UserError
from bigmodel.lm_eval import tasks as tasks_lib
from bigmodel.lm_eval.adapter import DEFAULT_BATCH_SIZE, BigmodelLM

# lm-eval's default few-shot seed (simple_evaluate's fewshot_random_seed).
FEWSHOT_SEED = 1234
# Bootstrap resamples for the stderr of metrics that are not means (a mean's
# stderr is computed exactly); lm-eval's 100k take minutes for some metrics.
BOOTSTRAP_ITERS = 1000


def task_list(tasks: str | Sequence[str]) -> list[str]:
  """``"a,b"`` or ``["a", "b"]`` -> ``["a", "b"]`` (blanks dropped)."""
  names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
  return [name.strip() for name in names if name and name.strip()]


def load_tasks(tasks: Sequence[str], include_path: Optional[str | Sequence[str]] = None,
               num_fewshot: Optional[int] = None) -> dict[str, Any]:
  """lm-eval's task dict ({"tasks", "groups", "group_map"}) with shots set.

  Raises:
    UserError: an unknown task, a bad ``include_path`` or data file (see
      ``tasks.check_tasks``), data that cannot be loaded (offline and not
      cached), or a negative ``num_fewshot``.
  """
  if num_fewshot is not None and num_fewshot < 0:
    raise UserError(f"--num_fewshot must be >= 0, got {num_fewshot}")
  manager = tasks_lib.task_manager(tasks, include_path)
  tasks_lib.check_tasks(manager, tasks, include_path)
  try:
    loaded = manager.load(list(tasks))
  except Exception as e:  # pylint: disable=broad-except
    # The datasets library's many failures (offline, not cached, a bad file)
    # all mean the same to the user: this data cannot be read here.
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"cannot load the data of {', '.join(tasks)}: {type(e).__name__}: "
                    f"{reason}") from e
  for task in loaded["tasks"].values():
    default = task.get_config("num_fewshot")
    if num_fewshot is not None and default != 0:
      task.set_config(key="num_fewshot", value=num_fewshot)
    elif default is None:
      task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=FEWSHOT_SEED)
  return loaded


def run_harness(lm, tasks: str | Sequence[str], num_fewshot: Optional[int] = None,
                limit: Optional[int] = None, include_path: Optional[str | Sequence[str]] = None,
                log_samples: bool = False,
                bootstrap_iters: int = BOOTSTRAP_ITERS) -> dict[str, Any]:
  """lm-eval's results dict for ``lm`` (any ``lm_eval.api.model.LM``) on ``tasks``.

  ``limit``: the first n documents of each task. ``log_samples``: keep each
  document's requests and responses under ``results["samples"]``.
  """
  from lm_eval.evaluator import evaluate  # pylint: disable=g-import-not-at-top
  names = task_list(tasks)
  if limit is not None and limit < 1:
    raise UserError(f"--limit must be at least 1, got {limit}")
  loaded = load_tasks(names, include_path, num_fewshot)
  return evaluate(lm=lm, task_dict=loaded, limit=limit, log_samples=log_samples,
                  bootstrap_iters=bootstrap_iters)


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
  """``{"lm_eval/TASK/METRIC": value}`` of lm-eval's results: its
  ``"acc,none"`` keys become ``acc`` (``METRIC/FILTER`` for other filters);
  stderrs are ``METRIC_stderr``; text and "N/A" entries are left out."""
  flat = {}
  for task, values in results.get("results", {}).items():
    for key, value in values.items():
      metric, _, filter_name = key.partition(",")
      if not is_metric(results, task, metric) or not isinstance(value, (int, float)):
        continue
      name = metric if filter_name in ("", "none") else f"{metric}/{filter_name}"
      flat[f"lm_eval/{task}/{name}"] = float(value)
  return flat


def is_metric(results: dict[str, Any], task: str, name: str) -> bool:
  """Whether ``name`` in a task's results is a metric or its stderr (not
  lm-eval's ``alias``, ``name`` or ``sample_len``): the metrics are those
  ``higher_is_better`` lists."""
  known = results.get("higher_is_better", {}).get(task)
  if known is None:  # No list: everything but lm-eval's bookkeeping.
    return name not in ("alias", "name", "sample_len")
  return name.removesuffix("_stderr") in known


def evaluate_tasks(run_or_pieces: Any, tasks: str | Sequence[str],
                   num_fewshot: Optional[int] = None, limit: Optional[int] = None,
                   include_path: Optional[str | Sequence[str]] = None,
                   batch_size: int = DEFAULT_BATCH_SIZE) -> dict[str, float]:
  """Flat lm-eval metrics of a model on ``tasks``: ``{"lm_eval/TASK/acc": ...}``.

  Args:
    run_or_pieces: A workdir, a ``LoadedRun``, or the pieces a trainer holds
      (``ModelPieces`` or a mapping: model, params, config, tokenizer, mesh,
      optionally step). Compiled programs are kept per model module, so a
      hook that evaluates every N steps compiles once.
    tasks: Task names ("a,b" or a list).
    num_fewshot: Shots (default: each task's own, else 0).
    limit: The first n documents of each task.
    include_path: Folders of task YAML files (a list or "a,b").
    batch_size: Rows per compiled call.

  Raises:
    UserError: a BERT run, an unknown task, unreadable task data.
  """
  lm = BigmodelLM(run=run_or_pieces, batch_size=batch_size)
  return flat_metrics(run_harness(lm, tasks, num_fewshot, limit, include_path))
