r"""Eval loss of a model trained dense, 50% magnitude-pruned and 2:4-pruned.

    python -m benchmarks.pruning [--config=configs/gpt.py:tiny] [--steps=300] \
        [--runs_dir=/tmp/pruning_bench] [--eval_steps=16]

Trains ``--config`` (default ``configs/gpt.py:tiny``; any family's, e.g.
``configs/bert.py:tiny`` or ``configs/t5.py:tiny``, with ``--config.KEY=VALUE``
overrides) on its data (the tiny presets': the default offline data, Python's
standard library) three times for the same ``--steps``, with the same data and seed:
dense; ``prune.method=magnitude`` to ``--sparsity`` on the cubic schedule from
1/4 to 3/4 of the run (masks every ``--steps`` / 30 steps); and
``prune.method=n_m`` 2:4, applied at 1/4 of the run. Each run is the trainer's
own (``bigmodel.train.Trainer``) in ``RUNS_DIR/VARIANT``; the tokenizer and the
prepared records of the first are shared. Prints a Markdown table of each
run's final eval loss, its difference to dense, the achieved sparsity of the
targeted kernels and the training time (no sparse kernels are used, so the
step time is the dense one).
"""
import os
import tempfile
import time

from absl import app
from absl import flags

# The trainer's own --config (the model to prune; default configs/gpt.py:tiny):
# it defines it (and --workdir, unused here) when imported.
from bigmodel import train as train_lib

_STEPS = flags.DEFINE_integer("steps", 300, "Training steps of every run.")
_SPARSITY = flags.DEFINE_float("sparsity", 0.5, "Final sparsity of the magnitude run.")
_EVAL_STEPS = flags.DEFINE_integer("eval_steps", 16, "Eval batches of the final evaluation.")
_RUNS_DIR = flags.DEFINE_string("runs_dir", None, "Where the runs go (default: a temporary "
                               "folder); a run already there is resumed, not retrained.")


def variants(steps: int, sparsity: float) -> dict[str, dict]:
  """``config.prune`` overrides by run name."""
  start, end = steps // 4, 3 * steps // 4
  return {
      "dense": {},
      f"magnitude {sparsity:.0%}": dict(method="magnitude", sparsity=sparsity, start_step=start,
                                        end_step=end, every=max(steps // 30, 1)),
      "2:4": dict(method="n_m", n=2, m=4, start_step=start),
  }


def default_config():
  """``configs/gpt.py:tiny``: the model pruned without ``--config``."""
  import configs.gpt as gpt  # pylint: disable=g-import-not-at-top
  return gpt.get_config("tiny")


def run(steps: int, sparsity: float, eval_steps: int, workdir: str,
        base=None) -> list[dict]:
  """Trains every variant of ``base`` (a config; default the tiny GPT's);
  returns one row per run."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  base = (default_config() if base is None else base).to_dict()
  rows, shared = [], {}
  for name, prune in variants(steps, sparsity).items():
    config = ml_collections.ConfigDict(base)
    config.train.update(steps=steps, eval_every=0, eval_steps=eval_steps, sample_tokens=0,
                        progress=False, trackers="")
    config.data.update(**shared)
    config.prune.update(**prune)
    run_dir = os.path.join(workdir, name.replace(" ", "_").replace("%", "").replace(":", "_"))
    start = time.perf_counter()
    metrics = train_lib.Trainer(config, run_dir).run()
    rows.append(dict(name=name, eval_loss=metrics["eval_loss"],
                     sparsity=metrics.get("sparsity", 0.0), seconds=time.perf_counter() - start))
    if not shared:  # The first run's tokenizer and records serve the others.
      shared = dict(tokenizer=os.path.join(run_dir, "tokenizer.model"),
                    data_dir=os.path.join(run_dir, "data"))
  return rows


def table(rows: list[dict], steps: int, config=None) -> str:
  m = (default_config() if config is None else config).model
  dense = rows[0]["eval_loss"]
  lines = [f"{m.family}, {m.num_layers} layers x {m.embed_dim} wide, {steps} steps, pruning "
           f"from step {steps // 4} to {3 * steps // 4}",
           "", "| run | sparsity | eval loss | vs dense | train s |", "|---|---|---|---|---|"]
  lines += [f"| {r['name']} | {r['sparsity']:.3f} | {r['eval_loss']:.4f} | "
            f"{r['eval_loss'] - dense:+.4f} | {r['seconds']:.0f} |" for r in rows]
  return "\n".join(lines)


def main(argv):
  from bigmodel.errors import fail, user_errors_exit  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  workdir = _RUNS_DIR.value or tempfile.mkdtemp(prefix="pruning_bench_")
  config = default_config() if flags.FLAGS.config is None else flags.FLAGS.config
  with user_errors_exit():
    rows = run(_STEPS.value, _SPARSITY.value, _EVAL_STEPS.value, workdir, config)
  print(table(rows, _STEPS.value, config), flush=True)


if __name__ == "__main__":
  from bigmodel import cli  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=cli.parse_flags)
