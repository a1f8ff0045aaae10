"""Checkpoints that never lose work: orbax ``CheckpointManager`` under ``WORKDIR/checkpoints``.

A checkpoint holds everything needed to continue exactly: the train state
(parameters, optimizer state, step, dropout key), the data iterator's position
and the resolved config. A *parameters-only* checkpoint (``save_params``: what
``bigmodel.convert --from_hf`` writes) holds the parameters and the config: it
is read by ``restore_params`` (generation, evaluation, export, ``init_from``),
and training refuses to resume from it. Saves are asynchronous and atomic (orbax writes to a
temporary directory and renames it when complete, so a half-written checkpoint
is never picked up). Restoring reshards onto whatever mesh the restoring run
uses.

A run whose frozen arrays come unchanged from other runs' checkpoints (the
``init_from`` parameters that stay frozen: LoRA's base, ``optim.freeze``;
DPO's reference copy; a distillation teacher) saves checkpoints that *point
to* those *base* checkpoints instead of repeating them: the arrays are left
out, and a ``base`` item lists each source (its workdir, step, a fingerprint
of its digests, and the paths it provides in ``params`` and in
``reference``). Restoring such a checkpoint here gives those places as
``None``; ``bigmodel.run`` fills them from the sources.
"""
import os
import shutil
from typing import Any, Callable, Optional

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from bigmodel import storage
from bigmodel.errors import UserError
from bigmodel.sharding import path_name

# The JSON items of a checkpoint, next to its arrays ("state").
_JSON_ITEMS = ("data", "config", "digests", "params_only", "base")
# A save needs the state's size free on disk, plus this margin (metadata, JSON).
_SPACE_MARGIN_BYTES = 16 << 20


class CheckpointWriteError(Exception):
  """A checkpoint could not be written (e.g. a full disk): the run stops, exit 3.

  Not a :class:`UserError` (the input was fine), but reported the same way:
  one ``error:`` line; the earlier checkpoints are intact.
  """


def _as_uint32(x: jax.Array) -> jax.Array:
  """The raw bits of ``x`` as uint32 words (one per element; two for 8-byte types)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if jnp.issubdtype(x.dtype, jnp.integer) and jnp.iinfo(x.dtype).bits == 4:
    # int4 (bigmodel.quantize's kernels): bitcast needs whole bytes; widening
    # keeps every value, hence every bit, distinct.
    return jax.lax.bitcast_convert_type(x.astype(jnp.int32), jnp.uint32)
  size = x.dtype.itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # Adds a trailing axis of 2.
  unsigned = {1: jnp.uint8, 2: jnp.uint16}[size]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf_digest(x: jax.Array) -> jax.Array:
  """Two wrapping uint32 sums of the bits: plain, and weighted by odd position
  weights. Any single flipped bit changes the plain sum (by +-2^k, never 0 mod
  2^32); the weighted one also catches swapped elements. Elementwise work and
  a reduction: it stays sharded like ``x``, unlike a host-side hash (orbax's
  tensorstore files carry no checksum of their own)."""
  bits = _as_uint32(x)
  index = jnp.zeros(bits.shape, jnp.uint32)
  for axis in range(bits.ndim):
    stride = int(np.prod(bits.shape[axis + 1:], dtype=np.int64)) % (1 << 32)
    index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride)
  weights = index * jnp.uint32(2) + jnp.uint32(1)
  # One variadic reduction: XLA computes the bits, weights and both sums in
  # one loop. Two separate sums made XLA:CPU materialise array-sized
  # temporaries (2 GB for a 1 GB leaf, kept by the allocator afterwards).
  zero = jnp.uint32(0)
  plain, weighted = jax.lax.reduce(
      (bits, bits * weights), (zero, zero),
      lambda a, b: (a[0] + b[0], a[1] + b[1]), tuple(range(bits.ndim)))
  return jnp.stack([plain, weighted])


_jit_leaf_digest = jax.jit(_leaf_digest)


def state_digests(saveable_state: Any) -> dict[str, list[int]]:
  """``{leaf path: [sum, weighted sum]}`` of every array of a saveable state.

  One leaf at a time: a digest's temporaries (the bits and their weights) are
  the size of its array, so digesting the whole tree in one computation would
  hold two more copies of the state at once.
  """
  flat = jax.tree_util.tree_flatten_with_path(saveable_state)[0]
  # Each read before the next dispatch: several processes' digests are
  # collectives, and dispatching them all first aborted a 2-process save (gloo).
  return {jax.tree_util.keystr(path):
          [int(v) for v in np.asarray(_jit_leaf_digest(x).addressable_data(0))]
          for path, x in flat}


def _check_digests(saved: dict[str, list[int]], actual: dict[str, list[int]],
                   whole_tree: bool) -> None:
  """ValueError if an array's digest is not the saved one (``whole_tree``: and
  the saved digests name exactly these arrays)."""
  changed = sorted(k for k in actual if saved.get(k) != actual[k])
  if changed or (whole_tree and set(saved) != set(actual)):
    raise ValueError(f"the arrays {', '.join(changed) or '(tree)'} do not match the "
                     "digests saved with them: the checkpoint is corrupt")


def _state_nbytes(state: Any) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state)
             if hasattr(x, "dtype"))


def _to_saveable(state: Any) -> Any:
  """Typed PRNG keys are stored as their raw uint32 data (abstract or concrete)."""
  rng = state.rng
  if isinstance(rng, jax.ShapeDtypeStruct):
    data = jax.eval_shape(jax.random.key_data, rng)
    return state.replace(rng=jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=rng.sharding))
  return state.replace(rng=jax.random.key_data(rng))


def _from_saveable(state: Any) -> Any:
  return state.replace(rng=jax.random.wrap_key_data(state.rng))


def with_holes(tree: Any, paths: list[str]) -> Any:
  """``tree`` with None at the leaves named by ``paths`` (``a/b/kernel``)."""
  paths = set(paths)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: None if path_name(p) in paths else x, tree)


def provided_paths(bases: list[dict[str, Any]], where: str) -> list[str]:
  """The paths in ``where`` ("params" or "reference") that base sources provide."""
  return [path for source in bases for path in source[where]]


def without_base(state: Any, bases: list[dict[str, Any]]) -> Any:
  """A train state less the arrays that base sources (``bigmodel.run.base_source``)
  provide: their ``params`` paths in ``state.params``, their ``reference``
  paths in ``state.reference`` (DPO's frozen copy, a distillation teacher)."""
  if not bases:
    return state
  reference = state.reference
  if reference is not None:
    reference = with_holes(reference, provided_paths(bases, "reference"))
  return state.replace(params=with_holes(state.params, provided_paths(bases, "params")),
                       reference=reference)


def _params_only(directory: str, step: int) -> bool:
  """Whether checkpoint ``step`` in ``directory`` is parameters-only (``save_params``)."""
  return (epath.Path(directory) / str(step) / "params_only").exists()


def check_resumable(directory: str, step: Optional[int] = None) -> None:
  """UserError if checkpoint ``step`` (default: the newest) in ``directory`` (a
  folder or a ``gs://`` URL) is parameters-only: training cannot resume from
  it. Reads no array."""
  if step is None:
    folder = epath.Path(directory)
    steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.exists() else []
    if not steps:
      return
    step = max(steps)
  if _params_only(directory, step):
    # bigmodel.quantize's output is parameters-only too, but no run starts from it.
    from bigmodel.models.quantization import saved_weight_bits  # pylint: disable=g-import-not-at-top
    bits = saved_weight_bits("" if storage.is_url(directory)
                             else os.path.dirname(os.path.abspath(directory)))
    if bits:
      raise UserError(
          f"the checkpoint at step {step} in {directory} holds int{bits} weight-quantized "
          "parameters (bigmodel.quantize): they load for generation and evaluation only, "
          "nothing trains from them; train the float run they were made from")
    raise UserError(
        f"the checkpoint at step {step} in {directory} holds parameters only (a converted "
        "model: no optimizer state or data position to resume); train from it in a new "
        "workdir with --config.init_from=WORKDIR")


class Checkpointer:
  """Saves and restores a run's checkpoints.

  Args:
    directory: Where the checkpoints live (``bigmodel.run``: WORKDIR/checkpoints):
      a folder, or a ``gs://`` URL that orbax (tensorstore) writes to itself,
      from every process of the run (``bigmodel.remote_workdir``).
    unusable_directory: Where unusable checkpoints are moved when an older one
      is used (never deleted).
    keep: How many of the latest checkpoints to keep.
    keep_best: Also keep the checkpoint with the lowest ``eval_loss``.
    async_save: Write in a background thread while training continues.
    save_concurrent_gb: At most this many GB of arrays copied to the host at
      once while saving (default: orbax's).
  """

  def __init__(self, directory: str, unusable_directory: str, *, keep: int,
               keep_best: bool = False, async_save: bool = True, read_only: bool = False,
               save_concurrent_gb: Optional[float] = None):
    if keep < 1:  # LatestN(0) would delete every checkpoint, the newest included.
      raise UserError(f"checkpoint.keep={keep} must be >= 1")
    if storage.is_url(directory):
      storage.share_gcs_endpoint()
      self.directory = directory
    else:
      self.directory = os.path.abspath(directory)
    self.unusable_directory = unusable_directory
    self._pending_step = -1  # The step of the save in flight, for its error message.
    policies = [checkpoint_managers.LatestN(n=keep)]
    if keep_best:
      policies.append(checkpoint_managers.BestN(
          get_metric_fn=lambda metrics: metrics["eval_loss"], reverse=True, n=1,
          keep_checkpoints_without_metrics=False))
    # A writer removes the temporary folders of saves that a kill interrupted;
    # a reader (evaluate, export) must not: a live run may be writing them.
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, create=not read_only, read_only=read_only,
        cleanup_tmp_directories=not read_only)
    # save_concurrent_gb bounds the host copies a save holds at once (a writer
    # that never restores; the default handler allows 96 GB).
    handlers = None
    if save_concurrent_gb is not None:
      handlers = {name: ocp.JsonCheckpointHandler() for name in _JSON_ITEMS}
      handlers["state"] = ocp.StandardCheckpointHandler(save_concurrent_gb=save_concurrent_gb)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers=handlers)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict[str, Any],
           config: ml_collections.ConfigDict, metrics: Optional[dict[str, float]] = None,
           bases: tuple[dict[str, Any], ...] = ()) -> None:
    """Starts saving ``state`` at ``step``; returns once arrays are copied off device.

    Also saves a digest of every array, checked at restore. ``bases`` (base
    sources, ``bigmodel.run.base_source``): the arrays they provide are left
    out and the sources are saved instead.

    Raises:
      CheckpointWriteError: too little free space, or the write failed (the
        partial temporary folder is removed; earlier checkpoints are intact).
    """
    self.wait()  # An earlier async save's failure surfaces here, naming its own step.
    self._pending_step = step
    saveable = _to_saveable(without_base(state, list(bases)))
    needed = _state_nbytes(saveable) + _SPACE_MARGIN_BYTES
    free = self._free_bytes()
    if free is not None and free < needed:
      raise CheckpointWriteError(
          f"not enough free space to save the checkpoint at step {step} in {self.directory}: "
          f"{free / 2**20:.1f} MiB free, about {needed / 2**20:.1f} MiB needed; the earlier "
          "checkpoints are intact")
    items = dict(state=ocp.args.StandardSave(saveable), data=ocp.args.JsonSave(data_state),
                 config=ocp.args.JsonSave(config.to_dict()),
                 digests=ocp.args.JsonSave(state_digests(saveable)))
    if bases:
      items["base"] = ocp.args.JsonSave({"sources": list(bases)})
    try:
      self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._write_failed(step, e)

  def _free_bytes(self) -> Optional[int]:
    """Free space where the checkpoints go; None for an object store (no such limit)."""
    return None if storage.is_url(self.directory) else shutil.disk_usage(self.directory).free

  def _write_failed(self, step: int, error: Exception) -> None:
    """Removes the partial save and raises one clear ``CheckpointWriteError``."""
    # A bucket's unfinished save has no temporary name (orbax marks a finished
    # one with commit_success.txt instead): the next writer's start-up drops it.
    for tmp in epath.Path(self.directory).glob(f"{step}.orbax-checkpoint-tmp*"):
      tmp.rmtree(missing_ok=True)
    reason = " ".join(str(error).split())
    for known in ("No space left on device", "File too large", "Disk quota exceeded",
                  "Read-only file system", "Permission denied"):
      if known in reason:
        reason = known
        break
    free = self._free_bytes()
    space = "" if free is None else f" ({free / 2**20:.1f} MiB free)"
    raise CheckpointWriteError(
        f"writing the checkpoint at step {step} to {self.directory} failed: {reason[:300]}"
        f"{space}; the earlier checkpoints are intact") from None

  def is_saving(self) -> bool:
    """True while an async save is still being written."""
    return self._manager.is_saving_in_progress()

  def wait(self) -> None:
    """Blocks until every started save is durable on disk.

    Raises:
      CheckpointWriteError: a background save failed.
    """
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._write_failed(self._pending_step, e)

  def close(self) -> None:
    self._manager.close()

  def _has_item(self, step: int, name: str) -> bool:
    return (epath.Path(self.directory) / str(step) / name).exists()

  def base_sources(self, step: int) -> list[dict[str, Any]]:
    """The base sources of checkpoint ``step``; [] when it holds every array."""
    if not self._has_item(step, "base"):
      return []
    return self._manager.restore(step, args=ocp.args.Composite(
        base=ocp.args.JsonRestore()))["base"]["sources"]

  def saved_digests(self, step: int) -> Optional[dict[str, list[int]]]:
    """The digests saved with checkpoint ``step`` (None for a checkpoint without)."""
    if not self._has_item(step, "digests"):
      return None
    return self._manager.restore(step, args=ocp.args.Composite(
        digests=ocp.args.JsonRestore()))["digests"]

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores checkpoint ``step`` onto ``abstract_state``'s shardings.

    The arrays base sources provide (``base_sources``) come back as None.

    Raises:
      ValueError: an array does not match the digest saved with it.
    """
    abstract_state = without_base(abstract_state, self.base_sources(step))
    items = dict(state=ocp.args.StandardRestore(_to_saveable(abstract_state)),
                 data=ocp.args.JsonRestore())
    has_digests = self._has_item(step, "digests")
    if has_digests:  # Checkpoints written before digests existed have none.
      items["digests"] = ocp.args.JsonRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    if has_digests:
      _check_digests(restored["digests"], state_digests(restored["state"]), whole_tree=True)
    return _from_saveable(restored["state"]), restored["data"]

  def save_params(self, step: int, params: Any, config: ml_collections.ConfigDict) -> None:
    """Saves a parameters-only checkpoint (no optimizer state, no data position).

    Arrays are written from where they live (sharded, on device): nothing is
    gathered or copied on the host first.
    """
    self.wait()
    self._pending_step = step
    saveable = {"params": params}
    try:
      self._manager.save(
          step, args=ocp.args.Composite(
              state=ocp.args.StandardSave(saveable), config=ocp.args.JsonSave(config.to_dict()),
              digests=ocp.args.JsonSave(state_digests(saveable)),
              params_only=ocp.args.JsonSave({"params_only": True})), force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._write_failed(step, e)

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """The parameters of checkpoint ``step`` (full or parameters-only), onto
    ``abstract_params``' shardings; the optimizer state is never read. Those
    base sources provide come back as None.

    Raises:
      ValueError: an array does not match the digest saved with it.
    """
    abstract_params = with_holes(abstract_params,
                                 provided_paths(self.base_sources(step), "params"))
    target = {"params": abstract_params}
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, target)
    items = dict(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target, shardings),
        partial_restore=True))
    has_digests = self._has_item(step, "digests")
    if has_digests:
      items["digests"] = ocp.args.JsonRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    params = restored["state"]["params"]
    if has_digests:
      # A full checkpoint names its leaves .params[...] (a TrainState), a
      # parameters-only one ['params'][...] (a dict).
      prefix = "['params']" if _params_only(self.directory, step) else ".params"
      actual = {prefix + k[len("['params']"):]: v
                for k, v in state_digests({"params": params}).items()}
      _check_digests(restored["digests"], actual, whole_tree=False)
    return params

  def restore_config(self, step: int) -> dict[str, Any]:
    return self._manager.restore(
        step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def restore_latest_usable(
      self, abstract_state: Any, accept_data_state: Callable[[dict], None] = lambda _: None,
  ) -> Optional[tuple[int, Any, dict]]:
    """Restores the newest checkpoint that loads; None when there is none.

    A checkpoint that fails to load (or whose data-iterator state
    ``accept_data_state`` rejects by raising) is reported on one line and the
    previous one is tried. Once a usable one is found, the unusable newer ones
    are moved to ``WORKDIR/checkpoints_unusable`` so training can save those
    steps again. If none loads, raises ``UserError`` and touches nothing.
    """
    failures = []
    for step in reversed(self.all_steps()):
      check_resumable(self.directory, step)
      try:
        state, data_state = self.restore(step, abstract_state)
        accept_data_state(data_state)
      except Exception as e:  # pylint: disable=broad-except
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        logging.warning("checkpoint at step %d is unusable (%s); trying the previous one",
                        step, reason)
        print(f"checkpoint at step {step} is unusable ({reason[:160]}); trying the previous one",
              flush=True)
        failures.append((step, reason))
        continue
      for bad_step, _ in failures:
        self._move_aside(bad_step)
      return step, state, data_state
    if failures:
      raise UserError(f"no usable checkpoint in {self.directory}: " + "; ".join(
          f"step {s}: {r[:120]}" for s, r in failures))
    return None

  def _move_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      target = epath.Path(self.unusable_directory)
      # The same step may be set aside again after a later run saves it anew:
      # every copy gets its own name, so setting aside never fails.
      name, n = str(step), 1
      while (target / name).exists():
        name, n = f"{step}.{n}", n + 1
      source = os.path.join(self.directory, str(step))
      if storage.is_url(self.directory):  # A bucket has no folders to rename.
        fs, path = storage.filesystem(source)
        storage.request(source, fs.mv, path, storage.filesystem(str(target / name))[1],
                        recursive=True)
      else:
        target.mkdir(parents=True, exist_ok=True)
        shutil.move(source, str(target / name))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"bigmodel_move_aside_{step}")
    self._manager.reload()
