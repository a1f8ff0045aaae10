"""Tiny GPT / T5 generators with random parameters, shared by the generation tests."""
import jax
import jax.numpy as jnp

from bigmodel import sharding
from bigmodel.generation.generator import Generator
from bigmodel.models import build_model
from model_fixtures import tiny_config

# Prompts (ids; 1 = BOS) decoded together and alone: two lengths, so one is
# padded in the batch, and two of a length, so the oracle compiles twice only.
PROMPTS = ([1, 17, 40, 9, 88, 5, 61], [1, 23], [1, 99, 3, 71, 12, 4, 30])


def tiny_generator(family: str, mesh=None, **model_overrides) -> Generator:
  """A generator over a random tiny model whose greedy outputs vary.

  Freshly initialised GPTs mostly repeat the last token (small weights, tied
  embeddings); noise on every parameter makes the decoded tokens depend on
  the whole prefix, so a wrong cache or mask shows.
  """
  config = tiny_config(family, **model_overrides)
  config.model.max_len = 64
  model = build_model(config.model)
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = model.init(jax.random.key(0), *((tokens, tokens) if family == "t5" else (tokens,)))
  params = sharding.strip_boxes(params["params"])
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  params = jax.tree_util.tree_unflatten(treedef, leaves)
  if mesh is None:
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  else:
    config.mesh.update(mesh)
    mesh = sharding.make_mesh(config.mesh)
    _, shardings = _param_shardings(model, config, mesh)
    params = jax.device_put(params, shardings)
  return Generator(model, params, config, tokenizer=None, mesh=mesh)


def _param_shardings(model, config, mesh):
  from bigmodel.optim import make_optimizer  # pylint: disable=g-import-not-at-top
  from bigmodel.state import abstract_sharded_state  # pylint: disable=g-import-not-at-top
  optimizer, _ = make_optimizer(config.optim, 10)
  abstract, shardings = abstract_sharded_state(config, model, optimizer, mesh)
  return abstract.params, shardings.params
