r"""Trains a model: ``python -m bigmodel.train --config=configs/gpt.py:tiny --workdir=DIR``.

Overrides follow the config's shape, e.g. ``--config.train.steps=40
--config.mesh.fsdp=2``. Writes ``DIR/config.json``, ``DIR/metrics.jsonl``,
``DIR/tensorboard`` and ``DIR/checkpoints``; a ``DIR`` that holds checkpoints
is resumed exactly from the latest usable one. SIGTERM or Ctrl-C finishes the
current step, saves, and exits 0; before the first step they exit 0 at once.
Prints a sample from the trained model at the end.
"""
import logging as logging_std
import os
import signal
import sys
import time
from typing import Callable, Optional


def _exit_before_start(signum, frame) -> None:  # pylint: disable=unused-argument
  """Nothing is written before the trainer takes over the signals: exit now.

  ``os._exit``: a normal interpreter shutdown in the middle of JAX's start-up
  (backend threads running) was measured to segfault now and then.
  """
  print(f"stopped by {signal.Signals(signum).name} before the first step: nothing to save",
        flush=True)
  os._exit(0)  # pylint: disable=protected-access


if __name__ == "__main__":  # Covers the imports below too (JAX's take seconds).
  for _signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(_signum, _exit_before_start)

from absl import app
from absl import flags
from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
from ml_collections import config_flags

from bigmodel import cli
from bigmodel import console
from bigmodel import distill
from bigmodel import distributed  # Also defines the multi-process flags.
from bigmodel import flops
from bigmodel import objectives
from bigmodel import optim
from bigmodel import remote_workdir
from bigmodel import resume
from bigmodel import sharding
from bigmodel import storage
from bigmodel import run as run_lib
from bigmodel.checkpoint import CheckpointWriteError, check_resumable
from bigmodel.config import profile_steps, tracker_names, validate
from bigmodel.data import build_datasets, validate_data_config
from bigmodel.errors import UserError, fail, user_errors_exit
from bigmodel.evaluation import classification_eval_args, evaluate
from bigmodel.generation.generator import Generator
from bigmodel.goodput import Timeline
from bigmodel.lm_eval import training as lm_eval_tasks
from bigmodel.metrics import MetricsWriter, WandbTracker
from bigmodel.models import ModelConfig, build_model, context_parallel, families
from bigmodel.optim import all_finite, make_optimizer
from bigmodel.pretrained import init_from_pretrained
from bigmodel.run_lock import RunLock
from bigmodel.state import abstract_sharded_state, create_sharded_state
from bigmodel.train_hooks import (CheckpointHook, EvalHook, LockHook, LogHook, MetricsHook,
                                  SourceTokensHook, StepOutcome, StepProfiler, SyncHook)
from bigmodel.train_step import jit_eval_step, jit_train_step

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and preset, e.g. configs/gpt.py:tiny.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for the config, metrics, tokenizer, data and checkpoints.")
# Exit status when a checkpoint cannot be written (a full disk, ...); bad input is 2.
CHECKPOINT_WRITE_FAILED = 3


def make_workdir(workdir: str) -> None:
  """Creates ``workdir`` (and parents); UserError if that is impossible."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create the workdir {workdir}: {e.strerror or e}") from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise UserError(f"cannot write to the workdir {workdir}: permission denied")


class StoppedBeforeStart(BaseException):
  """SIGTERM or Ctrl-C before the first step: nothing to save, exit 0.

  A BaseException, as KeyboardInterrupt is: raised from the signal handler
  wherever start-up is, it must pass the ``except Exception`` of the code it
  interrupts (found swallowed by one during data preparation).
  """


class StopRequest:
  """Whether to save and exit after a step, once SIGTERM or Ctrl-C (SIGINT) arrived.

  One process: a handler sets a flag that the loop reads between steps; a
  signal before the first step stops the start-up at once (nothing to save),
  and a second Ctrl-C exits at once. Several processes: the signal may reach
  some of them, at different steps, yet the save is collective, so JAX's
  preemption sync manager (which catches SIGTERM itself and tells every
  process) picks one step for all; Ctrl-C is forwarded to it as SIGTERM.
  """

  def __init__(self):
    self._requested = False
    self._started = False
    self._multi_process = jax.process_count() > 1
    self._previous = {}
    signals = (signal.SIGINT,) if self._multi_process else (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
      self._previous[signum] = signal.signal(signum, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self._multi_process:
      os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption notifier takes it from here.
      return
    if not self._started:
      raise StoppedBeforeStart(signal.Signals(signum).name)
    if self._requested and signum == signal.SIGINT:
      raise KeyboardInterrupt  # The second Ctrl-C: exit now, without saving.
    self._requested = True
    if signum == signal.SIGINT:
      print("\nCtrl-C: saving after this step (press again to exit at once)",
            file=sys.stderr, flush=True)

  def start(self) -> None:
    """From here on a signal requests a save instead of stopping the start-up."""
    self._started = True

  def reached(self, step: int) -> bool:
    """True at the step to save and exit at; call once per step."""
    if self._multi_process:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested

  def restore(self):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)


def check_batch_layout(config, mesh) -> None:
  micro_batch = config.train.batch_size // config.optim.grad_accum
  dp = sharding.data_parallel_size(mesh)
  if micro_batch % dp:
    raise UserError(
        f"train.batch_size={config.train.batch_size} (micro-batch {micro_batch} with "
        f"optim.grad_accum={config.optim.grad_accum}) is not divisible by the data-parallel "
        f"size {dp} (mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']} x "
        f"expert={mesh.shape['expert']})")


def _training_rows(config) -> Callable[[dict], dict]:
  """What the trainer does to each host batch before it goes to the devices:
  a causal decoder's rows in the causal-balanced order when its sequences
  split over a context axis (``mesh.context_balance``; evaluation keeps their
  order: the masks compare positions, so both are exact)."""
  context = int(config.mesh.get("context", 1))
  if (context == 1 or not config.mesh.get("context_balance", True)
      or not families.get(config.model.family).is_causal_lm):
    return lambda batch: batch
  return lambda batch: context_parallel.balance_rows(batch, context, config.data.seq_len)


_all_finite = jax.jit(all_finite)


class Trainer:
  """One training run: builds everything from the config, then ``run()``.

  Nothing is written before the whole config is validated and the workdir's
  lock is taken (one trainer per workdir); ``config.json`` is written only
  once the run has its initial state, i.e. for a run that starts.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               on_metrics: Optional[Callable[[int, dict], None]] = None,
               devices: Optional[list] = None):
    """``on_metrics(step, record)`` sees every logged record (notebook plots);
    ``devices`` (default: all) are the ones ``config.mesh`` spans."""
    self._start_time = time.time()  # The session's start, for bigmodel.goodput.
    validate(config)
    validate_data_config(config, jax.process_count())
    if not storage.is_url(workdir):  # A URL's checkpoints are checked once copied down.
      check_resumable(run_lib.RunDir(workdir).checkpoints)  # Before the lock or a log is written.
    if "wandb" in tracker_names(config.train.trackers):
      WandbTracker.load()
    if config.lm_eval.every:  # Unknown tasks or unreadable task files: before any write.
      lm_eval_tasks.check_config(config)
    self.config, self.workdir, self.on_metrics = config, workdir, on_metrics
    self.mesh = sharding.make_mesh(config.mesh, devices)
    check_batch_layout(config, self.mesh)
    self.model = build_model(config.model, config.lora, training=True)
    # Evaluation and samples run without LoRA's dropout.
    self.eval_model = build_model(config.model, config.lora)
    self.objective = objectives.for_config(config, self.eval_model)
    self.optimizer, self.schedule = make_optimizer(config.optim, config.train.steps,
                                                   config.prune)
    # Shapes only, before anything is written (a LoRA target or freeze pattern
    # that matches nothing fails here); the resume check and restore share it.
    with sharding.activate(self.mesh):
      self._abstract_state, self._state_shardings = abstract_sharded_state(
          config, self.model, self.optimizer, self.mesh)
    self.is_writer = jax.process_index() == 0
    self.stop = StopRequest()  # From here a signal ends the start-up cleanly.
    self._lock: Optional[RunLock] = None
    self._log_file = None
    self.checkpointer = None
    self.remote, self._remote_lock, self._pushing = None, None, False
    # The base sources the checkpoints save instead of their arrays (bigmodel.run.base_source).
    self.bases: list[dict] = []
    try:
      if storage.is_url(workdir):
        # A workdir in an object store: the run works in its local mirror
        # (bigmodel.remote_workdir), after taking the store's lock and copying it down.
        self.remote, self._remote_lock, stale = remote_workdir.open_for_training(
            workdir, jax.process_index(), jax.process_count())
        if stale:
          print(f"took over the workdir lock: {stale}", flush=True)
        print(f"workdir {self.remote.url}, mirrored in {self.remote.local}", flush=True)
        self.workdir = workdir = self.remote.local
        check_resumable(run_lib.RunDir(self.remote.checkpoint_root).checkpoints)
      if self.is_writer:  # On several processes only the coordinator takes the lock.
        make_workdir(workdir)
        self._lock = RunLock(workdir)
        stale = self._lock.acquire()
        if stale:
          print(f"took over the workdir lock: {stale}", flush=True)
      self._log_file = console.add_log_file(run_lib.RunDir(workdir).log(jax.process_index()))
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices("bigmodel_workdir_locked")
      self.checkpointer = run_lib.checkpointer(self.remote.checkpoint_root if self.remote
                                               else workdir, keep=config.checkpoint.keep,
                                               keep_best=config.checkpoint.keep_best,
                                               async_save=config.checkpoint.async_save)
      self.data_changes = self._check_saved_config()
      self.datasets = build_datasets(config, workdir, jax.process_index(), jax.process_count())
    except BaseException:
      self._release()
      raise
    self.peak = flops.DevicePeak(config.train.peak_tflops_per_device, config.model.dtype)
    logging.info("peak %.1f TFLOP/s per device (%s)", self.peak.peak, self.peak.source)

  def _release(self) -> None:
    self.stop.restore()
    if self.checkpointer is not None:
      self.checkpointer.close()
    if self._log_file is not None:
      logging_std.getLogger().removeHandler(self._log_file)
      self._log_file.close()
    lost = any(lock is not None and lock.lost for lock in (self._lock, self._remote_lock))
    try:
      if self._pushing and not lost:  # The last checkpoint, metrics and log lines, up to the store.
        self.remote.flush()
    finally:
      if self._lock is not None:
        self._lock.release()
      if self._remote_lock is not None:
        self._remote_lock.release()

  def _check_saved_config(self) -> list[str]:
    """Compares the newest checkpoint's config with this one (see ``bigmodel.resume``)."""
    for step in reversed(self.checkpointer.all_steps()):
      try:
        saved = self.checkpointer.restore_config(step)
      except Exception:  # pylint: disable=broad-except
        continue  # A corrupt checkpoint: restoring reports it and uses an older one.
      with sharding.activate(self.mesh):
        return resume.check_saved_config(saved, self.config, step, self._abstract_state,
                                         self.mesh)
    return []

  def _initial_state(self):
    """The latest usable checkpoint (resharded onto this mesh), or a fresh state."""
    abstract_state, state_shardings = self._abstract_state, self._state_shardings
    train_iter = self.datasets.train_iter

    def accept_data_state(data_state):
      try:
        train_iter.set_state(data_state)
      except Exception:  # pylint: disable=broad-except
        if not self.data_changes:
          raise  # Same data: a state that does not load is a damaged checkpoint.
        print("the saved data position does not fit the changed data settings; reading "
              "the data from its start", flush=True)

    restored = self.checkpointer.restore_latest_usable(abstract_state, accept_data_state)
    if restored is None:
      state, _ = create_sharded_state(self.config, self.model, self.optimizer, self.mesh)
      if self.config.init_from:
        state, base = init_from_pretrained(state, self.config, self.mesh)
        self.bases = [base] if base else []
      if distill.enabled(self.config):
        state, teacher = distill.load_teacher(state, abstract_state.reference, self.config,
                                              self.mesh)
        self.bases += [] if self.config.checkpoint.self_contained else [teacher]
      return state, state_shardings
    step, state, _ = restored
    bases = self.checkpointer.base_sources(step)
    if bases:  # The frozen arrays it took from its init_from (or teacher).
      state = run_lib.fill_from_base(state, abstract_state, bases, self.mesh,
                                     f"checkpoint {step} of {self.workdir}")
      self.bases = [] if self.config.checkpoint.self_contained else bases
    print(f"resuming from the checkpoint at step {step} in {self.checkpointer.directory}",
          flush=True)
    return state, state_shardings

  def _save(self, state, step: int, metrics: dict[str, float]) -> None:
    if not bool(_all_finite(state.params)):
      raise UserError(f"the state at step {step} is not finite; not checkpointed")
    best_metric = {"eval_loss": metrics["eval_loss"]} if "eval_loss" in metrics else None
    if self.remote:  # The previous checkpoint's copy up, before retention may delete it.
      self.remote.wait()
    self.checkpointer.save(step, state, self.datasets.train_iter.get_state(), self.config,
                           metrics=best_metric, bases=tuple(self.bases))

  def run(self) -> dict[str, float]:
    """Trains up to ``train.steps``; returns the last logged metrics.

    The loop is "next batch -> step -> hooks" (``bigmodel.train_hooks``); a
    :class:`~bigmodel.goodput.Timeline` counts where the time goes.
    """
    config, mesh = self.config, self.mesh
    writer, profiler = None, None
    self._pushing = self.remote is not None  # From here on, what the run writes goes up.
    try:
      with sharding.activate(mesh):
        restore_start = time.perf_counter()
        state, state_shardings = self._initial_state()
        start_step = int(state.step)
        timeline = Timeline(start_step, self._start_time)
        timeline.add("restore", time.perf_counter() - restore_start)
        if self.is_writer:
          run_lib.write_config(config, run_lib.RunDir(self.workdir).config)
          writer = MetricsWriter(self.workdir, config.train.steps, config.train.progress,
                                 tracker_names(config.train.trackers), config.wandb,
                                 config.to_dict())
          if start_step:  # Readers keep the last record of a step logged twice.
            writer.write_event(start_step, resumed_from=start_step)
          writer.write_event(start_step, event="peak", peak_tflops_per_device=self.peak.peak,
                             peak_source=self.peak.source)
        num_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
        trainable = sum(x.size for x in jax.tree_util.tree_leaves(
            optim.partition(state.params, state.frozen)[0]))
        logging.info("model: %s, %.2fM parameters%s; mesh %s", config.model.family,
                     num_params / 1e6,
                     f" ({trainable / 1e6:.3f}M trained)" if state.frozen else "",
                     dict(mesh.shape))
        if config.print_sharding and self.is_writer:
          print(sharding.describe_shardings(state.params, state_shardings.params), flush=True)
        train_step_fn = jit_train_step(self.model, self.optimizer, self.schedule,
                                       config.optim.grad_accum, mesh, state_shardings,
                                       self.objective)
        eval_fn = jit_eval_step(self.eval_model, mesh, state_shardings.params,
                                objectives.for_evaluation(config, self.eval_model),
                                state_shardings.reference)
        rows = _training_rows(config)
        next_batch = lambda: sharding.global_batch(rows(next(self.datasets.train_iter)), mesh)  # noqa: E731
        first_batch = next_batch()
        hooks, log = self._hooks(state, first_batch, eval_fn, writer)
        profiler = StepProfiler(profile_steps(config.train.profile_steps, config.train.steps),
                                os.path.join(os.path.abspath(self.workdir), "profile"))
        timeline.add("startup", time.time() - self._start_time - sum(timeline.seconds.values()))

        self.stop.start()
        for step in range(start_step + 1, config.train.steps + 1):
          profiler.start(step)
          fetch_start = time.perf_counter()
          batch = first_batch if step == start_step + 1 else next_batch()
          step_start = time.perf_counter()
          state, metrics = train_step_fn(state, batch)
          if profiler.active(step):  # Its compute time, not just the dispatch.
            jax.block_until_ready(metrics)
          hooks_start = time.perf_counter()
          # The first step traces and compiles (then runs).
          step_category = "compile" if step == start_step + 1 else "step"
          timeline.add("data_wait", step_start - fetch_start)
          timeline.add(step_category, hooks_start - step_start)
          is_last = step == config.train.steps
          # Read once: a signal arriving later in this step must not make it
          # exit without the save that the flag promises.
          preempted = self.stop.reached(step)
          save_every = config.checkpoint.save_every
          outcome = StepOutcome(step, state, metrics, is_last, save=bool(
              is_last or preempted or (save_every and step % save_every == 0)))
          host_s = 0.0  # The hooks' time but evaluating and saving.
          for hook in hooks:
            hook_start = time.perf_counter()
            hook(outcome)
            category = getattr(hook, "timeline_category", step_category)
            timeline.add(category, time.perf_counter() - hook_start)
            host_s += (time.perf_counter() - hook_start) if category == step_category else 0.0
          profiler.add(step, data_wait=step_start - fetch_start,
                       compute=hooks_start - step_start, host=host_s,
                       eval_and_save=time.perf_counter() - hooks_start - host_s)
          self._report_profile(profiler.finish(step), step, writer)
          if preempted and not is_last:
            wait_start = time.perf_counter()
            self.checkpointer.wait()
            timeline.add("checkpoint", time.perf_counter() - wait_start)
            if writer:
              writer.write_event(step, **timeline.record(end="preempted"))
            print(f"preempted: saved the checkpoint at step {step}; exiting", flush=True)
            return log.last_metrics
          if writer and (outcome.record or outcome.save):
            writer.write_event(step, **timeline.record())
        wait_start = time.perf_counter()
        self.checkpointer.wait()
        timeline.add("checkpoint", time.perf_counter() - wait_start)

        # Every process takes part: generation is a computation over the global mesh.
        if (families.get(config.model.family).is_causal_lm and self.datasets.tokenizer is not None
            and config.train.sample_tokens > 0):
          sample_start = time.perf_counter()
          if writer:
            writer.end_line()
          print_sample(config, self.eval_model, state.params, self.datasets.tokenizer, mesh,
                       show=self.is_writer)
          timeline.add("sample", time.perf_counter() - sample_start)
        if writer:
          writer.write_event(config.train.steps, **timeline.record(end="finished"))
    finally:
      if profiler is not None:
        profiler.close()
      if writer:
        writer.close()
      if hasattr(self.datasets.train_iter, "close"):
        self.datasets.train_iter.close()  # Stops grain's worker processes, if any.
      self._release()
    return log.last_metrics

  def _report_profile(self, split: Optional[dict], step: int, writer) -> None:
    """Logs a finished profile's time split (metrics.jsonl and one console line)."""
    if split is None or not self.is_writer:
      return
    if writer:
      writer.write_event(step, **split)
    print(f"profiled steps {split['profile_steps']}: {split['profile_step_seconds']:.3f} s per "
          f"step, compute {split['profile_compute_share']:.1%}, data wait "
          f"{split['profile_data_wait_share']:.1%}, host {split['profile_host_share']:.1%}, "
          f"evaluation and saving {split['profile_eval_and_save_share']:.1%}; trace in "
          f"{split['profile_trace']}", flush=True)

  def _hooks(self, state, first_batch, eval_fn, writer) -> tuple[list, LogHook]:
    """The hooks, in order: metrics, evaluation, lock check, logging, checkpointing, sync."""
    config = self.config
    batch_shapes = self.objective.model_batch_shapes(
        {k: v.shape for k, v in first_batch.items()})
    model_config = ModelConfig.from_config(config.model)
    train_flops = flops.train_flops_per_step(model_config, batch_shapes)
    # The objective's extra forward passes (DPO's reference) are of the plain model.
    step_flops = (train_flops * self.objective.passes / 3 + flops.trainable_flops_correction(
        model_config, state.params, state.frozen, batch_shapes))
    if distill.enabled(config):  # The teacher's forward pass.
      step_flops += flops.train_flops_per_step(
          ModelConfig.from_config(distill.teacher_config(config).model), batch_shapes) / 3
    metrics_hook = MetricsHook(
        config.train, flops.tokens_per_batch(batch_shapes), step_flops,
        self.peak, nonfinite_at_start=int(state.opt_state.total_notfinite))
    hooks = [metrics_hook]
    if getattr(self.datasets.train_iter, "source_names", ()):
      hooks.append(SourceTokensHook(config.train.log_every,
                                    self.datasets.train_iter.source_tokens))
    if self.datasets.make_eval_iter:
      def run_eval(state):
        metrics = evaluate(eval_fn, state.params, self.datasets.make_eval_iter(), self.mesh,
                           reference=state.reference,
                           **classification_eval_args(config, self.datasets))
        return {**metrics, **self.datasets.eval_baselines}
      hooks.append(EvalHook(config.train.eval_every, run_eval,
                            after=metrics_hook.restart_interval))  # Eval is not step time.
    if config.lm_eval.every:
      def run_lm_eval(state):
        pieces = dict(model=self.eval_model, params=state.params, config=config,
                      tokenizer=self.datasets.tokenizer, mesh=self.mesh)
        return lm_eval_tasks.evaluate_config_tasks(pieces, config.lm_eval)
      hooks.append(EvalHook(config.lm_eval.every, run_lm_eval,
                            after=metrics_hook.restart_interval))
    sinks = [writer.write] if writer else []
    if self.on_metrics and self.is_writer:
      sinks.append(self.on_metrics)
    log = LogHook(sinks)
    hooks += [LockHook([self._lock, self._remote_lock]), log, CheckpointHook(self._save)]
    if self.remote:
      hooks.append(SyncHook(self.remote.push))
    return hooks, log


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) a run; returns the last logged metrics."""
  return Trainer(config, workdir).run()


def print_sample(config, model, params, tokenizer, mesh, show: bool = True) -> None:
  """Prints ``train.sample_prompt`` and a sampled continuation, cut at end-of-text.

  Every process of a multi-process run must call it (``show`` on one).
  """
  generator = Generator(model, params, config, tokenizer, mesh)
  completion, = generator.generate(
      config.train.sample_prompt, max_new_tokens=config.train.sample_tokens,
      temperature=config.train.sample_temperature, seed=config.train.seed + 1)
  if not show:
    return
  print("----- sample -----")
  print(config.train.sample_prompt + completion)
  print("------------------", flush=True)


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.require_flags("config", "workdir")
  distributed.initialize()  # Joins the other processes, if any, before devices are used.
  with distributed.failure_guard(), user_errors_exit():
    try:
      train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except StoppedBeforeStart as e:
      # The trainer released the lock and closed its files; see _exit_before_start.
      _exit_before_start(signal.Signals[str(e)], None)
    except CheckpointWriteError as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      if jax.process_count() > 1:
        sys.exit(CHECKPOINT_WRITE_FAILED)  # failure_guard tells the other processes.
      # orbax's abandoned write tasks would print tracebacks at interpreter
      # shutdown; the trainer has already released everything it holds.
      sys.stdout.flush()
      os._exit(CHECKPOINT_WRITE_FAILED)  # pylint: disable=protected-access


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
