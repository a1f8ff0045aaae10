"""The train state pytree and its sharded initialisation."""
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from bigmodel import distill, objectives, optim, sharding
from bigmodel.models import family_of, lora


@flax.struct.dataclass
class TrainState:
  step: jax.Array      # int32 scalar: optimizer updates applied so far.
  params: Any
  opt_state: Any       # Of the trainable parameters only (None in the frozen places).
  rng: jax.Array       # Key for dropout; split afresh every step.
  # Paths of the parameters that do not train (``optim.frozen_paths``); static.
  frozen: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())
  # Frozen parameters of a second model the objective reads: DPO's reference
  # (without LoRA: a copy of the starting parameters), a distillation teacher;
  # None otherwise.
  reference: Any = None


def init_train_state(rng: jax.Array, model: nn.Module, optimizer: optim.SkippingOptimizer,
                     seq_len: int, freeze: str = "", lora_cfg=None,
                     with_reference: bool = False, teacher: nn.Module = None) -> TrainState:
  """A fresh state; parameters stay boxed with their logical axis names.

  ``freeze`` (``optim.freeze``) and ``lora_cfg`` (``config.lora``) say which
  parameters are frozen; the optimizer state covers the others only.
  ``with_reference``: keep a copy of the parameters as DPO's reference.
  ``teacher``: a distillation teacher's module, whose (random) parameters
  fill the reference (for shapes: ``bigmodel.distill.load_teacher`` loads them).
  """
  params_rng, state_rng = jax.random.split(rng)
  inputs = family_of(model).example_inputs(model.config, seq_len)
  with lora.init_context(lora_cfg):
    params = model.init({"params": params_rng}, *inputs)["params"]
  if lora.enabled(lora_cfg):
    lora.check_adapters(params, lora_cfg)
  frozen = optim.frozen_paths(params, freeze, lora_cfg)
  trainable, _ = optim.partition(params, frozen)
  reference = jax.tree_util.tree_map(jnp.copy, params) if with_reference else None
  if teacher is not None:
    teacher_inputs = family_of(teacher).example_inputs(teacher.config, seq_len)
    reference = teacher.init({"params": params_rng}, *teacher_inputs)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(trainable), rng=state_rng, frozen=frozen,
                    reference=reference)


def abstract_sharded_state(config, model: nn.Module, optimizer: optim.SkippingOptimizer,
                           mesh: Mesh) -> tuple[Any, Any]:
  """(abstract state, state shardings): shapes, dtypes and placement, no memory.

  The abstract leaves carry their shardings, so they also serve as restore
  targets that reshard a checkpoint onto ``mesh``.
  """
  init_fn = functools.partial(init_train_state, model=model, optimizer=optimizer,
                              seq_len=config.data.seq_len, freeze=config.optim.freeze,
                              lora_cfg=config.lora,
                              with_reference=objectives.needs_reference(config),
                              teacher=distill.teacher_model(config))
  boxed = jax.eval_shape(init_fn, jax.random.key(config.train.seed))
  state_shardings = sharding.logical_to_shardings(boxed, mesh, sharding.logical_rules(config))
  abstract_state = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      sharding.strip_boxes(boxed), state_shardings)
  return abstract_state, state_shardings


def create_sharded_state(config, model: nn.Module, optimizer: optim.SkippingOptimizer,
                         mesh: Mesh) -> tuple[Any, Any]:
  """Initialises the train state directly in its sharded layout.

  Returns (state, state_shardings). Parameters are created on the devices
  that own them: nothing is materialised whole on one device first. A
  distillation teacher is not created (its ``reference`` is None until
  ``bigmodel.distill.load_teacher`` places the teacher's own parameters).
  """
  _, state_shardings = abstract_sharded_state(config, model, optimizer, mesh)
  init_fn = functools.partial(init_train_state, model=model, optimizer=optimizer,
                              seq_len=config.data.seq_len, freeze=config.optim.freeze,
                              lora_cfg=config.lora,
                              with_reference=objectives.needs_reference(config))
  out_shardings = state_shardings
  if distill.enabled(config):
    out_shardings = state_shardings.replace(reference=None)
  state = jax.jit(lambda r: sharding.strip_boxes(init_fn(r)),
                  out_shardings=out_shardings)(jax.random.key(config.train.seed))
  return state, state_shardings
