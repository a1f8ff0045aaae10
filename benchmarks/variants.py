r"""Variants of the trainer's step, compiled side by side and stepped in turns.

    python -m benchmarks.variants --config=configs/gpt.py:small \
        --config.data.seq_len=512 --config.train.batch_size=4 \
        --variant='default:' --variant='unrolled:model.scan=False' \
        --variant='concurrency scheduler:xla.xla_cpu_enable_concurrency_optimized_scheduler=True' \
        [--rounds=6] [--compile_only]

Each ``--variant`` is ``NAME:SETTINGS``, SETTINGS a comma-separated list of
``key=value``: a config key (``model.scan=False``; the value is read as a
Python literal, else taken as a string) or ``xla.OPTION=value``, an XLA
compiler option for that variant's compile. The first variant is the
baseline. Give a variant twice, first and last, to see how much the order
alone moves the figures (on the development CPU a two-variant run once
favoured the second-compiled step by 5% where a first-and-last repeat showed
nothing).

Every variant is the trainer's own compiled step
(``benchmarks.train_step.compile_step``): the table gives XLA's compiled
per-device memory and the planner's; without ``--compile_only`` the variants
then step in turns on the same synthetic batches (A B C A B C ...: load on a
shared machine slows them alike), and the table adds each one's median step
time, tokens/s and ratio to the baseline.
"""
import ast
import statistics
import time
from typing import Any

from absl import app
from absl import flags
import jax

from benchmarks.train_step import compile_step, compiled_memory
from bigmodel import api, flops, memory, sharding
from bigmodel.config import validate
from bigmodel.data.synthetic import SyntheticIterator
from bigmodel.errors import UserError
from bigmodel.state import create_sharded_state

_MIB = 2 ** 20


def parse_variant(spec: str, config) -> tuple[str, Any, dict[str, Any]]:
  """``NAME:key=value,...`` -> (name, overridden copy of ``config``, XLA options)."""
  name, sep, settings = spec.partition(":")
  if not sep or not name:
    raise UserError(f"--variant={spec!r}: expected NAME:key=value,... (settings may be empty)")
  config = config.copy_and_resolve_references()
  options = {}
  for setting in filter(None, (s.strip() for s in settings.split(","))):
    key, eq, text = setting.partition("=")
    if not eq:
      raise UserError(f"--variant={spec!r}: {setting!r} is not key=value")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    if key.startswith("xla."):
      options[key[len("xla."):]] = value
      continue
    try:
      api.override(config, key, value)
    except UserError as e:
      raise UserError(f"--variant={spec!r}: {e}") from None
  validate(config)
  return name, config, options


def measure(variants: list[tuple[str, Any, dict[str, Any]]], rounds: int,
            compile_only: bool) -> list[dict]:
  """One row per (name, config, XLA options): memory, and (unless
  ``compile_only``) steps in turns. The configs share batch shape and mesh."""
  base = variants[0][1]
  mesh = sharding.make_mesh(base.mesh)
  rows, steps = [], []
  with sharding.activate(mesh):
    for name, config, options in variants:
      try:
        compiled, pieces, times = compile_step(config, mesh, options)
      except jax.errors.JaxRuntimeError as e:
        if "compile option" not in str(e):
          raise
        raise UserError(f"variant {name!r}: {str(e).splitlines()[0]}") from None
      planned = memory.estimate(config, dict(mesh.shape), jax.default_backend())
      rows.append(dict(name=name, compile_s=times["compile_s"], planned=planned.total,
                       **compiled_memory(compiled)))
      steps.append((compiled, config, pieces))
    if compile_only:
      return rows
    data = SyntheticIterator(vocab_size=base.model.vocab_size, seq_len=base.data.seq_len,
                             batch_size=base.train.batch_size, seed=base.train.seed)
    batches = [sharding.global_batch(next(data), mesh) for _ in range(2)]
    states = []
    for compiled, config, (_, model, optimizer, _, _) in steps:
      state, _ = create_sharded_state(config, model, optimizer, mesh)
      state, _ = compiled(state, batches[0])  # Warm-up.
      states.append(jax.block_until_ready(state))
    times = [[] for _ in steps]
    for r in range(rounds):
      for i, (compiled, _, _) in enumerate(steps):
        start = time.perf_counter()
        states[i], metrics = jax.block_until_ready(compiled(states[i], batches[r % 2]))
        times[i].append(time.perf_counter() - start)
        rows[i].setdefault("losses", []).append(float(metrics["loss"]))
  tokens = base.train.batch_size * base.data.seq_len
  for row, t in zip(rows, times):
    row.update(step_s=statistics.median(t), step_s_min=min(t),
               tokens_per_s=tokens / statistics.median(t))
  return rows


def format_table(rows: list[dict], compile_only: bool) -> str:
  head = ["variant", "compile s", "temp MiB", "peak MiB", "planned MiB"]
  if not compile_only:
    head += ["step s (median)", "min", "tokens/s", f"vs {rows[0]['name']}"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  base = rows[0].get("step_s")
  for row in rows:
    cells = [row["name"], f"{row['compile_s']:.1f}", f"{row['temp'] / _MIB:,.0f}",
             f"{row['peak'] / _MIB:,.0f}", f"{row['planned'] / _MIB:,.0f}"]
    if not compile_only:
      cells += [f"{row['step_s']:.3f}", f"{row['step_s_min']:.3f}",
                f"{row['tokens_per_s']:,.0f}", f"{row['step_s'] / base:.3f}x time"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv, config_flag):
  from bigmodel.errors import fail, user_errors_exit  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  with user_errors_exit():
    if len(f.variant) < 2 or f.rounds < 1:
      raise UserError("give at least two --variant NAME:SETTINGS (the first is the baseline) "
                      "and --rounds >= 1")
    variants = [parse_variant(spec, config_flag.value) for spec in f.variant]
    rows = measure(variants, f.rounds, f.compile_only)
  c = config_flag.value
  print(f"{c.get('preset', '')}: batch {c.train.batch_size} x {c.data.seq_len}, "
        f"{jax.device_count()} x {flops.device_description()}, {f.rounds} rounds")
  print(format_table(rows, f.compile_only))


if __name__ == "__main__":
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/gpt.py:small", "Model config.",
                                            lock_config=True)
  flags.DEFINE_multi_string("variant", [], "NAME:key=value,... (config keys, xla.OPTION).")
  flags.DEFINE_integer("rounds", 6, "Timed steps per variant, taken in turns.")
  flags.DEFINE_bool("compile_only", False, "Memory only (abstract state, no steps).")
  from bigmodel import cli as _cli  # pylint: disable=g-import-not-at-top
  app.run(lambda argv: main(argv, _CONFIG), flags_parser=_cli.parse_flags)
