"""Device meshes and logical-axis sharding rules (what pjit is today).

Parameters and activations are annotated with logical axis names by the
models; ``LOGICAL_AXIS_RULES`` maps those names onto the mesh axes ``data``,
``fsdp``, ``context`` and ``tensor``. ``mesh.rules`` in the config overrides some of them
(config data, as in MaxText and the Flax examples), e.g.
``--config.mesh.rules="embed=none,mlp=fsdp+tensor"``; a mesh made by
``make_mesh`` carries its config's rules to ``activate`` and
``logical_to_shardings``. The mesh uses ``AxisType.Auto`` deliberately: GSPMD
propagates shardings between the annotated points, as in MaxText, instead of
JAX 0.10's default explicit mode that would need an output sharding on every
op whose contracting dimension is sharded.
"""
import contextlib
import math
from typing import Any, Iterator, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bigmodel.errors import UserError

# context sits next to tensor: both talk every layer, so they get the
# closest devices (create_device_mesh fills the last axes first).
MESH_AXES = ("data", "fsdp", "expert", "context", "tensor")
# The mesh axis that splits sequences (context parallelism).
CONTEXT_AXIS = "context"
# The mesh axis that splits a layer's experts (expert parallelism). Outside
# the expert layers its devices split the batch, as data's do (MaxText).
EXPERT_AXIS = "expert"
BATCH_AXES = ("data", "fsdp", EXPERT_AXIS)
# Axes a config may leave out (1): configs saved before they existed.
_OPTIONAL_AXES = (EXPERT_AXIS, CONTEXT_AXIS)

LOGICAL_AXIS_RULES = (
    # Activations: the batch splits over data and fsdp; tensor parallelism
    # splits heads and the mlp width (Megatron style).
    ("batch", BATCH_AXES),
    # Context parallelism splits the sequence; attention then runs as a ring
    # (or an all-gather) over the context axis (models/context_parallel.py).
    ("length", CONTEXT_AXIS),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_vocab", "tensor"),
    # Expert layers (models/moe.py): routed tokens in groups, one per batch
    # shard; moving a group's expert inputs from its batch shard to the
    # expert axis is the all-to-all of expert parallelism.
    ("moe_group", ("data", "fsdp")),
    # Parameters: fsdp shards the model width (ZeRO-3 style, gathered per
    # layer by GSPMD), tensor shards heads, mlp and vocabulary.
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("exp", EXPERT_AXIS),
    ("layers", None),
)


# Rules of the meshes ``make_mesh`` built from a config with ``mesh.rules``.
_MESH_RULES: dict[Mesh, tuple] = {}


def parse_rules(text: str) -> tuple[tuple[str, Any], ...]:
  """``mesh.rules`` -> overrides: "name=axes,..." where axes are mesh axes joined
  by ``+`` or ``none`` (replicated). UserError (one line) for a bad rule."""
  overrides: dict[str, Any] = {}
  known = dict(LOGICAL_AXIS_RULES)
  for item in filter(None, (part.strip() for part in (text or "").split(","))):
    name, sep, axes_text = (x.strip() for x in item.partition("="))
    if not sep or not name:
      raise UserError(f"--config.mesh.rules: {item!r} is not LOGICAL=AXES "
                      "(e.g. embed=none or mlp=fsdp+tensor)")
    if name not in known:
      raise UserError(f"--config.mesh.rules: unknown logical axis {name!r}; known: "
                      f"{', '.join(known)}")
    axes = tuple(a.strip() for a in axes_text.split("+") if a.strip())
    if axes_text.strip().lower() in ("none", ""):
      axes = ()
    bad = [a for a in axes if a not in MESH_AXES]
    if bad or len(set(axes)) != len(axes):
      raise UserError(f"--config.mesh.rules: {item!r} names {', '.join(bad) or 'an axis twice'}; "
                      f"mesh axes are {', '.join(MESH_AXES)} (joined by +) or none")
    overrides[name] = None if not axes else axes[0] if len(axes) == 1 else axes
  return tuple(overrides.items())


def logical_rules(config_or_mesh_cfg=None) -> tuple:
  """``LOGICAL_AXIS_RULES`` with ``mesh.rules`` overrides applied (a config or
  its ``mesh``); with ``mesh.context`` > 1 parameters' ``embed`` dimension
  splits over fsdp x context unless a rule names it."""
  if config_or_mesh_cfg is None:
    return LOGICAL_AXIS_RULES
  mesh_cfg = config_or_mesh_cfg.get("mesh", config_or_mesh_cfg)
  overrides = dict(parse_rules(mesh_cfg.get("rules", "")))
  if int(mesh_cfg.get(CONTEXT_AXIS, 1)) != 1:
    # Devices that split sequences also split the parameters, as fsdp's do
    # (else each would hold fsdp's share whole); mesh.rules may say otherwise.
    overrides.setdefault("embed", ("fsdp", CONTEXT_AXIS))
  return tuple((name, overrides.get(name, axes)) for name, axes in LOGICAL_AXIS_RULES)


def rules_for(mesh: Mesh) -> tuple:
  """The rules ``make_mesh`` recorded for ``mesh`` (default: ``LOGICAL_AXIS_RULES``)."""
  try:
    return _MESH_RULES.get(mesh, LOGICAL_AXIS_RULES)
  except TypeError:  # An abstract mesh or another unhashable stand-in.
    return LOGICAL_AXIS_RULES


# Mesh axes that may also span slices (data-centre network), in MESH_AXES order.
DCN_AXES = ("dcn_data", "dcn_fsdp")


def dcn_shape(mesh_cfg, num_slices: int) -> tuple[int, int]:
  """(dcn_data, dcn_fsdp): how the slices split over the data and fsdp axes.

  One may be -1 (the slices left); their product must be ``num_slices``.
  """
  sizes = [int(mesh_cfg.get(name, 1)) for name in DCN_AXES]
  described = ", ".join(f"mesh.{n}={s}" for n, s in zip(DCN_AXES, sizes))
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise UserError(f"{described}: sizes must be positive, at most one -1")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if num_slices % known:
      raise UserError(f"{described}: {known} does not divide the {num_slices} slices")
    sizes[sizes.index(-1)] = num_slices // known
  if math.prod(sizes) != num_slices:
    raise UserError(f"{described} spans {math.prod(sizes)} slices but the devices are in "
                    f"{num_slices} (by their slice_index); make the product match or use -1")
  return sizes[0], sizes[1]


def mesh_sizes(mesh_cfg) -> tuple[int, ...]:
  """The sizes ``mesh_cfg`` (a config's ``mesh`` or a dict) gives ``MESH_AXES``
  (``expert`` and ``context`` 1 when absent: configs and meshes from before
  they existed)."""
  return tuple(int(mesh_cfg.get(name, 1) if name in _OPTIONAL_AXES else mesh_cfg[name])
               for name in MESH_AXES)


def resolve_mesh_shape(mesh_cfg, num_devices: int, num_slices: int = 1) -> tuple[int, ...]:
  """Global sizes for ``MESH_AXES``: the in-slice sizes (one may be -1: fill
  with the slice's remaining devices) times the slices on ``data`` / ``fsdp``."""
  sizes = list(mesh_sizes(mesh_cfg))
  described = ", ".join(f"{n}={s}" for n, s in zip(MESH_AXES, sizes))
  dcn_data, dcn_fsdp = dcn_shape(mesh_cfg, num_slices)
  if num_devices % num_slices:
    raise UserError(f"{num_devices} devices do not split evenly into {num_slices} slices")
  per_slice = num_devices // num_slices
  if sizes.count(-1) > 1:
    raise UserError(f"mesh {described}: at most one axis may be -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise UserError(f"mesh {described}: sizes must be positive or -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if per_slice % known:
      raise UserError(f"mesh {described}: {known} does not divide the {per_slice} devices"
                      + (" of each slice" if num_slices > 1 else ""))
    sizes[sizes.index(-1)] = per_slice // known
  if math.prod(sizes) != per_slice:
    raise UserError(f"mesh {described} has {math.prod(sizes)} devices but "
                    f"{per_slice} are available" + (" in each slice" if num_slices > 1 else "")
                    + "; make the product match or use -1")
  return (sizes[0] * dcn_data, sizes[1] * dcn_fsdp, *sizes[2:])


def num_slices(devices: Sequence[Any]) -> int:
  """The slices ``devices`` span (their distinct ``slice_index``; 1 without one)."""
  return len({getattr(d, "slice_index", 0) or 0 for d in devices})


def device_array(mesh_cfg, devices: Sequence[Any]) -> np.ndarray:
  """The devices as a [data, fsdp, expert, context, tensor] array; across
  slices (TPU multi-slice, DCN between them) by JAX's hybrid mesh:
  ``dcn_data`` x ``dcn_fsdp`` blocks of whole slices, every tensor group and
  the in-slice part of data and fsdp (and all of expert and context) inside
  one slice."""
  slices = num_slices(devices)
  shape = resolve_mesh_shape(mesh_cfg, len(devices), slices)
  if slices == 1:
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  dcn_data, dcn_fsdp = dcn_shape(mesh_cfg, slices)
  in_slice = (shape[0] // dcn_data, shape[1] // dcn_fsdp, *shape[2:])
  dcn = (dcn_data, dcn_fsdp) + (1,) * (len(MESH_AXES) - 2)
  return mesh_utils.create_hybrid_device_mesh(in_slice, dcn, devices,
                                              allow_split_physical_axes=True)


def make_mesh(mesh_cfg, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A (data, fsdp, expert, context, tensor) mesh over ``devices`` (default: all devices);
  over several slices, a hybrid mesh (``device_array``).

  ``mesh_cfg.rules`` (if any) become the mesh's logical-axis rules.
  """
  rules = logical_rules(mesh_cfg)  # Checked before any device work.
  devices = list(jax.devices() if devices is None else devices)
  if num_slices(devices) == 1:
    shape = resolve_mesh_shape(mesh_cfg, len(devices))
    mesh = jax.make_mesh(shape, MESH_AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)
  else:
    mesh = Mesh(device_array(mesh_cfg, devices), MESH_AXES,
                axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
  # Equal meshes are one key: the latest config's rules win, as its run is the live one.
  _MESH_RULES[mesh] = rules
  return mesh


@contextlib.contextmanager
def activate(mesh: Mesh, rules=None) -> Iterator[None]:
  """Makes ``mesh`` and the logical rules current, for tracing jitted steps.

  ``rules`` None: the mesh's own (``rules_for``).
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules_for(mesh) if rules is None else rules):
    yield


def strip_boxes(tree: Any) -> Any:
  """The raw values of logically boxed leaves.

  Unlike ``nn.unbox`` this adds no sharding constraints, which would fail for
  optimizer statistics whose box names do not match their (factored) rank;
  placement comes from the jit's ``out_shardings`` instead.
  """
  return jax.tree_util.tree_map(lambda x: getattr(x, "value", x), tree,
                                is_leaf=lambda x: isinstance(x, nn.Partitioned))


def logical_to_shardings(abstract_tree: Any, mesh: Mesh, rules=None) -> Any:
  """NamedShardings for a tree of (possibly logically boxed) abstract arrays.

  ``rules`` None: the mesh's own (``rules_for``).
  Leaves without logical names are replicated, and so is any dimension the
  mesh axes do not divide (e.g. 2 kv heads on tensor=8) or whose box names do
  not match its rank (optimizer statistics that factor a parameter, such as
  Adafactor's row/column moments).
  """
  specs = nn.get_partition_spec(abstract_tree)
  rules = rules_for(mesh) if rules is None else rules
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  shapes = strip_boxes(abstract_tree)

  def fit(sharding, leaf):
    spec = tuple(sharding.spec)
    if len(spec) > len(leaf.shape):
      return NamedSharding(mesh, P())
    spec = [axes if dim % axes_size(mesh, axes) == 0 else None
            for axes, dim in zip(spec, leaf.shape)]
    return NamedSharding(mesh, P(*spec))

  return jax.tree_util.tree_map(fit, shardings, shapes)


def axes_size(mesh, axes) -> int:
  """Devices along ``axes`` of ``mesh`` (an axis name, a tuple of them, or None)."""
  return math.prod(mesh.shape[a] for a in split_axes(mesh, axes, keep_single=True))


def split_axes(mesh, axes, keep_single: bool = False) -> tuple[str, ...]:
  """``axes`` (an axis name, a tuple of them, or None: what the logical rules
  map a name to) as a tuple of the axes of ``mesh`` with more than one
  device (all of them with ``keep_single``)."""
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return axes if keep_single else tuple(a for a in axes if mesh.shape[a] > 1)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches [B, ...] split over the data-parallel axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(host_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles every host's share [B / hosts, ...] into global arrays [B, ...]."""
  return multihost_utils.host_local_array_to_global_array(host_batch, mesh, P(BATCH_AXES))


def data_parallel_size(mesh) -> int:
  """Ways the batch splits: the ``BATCH_AXES`` of a mesh or a {axis: size} mapping."""
  shape = getattr(mesh, "shape", mesh)
  return math.prod(int(shape.get(a, 1)) for a in BATCH_AXES)


def path_name(path: tuple) -> str:
  """A pytree key path as ``a/b/c`` (parameter names in tables and messages)."""
  return "/".join(str(getattr(k, "key", k)) for k in path)


def describe_shardings(params: Any, shardings: Any) -> str:
  """A table of every parameter: path, shape, dtype and partition spec."""
  rows = []
  flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_shardings = jax.tree_util.tree_leaves(shardings)
  for (path, leaf), sharding in zip(flat_params, flat_shardings):
    name = path_name(path)
    rows.append((name, str(tuple(leaf.shape)), str(leaf.dtype), str(sharding.spec)))
  widths = [max(len(r[i]) for r in rows + [("parameter", "shape", "dtype", "spec")])
            for i in range(4)]
  lines = ["  ".join(h.ljust(w) for h, w in zip(("parameter", "shape", "dtype", "spec"), widths))]
  lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
  return "\n".join(lines)
