r"""Trains a model: ``python -m bigmodel.train --config=configs/gpt.py:tiny --workdir=DIR``.

Overrides follow the config's shape, e.g. ``--config.train.steps=40
--config.mesh.fsdp=2``. Writes ``DIR/config.json``, ``DIR/metrics.jsonl``,
``DIR/tensorboard`` and ``DIR/checkpoints``; a ``DIR`` that holds checkpoints
is resumed exactly from the latest usable one. SIGTERM finishes the current
step, saves, and exits 0. Prints a sample from the trained model at the end.
"""
import functools
import os
import signal
import time
from typing import Callable, Optional

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
from ml_collections import config_flags
from jax.sharding import NamedSharding, PartitionSpec as P

from bigmodel import cli
from bigmodel import distributed  # Also defines the multi-process flags.
from bigmodel import flops
from bigmodel import sharding
from bigmodel.checkpoint import Checkpointer
from bigmodel.config import validate
from bigmodel.data import build_datasets
from bigmodel.errors import UserError, fail, user_errors_exit
from bigmodel.evaluation import classification_eval_args, evaluate
from bigmodel.generation.generator import Generator
from bigmodel.metrics import MetricsWriter
from bigmodel.models import ModelConfig, build_model
from bigmodel.optim import make_optimizer
from bigmodel.pretrained import init_from_pretrained
from bigmodel.state import abstract_sharded_state, create_sharded_state
from bigmodel.train_step import eval_step, make_train_step

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and preset, e.g. configs/gpt.py:tiny.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for the config, metrics, tokenizer, data and checkpoints.")


class PreemptionFlag:
  """Whether to save and exit after a step, once a SIGTERM has arrived.

  One process: a SIGTERM handler sets a flag that the loop reads between
  steps. Several processes: the signal may reach some of them, at different
  steps, yet the save is collective, so JAX's preemption sync manager (which
  catches SIGTERM itself and tells every process) picks one step for all.
  """

  def __init__(self):
    self._requested = False
    self._multi_process = jax.process_count() > 1
    if not self._multi_process:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self._requested = True

  def reached(self, step: int) -> bool:
    """True at the step to save and exit at; call once per step."""
    if self._multi_process:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested

  def restore(self):
    if not self._multi_process:
      signal.signal(signal.SIGTERM, self._previous)


def check_batch_layout(config, mesh) -> None:
  micro_batch = config.train.batch_size // config.optim.grad_accum
  dp = sharding.data_parallel_size(mesh)
  if micro_batch % dp:
    raise UserError(
        f"train.batch_size={config.train.batch_size} (micro-batch {micro_batch} with "
        f"optim.grad_accum={config.optim.grad_accum}) is not divisible by the data-parallel "
        f"size {dp} (mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})")


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree_util.tree_leaves(tree)]))


class Trainer:
  """One training run: builds everything from the config, then ``run()``."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               on_metrics: Optional[Callable[[int, dict], None]] = None,
               devices: Optional[list] = None):
    """``on_metrics(step, record)`` sees every logged record (notebook plots);
    ``devices`` (default: all) are the ones ``config.mesh`` spans."""
    validate(config)
    self.config, self.workdir, self.on_metrics = config, workdir, on_metrics
    self.mesh = sharding.make_mesh(config.mesh, devices)
    check_batch_layout(config, self.mesh)
    os.makedirs(workdir, exist_ok=True)
    self.is_writer = jax.process_index() == 0
    if self.is_writer:
      cli.write_config(config, os.path.join(workdir, "config.json"))
    self.datasets = build_datasets(config, workdir, jax.process_index(), jax.process_count())
    self.model = build_model(config.model)
    self.optimizer, self.schedule = make_optimizer(config.optim, config.train.steps)
    self.checkpointer = Checkpointer(workdir, keep=config.checkpoint.keep,
                                     keep_best=config.checkpoint.keep_best,
                                     async_save=config.checkpoint.async_save)
    self.peak_tflops, peak_source = flops.peak_tflops_per_device(
        config.train.peak_tflops_per_device, config.model.dtype)
    logging.info("peak %.1f TFLOP/s per device (%s)", self.peak_tflops, peak_source)

  def _initial_state(self):
    """The latest usable checkpoint (resharded onto this mesh), or a fresh state."""
    abstract_state, state_shardings = abstract_sharded_state(
        self.config, self.model, self.optimizer, self.mesh)
    restored = self.checkpointer.restore_latest_usable(abstract_state)
    if restored is None:
      state, _ = create_sharded_state(self.config, self.model, self.optimizer, self.mesh)
      if self.config.init_from:
        state = init_from_pretrained(state, self.config, self.mesh)
      return state, state_shardings
    step, state, data_state = restored
    self.datasets.train_iter.set_state(data_state)
    print(f"resuming from the checkpoint at step {step} in {self.checkpointer.directory}",
          flush=True)
    return state, state_shardings

  def _save(self, state, step: int, metrics: dict[str, float]) -> None:
    if not bool(_all_finite(state.params)):
      raise UserError(f"the state at step {step} is not finite; not checkpointed")
    best_metric = {"eval_loss": metrics["eval_loss"]} if "eval_loss" in metrics else None
    self.checkpointer.save(step, state, self.datasets.train_iter.get_state(), self.config,
                           metrics=best_metric)

  def _check_nonfinite(self, metrics: dict[str, float], step: int, seen: int) -> int:
    """Applies ``train.nonfinite`` to updates skipped since the last check."""
    count = int(metrics["nonfinite_steps"])
    if count > seen:
      message = (f"{count - seen} update(s) with a non-finite loss or gradient up to step "
                 f"{step} (loss {metrics['loss']})")
      if self.config.train.nonfinite == "halt":
        raise UserError(message + "; halting (train.nonfinite=halt)")
      logging.warning("%s; skipped them (train.nonfinite=skip)", message)
    return count

  def run(self) -> dict[str, float]:
    """Trains up to ``train.steps``; returns the last logged metrics."""
    config, mesh = self.config, self.mesh
    train_cfg = config.train
    preemption = PreemptionFlag()
    writer = MetricsWriter(self.workdir, train_cfg.steps, train_cfg.progress) \
        if self.is_writer else None
    last_metrics: dict[str, float] = {}
    try:
      with sharding.activate(mesh):
        state, state_shardings = self._initial_state()
        num_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
        logging.info("model: %s, %.2fM parameters; mesh %s", config.model.family,
                     num_params / 1e6, dict(mesh.shape))
        if config.print_sharding and self.is_writer:
          print(sharding.describe_shardings(state.params, state_shardings.params), flush=True)
        batch_sharding = sharding.batch_sharding(mesh)
        replicated = NamedSharding(mesh, P())
        train_step_fn = jax.jit(
            make_train_step(self.model, self.optimizer, self.schedule, config.optim.grad_accum),
            in_shardings=(state_shardings, batch_sharding),
            out_shardings=(state_shardings, replicated), donate_argnums=(0,))
        eval_fn = jax.jit(functools.partial(eval_step, model=self.model),
                          in_shardings=(state_shardings.params, batch_sharding),
                          out_shardings=replicated)

        start_step = int(state.step)
        nonfinite_seen = None
        interval_start, interval_steps = None, 0
        for step in range(start_step + 1, train_cfg.steps + 1):
          batch = sharding.global_batch(next(self.datasets.train_iter), mesh)
          if step == start_step + 1:
            batch_shapes = {k: v.shape for k, v in batch.items()}
            tokens_per_step = flops.tokens_per_batch(batch_shapes)
            flops_per_step = flops.train_flops_per_step(
                ModelConfig.from_config(config.model), batch_shapes)
          state, metrics = train_step_fn(state, batch)
          interval_steps += 1
          if interval_start is None:
            # The first step includes compilation: time from its end instead.
            jax.block_until_ready(metrics)
            interval_start, interval_steps = time.perf_counter(), 0
          is_last = step == train_cfg.steps
          save_every = config.checkpoint.save_every
          # Read once: a SIGTERM arriving later in this step must not make it
          # exit without the save that the flag promises.
          preempted = preemption.reached(step)
          will_save = is_last or preempted or (save_every and step % save_every == 0)
          record: dict[str, float] = {}
          if step % train_cfg.log_every == 0 or is_last or will_save:
            fetched = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if nonfinite_seen is None:
              nonfinite_seen = int(fetched["nonfinite_steps"]) if step > 1 else 0
            nonfinite_seen = self._check_nonfinite(fetched, step, nonfinite_seen)
            if step % train_cfg.log_every == 0 or is_last:
              record.update(fetched)
              if interval_steps:
                elapsed = time.perf_counter() - interval_start
                tokens_per_sec = interval_steps * tokens_per_step / elapsed
                tflops = interval_steps * flops_per_step / elapsed / jax.device_count() / 1e12
                record.update(tokens_per_sec=tokens_per_sec, tflops_per_device=tflops,
                              mfu=tflops / self.peak_tflops)
              interval_start, interval_steps = time.perf_counter(), 0
          if self.datasets.make_eval_iter and (
              is_last or (train_cfg.eval_every and step % train_cfg.eval_every == 0)):
            record.update(evaluate(eval_fn, state.params, self.datasets.make_eval_iter(), mesh,
                                   **classification_eval_args(config, self.datasets)))
            record.update(self.datasets.eval_baselines)
            interval_start, interval_steps = time.perf_counter(), 0  # Eval is not step time.
          if record:
            last_metrics.update(record)
            if writer:
              writer.write(step, record)
            if self.on_metrics and self.is_writer:
              self.on_metrics(step, dict(record))
          if will_save:
            self._save(state, step, record)
          if preempted and not is_last:
            self.checkpointer.wait()
            print(f"preempted: saved the checkpoint at step {step}; exiting", flush=True)
            return last_metrics
        self.checkpointer.wait()
    finally:
      preemption.restore()
      if writer:
        writer.close()
      self.checkpointer.close()
      if hasattr(self.datasets.train_iter, "close"):
        self.datasets.train_iter.close()  # Stops grain's worker processes, if any.

    if (config.model.family == "gpt" and self.datasets.tokenizer is not None
        and train_cfg.sample_tokens > 0 and self.is_writer):
      print_sample(config, self.model, state.params, self.datasets.tokenizer, mesh)
    return last_metrics


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) a run; returns the last logged metrics."""
  return Trainer(config, workdir).run()


def print_sample(config, model, params, tokenizer, mesh) -> None:
  """Prints ``train.sample_prompt`` and a sampled continuation, cut at end-of-text."""
  generator = Generator(model, params, config, tokenizer, mesh)
  completion, = generator.generate(
      config.train.sample_prompt, max_new_tokens=config.train.sample_tokens,
      temperature=config.train.sample_temperature, seed=config.train.seed + 1)
  print("----- sample -----")
  print(config.train.sample_prompt + completion)
  print("------------------", flush=True)


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.require_flags("config", "workdir")
  distributed.initialize()  # Joins the other processes, if any, before devices are used.
  with distributed.failure_guard(), user_errors_exit():
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
