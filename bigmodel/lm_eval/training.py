"""lm-eval tasks as a training hook (``config.lm_eval``): checked before the
run writes anything, then evaluated with the trainer's current parameters.

Kept apart from the harness modules so that the trainer imports lm-eval only
when a run asks for it.
"""
from typing import Any

from bigmodel.errors import UserError


def _lm_eval_module():
  try:
    from bigmodel.lm_eval import harness  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError("lm_eval.every needs lm-eval (pip install -e .[eval])") from e
  return harness


def check_config(config) -> None:
  """UserError for a run that cannot score its ``lm_eval.tasks``: no lm-eval,
  a BERT model, synthetic data (no text), an unknown task or unreadable task data."""
  harness = _lm_eval_module()
  from bigmodel.lm_eval import adapter, tasks  # pylint: disable=g-import-not-at-top
  if config.data.source == "synthetic":
    raise UserError("lm_eval.every needs text: this run's data is synthetic (no tokenizer)")
  adapter.check_scorable(config, tokenizer=True)
  names = harness.task_list(config.lm_eval.tasks)
  include_path = config.lm_eval.include_path or None
  tasks.check_tasks(tasks.task_manager(names, include_path), names, include_path)


def evaluate_config_tasks(pieces: dict[str, Any], lm_eval_config) -> dict[str, float]:
  """``{"lm_eval/TASK/METRIC": value}`` of the model in ``pieces`` (model,
  params, config, tokenizer, mesh) on ``lm_eval_config``'s tasks."""
  harness = _lm_eval_module()
  c = lm_eval_config
  return harness.evaluate_tasks(
      pieces, c.tasks, num_fewshot=None if c.num_fewshot < 0 else c.num_fewshot,
      limit=c.limit or None, include_path=c.include_path or None, batch_size=c.batch_size)
