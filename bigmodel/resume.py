"""Resuming with a changed config: refuse what cannot load, warn about what changes the run.

A checkpoint stores the config it was saved with. Before restoring, the
trainer compares it with the new one:

* a change that alters the train state's shapes or structure (model size,
  vocabulary, optimizer, scan, ...) cannot resume: one ``error:`` line names
  the changed keys (instead of orbax's shape complaint and its traceback);
* a change of what the batches hold (``data.*``, the batch size, the seed,
  micro-batching) resumes, but the run is then no longer the same as one that
  was never interrupted: a warning names the keys.

Anything else (learning rate, steps, logging, checkpoint policy) may change
freely.
"""
import sys
from typing import Any

import jax
import ml_collections

from bigmodel.config import config_from_dict
from bigmodel.errors import UserError

# Settings that change the batches a resumed run sees.
_DATA_KEYS = ("data.", "train.batch_size", "train.seed", "optim.grad_accum")
# Settings that say where things are or how they are computed, not what is trained.
_IGNORED_PREFIXES = ("init_from", "print_sharding", "mesh.", "checkpoint.", "model.attention_impl",
                     "model.remat", "model.dtype", "model.dropout_rate")


def _flat(config: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in config.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def changed_keys(saved: dict, new: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
  """``{key: (saved value, new value)}`` for every setting that differs."""
  before = _flat(config_from_dict(saved).to_dict())
  after = _flat(new.to_dict())
  return {k: (before.get(k), after[k]) for k in after if before.get(k) != after[k]}


def _describe(changes: dict[str, tuple[Any, Any]]) -> str:
  return ", ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new) in sorted(changes.items()))


def _shapes(abstract_state: Any) -> Any:
  return jax.tree_util.tree_map(lambda x: (tuple(x.shape), str(x.dtype)), abstract_state)


def check_saved_config(saved: dict, config: ml_collections.ConfigDict, step: int,
                       abstract_state: Any, mesh) -> list[str]:
  """Compares checkpoint ``step``'s config with ``config``; returns the data keys changed.

  Args:
    saved: The config stored in the checkpoint.
    config: This run's config.
    step: The checkpoint's step (for messages).
    abstract_state: This run's abstract train state.
    mesh: This run's mesh.

  Raises:
    UserError: the saved train state has other shapes than this config's,
      naming the config keys that changed.
  """
  # Imported here: these build models, which comparing configs does not need.
  from bigmodel.models import build_model  # pylint: disable=g-import-not-at-top
  from bigmodel.optim import make_optimizer  # pylint: disable=g-import-not-at-top
  from bigmodel.state import abstract_sharded_state  # pylint: disable=g-import-not-at-top
  changes = changed_keys(saved, config)
  relevant = {k: v for k, v in changes.items() if not k.startswith(_IGNORED_PREFIXES)}
  saved_config = config_from_dict(saved)
  try:
    optimizer, _ = make_optimizer(saved_config.optim, saved_config.train.steps,
                                  saved_config.prune)
    saved_model = build_model(saved_config.model, saved_config.lora)
    saved_state, _ = abstract_sharded_state(saved_config, saved_model, optimizer, mesh)
    same_shapes = _shapes(saved_state) == _shapes(abstract_state)
  except Exception:  # pylint: disable=broad-except
    same_shapes = False  # The saved config no longer builds: it cannot be the same state.
  if not same_shapes:
    structural = {k: v for k, v in relevant.items()
                  if k.startswith(("model.", "optim.", "lora.", "prune."))
                  and not k.startswith(_DATA_KEYS)}
    what = _describe(structural) or "no setting (the code that builds the state changed)"
    raise UserError(
        f"the checkpoint at step {step} holds another model or optimizer state than this "
        f"config builds; changed: {what}. Resume with the saved settings, or train in a new "
        "workdir (--config.init_from=WORKDIR starts from its parameters)")
  data_changes = {k: v for k, v in relevant.items() if k.startswith(_DATA_KEYS)}
  if data_changes:
    message = (f"resuming with changed data settings: {_describe(data_changes)}; the run now "
               "differs from one that was never interrupted (exact resume no longer holds)")
    print(f"warning: {message}", file=sys.stderr, flush=True)
  return sorted(data_changes)
