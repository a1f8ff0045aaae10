r"""The optimizer update alone: optax's transforms as bigmodel used them until
December 2026 vs ``optim.SkippingOptimizer``, compiled side by side, called in turns.

    python -m benchmarks.optimizer_update --config=configs/gpt.py:small \
        --config.model.vocab_size=32768 [--rounds=9]

On the parameters ``config`` initialises (one device), each variant is one
jitted update with the parameters and optimizer state donated, called on the
same gradients (norm about 10, so the clip acts): ``optax`` (the base optimizer
of ``make_optimizer`` in ``optax.apply_if_finite(chain(optax.clip_by_global_norm,
base))``, then ``optax.apply_updates`` and a finite check of the new
parameters in a ``lax.cond``), and ``bigmodel`` (``make_optimizer``'s
``SkippingOptimizer``), each given first and last. The table gives median and
fastest seconds per update and XLA's temporaries (docs/performance.md).
"""
import statistics
import time
from typing import Any, NamedTuple

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import optax

from bigmodel import api, flops, optim, sharding

_MIB = 2 ** 20


class OptaxReference(NamedTuple):
  """The update as optax's own transforms give it, with ``SkippingOptimizer``'s
  interface: what ``make_optimizer`` and the train step built before it."""
  transform: optax.GradientTransformation

  def init(self, params: Any) -> optax.ApplyIfFiniteState:
    return self.transform.init(params)

  def apply(self, grads: Any, state: optax.ApplyIfFiniteState, params: Any
            ) -> tuple[Any, optax.ApplyIfFiniteState, jax.Array]:
    updates, new_state = self.transform.update(grads, state, params)
    new_params = optax.apply_updates(params, updates)
    new_params, new_state = jax.lax.cond(optim.all_finite(new_params),
                                         lambda: (new_params, new_state),
                                         lambda: (params, optim.count_skipped(state)))
    return new_params, new_state, optax.tree.norm(grads)


def optax_reference(optim_cfg, total_steps: int) -> OptaxReference:
  """``make_optimizer``'s base optimizer (no pruning) under optax's own clip
  and ``apply_if_finite``; its state has ``SkippingOptimizer``'s layout."""
  unclipped = optim_cfg.copy_and_resolve_references()
  unclipped.clip = 0.0
  base = optim.make_optimizer(unclipped, total_steps)[0].base
  if optim_cfg.clip > 0:
    base = optax.chain(optax.clip_by_global_norm(optim_cfg.clip), base)
  return OptaxReference(optax.apply_if_finite(base, max_consecutive_errors=2**30))


def measure(config, rounds: int) -> list[dict[str, Any]]:
  """Rows of (name, median and fastest seconds, XLA temporaries, final parameters)."""
  params = sharding.strip_boxes(api.init_params(config, jax.devices()[:1])[0])
  key = jax.random.PRNGKey(0)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  grads = jax.tree_util.tree_unflatten(treedef, [
      jax.random.normal(k, x.shape, x.dtype) for k, x in
      zip(jax.random.split(key, len(leaves)), leaves)])
  scale = 10.0 / optax.tree.norm(grads)
  grads = jax.tree_util.tree_map(lambda g: g * scale, grads)
  optimizers = {"optax": optax_reference(config.optim, config.train.steps),
                "bigmodel": optim.make_optimizer(config.optim, config.train.steps)[0]}
  runs = []
  for name in ("optax", "bigmodel", "bigmodel", "optax"):
    optimizer = optimizers[name]
    # Parameters and state in and out in one order, as the train step holds them.
    update = jax.jit(lambda p, s, g, o=optimizer: o.apply(g, s, p)[:2], donate_argnums=(0, 1))
    state = (jax.tree_util.tree_map(jnp.copy, params), optimizer.init(params))
    compiled = update.lower(*state, grads).compile()
    state = compiled(*state, grads)  # Warm-up.
    jax.block_until_ready(state)
    runs.append(dict(name=name, compiled=compiled, state=state, times=[],
                     temp=compiled.memory_analysis().temp_size_in_bytes))
  for _ in range(rounds):
    for run in runs:
      start = time.perf_counter()
      run["state"] = run["compiled"](*run["state"], grads)
      jax.block_until_ready(run["state"])
      run["times"].append(time.perf_counter() - start)
  base = statistics.median(runs[0]["times"])
  return [dict(name=r["name"], median_s=statistics.median(r["times"]), min_s=min(r["times"]),
               ratio=statistics.median(r["times"]) / base, temp=r["temp"],
               params=r["state"][0]) for r in runs]


def format_table(rows: list[dict[str, Any]]) -> str:
  lines = ["| update | median s | min s | vs first | temporaries MiB |",
           "|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['name']} | {r['median_s']:.3f} | {r['min_s']:.3f} | "
                 f"{r['ratio']:.3f}x | {r['temp'] / _MIB:,.0f} |")
  return "\n".join(lines)


def main(argv, config_flag):
  from bigmodel.errors import fail  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if flags.FLAGS.rounds < 1:
    fail("--rounds must be >= 1")
  config = config_flag.value
  rows = measure(config, flags.FLAGS.rounds)
  count = sum(x.size for x in jax.tree_util.tree_leaves(rows[0]["params"]))
  print(f"{config.get('preset', '')}: {count / 1e6:.1f}M parameters, {config.optim.name}, "
        f"clip {config.optim.clip}, {flags.FLAGS.rounds} rounds, {flops.device_description()}")
  print(format_table(rows))


if __name__ == "__main__":
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/gpt.py:small", "Model config.",
                                            lock_config=True)
  flags.DEFINE_integer("rounds", 9, "Timed updates per variant, taken in turns.")
  from bigmodel import cli as _cli  # pylint: disable=g-import-not-at-top
  app.run(lambda argv: main(argv, _CONFIG), flags_parser=_cli.parse_flags)
