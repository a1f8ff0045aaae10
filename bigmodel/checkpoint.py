"""Checkpoints that never lose work: orbax ``CheckpointManager`` under ``WORKDIR/checkpoints``.

A checkpoint holds everything needed to continue exactly: the train state
(parameters, optimizer state, step, dropout key), the data iterator's position
and the resolved config. Saves are asynchronous and atomic (orbax writes to a
temporary directory and renames it when complete, so a half-written checkpoint
is never picked up). Restoring reshards onto whatever mesh the restoring run
uses.
"""
import os
import shutil
from typing import Any, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from bigmodel.errors import UserError

CHECKPOINT_DIR = "checkpoints"
# Unusable checkpoints are moved here (never deleted) when an older one is used.
CORRUPT_DIR = "checkpoints_unusable"


def _to_saveable(state: Any) -> Any:
  """Typed PRNG keys are stored as their raw uint32 data (abstract or concrete)."""
  rng = state.rng
  if isinstance(rng, jax.ShapeDtypeStruct):
    data = jax.eval_shape(jax.random.key_data, rng)
    return state.replace(rng=jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=rng.sharding))
  return state.replace(rng=jax.random.key_data(rng))


def _from_saveable(state: Any) -> Any:
  return state.replace(rng=jax.random.wrap_key_data(state.rng))


class Checkpointer:
  """Saves and restores a run's checkpoints.

  Args:
    workdir: The run's directory; checkpoints live in ``workdir/checkpoints``.
    keep: How many of the latest checkpoints to keep.
    keep_best: Also keep the checkpoint with the lowest ``eval_loss``.
    async_save: Write in a background thread while training continues.
  """

  def __init__(self, workdir: str, *, keep: int, keep_best: bool = False,
               async_save: bool = True):
    self.workdir = workdir
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    policies = [checkpoint_managers.LatestN(n=keep)]
    if keep_best:
      policies.append(checkpoint_managers.BestN(
          get_metric_fn=lambda metrics: metrics["eval_loss"], reverse=True, n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict[str, Any],
           config: ml_collections.ConfigDict, metrics: Optional[dict[str, float]] = None) -> None:
    """Starts saving ``state`` at ``step``; returns once arrays are copied off device."""
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(_to_saveable(state)),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config.to_dict())),
        metrics=metrics, force=True)

  def is_saving(self) -> bool:
    """True while an async save is still being written."""
    return self._manager.is_saving_in_progress()

  def wait(self) -> None:
    """Blocks until every started save is durable on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores checkpoint ``step`` onto ``abstract_state``'s shardings."""
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_to_saveable(abstract_state)),
            data=ocp.args.JsonRestore()))
    return _from_saveable(restored["state"]), restored["data"]

  def restore_config(self, step: int) -> dict[str, Any]:
    return self._manager.restore(
        step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def restore_latest_usable(self, abstract_state: Any) -> Optional[tuple[int, Any, dict]]:
    """Restores the newest checkpoint that loads; None when there is none.

    A checkpoint that fails to load is reported on one line and the previous
    one is tried. Once a usable one is found, the unusable newer ones are moved
    to ``WORKDIR/checkpoints_unusable`` so training can save those steps
    again. If none loads, raises ``UserError`` and touches nothing.
    """
    failures = []
    for step in reversed(self.all_steps()):
      try:
        state, data_state = self.restore(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        logging.warning("checkpoint at step %d is unusable (%s); trying the previous one",
                        step, reason)
        print(f"checkpoint at step {step} is unusable ({reason[:160]}); trying the previous one",
              flush=True)
        failures.append((step, reason))
        continue
      for bad_step, _ in failures:
        self._move_aside(bad_step)
      return step, state, data_state
    if failures:
      raise UserError(f"no usable checkpoint in {self.directory}: " + "; ".join(
          f"step {s}: {r[:120]}" for s, r in failures))
    return None

  def _move_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      target = os.path.join(self.workdir, CORRUPT_DIR)
      os.makedirs(target, exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), os.path.join(target, str(step)))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"bigmodel_move_aside_{step}")
    self._manager.reload()


def restore_params(workdir: str, mesh, step: Optional[int] = None) -> tuple[Any, dict, int]:
  """Parameters of a run's checkpoint (default: the latest), sharded over ``mesh``.

  Returns (params, the run's config as a dict, step). The run's own config
  rebuilds the abstract state, so this works from any other run.
  """
  # Imported here: these build models, which the checkpoint mechanics do not need.
  from bigmodel.models import build_model  # pylint: disable=g-import-not-at-top
  from bigmodel.optim import make_optimizer  # pylint: disable=g-import-not-at-top
  from bigmodel.state import abstract_sharded_state  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)):
    raise UserError(f"no checkpoints in {os.path.join(workdir, CHECKPOINT_DIR)}")
  checkpointer = Checkpointer(workdir, keep=1_000_000)
  try:
    steps = checkpointer.all_steps()
    if not steps:
      raise UserError(f"no checkpoints in {checkpointer.directory}")
    step = steps[-1] if step is None else step
    if step not in steps:
      raise UserError(f"no checkpoint at step {step} in {checkpointer.directory}; "
                      f"steps: {', '.join(map(str, steps))}")
    config = ml_collections.ConfigDict(checkpointer.restore_config(step))
    model = build_model(config.model)
    optimizer, _ = make_optimizer(config.optim, config.train.steps)
    abstract_state, _ = abstract_sharded_state(config, model, optimizer, mesh)
    state, _ = checkpointer.restore(step, abstract_state)
  finally:
    checkpointer.close()
  return state.params, config.to_dict(), step
