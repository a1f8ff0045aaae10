"""Sharded training equals single-device training; mesh and sharding rules."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
import ml_collections

from bigmodel import sharding
from bigmodel.errors import UserError

_HERE = os.path.dirname(os.path.abspath(__file__))


def test_same_steps_on_one_and_eight_devices():
  """3 steps with dropout and grad accumulation on 1 device vs data / fsdp / 3-axis meshes.

  The Pallas run (interpreted on CPU) must run the kernel per device under
  shard_map rather than gather q, k and v whole; the last run splits each
  sequence in 4 (context parallelism: a ring of keys and values), its rows
  in the causal-balanced order, so without dropout, against a reference
  without it.
  """
  meshes = ["single", "8,1,1", "1,8,1", "2,2,2", "2,2,2@pallas", "single%", "1,1,4,2%"]
  out = subprocess.run([sys.executable, os.path.join(_HERE, "sharded_steps.py"), *meshes],
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads(out.stdout.strip().splitlines()[-1])
  assert results["single"]["num_shards"] == 1
  for mesh in meshes[1:]:
    reference = results["single%" if "%" in mesh else "single"]
    np.testing.assert_allclose(results[mesh]["losses"], reference["losses"], rtol=1e-5)
    for got, want in zip(results[mesh]["params"], reference["params"]):
      np.testing.assert_allclose(got, want, atol=1e-5)
  # The parameters really were split: 8 fsdp shards, and 4 on the 2x2x2 mesh
  # (fsdp x tensor; replicated over data).
  assert results["1,8,1"]["num_shards"] == 8
  assert results["2,2,2"]["num_shards"] == 4
  assert results["2,2,2"]["query_kernel_spec"] == "P(None, 'fsdp', 'tensor', None)"
  assert results["2,2,2@pallas"]["uses_shard_map"]
  assert not results["2,2,2"]["uses_shard_map"]
  assert results["1,1,4,2%"]["context_ring"] and not results["2,2,2"]["context_ring"]
  assert results["1,1,4,2%"]["balanced"]  # Rows reordered; the losses are the same.


# Llama: RMSNorm, gated MLP without biases, untied head, rotary with llama3
# scaling, grouped-query attention: parameters the GPT-2 run does not have.
# The 8-device runs with ~8 take the chunked loss (model.loss_chunk_len) over
# a vocabulary split on the tensor axis; the single-device reference does not.
# Mistral's sliding window, BERT's bidirectional attention and T5's relative
# bias run context-parallel: the sequence split in 4 (a ring, with the
# chunked loss) or 2 (a ring, or an all-gather of keys and values). A mixture of experts (Llama-shaped, 4
# experts, capacity with room for every token) splits its experts over 4 or
# 2 devices (expert parallelism: all-to-all dispatch); dropless, each device
# routes its own tokens (shard_map) to experts split over fsdp and tensor.
_FAMILY_MESHES = {
    "bert": ["2,1,2,2~8", "1,8,1"],
    "t5": ["1,2,2,2~8"],  # fsdp=8 alone: the other families'.
    "llama": ["2,2,2~8", "1,8,1"],
    "mistral": ["2,1,4,1%~8", "1,2,2,2%@all_gather"],  # Balanced rows: no dropout.
    "moe": ["2,1,4,1,1", "1,2,2,1,2~8", "2,2,2@dropless"],
}


@pytest.mark.parametrize("family", list(_FAMILY_MESHES))
def test_other_families_same_steps_on_one_and_eight_devices(family):
  references = [f"single#{family}"] + [f"single%#{family}"] * any(
      "%" in mesh for mesh in _FAMILY_MESHES[family])
  meshes = references + [f"{mesh}#{family}" for mesh in _FAMILY_MESHES[family]]
  out = subprocess.run([sys.executable, os.path.join(_HERE, "sharded_steps.py"), *meshes],
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads(out.stdout.strip().splitlines()[-1])
  for mesh in meshes[len(references):]:
    reference = results[f"single{'%' if '%' in mesh else ''}#{family}"]
    causal_lm = family not in ("bert", "t5")  # Only causal decoders get balanced rows.
    assert results[mesh]["balanced"] == (results[mesh]["context"] > 1 and causal_lm)
    np.testing.assert_allclose(results[mesh]["losses"], reference["losses"], rtol=1e-5)
    for got, want in zip(results[mesh]["params"], reference["params"]):
      np.testing.assert_allclose(got, want, atol=1e-5)
    context = results[mesh]["context"] > 1  # Attention runs per device under shard_map.
    assert results[mesh]["uses_shard_map"] == (context or "@dropless" in mesh)
    assert results[mesh]["context_ring"] == (context and "@all_gather" not in mesh)
    if results[mesh]["expert"] > 1:  # Each device holds its experts; tokens reach them by all-to-all.
      assert results[mesh]["all_to_all"] and "expert" in results[mesh]["expert_kernel_spec"]
  if "1,8,1" in _FAMILY_MESHES[family]:
    assert results[f"1,8,1#{family}"]["num_shards"] == 8


@pytest.mark.parametrize("sizes,devices,expected", [
    ((-1, 1, 1, 1, 1), 8, (8, 1, 1, 1, 1)),
    ((2, -1, 1, 1, 2), 8, (2, 2, 1, 1, 2)),
    ((1, 2, 1, -1, 1), 8, (1, 2, 1, 4, 1)),
    ((1, 2, -1, 1, 1), 8, (1, 2, 4, 1, 1)),
    ((1, 1, 1, 1, 1), 1, (1, 1, 1, 1, 1)),
])
def test_resolve_mesh_shape(sizes, devices, expected):
  cfg = ml_collections.ConfigDict(dict(zip(sharding.MESH_AXES, sizes)))
  assert sharding.resolve_mesh_shape(cfg, devices) == expected


def test_a_mesh_config_without_context_or_expert_has_them_one():
  """Configs saved before the context and expert axes existed still resolve."""
  cfg = ml_collections.ConfigDict(dict(data=2, fsdp=-1, tensor=2))
  assert sharding.resolve_mesh_shape(cfg, 8) == (2, 2, 1, 1, 2)


@pytest.mark.parametrize("sizes,devices,message", [
    ((2, 2, 1, 1, 1), 8, "has 4 devices but 8 are available"),
    ((-1, -1, 1, 1, 1), 8, "at most one axis may be -1"),
    ((3, 1, 1, -1, 1), 8, "3 does not divide the 8 devices"),
    ((0, 1, 1, 1, 1), 1, "sizes must be positive"),
])
def test_bad_mesh_shapes(sizes, devices, message):
  cfg = ml_collections.ConfigDict(dict(zip(sharding.MESH_AXES, sizes)))
  with pytest.raises(UserError, match=message):
    sharding.resolve_mesh_shape(cfg, devices)


def test_indivisible_dimensions_are_replicated():
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)),
                            jax.devices()[:1])
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  boxed = {"w": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((6, 4), np.float32),
                                        ("embed", "mlp")),
           "factored": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((6,), np.float32),
                                               ("embed", "mlp"))}
  shardings = sharding.logical_to_shardings(boxed, mesh)
  assert shardings["w"].spec == P("fsdp", "tensor")
  assert shardings["factored"].spec == P()  # Names do not match the rank.


def _param_specs(config, mesh):
  from bigmodel.models import build_model  # pylint: disable=g-import-not-at-top
  from bigmodel.optim import make_optimizer  # pylint: disable=g-import-not-at-top
  from bigmodel.state import abstract_sharded_state  # pylint: disable=g-import-not-at-top
  optimizer, _ = make_optimizer(config.optim, 10)
  _, shardings = abstract_sharded_state(config, build_model(config.model), optimizer, mesh)
  return shardings.params


def test_mesh_rules_override_a_parameters_sharding():
  from model_fixtures import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  devices = jax.devices()[:1]
  mesh = sharding.make_mesh(config.mesh, devices)
  default = _param_specs(config, mesh)
  assert default["token_embed"]["embedding"].spec == P("tensor", "fsdp")
  config.mesh.rules = "embed=none, vocab=data+fsdp"
  try:
    ruled_mesh = sharding.make_mesh(config.mesh, devices)
    ruled = _param_specs(config, ruled_mesh)
    assert ruled["token_embed"]["embedding"].spec == P(("data", "fsdp"), None)
    # Rules not overridden keep their defaults.
    assert ruled["blocks"]["mlp"]["wi"]["kernel"].spec == P(None, None, "tensor")
    # The mesh carries its config's rules to code that only has the mesh.
    assert dict(sharding.rules_for(ruled_mesh))["embed"] is None
  finally:
    config.mesh.rules = ""
    sharding.make_mesh(config.mesh, devices)  # Equal meshes share rules: restore the defaults.
  assert dict(sharding.rules_for(mesh))["embed"] == "fsdp"


@pytest.mark.parametrize("rules,message", [
    ("embed=gpu", r"names gpu; mesh axes are data, fsdp, expert, context, tensor"),
    ("heads=tensor+tensor", "names an axis twice"),
    ("bogus=data", r"unknown logical axis 'bogus'"),
    ("embed", r"'embed' is not LOGICAL=AXES"),
])
def test_bad_mesh_rules_are_one_error_line(rules, message):
  from bigmodel.config import validate  # pylint: disable=g-import-not-at-top
  from model_fixtures import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  config.mesh.rules = rules
  with pytest.raises(UserError, match=message) as error:
    validate(config)
  assert "\n" not in str(error.value)


class _FakeDevice:
  """What the mesh builder reads of a device: id, platform, kind and slice."""

  def __init__(self, device_id: int, slice_index: int):
    self.id, self.slice_index, self.process_index = device_id, slice_index, slice_index
    self.platform, self.device_kind = "cpu", "cpu"

  def __repr__(self):
    return f"D{self.id}@s{self.slice_index}"


@pytest.mark.parametrize("dcn, ici, expected_shape", [
    ({"dcn_data": 2}, {"data": 1, "fsdp": 2, "tensor": 2}, (2, 2, 1, 1, 2)),
    ({"dcn_data": -1}, {"data": -1, "fsdp": 1, "tensor": 2}, (4, 1, 1, 1, 2)),
    ({"dcn_fsdp": 2}, {"data": 1, "fsdp": -1, "tensor": 2}, (1, 4, 1, 1, 2)),
    ({"dcn_data": 2}, {"data": 1, "fsdp": 1, "context": 2, "tensor": 2}, (2, 1, 1, 2, 2)),
    ({"dcn_data": 2}, {"data": 1, "fsdp": 1, "expert": 2, "tensor": 2}, (2, 1, 2, 1, 2)),
])
def test_a_hybrid_mesh_puts_only_dcn_axes_across_slices(dcn, ici, expected_shape):
  # 8 devices in 2 slices of 4, listed interleaved as a runtime might.
  devices = [_FakeDevice(i, i % 2) for i in range(8)]
  cfg = ml_collections.ConfigDict({**ici, **dcn})
  array = sharding.device_array(cfg, devices)
  assert array.shape == expected_shape
  slice_of = np.vectorize(lambda d: d.slice_index)(array)
  # Each in-slice block of data x fsdp (all of expert, context, tensor) is one slice ...
  assert (slice_of == slice_of[..., :1, :1, :1]).all()
  dcn_axis = 0 if "dcn_data" in dcn else 1
  halves = np.split(slice_of, 2, axis=dcn_axis)
  assert [np.unique(h).tolist() for h in halves] == [[0], [1]]  # ... slices along the dcn axis.
  assert sorted(d.id for d in array.ravel()) == list(range(8))


def test_bad_multislice_meshes_are_user_errors():
  devices = [_FakeDevice(i, i // 4) for i in range(8)]
  with pytest.raises(UserError, match="spans 3 slices but the devices are in 2"):
    sharding.device_array(ml_collections.ConfigDict(
        dict(data=-1, fsdp=1, tensor=1, dcn_data=3, dcn_fsdp=1)), devices)
  with pytest.raises(UserError, match="has 8 devices but 4 are available in each slice"):
    sharding.device_array(ml_collections.ConfigDict(
        dict(data=8, fsdp=1, tensor=1, dcn_data=2, dcn_fsdp=1)), devices)
  with pytest.raises(UserError, match="at most one -1"):
    sharding.dcn_shape(ml_collections.ConfigDict(dict(dcn_data=-1, dcn_fsdp=-1)), 2)
  # One slice (CPU, GPU hosts): dcn sizes other than 1 cannot be met.
  with pytest.raises(UserError, match="spans 2 slices but the devices are in 1"):
    sharding.resolve_mesh_shape(ml_collections.ConfigDict(
        dict(data=-1, fsdp=1, tensor=1, dcn_data=2)), 8)


def test_bad_context_parallel_configs_are_user_errors():
  from bigmodel.config import validate  # pylint: disable=g-import-not-at-top
  from model_fixtures import tiny_config  # pylint: disable=g-import-not-at-top
  t5 = tiny_config("t5")
  t5.mesh.context = 2
  validate(t5)  # Its relative bias is built per block (models/relative_bias.py).
  gpt = tiny_config()
  gpt.mesh.context, gpt.data.seq_len = 4, 30
  with pytest.raises(UserError, match="mesh.context=4 does not divide data.seq_len=30"):
    validate(gpt)
  gpt.data.seq_len = 32
  validate(gpt)


@pytest.mark.parametrize("model, expert, message", [
    ({}, 2, "model.num_experts=0"),
    ({"num_experts": 4, "moe_dispatch": "capacity"}, 3, "does not divide model.num_experts=4"),
    ({"num_experts": 4}, 2, "needs model.moe_dispatch=capacity"),
    ({"num_experts": 4, "moe_dispatch": "capacity"}, -1, "must be a positive size"),
])
def test_bad_expert_parallel_configs_are_user_errors(model, expert, message):
  from bigmodel.config import validate  # pylint: disable=g-import-not-at-top
  from model_fixtures import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config("llama", **model)
  config.mesh.expert = expert
  with pytest.raises(UserError, match=message):
    validate(config)
