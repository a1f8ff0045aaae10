"""Times attention implementations: forward and forward+backward under jit.

    python benchmarks/attention.py                      # default shapes for the platform
    python benchmarks/attention.py --shapes 4x2048x16x128 --dtype bfloat16 --causal

Shapes are BxLxNxH (self-attention, T = S = L). Prints the median wall time
of each implementation and its ratio to ``xla``. On CPU the Pallas kernel
runs in Pallas' interpreter: a correctness check, not a speed measurement.
"""
import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp

from bigmodel.models.attention import dot_product_attention

DEFAULT_SHAPES = {
    "cpu": ["1x512x4x64", "1x1024x4x64", "1x1024x2x128"],
    "gpu": ["8x1024x16x64", "4x2048x16x128", "2x4096x16x128", "1x8192x16x128"],
    "tpu": ["8x1024x16x128", "4x2048x16x128", "2x4096x16x128", "1x8192x16x128"],
}


def _median_ms(fn, args, iters):
  jax.block_until_ready(fn(*args))  # Compile and warm up.
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def time_impl(impl, shape, dtype, causal, iters):
  """(forward ms, forward+backward ms) for one implementation and shape."""
  b, length, n, h = shape
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, d_out = (jax.random.normal(key, (b, length, n, h), dtype) for key in keys)
  attention = functools.partial(dot_product_attention, impl=impl, causal=causal)
  forward = jax.jit(attention)

  @jax.jit
  def forward_backward(q, k, v, d_out):
    out, vjp = jax.vjp(attention, q, k, v)
    return out, vjp(d_out)

  return (_median_ms(forward, (q, k, v), iters),
          _median_ms(forward_backward, (q, k, v, d_out), iters))


def main():
  platform = jax.default_backend()
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES.get(platform, ["1x512x4x64"]),
                      help="BxLxNxH per benchmark")
  parser.add_argument("--dtype", default="float32" if platform == "cpu" else "bfloat16")
  parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument("--iters", type=int, default=5 if platform == "cpu" else 20)
  parser.add_argument("--impls", nargs="+", default=None,
                      help="default: xla pallas (+ cudnn on GPU with 16-bit dtypes)")
  args = parser.parse_args()
  dtype = jnp.dtype(args.dtype)
  impls = args.impls or (["xla", "pallas"] + (
      ["cudnn"] if platform == "gpu" and dtype in (jnp.bfloat16, jnp.float16) else []))

  print(f"platform={platform} ({jax.devices()[0].device_kind}) dtype={dtype} "
        f"causal={args.causal} iters={args.iters}")
  if platform == "cpu":
    print("NOTE: on CPU the Pallas kernels run in interpret mode; these timings only show "
          "that they run, not how fast they are on an accelerator.")
  header = f"{'shape BxLxNxH':>16} {'impl':>7} {'fwd ms':>10} {'fwd+bwd ms':>11} " \
           f"{'fwd/xla':>8} {'f+b/xla':>8}"
  print(header)
  print("-" * len(header))
  for spec in args.shapes:
    shape = tuple(int(x) for x in spec.split("x"))
    results = {}
    for impl in impls:
      try:
        results[impl] = time_impl(impl, shape, dtype, args.causal, args.iters)
      except Exception as e:  # pylint: disable=broad-except  # Report and go on.
        print(f"{spec:>16} {impl:>7} failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
        continue
      fwd, fwd_bwd = results[impl]
      base = results.get("xla")
      ratios = (f"{fwd / base[0]:8.2f} {fwd_bwd / base[1]:8.2f}" if base else f"{'-':>8} {'-':>8}")
      print(f"{spec:>16} {impl:>7} {fwd:10.2f} {fwd_bwd:11.2f} {ratios}")


if __name__ == "__main__":
  main()
