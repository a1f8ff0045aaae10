"""Gemma's decoding caches: rings for local layers vs every slot for every layer.

    python benchmarks/window_cache.py
    python benchmarks/window_cache.py --context 4096 --batch 4 --repeats 20

Two tables. First, the cache bytes of the published presets (``gemma2_2b``,
``gemma3_1b``, ``gemma3_12b``; bfloat16, batch 1) at a few context lengths,
from the shapes ``prefill`` returns (``jax.eval_shape``: nothing is
computed): ``LocalGlobalCache`` (local layers keep ``window`` slots) against
a cache that keeps every key for every layer, which is what mixed models
kept before. Second, measured on this machine: one decoding step of a small
random Gemma 3-style model (6 layers, pattern 6, window 64) whose prompt
fills ``--context`` slots, with both caches: median step time over
``--repeats`` steps after a compile step, and the largest logit difference
between the two (the every-slot cache masks old keys by slot ids instead).
"""
import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import configs.gemma as gemma_configs
from bigmodel import flops
from bigmodel.models import build_model, families
from bigmodel.models.layers import PREFILL

CONTEXTS = (8192, 32768, 131072)


def _prefill_state(model, params, prompt_len, num_new, batch):
  family = families.family_of(model)
  tokens_BxP = jnp.ones((batch, prompt_len), jnp.int32)
  return family.prefill(model, params, tokens_BxP, jnp.full((batch,), prompt_len), num_new, 0)


def _every_slot_cache(model, params, prompt_len, num_new, batch):
  """One stacked cache of every slot for every layer (all layers alike)."""
  tokens_BxP = jnp.ones((batch, prompt_len), jnp.int32)
  _, cache = model.apply({"params": params}, tokens_BxP, mode=PREFILL)
  return cache.padded(prompt_len + num_new)


def _bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def preset_table():
  print("cache bytes, bfloat16, batch 1 (GiB): local rings + global | every slot | ratio")
  print(f"{'preset':11} {'window':>6} " + " ".join(f"{n:>22}" for n in CONTEXTS))
  for preset in ("gemma2_2b", "gemma3_1b", "gemma3_12b"):
    config = gemma_configs.get_config(preset)
    model = build_model(config.model)
    params = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    params = jax.tree_util.tree_map(lambda x: getattr(x, "value", x), params,
                                    is_leaf=lambda x: hasattr(x, "value"))
    cells = []
    for context in CONTEXTS:
      if context > config.model.max_len:  # Past the model's trained length.
        cells.append("-")
        continue
      shapes = dict(prompt_len=1, num_new=context - 1, batch=1)
      split = _bytes(jax.eval_shape(functools.partial(_prefill_state, model, **shapes),
                                    params)[1].cache)
      every = _bytes(jax.eval_shape(functools.partial(_every_slot_cache, model, **shapes),
                                    params))
      cells.append(f"{split / 2**30:6.2f} | {every / 2**30:6.2f} | {every / split:4.1f}x")
    print(f"{preset:11} {config.model.sliding_window:>6} " + " ".join(f"{c:>22}" for c in cells))


def step_table(context, batch, repeats):
  config = gemma_configs.get_config("tiny")
  config.model.update(num_layers=6, sliding_window_pattern=6, sliding_window=64,
                      max_len=context + 8)
  model = build_model(config.model)
  params = jax.jit(lambda key: model.init(key, jnp.zeros((1, 8), jnp.int32))["params"])(
      jax.random.key(0))
  params = jax.tree_util.tree_map(lambda x: getattr(x, "value", x), params,
                                  is_leaf=lambda x: hasattr(x, "value"))
  prompt_len, num_new = context - 1, 1
  family = families.family_of(model)
  step = jax.jit(functools.partial(family.step, model))
  split = _prefill_state(model, params, prompt_len, num_new, batch)[1]
  every = split.replace(cache=_every_slot_cache(model, params, prompt_len, num_new, batch))
  token_B = jnp.full((batch,), 5, jnp.int32)
  results = {}
  for name, state in (("local rings", split), ("every slot", every)):
    logits, _ = jax.block_until_ready(step(params, token_B, state))
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(step(params, token_B, state))
      times.append(time.perf_counter() - start)
    results[name] = (statistics.median(times), _bytes(state.cache), logits)
  print(f"\none decoding step, {flops.device_description()}, 6 layers (5 local, window 64), "
        f"D {config.model.embed_dim}, batch {batch}, {context} slots; median of {repeats}")
  print(f"{'cache':12} {'step ms':>8} {'cache MiB':>9}")
  for name, (seconds, size, _) in results.items():
    print(f"{name:12} {seconds * 1e3:>8.2f} {size / 2**20:>9.1f}")
  ratio = results["every slot"][0] / results["local rings"][0]
  diff = float(jnp.abs(results["every slot"][2] - results["local rings"][2]).max())
  print(f"every slot / local rings step time: {ratio:.2f}x; max |logit difference| {diff:.2e}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--context", type=int, default=4096)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args()
  preset_table()
  step_table(args.context, args.batch, args.repeats)


if __name__ == "__main__":
  main()
