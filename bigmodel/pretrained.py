"""Starting a run from another run's parameters (``--config.init_from=WORKDIR``).

Every parameter of the new model that the pretrained one has (same path, same
shape) is copied; the rest (e.g. a classification head on a pretrained MLM
encoder) keeps its fresh initialisation, and the run says which.

The copied parameters that stay frozen (LoRA's base, ``optim.freeze``) and
DPO's reference copy are then not saved again in the run's checkpoints: they
point to the base checkpoint instead (``bigmodel.run.base_source``), unless
``checkpoint.self_contained``.
"""
from typing import Any, Optional

from absl import logging
import jax
import jax.numpy as jnp

from bigmodel.run import base_source, restore_params
from bigmodel.errors import UserError
from bigmodel.sharding import path_name


def _flatten(tree: Any) -> dict[str, Any]:
  return {path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def merge_params(fresh: Any, pretrained: Any) -> tuple[Any, list[str], list[str]]:
  """(merged params, copied paths, fresh paths); a shape mismatch is a UserError."""
  pretrained_flat = _flatten(pretrained)
  copied, kept_fresh = [], []

  def pick(path, leaf):
    name = path_name(path)
    if name not in pretrained_flat:
      kept_fresh.append(name)
      return leaf
    source = pretrained_flat[name]
    if source.shape != leaf.shape:
      raise UserError(f"pretrained parameter {name} has shape {tuple(source.shape)} but this "
                      f"model needs {tuple(leaf.shape)}; the checkpoint is of another size")
    copied.append(name)
    return jax.device_put(source.astype(leaf.dtype), leaf.sharding)

  merged = jax.tree_util.tree_map_with_path(pick, fresh)
  return merged, copied, kept_fresh


def init_from_pretrained(state: Any, config, mesh) -> tuple[Any, Optional[dict[str, Any]]]:
  """(``state`` with parameters loaded from ``config.init_from``'s latest
  checkpoint, the base source its checkpoints save instead of the frozen
  arrays taken from it, or None)."""
  params, pretrained_config, step = restore_params(config.init_from, mesh)
  family = pretrained_config["model"]["family"]
  if family != config.model.family:
    raise UserError(f"--config.init_from={config.init_from} holds a {family} model, but this "
                    f"run trains a {config.model.family} model")
  params, copied, fresh = merge_params(state.params, params)
  if not copied:
    raise UserError(f"no parameter of {config.init_from} matches this model")
  message = (f"initialised {len(copied)} of {len(copied) + len(fresh)} parameter arrays from "
             f"{config.init_from} (step {step})")
  if fresh:
    message += f"; fresh: {', '.join(fresh)}"
  print(message, flush=True)
  logging.info(message)
  # The optimizer state starts fresh: its moments belong to the old task. A
  # DPO reference is the starting model: these parameters, copied.
  reference = None if state.reference is None else jax.tree_util.tree_map(jnp.copy, params)
  base = None
  from_base = [name for name in copied if name in set(state.frozen)]
  if not config.checkpoint.self_contained and (from_base or reference is not None):
    base = base_source(config.init_from, step, "init_from", from_base,
                       copied if reference is not None else [])
  return state.replace(params=params, reference=reference), base
