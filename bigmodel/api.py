"""The Python API: what the command-line tools do, callable from a notebook.

No absl flags are involved: configs are loaded by name and overridden with a
dict of dotted keys, and every function here is the one the matching
command-line tool calls (``bigmodel.train`` -> :func:`train`), so a notebook
and a cluster job run the same code.

    config = api.get_config("gpt:tiny", {"train.steps": 50})
    print(api.describe(config))                 # parameters and their sharding
    api.train(config, "/tmp/run", on_metrics=api.LossPlot())
    api.load_generator("/tmp/run").generate(["def main("], max_new_tokens=32)
    api.evaluate("/tmp/run")
"""
from __future__ import annotations

import importlib
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import ml_collections

from bigmodel import sharding
from bigmodel.errors import UserError
from bigmodel.models import build_model
from bigmodel.optim import make_optimizer
from bigmodel.state import abstract_sharded_state, create_sharded_state

MetricsCallback = Callable[[int, dict], None]


def get_config(name: str, overrides: Optional[Mapping[str, Any]] = None
               ) -> ml_collections.ConfigDict:
  """A preset config by name, with dotted-key overrides.

  ``name`` is ``FILE[:PRESET]`` where FILE is a module of ``configs/``
  ("gpt", "bert", "bert_classify", "t5", "t5_finetune"), e.g. "gpt:small".
  ``overrides`` maps keys such as "train.steps" to values, like
  ``--config.train.steps=50`` on the command line; an unknown key raises.
  """
  file, _, preset = name.partition(":")
  try:
    module = importlib.import_module(f"configs.{file}")
  except ModuleNotFoundError:
    raise UserError(f"unknown config {file!r}; choose from gpt, bert, bert_classify, t5, "
                    "t5_finetune") from None
  try:
    config = module.get_config(preset) if preset else module.get_config()
  except ValueError as e:
    raise UserError(str(e)) from None
  for key, value in (overrides or {}).items():
    override(config, key, value)
  return config


def override(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """Sets the dotted ``key`` (e.g. "train.steps") of ``config`` to ``value``,
  as ``--config.KEY=VALUE`` would; an unknown key or a value of the wrong
  type raises ``UserError``."""
  parent, _, leaf = key.rpartition(".")
  node = config
  for part in parent.split(".") if parent else []:
    node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    raise UserError(f"unknown config key {key!r}")
  try:
    setattr(node, leaf, value)  # ConfigDict checks the type, as the flag would.
  except (TypeError, ValueError) as e:
    raise UserError(f"config key {key!r}: {e}") from None


def describe(config: ml_collections.ConfigDict, devices: Optional[Sequence] = None) -> str:
  """Parameter count and a table of every parameter's shape and partition
  spec on ``config.mesh`` over ``devices`` (default: all; nothing is
  allocated: shapes only)."""
  mesh = sharding.make_mesh(config.mesh, devices)
  model = build_model(config.model, config.lora)
  optimizer, _ = make_optimizer(config.optim, config.train.steps)
  with sharding.activate(mesh):
    state, shardings = abstract_sharded_state(config, model, optimizer, mesh)
  count = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(state.params))
  header = (f"{config.model.family}: {count:,} parameters ({count / 1e6:.2f}M) on mesh "
            f"{dict(mesh.shape)} of {mesh.devices.size} {jax.devices()[0].platform} device(s)")
  return header + "\n" + sharding.describe_shardings(state.params, shardings.params)


def init_params(config: ml_collections.ConfigDict, devices: Optional[Sequence] = None
                ) -> tuple[Any, jax.sharding.Mesh]:
  """Freshly initialised parameters, sharded on ``config.mesh`` (over
  ``devices``, default all) as the trainer shards them, and the mesh."""
  mesh = sharding.make_mesh(config.mesh, devices)
  model = build_model(config.model, config.lora)
  optimizer, _ = make_optimizer(config.optim, config.train.steps)
  with sharding.activate(mesh):
    state, _ = create_sharded_state(config, model, optimizer, mesh)
  return state.params, mesh


def train(config: ml_collections.ConfigDict, workdir: str,
          on_metrics: Optional[MetricsCallback] = None,
          devices: Optional[Sequence] = None) -> dict[str, float]:
  """Trains (or resumes) a run in ``workdir``, exactly as ``python -m
  bigmodel.train`` does; ``on_metrics(step, record)`` sees every logged record,
  and ``config.mesh`` spans ``devices`` (default: all). Returns the last
  logged metrics."""
  from bigmodel.train import Trainer  # pylint: disable=import-outside-toplevel
  return Trainer(config, workdir, on_metrics=on_metrics, devices=devices).run()


def load_generator(workdir: str, step: Optional[int] = None,
                   mesh_config: Optional[dict] = None):
  """A KV-cache ``Generator`` for a run's (or a converted model's) checkpoint,
  as ``python -m bigmodel.generate`` uses: ``.generate(prompts, ...)``."""
  from bigmodel.generation.generator import load  # pylint: disable=import-outside-toplevel
  return load(workdir, step, mesh_config)


def evaluate(workdir: str, split: str = "validation", step: Optional[int] = None,
             with_confusion: bool = False) -> dict[str, Any]:
  """A checkpoint's eval metrics, as ``python -m bigmodel.evaluate`` reports them;
  classifiers add ``eval_confusion`` [true, predicted] and ``eval_labels``
  when ``with_confusion``."""
  from bigmodel.evaluate import evaluate_run  # pylint: disable=import-outside-toplevel
  metrics, _, _ = evaluate_run(workdir, split, step, with_confusion=with_confusion)
  return metrics


class LossPlot:
  """An ``on_metrics`` callback that redraws train and eval loss in a notebook."""

  def __init__(self, title: str = "loss"):
    self.title = title
    self.train: list[tuple[int, float]] = []
    self.eval: list[tuple[int, float]] = []

  def __call__(self, step: int, record: dict) -> None:
    if "loss" in record:
      self.train.append((step, record["loss"]))
    if "eval_loss" in record:
      self.eval.append((step, record["eval_loss"]))
    self.draw()

  def draw(self):
    """Draws the curves so far (replacing the previous drawing in a notebook)."""
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    try:
      from IPython import display  # pylint: disable=import-outside-toplevel
      display.clear_output(wait=True)
    except ImportError:
      display = None
    figure, axes = plt.subplots(figsize=(6, 3.5))
    for points, label in ((self.train, "train"), (self.eval, "eval")):
      if points:
        axes.plot(*zip(*points), marker="o" if label == "eval" else None, label=label)
    axes.set(xlabel="step", ylabel="loss", title=self.title)
    axes.legend()
    if display is not None:
      display.display(figure)
    plt.close(figure)
    return figure
