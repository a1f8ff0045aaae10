r"""Eval loss of the tiny GPT trained dense, 50% magnitude-pruned and 2:4-pruned.

    python -m benchmarks.pruning [--steps=300] [--runs_dir=/tmp/pruning_bench] [--eval_steps=16]

Trains ``configs/gpt.py:tiny`` on its default offline data (Python's standard
library) three times for the same ``--steps``, with the same data and seed:
dense; ``prune.method=magnitude`` to ``--sparsity`` on the cubic schedule from
1/4 to 3/4 of the run (masks every ``--steps`` / 30 steps); and
``prune.method=n_m`` 2:4, applied at 1/4 of the run. Each run is the trainer's
own (``bigmodel.api.train``) in ``RUNS_DIR/VARIANT``; the tokenizer and the
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


def run(steps: int, sparsity: float, eval_steps: int, workdir: str) -> list[dict]:
  """Trains every variant; returns one row per run."""
  # Imported here: flag parsing (and the docs' check of this command) stays light.
  import configs.gpt as gpt  # pylint: disable=g-import-not-at-top
  from bigmodel import api  # pylint: disable=g-import-not-at-top
  rows, shared = [], {}
  for name, prune in variants(steps, sparsity).items():
    config = gpt.get_config("tiny")
    config.train.update(steps=steps, eval_every=0, eval_steps=eval_steps, sample_tokens=0,
                        progress=False, trackers="")
    config.data.update(**shared)
    config.prune.update(**prune)
    run_dir = os.path.join(workdir, name.replace(" ", "_").replace("%", "").replace(":", "_"))
    start = time.perf_counter()
    metrics = api.train(config, run_dir)
    rows.append(dict(name=name, eval_loss=metrics["eval_loss"],
                     sparsity=metrics.get("sparsity", 0.0), seconds=time.perf_counter() - start))
    if not shared:  # The first run's tokenizer and records serve the others.
      shared = dict(tokenizer=os.path.join(run_dir, "tokenizer.model"),
                    data_dir=os.path.join(run_dir, "data"))
  return rows


def table(rows: list[dict], steps: int) -> str:
  dense = rows[0]["eval_loss"]
  lines = [f"tiny GPT, {steps} steps, pruning from step {steps // 4} to {3 * steps // 4}",
           "", "| run | sparsity | eval loss | vs dense | train s |", "|---|---|---|---|---|"]
  lines += [f"| {r['name']} | {r['sparsity']:.3f} | {r['eval_loss']:.4f} | "
            f"{r['eval_loss'] - dense:+.4f} | {r['seconds']:.0f} |" for r in rows]
  return "\n".join(lines)


def main(argv):
  del argv
  workdir = _RUNS_DIR.value or tempfile.mkdtemp(prefix="pruning_bench_")
  rows = run(_STEPS.value, _SPARSITY.value, _EVAL_STEPS.value, workdir)
  print(table(rows, _STEPS.value), flush=True)


if __name__ == "__main__":
  app.run(main)
