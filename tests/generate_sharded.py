"""Cached greedy decoding of the tests' tiny GPT / T5 on a 2x2x2 (data, fsdp, tensor) mesh.

Run as a script in a subprocess so XLA_FLAGS can ask for 8 CPU devices
before JAX starts; prints JSON: per family the new tokens of each prompt and
how many devices hold a parameter. tests/test_generate.py compares them with
full-forward re-decoding on one device.
"""
import json
import os
import sys

# The suite's flags and 8 devices, before JAX is imported (tests/commands.py).
from commands import simulate_devices  # pylint: disable=wrong-import-position
simulate_devices(8)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=wrong-import-position

from generate_fixtures import PROMPTS, tiny_generator  # pylint: disable=wrong-import-position

NUM_NEW = 12  # As in test_generate.py.


def main():
  results = {}
  for family in ("gpt", "t5"):
    generator = tiny_generator(family, mesh=dict(data=2, fsdp=2, tensor=2))
    cached = generator.generate_ids(PROMPTS, max_new_tokens=NUM_NEW, stop_at_eos=False)
    devices = len(jax.tree_util.tree_leaves(generator.params)[0].sharding.device_set)
    results[family] = dict(cached=cached, devices=devices)
  print(json.dumps(results))


if __name__ == "__main__":
  main()
