"""Context parallelism: ring and all-gather attention over a sequence sharded on 8 CPU devices."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bigmodel.models.context_parallel import balanced_order

_HERE = os.path.dirname(os.path.abspath(__file__))


def test_ring_and_all_gather_attention_equal_one_device_attention():
  out = subprocess.run([sys.executable, os.path.join(_HERE, "context_parallel_check.py")],
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  cases = json.loads(out.stdout.strip().splitlines()[-1])
  assert len(cases) == 10  # Ring and all-gather, each over 5 masks and meshes.
  for name, diffs in cases.items():
    # Output, then the gradients of q, k and v (float32, sums over 32 keys).
    assert max(diffs) < 1e-5, (name, diffs)


@pytest.mark.parametrize("devices", [1, 2, 4])
def test_the_balanced_order_evens_out_causal_work(devices):
  length = 64
  order = balanced_order(length, devices)
  assert sorted(order) == list(range(length))
  chunk = length // (2 * devices)
  per_device = order.reshape(devices, -1)
  for i, tokens in enumerate(per_device):
    assert set(tokens) == set(range(i * chunk, (i + 1) * chunk)) | set(
        range((2 * devices - 1 - i) * chunk, (2 * devices - i) * chunk))
  # Causal work: each device's queries see the same number of keys in all.
  work = [int(sum(t + 1 for t in tokens)) for tokens in per_device]
  assert len(set(work)) == 1
  contiguous = np.arange(length).reshape(devices, -1)
  if devices > 1:  # Without balancing the last device does most of the work.
    assert len({int(sum(t + 1 for t in tokens)) for tokens in contiguous}) == devices
  with pytest.raises(ValueError, match="multiple of"):
    balanced_order(30, 4)


def test_the_trainer_feeds_context_parallel_causal_decoders_balanced_rows():
  from bigmodel.train import _training_rows  # pylint: disable=g-import-not-at-top
  from model_fixtures import random_family_batch, tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config("llama")
  config.mesh.context = 2
  rows = random_family_batch("llama", 2, 32, 128, num_segments=2)
  rows["example_weight"] = np.ones(2, np.float32)  # Not [B, L]: left as it is.
  balanced = _training_rows(config)(rows)
  order = balanced_order(32, 2)
  for key in ("inputs", "targets", "segment_ids", "positions", "loss_mask"):
    np.testing.assert_array_equal(balanced[key], rows[key][:, order])
  np.testing.assert_array_equal(balanced["example_weight"], rows["example_weight"])
  config.mesh.context_balance = False
  assert _training_rows(config)(rows) is rows
  bert = tiny_config("bert")  # Bidirectional: nothing to balance.
  bert.mesh.context = 2
  assert _training_rows(bert)(rows) is rows


def test_a_length_the_balanced_order_cannot_split_is_a_user_error():
  from bigmodel.config import validate  # pylint: disable=g-import-not-at-top
  from bigmodel.errors import UserError  # pylint: disable=g-import-not-at-top
  from model_fixtures import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config("llama")
  config.mesh.context, config.data.seq_len = 4, 36  # 4 divides 36, 2 x 4 does not.
  with pytest.raises(UserError, match="must be a multiple of 8 .or set mesh.context_balance"):
    validate(config)
  config.mesh.context_balance = False
  validate(config)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_a_relative_bias_built_per_block_equals_the_whole_one(bidirectional):
  """T5's bias as context-parallel blocks build it (from any query and key
  indices) equals the module's whole [1, N, T, S] bias, block by block."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from bigmodel.models.layers import RelativePositionBias  # pylint: disable=g-import-not-at-top
  module = RelativePositionBias(32, 128, num_heads=3, bidirectional=bidirectional)
  params = module.init(jax.random.key(0), 4, 4)
  whole = np.asarray(module.apply(params, 200, 200))  # Distances past max_distance too.
  per_block = module.apply(params, 0, 0, per_block=True)
  q_index = jnp.asarray([[150, 151, 20, 3]])  # Any tokens, e.g. a balanced device's.
  kv_index = jnp.asarray([[0, 7, 199, 150, 64]])
  block = np.asarray(per_block.block(q_index, kv_index))
  np.testing.assert_allclose(block[0], whole[0][:, q_index[0]][:, :, kv_index[0]], rtol=1e-6)
