r"""The longest sequence a config trains on a mesh, per the planner (no devices).

    python -m benchmarks.longest_sequence --preset=llama:llama3_8b \
        --devices=8 --device_memory=139GiB [--contexts=1,2,4,8] [--remat=full]

For each context-parallel size c (``mesh.context``; the other devices shard
parameters, ``fsdp``), one sequence per data-parallel rank: the batch is
devices / c sequences, each device holds L / c positions of one. Bisects
the sequence length (in steps of ``--granularity``) for the longest one whose
planned per-device memory (``bigmodel.memory.estimate``) fits, and prints a
table of it with its memory breakdown.
"""
from absl import app
from absl import flags

from bigmodel import plan
from bigmodel.api import get_config

# Not --config: that name is the trainer's config file flag.
_PRESET = flags.DEFINE_string("preset", "llama:llama3_8b", "A config by name: FILE:PRESET of "
                              "configs/ (bigmodel.api.get_config).")
_DEVICES = flags.DEFINE_integer("devices", 8, "Devices in the mesh.")
_MEMORY = flags.DEFINE_string("device_memory", "139GiB", "Memory per device.")
_CONTEXTS = flags.DEFINE_list("contexts", ["1", "2", "4", "8"], "Context-parallel sizes.")
_REMAT = flags.DEFINE_string("remat", "", "model.remat override ('' = the preset's).")
_CONTEXT_ATTENTION = flags.DEFINE_string("context_attention", "ring", "ring | all_gather.")
_PLATFORM = flags.DEFINE_string("platform", "gpu", "cpu | gpu | tpu (what attention runs).")
_GRANULARITY = flags.DEFINE_integer("granularity", 1024, "Lengths searched are multiples.")


def planned(context: int, seq_len: int, device_memory: float) -> plan.Plan:
  devices = _DEVICES.value
  overrides = {"data.seq_len": seq_len, "model.max_len": seq_len,
               "train.batch_size": devices // context, "optim.grad_accum": 1,
               "model.context_attention": _CONTEXT_ATTENTION.value}
  if _REMAT.value:
    overrides["model.remat"] = _REMAT.value
  config = get_config(_PRESET.value, overrides)
  mesh = dict(data=1, fsdp=devices // context, context=context, tensor=1)
  return plan.make_plan(config, mesh, device_memory, platform=_PLATFORM.value)


def longest(context: int, device_memory: float) -> tuple[int, plan.Plan]:
  """The longest fitting length (0 if none) and its plan."""
  step = _GRANULARITY.value * context
  fits, best = 0, None
  length = step
  while True:  # Doubling, then bisection between the last fit and the first miss.
    trial = planned(context, length, device_memory)
    if not trial.fits:
      break
    fits, best, length = length, trial, length * 2
  low, high = fits, length
  while high - low > step:
    middle = (low + high) // 2 // step * step
    trial = planned(context, middle, device_memory)
    if trial.fits:
      low, best = middle, trial
    else:
      high = middle
  return low, best


def main(argv):
  del argv
  device_memory = plan.parse_bytes(_MEMORY.value)
  print(f"{_PRESET.value} on {_DEVICES.value} devices of {_MEMORY.value}, "
        f"remat={_REMAT.value or 'preset'}, {_CONTEXT_ATTENTION.value}, {_PLATFORM.value}")
  print(f"{'context':>7} {'fsdp':>4} {'longest L':>10} {'L/device':>9} "
        f"{'params':>7} {'opt':>7} {'saved':>7} {'working':>8} {'total GiB':>9}")
  for context in (int(c) for c in _CONTEXTS.value):
    length, best = longest(context, device_memory)
    if best is None:
      print(f"{context:>7} {_DEVICES.value // context:>4} {'none':>10}")
      continue
    m = best.memory
    gib = lambda x: f"{x / 2**30:.1f}"  # pylint: disable=unnecessary-lambda-assignment
    print(f"{context:>7} {_DEVICES.value // context:>4} {length:>10,} {length // context:>9,} "
          f"{gib(m.params):>7} {gib(m.opt_state):>7} {gib(m.activations):>7} "
          f"{gib(m.working):>8} {gib(m.total):>9}")


if __name__ == "__main__":
  app.run(main)
