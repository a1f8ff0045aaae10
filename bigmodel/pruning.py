r"""Magnitude pruning, unstructured or N:M, as one more optax transformation.

``--config.prune.method=magnitude`` zeroes the smallest-magnitude weights of
the targeted kernels (``prune.targets``, a regular expression searched in
parameter paths; by default every dense kernel of the layer stacks, never
embeddings, norms or biases), reaching ``prune.sparsity`` gradually on the
cubic schedule of Zhu & Gupta (2017, "To prune, or not to prune"):

    s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3,   s_i = 0,
    t0 = prune.start_step,  t0 + n dt = prune.end_step (0: train.steps),

with the masks recomputed every ``prune.every`` steps (and at ``end_step``).
``--config.prune.method=n_m`` keeps the ``prune.n`` largest of every
``prune.m`` consecutive weights along each kernel's input dimension (2:4 is
what sparse tensor cores run), in one step at ``start_step``: a pattern is all
or nothing per group, so there is no fraction to ramp.

Which weights survive is decided per kernel, and per layer of a scanned stack:
a stacked kernel [L, in..., out...] gets each layer's own threshold. A
kernel's input axes are its leading ones (``DenseGeneral`` contracts them):
all but the last when its output is the model width (``embed``: attention's
output projection [N, H, D]), else the first. N:M groups run along the last
input axis (H for [N, H, D]): consecutive along the flattened contraction
dimension K of ``x @ W``, which is the dimension sparse tensor cores compress.

The masks are optimizer state (``prune_masks`` sits last in the chain that
``optim.make_optimizer`` builds): checkpointed with it, so a resume continues
exactly, and boxed with their kernels' logical axes, so they are sharded like
them. Its update turns the chain's update into one that leaves every pruned
weight at exactly zero (``params + updates`` is ``p + (-p)``), weight decay
and momentum included. No sparse kernels are used: the model computes with
the zeros, as fast as dense.
"""
import math
import re
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bigmodel.errors import UserError
from bigmodel.sharding import path_name

METHODS = ("", "magnitude", "n_m")
# The dense kernels of the layer stacks (scanned ``blocks`` or unrolled
# ``blocks_3``, T5's encoder and decoder alike); LoRA's ``kernel_lora_*`` are not.
DEFAULT_TARGETS = r"blocks(_\d+)?/.*/kernel$"

# Magnitude thresholds are found by bisection over the bits of |w| as float32
# (for non-negative floats, the int32 bit pattern orders like the value): 32
# counting passes over a kernel, each a sharded reduction, where a sort would
# gather the kernel on one device. A pruned weight scores -1, below any |w|.
_PRUNED = -1
_INF_BITS = 0x7F800000
_BISECTIONS = 32


def enabled(prune_cfg) -> bool:
  return bool(prune_cfg is not None and prune_cfg.get("method", ""))


def end_step(prune_cfg, total_steps: int) -> int:
  """``prune.end_step``, 0 meaning the run's last step."""
  return int(prune_cfg.end_step) or int(total_steps)


def validate(prune_cfg, total_steps: int) -> None:
  """UserError (one line) for a bad ``config.prune`` setting; the ones that need
  the parameters (targets matching nothing, m not dividing an input
  dimension) fail when the optimizer state is built."""
  c = prune_cfg
  if c.method not in METHODS:
    raise UserError(f"--config.prune.method={c.method!r} is not one of: \"\" (off), magnitude, n_m")
  if not 0.0 <= c.sparsity < 1.0:
    raise UserError(f"prune.sparsity must be in [0, 1), got {c.sparsity}")
  if c.n < 1 or c.m < 2 or c.n >= c.m:
    raise UserError(f"prune.n={c.n}, prune.m={c.m}: N:M pruning keeps n of every m weights, "
                    "so it needs 1 <= n < m")
  if c.every < 1 or c.start_step < 0 or c.end_step < 0:
    raise UserError(f"prune.every must be >= 1 and prune.start_step, prune.end_step >= 0; got "
                    f"{c.every}, {c.start_step}, {c.end_step}")
  if end_step(c, total_steps) < c.start_step:
    raise UserError(f"prune.end_step={end_step(c, total_steps)}"
                    f"{'' if c.end_step else ' (train.steps)'} is before prune.start_step="
                    f"{c.start_step}")
  try:
    re.compile(c.targets)
  except re.error as e:
    raise UserError(f"prune.targets={c.targets!r} is not a regular expression: {e}") from e
  if not c.targets:
    raise UserError("prune.targets is empty; the default is the layer stacks' dense kernels, "
                    f"{DEFAULT_TARGETS!r}")


# --- The schedule -------------------------------------------------------------------------


def cubic_sparsity(step, final: float, start: int, end: int):
  """Zhu & Gupta's s_t from s_i = 0 at ``start`` to ``final`` at ``end`` (and after)."""
  progress = jnp.clip((step - start) / max(end - start, 1), 0.0, 1.0)
  progress = jnp.where(step >= end, 1.0, progress)  # end == start: one step to ``final``.
  return jnp.where(step < start, 0.0, final * (1.0 - (1.0 - progress) ** 3))


def is_update_step(step, prune_cfg, total_steps: int):
  """Whether the masks are recomputed in the update that makes ``step`` (1-based)."""
  start, end = int(prune_cfg.start_step), end_step(prune_cfg, total_steps)
  if prune_cfg.method == "n_m":
    return step == max(start, 1)
  return (step >= start) & (step <= end) & (((step - start) % prune_cfg.every == 0)
                                           | (step == end))


def target_sparsity(step, prune_cfg, total_steps: int):
  """The sparsity a mask update at ``step`` aims for."""
  if prune_cfg.method == "n_m":
    return jnp.float32(1.0 - prune_cfg.n / prune_cfg.m)
  return cubic_sparsity(step, prune_cfg.sparsity, int(prune_cfg.start_step),
                        end_step(prune_cfg, total_steps)).astype(jnp.float32)


def sparsity_after(step: int, prune_cfg, total_steps: int) -> float:
  """The scheduled sparsity of the masks after ``step`` updates (host side):
  the target of the latest mask update at or before ``step``, 0 before any."""
  updates = [t for t in range(1, step + 1) if bool(is_update_step(t, prune_cfg, total_steps))]
  return float(target_sparsity(updates[-1], prune_cfg, total_steps)) if updates else 0.0


# --- Which kernels, and their layout ------------------------------------------------------


class Layout(NamedTuple):
  """A targeted kernel's axes: ``stacked`` has a leading [layers] axis, then
  ``inputs`` input axes, then the output axes."""
  stacked: bool
  inputs: int

  def group_axis(self) -> int:
    """The axis N:M groups run along: the last input axis."""
    return int(self.stacked) + self.inputs - 1


def layout_of(param: Any) -> Layout:
  """From the logical axis names a parameter is boxed with at init. Without
  names (not a bigmodel model's init): one unstacked kernel, one input axis."""
  names = tuple(getattr(param, "names", None) or ())
  shape = np.shape(getattr(param, "value", param))
  stacked = bool(names) and names[0] == "layers"
  axes, ndim = names[int(stacked):], len(shape) - int(stacked)
  inputs = ndim - 1 if ndim > 2 and axes and axes[-1] == "embed" else 1
  return Layout(stacked, inputs)


def _is_box(x: Any) -> bool:
  return isinstance(x, nn.Partitioned)


def targeted(tree: Any, pattern: str) -> Any:
  """``tree``'s structure (boxes as leaves) with True at the parameters ``pattern``
  finds; UserError when it finds none, or finds one that is not a matrix."""
  def pick(path, x):
    name = path_name(path)
    if not re.search(pattern, name):
      return False
    value = getattr(x, "value", x)
    if np.ndim(value) - int(layout_of(x).stacked) < 2:
      raise UserError(f"prune.targets={pattern!r} matches {name} {tuple(np.shape(value))}, "
                      "which is not a matrix; target kernels (e.g. '/kernel$')")
    return True
  marks = jax.tree_util.tree_map_with_path(pick, tree, is_leaf=_is_box)
  if not any(jax.tree_util.tree_leaves(marks)):
    names = [path_name(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_box)[0]]
    raise UserError(f"prune.targets={pattern!r} matches no trainable parameter; parameters: "
                    f"{', '.join(names[:12])}{' ...' if len(names) > 12 else ''}")
  return marks


# --- The masks as optimizer state ---------------------------------------------------------


@flax.struct.dataclass
class KernelMask:
  """One targeted kernel's mask: ``keep`` (bool, the kernel's shape and logical
  axes; False = pruned), its layout and its N:M ``pattern`` ((n, m); () for
  magnitude). These are static, part of the tree structure: a resume with
  another pattern is refused (its masks, applied once, would never change)."""
  keep: Any
  stacked: bool = flax.struct.field(pytree_node=False, default=False)
  inputs: int = flax.struct.field(pytree_node=False, default=1)
  pattern: tuple = flax.struct.field(pytree_node=False, default=())


class PruneState(NamedTuple):
  count: jax.Array     # int32 []: updates made so far (the step this one makes, less one).
  sparsity: jax.Array  # float32 []: pruned fraction of the targeted weights, as of now.
  masks: Any           # KernelMask per targeted kernel (optax.MaskedNode elsewhere).


def _is_mask(x: Any) -> bool:
  return isinstance(x, KernelMask)


def _layer_axes(x: jax.Array, stacked: bool) -> tuple[int, ...]:
  """The axes one layer's threshold is taken over."""
  return tuple(range(int(stacked), x.ndim))


def magnitude_keep(keep: jax.Array, w: jax.Array, sparsity: jax.Array,
                   stacked: bool) -> jax.Array:
  """``keep`` with the smallest |w| pruned up to round(sparsity * size) per layer.

  keep, w: [L, ...] (``stacked``) or [...]. Pruned weights stay pruned. Ties at
  the threshold (equal magnitudes, rare in trained floats) are pruned together.
  """
  axes = _layer_axes(w, stacked)
  size = math.prod(w.shape[a] for a in axes)
  score = jnp.where(keep, jax.lax.bitcast_convert_type(jnp.abs(w.astype(jnp.float32)),
                                                       jnp.int32), _PRUNED)
  k = jnp.floor(sparsity * size + 0.5).astype(jnp.int32)  # Weights to prune per layer.
  lead = w.shape[:1] if stacked else ()
  expand = lambda t: t.reshape(lead + (1,) * len(axes))  # noqa: E731

  # Invariant: count(score <= lo) < k <= count(score <= hi); hi ends the least such.
  def bisect(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    enough = jnp.sum(score <= expand(mid), axis=axes, dtype=jnp.int32) >= k
    return jnp.where(enough, lo, mid), jnp.where(enough, mid, hi)

  _, hi = jax.lax.fori_loop(0, _BISECTIONS, bisect,
                            (jnp.full(lead, _PRUNED - 1, jnp.int32),
                             jnp.full(lead, _INF_BITS, jnp.int32)))
  threshold = jnp.where(k > 0, hi, _PRUNED - 1)
  return keep & (score > expand(threshold))


def n_m_keep(keep: jax.Array, w: jax.Array, n: int, m: int, axis: int) -> jax.Array:
  """``keep`` with only the ``n`` largest |w| of every ``m`` consecutive along ``axis``.

  keep, w: [..., D, ...] with m dividing D. The rank of each weight in its
  group is counted with m elementwise comparisons (no sort, no m-fold copy);
  among equal magnitudes the earlier wins.
  """
  shape = w.shape
  grouped = shape[:axis] + (shape[axis] // m, m) + shape[axis + 1:]
  mag = jnp.where(keep, jnp.abs(w.astype(jnp.float32)), -1.0).reshape(grouped)
  position = jax.lax.broadcasted_iota(jnp.int32, grouped, axis + 1)
  rank = jnp.zeros(grouped, jnp.int32)
  for j in range(m):
    other = jax.lax.slice_in_dim(mag, j, j + 1, axis=axis + 1)
    rank += ((other > mag) | ((other == mag) & (j < position))).astype(jnp.int32)
  return keep & (rank < n).reshape(shape)


def _pruned_fraction(masks: Any) -> jax.Array:
  """float32 []: pruned weights over targeted weights (counted, so exactly 0 at first)."""
  masks = [mk for mk in jax.tree_util.tree_leaves(masks, is_leaf=_is_mask) if _is_mask(mk)]
  pruned = sum(jnp.sum(~mk.keep, dtype=jnp.float32) for mk in masks)
  return (pruned / sum(mk.keep.size for mk in masks)).astype(jnp.float32)


def _masks_transform(prune_cfg, total_steps: int) -> optax.GradientTransformation:
  """The masks' transformation over the targeted kernels only (``prune_masks``)."""
  method, n, m = prune_cfg.method, int(prune_cfg.n), int(prune_cfg.m)

  def init(params):
    def make(path, param):
      layout = layout_of(param)
      shape = np.shape(getattr(param, "value", param))
      if method == "n_m" and shape[layout.group_axis()] % m:
        raise UserError(f"prune.m={m} does not divide the input dimension of "
                        f"{path_name(path)} {tuple(shape)} (axis {layout.group_axis()}: "
                        f"{shape[layout.group_axis()]}); N:M groups run along it")
      # A tree_map over the box keeps its logical axes: sharded like the kernel.
      keep = jax.tree_util.tree_map(lambda v: jnp.ones(np.shape(v), jnp.bool_), param)
      return KernelMask(keep, layout.stacked, layout.inputs, (n, m) if method == "n_m" else ())
    masks = jax.tree_util.tree_map_with_path(make, params, is_leaf=_is_box)
    return PruneState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32), masks)

  def recompute(masks, updates, params, step):
    sparsity = target_sparsity(step, prune_cfg, total_steps)

    def one(mk, u, p):
      w = p.astype(jnp.float32) + u.astype(jnp.float32)  # The weight this update makes.
      if mk.pattern:
        keep = n_m_keep(mk.keep, w, *mk.pattern, Layout(mk.stacked, mk.inputs).group_axis())
      else:
        keep = magnitude_keep(mk.keep, w, sparsity, mk.stacked)
      return mk.replace(keep=keep)
    masks = jax.tree_util.tree_map(one, masks, updates, params, is_leaf=_is_mask)
    return masks, _pruned_fraction(masks)

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("pruning needs the parameters (optax.apply_updates' params)")
    step = state.count + 1
    masks, sparsity = jax.lax.cond(
        is_update_step(step, prune_cfg, total_steps),
        lambda: recompute(state.masks, updates, params, step),
        lambda: (state.masks, state.sparsity))
    # p + (-p) is exactly +0.0 in IEEE arithmetic, whatever the chain proposed.
    updates = jax.tree_util.tree_map(lambda mk, u, p: jnp.where(mk.keep, u, -p),
                                     masks, updates, params, is_leaf=_is_mask)
    return updates, PruneState(step, sparsity, masks)

  return optax.GradientTransformation(init, update)


def prune_masks(prune_cfg, total_steps: int) -> optax.GradientTransformation:
  """The pruning transformation: last in the optimizer chain (``optim.make_optimizer``).

  Parameters other than the targets pass through (``optax.masked``).
  """
  return optax.masked(_masks_transform(prune_cfg, total_steps),
                      lambda tree: targeted(tree, prune_cfg.targets))


def find_state(opt_state: Any) -> PruneState | None:
  """The ``PruneState`` inside an optimizer state, if pruning is on."""
  found = [x for x in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda x: isinstance(x, PruneState)) if isinstance(x, PruneState)]
  return found[0] if found else None


def step_metrics(opt_state: Any) -> dict[str, jax.Array]:
  """``{"sparsity": the targeted kernels' pruned fraction}`` with pruning on, else {}."""
  state = find_state(opt_state)
  return {} if state is None else {"sparsity": state.sparsity}


# --- The per-kernel report ----------------------------------------------------------------


def _kernel_counts(w: jax.Array, stacked: bool, n: int, m: int, axis: int
                   ) -> tuple[jax.Array, jax.Array]:
  """(zeros per layer [L] or [1], groups of m along ``axis`` with more than m - n
  nonzeros); the second is -1 where m does not divide that axis."""
  zeros = jnp.sum(w == 0, axis=_layer_axes(w, stacked), dtype=jnp.int32).reshape(-1)
  if not m or w.shape[axis] % m:
    return zeros, jnp.int32(-1)
  grouped = w.shape[:axis] + (w.shape[axis] // m, m) + w.shape[axis + 1:]
  nonzero = jnp.sum(w.reshape(grouped) != 0, axis=axis + 1)
  return zeros, jnp.sum(nonzero > n, dtype=jnp.int32)


def run_report(workdir: str, step: int | None = None) -> str:
  """``sparsity_report`` of a run's checkpoint ``step`` (default: the latest);
  what ``python -m bigmodel.export --sparsity_report`` prints."""
  # Imported here: reading runs needs the checkpoint stack, the optimizer does not.
  from bigmodel import run as run_lib  # pylint: disable=g-import-not-at-top
  from bigmodel.models import family_of  # pylint: disable=g-import-not-at-top
  run = run_lib.load_run(workdir, step)
  # The logical axes (the layer stack's axis, the inputs) of the run's
  # parameters: shapes only.
  inputs = family_of(run.model).example_inputs(run.model.config, run.config.data.seq_len)
  boxed = jax.eval_shape(lambda: run.model.init(jax.random.key(0), *inputs)["params"])
  return f"step {run.step} of {workdir}\n" + sparsity_report(run.params, boxed, run.config.prune)


def sparsity_report(params: Any, boxed: Any, prune_cfg) -> str:
  """A table of each targeted kernel's zero fraction (per-layer range for a stack)
  and, for an N:M run, the groups breaking the pattern. ``boxed``: the model's
  abstract parameters with their logical axes (for the layouts)."""
  pattern = prune_cfg.targets if enabled(prune_cfg) else DEFAULT_TARGETS
  n_m = prune_cfg.method == "n_m"
  n, m = (int(prune_cfg.n), int(prune_cfg.m)) if n_m else (0, 0)
  layouts = {path_name(p): layout_of(x) for p, x in jax.tree_util.tree_flatten_with_path(
      boxed, is_leaf=_is_box)[0]}
  rows, zeros_all, size_all, broken_all = [], 0, 0, 0
  for path, w in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = path_name(path)
    if not re.search(pattern, name):
      continue
    layout = layouts.get(name, Layout(False, 1))
    zeros, broken = jax.jit(_kernel_counts, static_argnums=(1, 2, 3, 4))(
        w, layout.stacked, n, m, layout.group_axis())
    zeros, broken = np.asarray(zeros), int(broken)
    per_layer = w.size // len(zeros)
    fractions = zeros / per_layer
    layers = (f"{fractions.min():.4f}..{fractions.max():.4f}" if layout.stacked else "-")
    pattern_col = ("-" if not n_m else f"{n}:{m} ok" if broken == 0
                   else f"m does not divide {w.shape[layout.group_axis()]}" if broken < 0
                   else f"{broken} groups broken")
    rows.append((name, str(tuple(w.shape)), f"{zeros.sum() / w.size:.4f}", layers, pattern_col))
    zeros_all, size_all = zeros_all + int(zeros.sum()), size_all + w.size
    broken_all += max(broken, 0) if n_m else 0
  if not rows:
    raise UserError(f"prune.targets={pattern!r} matches no parameter of this run")
  header = ("kernel", "shape", "sparsity", "per layer", "N:M" if n_m else "pattern")
  widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
  lines.append(f"total: {zeros_all / size_all:.4f} of {size_all:,} targeted weights are zero"
               + (f"; {broken_all} groups break {n}:{m}" if n_m else ""))
  return "\n".join(lines)
