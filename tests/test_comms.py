"""The planner's communication model (bigmodel.comms): collectives per step, within and
across slices, and the priced suggestion."""
import pytest

import configs.llama as llama
from bigmodel import comms, memory, plan
from bigmodel.models import ModelConfig
from configs.gpt import get_config
from model_fixtures import tiny_config


def _collectives(config, mesh, dcn=None):
  estimate = memory.estimate(config, mesh)
  return {x.what: x for x in comms.step_collectives(config, mesh, estimate, dcn)}, estimate


def test_pure_data_parallelism_only_all_reduces_the_gradients():
  config = get_config("small")
  config.train.batch_size = 64
  found, estimate = _collectives(config, dict(data=8, fsdp=1, tensor=1))
  assert list(found) == ["gradient all-reduce"]
  # Ring all-reduce: 2 S (n - 1) / n of the whole (replicated) gradient.
  assert found["gradient all-reduce"].ici_bytes == pytest.approx(2 * estimate.params * 7 / 8)
  assert found["gradient all-reduce"].dcn_bytes == 0


def test_tensor_and_fsdp_collectives_scale_with_layers_and_micro_batches():
  config = get_config("small")
  config.train.batch_size = 16
  config.model.remat = "none"
  mesh = dict(data=1, fsdp=4, tensor=2)
  found, estimate = _collectives(config, mesh)
  c = ModelConfig.from_config(config.model)
  activations = estimate.micro_batch * config.data.seq_len * c.embed_dim * 4
  # Two all-reduces per layer forward, two backward, of 2 A (t - 1) / t each.
  assert found["tensor-parallel all-reduces"].ici_bytes == pytest.approx(
      c.num_layers * 4 * 2 * activations / 2)
  gathers = found["FSDP gathers (forward, backward)"].ici_bytes
  assert found["FSDP reduce-scatters"].ici_bytes == pytest.approx(gathers / 2)
  config.optim.grad_accum = 2  # Twice the micro-batches: twice the per-layer traffic ...
  accumulated, _ = _collectives(config, mesh)
  assert accumulated["FSDP gathers (forward, backward)"].ici_bytes == pytest.approx(
      2 * gathers)
  # ... but the same gradient all-reduce (none here: no replicas).
  assert "gradient all-reduce" not in accumulated


def test_context_ring_and_expert_all_to_all_appear_on_their_axes():
  config = tiny_config("llama", num_experts=4, moe_dispatch="capacity")
  config.train.batch_size = 8
  found, _ = _collectives(config, dict(data=1, fsdp=1, expert=2, context=2, tensor=1))
  assert found["context ring passes"].axes == ("context",)
  assert found["expert all-to-alls"].axes == ("expert",)
  # The replicas of the gradients: data x expert.
  assert found["gradient all-reduce"].axes == ("expert",)
  config.model.context_attention = "all_gather"
  found, _ = _collectives(config, dict(data=1, fsdp=1, expert=2, context=2, tensor=1))
  assert "context all-gathers" in found


def test_only_collectives_over_sliced_axes_cross_slices():
  config = llama.get_config("llama3_8b")
  config.train.batch_size = 32
  mesh = dict(data=2, fsdp=8, tensor=1)
  on_data, _ = _collectives(config, mesh, {"data": 2})
  assert [x.what for x in on_data.values() if x.crosses_slices] == ["gradient all-reduce"]
  on_fsdp, _ = _collectives(config, mesh, {"fsdp": 2})
  crossing = [x for x in on_fsdp.values() if x.crosses_slices]
  assert {x.what for x in crossing} == {"FSDP gathers (forward, backward)",
                                        "FSDP reduce-scatters"}
  # Hierarchical: 4 devices per slice first, then 1/4 of it across the 2 slices.
  gathers = on_fsdp["FSDP gathers (forward, backward)"]
  payload = gathers.ici_bytes / (3 / 4)
  assert gathers.dcn_bytes == pytest.approx(payload / 4 * 1 / 2)
  assert (sum(x.dcn_bytes for x in on_fsdp.values())
          > 2 * sum(x.dcn_bytes for x in on_data.values()))


def test_the_priced_suggestion_keeps_the_slow_network_for_the_gradients():
  """2 slices of 8: priced, the suggestion puts the slices on data (one gradient
  all-reduce per step crosses them) rather than on fsdp (every layer's gathers)."""
  config = llama.get_config("llama3_1b")
  config.train.batch_size, config.data.seq_len = 64, 2048
  network = plan.Network(slices=2, ici_bandwidth=450e9, dcn_bandwidth=1e9)
  best = plan.suggest(config, 16, 80e9, peak_tflops=989, network=network)
  assert best is not None and best.fits and best.dcn == {"data": 2}
  assert best.comm_seconds["dcn"] > 0 and best.bound_seconds >= best.step_seconds
  forced = plan.make_plan(plan._with_grad_accum(config, best.grad_accum),  # pylint: disable=protected-access
                          dict(best.mesh, data=best.mesh["data"] // 2,
                               fsdp=best.mesh["fsdp"] * 2),
                          80e9, 989, dcn={"fsdp": 2}, network=network)
  assert forced.comm_seconds["dcn"] > best.comm_seconds["dcn"]


@pytest.mark.parametrize("args,fragment", [
    (["--slices=0"], "--slices=0 must be positive"),
    (["--slices=2", "--devices=16", "--ici_bandwidth=400GB"], "needs --dcn_bandwidth too"),
    (["--ici_bandwidth=fast"], "--ici_bandwidth='fast': expected a size"),
    (["--slices=3", "--devices=16"], "16 devices do not split evenly into 3 slices"),
])
def test_bad_network_flags_are_one_error_line(args, fragment):
  from test_plan import run_plan  # pylint: disable=g-import-not-at-top
  result = run_plan("--config=configs/gpt.py:tiny", *args)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2, result.stderr[-2000:]
  assert lines[-1].startswith("error: ") and fragment in lines[-1], lines[-1:]
