"""Decoding speed: cached decoding vs full-forward re-decoding (random weights).

    python benchmarks/generate.py                       # tiny and small, batch 1 and 16
    python benchmarks/generate.py --presets tiny --batches 1 --new_tokens 64

For each GPT preset and batch size: time to first token (prefill of a
16-token prompt + the first token), decode tokens/s (new tokens after the
first, all rows, per second of the loop), and for the baseline cases the
time of re-running the whole forward pass per token (``generation.reference``)
for the same new tokens, and the speed-up. Medians of ``--repeats`` runs,
after a compile run. Greedy, no EOS stop, so every run decodes all tokens.
The models keep their widths and depths; ``tiny``'s position table is raised
to 512 so 256 new tokens fit.
"""
import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import configs.gpt as gpt_configs
from bigmodel import flops
from bigmodel.generation.models import CachedDecoder
from bigmodel.generation.reference import full_forward_greedy
from bigmodel.generation.sampling import Sampling
from bigmodel.generation.search import sample_loop
from bigmodel.models import build_model

PROMPT_LEN = 16


def _median_s(fn, repeats):
  jax.block_until_ready(fn())  # Compile and warm up.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench(preset, batch, new_tokens, repeats, baseline):
  config = gpt_configs.get_config(preset)
  config.model.max_len = max(config.model.max_len, 512)
  model = build_model(config.model)
  params = jax.jit(lambda key: model.init(key, jnp.zeros((1, 8), jnp.int32))["params"])(
      jax.random.key(0))
  params = jax.tree_util.tree_map(lambda x: getattr(x, "value", x), params,
                                  is_leaf=lambda x: hasattr(x, "value"))
  prompt_BxP = jnp.asarray(np.random.default_rng(0).integers(
      3, 1000, (batch, PROMPT_LEN)), jnp.int32)
  lengths_B = jnp.full((batch,), PROMPT_LEN, jnp.int32)
  sampling = Sampling()
  loop = jax.jit(functools.partial(
      sample_loop, CachedDecoder(model), num_new=new_tokens, static_key=sampling.static_key(),
      stop_ids=(), pad_id=0, start_id=1, num_valid_ids=config.model.vocab_size))
  run = lambda n: loop(params, prompt_BxP, lengths_B, jnp.int32(n), jax.random.key(0),  # pylint: disable=g-long-lambda
                       sampling.values())
  first_s = _median_s(lambda: run(1), repeats)
  all_s = _median_s(lambda: run(new_tokens), repeats)
  row = dict(preset=preset, batch=batch, ttft_ms=first_s * 1e3,
             decode_tok_s=batch * (new_tokens - 1) / (all_s - first_s), cached_s=all_s)
  if baseline:
    full = jax.jit(functools.partial(full_forward_greedy, model, num_new=new_tokens))
    cached_ids = np.asarray(run(new_tokens))
    full_ids = np.asarray(full(params, prompt_BxP))
    row["full_forward_s"] = _median_s(lambda: full(params, prompt_BxP), max(1, repeats // 2))
    row["speedup"] = row["full_forward_s"] / all_s
    row["same_tokens"] = bool((cached_ids == full_ids).all())
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
  parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
  parser.add_argument("--new_tokens", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--baseline", nargs="+", default=["tiny:1", "tiny:16", "small:1"],
                      help="preset:batch cases also timed with full-forward re-decoding")
  args = parser.parse_args()
  header = (f"{'preset':7} {'batch':>5} {'TTFT ms':>8} {'decode tok/s':>12} {'cached s':>9} "
            f"{'full fwd s':>10} {'speed-up':>8} {'same':>5}")
  print(f"{flops.device_description()}, {args.new_tokens} new tokens after a "
        f"{PROMPT_LEN}-token prompt; medians of {args.repeats}")
  print(header)
  for preset in args.presets:
    for batch in args.batches:
      r = bench(preset, batch, args.new_tokens, args.repeats,
                f"{preset}:{batch}" in args.baseline)
      full = (f"{r['full_forward_s']:>10.2f} {r['speedup']:>7.1f}x {str(r['same_tokens']):>5}"
              if "speedup" in r else f"{'-':>10} {'-':>8} {'-':>5}")
      print(f"{preset:7} {batch:>5} {r['ttft_ms']:>8.1f} {r['decode_tok_s']:>12.1f} "
            f"{r['cached_s']:>9.2f} {full}", flush=True)


if __name__ == "__main__":
  main()
