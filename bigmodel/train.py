r"""Trains a model: ``python -m bigmodel.train --config=configs/gpt.py:tiny --workdir=DIR``.

Overrides follow the config's shape, e.g. ``--config.train.steps=40
--config.mesh.fsdp=2``. Writes ``DIR/config.json``, ``DIR/metrics.jsonl`` and
``DIR/tensorboard``; prints a sample from the trained model at the end.
"""
import functools
import os
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
from jax.sharding import NamedSharding, PartitionSpec as P

from bigmodel import cli
from bigmodel import flops
from bigmodel import sharding
from bigmodel.config import validate
from bigmodel.data import build_datasets
from bigmodel.errors import UserError, fail, user_errors_exit
from bigmodel.metrics import MetricsWriter
from bigmodel.models import ModelConfig, build_model
from bigmodel.optim import make_optimizer
from bigmodel.sample import sample_tokens
from bigmodel.state import create_sharded_state
from bigmodel.train_step import eval_step, make_train_step

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and preset, e.g. configs/gpt.py:tiny.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for the config, metrics, tokenizer, data and checkpoints.")


def evaluate(eval_fn, params, eval_batches, mesh) -> dict[str, float]:
  """Token-weighted mean loss and perplexity over the eval batches."""
  loss_sum, token_count = 0.0, 0.0
  for host_batch in eval_batches:
    out = eval_fn(params, sharding.global_batch(host_batch, mesh))
    loss_sum, token_count = loss_sum + out["loss_sum"], token_count + out["token_count"]
  loss = float(loss_sum) / max(float(token_count), 1.0)
  return {"eval_loss": loss, "eval_perplexity": float(jnp.exp(min(loss, 50.0)))}


def check_batch_layout(config, mesh) -> None:
  micro_batch = config.train.batch_size // config.optim.grad_accum
  dp = sharding.data_parallel_size(mesh)
  if micro_batch % dp:
    raise UserError(
        f"train.batch_size={config.train.batch_size} (micro-batch {micro_batch} with "
        f"optim.grad_accum={config.optim.grad_accum}) is not divisible by the data-parallel "
        f"size {dp} (mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains for ``config.train.steps`` steps; returns the last logged metrics."""
  validate(config)
  mesh = sharding.make_mesh(config.mesh)
  check_batch_layout(config, mesh)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    cli.write_config(config, os.path.join(workdir, "config.json"))
  datasets = build_datasets(config, workdir, jax.process_index(), jax.process_count())

  model = build_model(config.model)
  model_config = ModelConfig.from_config(config.model)
  optimizer, schedule = make_optimizer(config.optim, config.train.steps)
  tokens_per_step = config.train.batch_size * config.data.seq_len
  flops_per_token = flops.train_flops_per_token(model_config, config.data.seq_len)
  peak_tflops, peak_source = flops.peak_tflops_per_device(
      config.train.peak_tflops_per_device, config.model.dtype)
  logging.info("peak %.1f TFLOP/s per device (%s); %.3g model FLOPs per token",
               peak_tflops, peak_source, flops_per_token)

  with sharding.activate(mesh):
    state, state_shardings = create_sharded_state(config, model, optimizer, mesh)
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    logging.info("model: %s, %.2fM parameters; mesh %s", config.model.family,
                 num_params / 1e6, dict(mesh.shape))
    if config.print_sharding and jax.process_index() == 0:
      print(sharding.describe_shardings(state.params, state_shardings.params), flush=True)
    batch_sharding = sharding.batch_sharding(mesh)
    replicated = NamedSharding(mesh, P())
    train_step_fn = jax.jit(
        make_train_step(model, optimizer, schedule, config.optim.grad_accum),
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    eval_fn = jax.jit(functools.partial(eval_step, model=model),
                      in_shardings=(state_shardings.params, batch_sharding),
                      out_shardings=replicated)

    writer = MetricsWriter(workdir, config.train.steps, config.train.progress) \
        if jax.process_index() == 0 else None
    last_metrics: dict[str, float] = {}
    interval_start, interval_steps = None, 0
    for step in range(1, config.train.steps + 1):
      batch = sharding.global_batch(next(datasets.train_iter), mesh)
      state, metrics = train_step_fn(state, batch)
      interval_steps += 1
      if interval_start is None:
        # The first step includes compilation: time from its end instead.
        jax.block_until_ready(metrics)
        interval_start, interval_steps = time.perf_counter(), 0
      is_last = step == config.train.steps
      record: dict[str, float] = {}
      if step % config.train.log_every == 0 or is_last:
        record.update({k: float(v) for k, v in jax.device_get(metrics).items()})
        if interval_steps:
          elapsed = time.perf_counter() - interval_start
          tokens_per_sec = interval_steps * tokens_per_step / elapsed
          tflops = tokens_per_sec * flops_per_token / jax.device_count() / 1e12
          record.update(tokens_per_sec=tokens_per_sec, tflops_per_device=tflops,
                        mfu=tflops / peak_tflops)
        interval_start, interval_steps = time.perf_counter(), 0
      if datasets.make_eval_iter and (
          is_last or (config.train.eval_every and step % config.train.eval_every == 0)):
        record.update(evaluate(eval_fn, state.params, datasets.make_eval_iter(), mesh))
        interval_start, interval_steps = time.perf_counter(), 0  # Eval time is not step time.
      if record:
        last_metrics.update(record)
        if writer:
          writer.write(step, record)
    if writer:
      writer.close()
  if hasattr(datasets.train_iter, "close"):
    datasets.train_iter.close()  # Stops grain's worker processes, if any.

  if datasets.tokenizer is not None and config.train.sample_tokens > 0 and jax.process_index() == 0:
    print_sample(config, model, state.params, datasets.tokenizer)
  return last_metrics


def print_sample(config, model, params, tokenizer) -> None:
  """Prints a sample continuing ``train.sample_prompt``, cut at end-of-text."""
  prompt_ids = [tokenizer.bos_id] + tokenizer.encode(config.train.sample_prompt)
  ids = sample_tokens(model, params, prompt_ids, config.train.sample_tokens,
                      rng=jax.random.key(config.train.seed + 1),
                      temperature=config.train.sample_temperature, max_len=config.data.seq_len,
                      num_valid_ids=tokenizer.vocab_size)
  generated = ids[1:]
  if tokenizer.eos_id in generated[len(prompt_ids) - 1:]:
    generated = generated[:generated.index(tokenizer.eos_id, len(prompt_ids) - 1)]
  print("----- sample -----")
  print(tokenizer.decode(generated))
  print("------------------", flush=True)


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.require_flags("config", "workdir")
  with user_errors_exit():
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
