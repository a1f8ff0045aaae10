"""The train state pytree and its sharded initialisation."""
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from bigmodel import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array      # int32 scalar: optimizer updates applied so far.
  params: Any
  opt_state: Any
  rng: jax.Array       # Key for dropout; split afresh every step.


def init_train_state(rng: jax.Array, model: nn.Module, optimizer: optax.GradientTransformation,
                     seq_len: int) -> TrainState:
  """A fresh state; parameters stay boxed with their logical axis names."""
  params_rng, state_rng = jax.random.split(rng)
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  params = model.init({"params": params_rng}, tokens)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), rng=state_rng)


def create_sharded_state(config, model: nn.Module, optimizer: optax.GradientTransformation,
                         mesh: Mesh) -> tuple[Any, Any]:
  """Initialises the train state directly in its sharded layout.

  Returns (state, state_shardings). Parameters are created on the devices
  that own them: nothing is materialised whole on one device first.
  """
  rng = jax.random.key(config.train.seed)
  init_fn = functools.partial(init_train_state, model=model, optimizer=optimizer,
                              seq_len=config.data.seq_len)
  abstract_state = jax.eval_shape(init_fn, rng)
  state_shardings = sharding.logical_to_shardings(abstract_state, mesh)
  state = jax.jit(lambda r: sharding.strip_boxes(init_fn(r)),
                  out_shardings=state_shardings)(rng)
  return state, state_shardings
