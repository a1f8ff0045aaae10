"""Attention implementations under jit: forward and forward+backward time, TFLOP/s, error.

    python -m benchmarks.attention                      # the sweep for this platform
    python -m benchmarks.attention --shapes 4x2048x16x128 --dtype bfloat16 --no-causal
    python -m benchmarks.attention --shapes 2x8192x16x128 --causal --documents 4

Shapes are BxLxNxH (self-attention, T = S = L). On GPU and TPU the default
sweep is the usual one: batch x length = 16k tokens, hidden N x H = 2048,
head_dim 64 and 128, length 512 .. 16k, causal and not. FLOPs: forward
4 B N L^2 H (half when causal), backward 2.5x the forward; ``--documents``
packs that many equal documents per row (segment ids) and still counts the
whole rows' FLOPs, so the TFLOP/s of packed and unpacked rows compare times
(a kernel that skips the masked blocks shows as faster). Each row also
gives the largest |output - float32 reference| (``pallas_kernels.reference``
on float32 inputs): on CPU, where the Pallas kernels run in Pallas'
interpreter, that error column is the point and the timings only show that
the kernels run.
"""
import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp

from bigmodel import flops
from bigmodel.models.attention import dot_product_attention

TOKENS, HIDDEN = 16384, 2048
LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
CPU_SHAPES = ["1x256x4x64", "1x512x4x64", "1x512x2x128", "1x200x2x128"]


def parse_shape(spec: str) -> tuple[int, ...]:
  """"BxLxNxH" -> (B, L, N, H)."""
  return tuple(int(x) for x in spec.split("x"))


def default_sweep(platform: str, lengths=LENGTHS, tokens: int = TOKENS
                  ) -> list[tuple[tuple[int, int, int, int], bool]]:
  """((B, L, N, H), causal) cases: the standard sweep (B x L = ``tokens``,
  N x H = 2048), or a small one on CPU."""
  if platform == "cpu":
    shapes = [parse_shape(s) for s in CPU_SHAPES]
  else:
    shapes = [(max(1, tokens // length), length, HIDDEN // head_dim, head_dim)
              for head_dim in (64, 128) for length in lengths]
  return [(shape, causal) for causal in (True, False) for shape in shapes]


def attention_flops(shape, causal: bool) -> tuple[float, float]:
  """(forward, forward + backward) FLOPs of one attention call."""
  b, length, n, h = shape
  forward = 4 * b * n * length * length * h / (2 if causal else 1)
  return forward, forward * 3.5


def _median_s(fn, args, iters):
  jax.block_until_ready(fn(*args))  # Compile and warm up.
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def packed_segment_ids(batch: int, length: int, documents: int) -> jax.Array:
  """[B, L] segment ids of rows packed with ``documents`` equal documents (ids 1..)."""
  ids = jnp.arange(length, dtype=jnp.int32) * documents // length + 1
  return jnp.broadcast_to(ids, (batch, length))


def _attention(impl, causal, q, k, v, segment_ids):
  return dot_product_attention(q, k, v, impl=impl, causal=causal, q_segment_ids_BxT=segment_ids,
                               kv_segment_ids_BxS=segment_ids)


def make_case(shape, dtype, causal, segment_ids=None, reference=True):
  """Inputs (q, k, v, d_out) of one case, and its float32 reference output.

  ``segment_ids`` [B, L] (``packed_segment_ids``): packed rows; None: one
  document per row. ``reference=False``: no reference (None), for shapes
  whose [B, N, L, L] float32 scores would not fit in memory.
  """
  keys = jax.random.split(jax.random.key(0), 4)
  inputs = tuple(jax.random.normal(key, shape, dtype) for key in keys)
  exact = jax.jit(functools.partial(_attention, "xla", causal))(
      *(x.astype(jnp.float32) for x in inputs[:3]), segment_ids) if reference else None
  return inputs, exact


def measure(impl, inputs, exact, causal, iters, segment_ids=None) -> dict[str, float]:
  """Forward and forward+backward seconds, and the forward's error vs ``exact``
  (from ``make_case`` with the same ``segment_ids``; NaN without one)."""
  q, k, v, d_out = inputs
  # Segment ids are an argument, not a closed-over constant baked into the program.
  forward = jax.jit(functools.partial(_attention, impl, causal))

  @jax.jit
  def forward_backward(q, k, v, d_out, segment_ids):
    out, vjp = jax.vjp(lambda q, k, v: _attention(impl, causal, q, k, v, segment_ids), q, k, v)
    return out, vjp(d_out)

  error = float("nan") if exact is None else float(
      jnp.max(jnp.abs(forward(q, k, v, segment_ids).astype(jnp.float32) - exact)))
  return dict(fwd_s=_median_s(forward, (q, k, v, segment_ids), iters),
              fwd_bwd_s=_median_s(forward_backward, (*inputs, segment_ids), iters), error=error)


def main():
  platform = jax.default_backend()
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", nargs="+", default=None,
                      help="BxLxNxH cases (default: the platform's sweep)")
  parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=None,
                      help="with --shapes: causal or not (default: both)")
  parser.add_argument("--dtype", default="float32" if platform == "cpu" else "bfloat16")
  parser.add_argument("--iters", type=int, default=3 if platform == "cpu" else 20)
  parser.add_argument("--documents", type=int, default=1,
                      help="documents packed per row (segment ids); 1 = unpacked")
  parser.add_argument("--impls", nargs="+", default=None,
                      help="default: xla pallas (+ cudnn on GPU with 16-bit dtypes)")
  args = parser.parse_args()
  dtype = jnp.dtype(args.dtype)
  impls = args.impls or (["xla", "pallas"] + (
      ["cudnn"] if platform == "gpu" and dtype in (jnp.bfloat16, jnp.float16) else []))
  if args.shapes:
    causals = (True, False) if args.causal is None else (args.causal,)
    cases = [(parse_shape(s), c) for c in causals for s in args.shapes]
  else:
    cases = default_sweep(platform)

  print(f"platform={platform} ({flops.device_description()}) dtype={dtype} "
        f"iters={args.iters} (medians) documents/row={args.documents}")
  if platform == "cpu":
    print("NOTE: on CPU the Pallas kernels run in interpret mode: the error column checks "
          "them, the timings are not a speed measurement.")
  header = (f"{'BxLxNxH':>15} {'causal':>6} {'impl':>7} {'fwd ms':>9} {'fwd TF/s':>9} "
            f"{'f+b ms':>9} {'f+b TF/s':>9} {'f+b/xla':>8} {'max err':>9}")
  print(header)
  print("-" * len(header))
  for shape, causal in cases:
    spec = "x".join(map(str, shape))
    flops_fwd, flops_fwd_bwd = attention_flops(shape, causal)
    segment_ids = (packed_segment_ids(shape[0], shape[1], args.documents)
                   if args.documents > 1 else None)
    inputs, exact = make_case(shape, dtype, causal, segment_ids)
    xla_fwd_bwd = None
    for impl in impls:
      try:
        r = measure(impl, inputs, exact, causal, args.iters, segment_ids)
      except Exception as e:  # pylint: disable=broad-except  # Report and go on.
        print(f"{spec:>15} {str(causal):>6} {impl:>7} failed: {type(e).__name__}: "
              f"{str(e).splitlines()[0][:70]}")
        continue
      xla_fwd_bwd = r["fwd_bwd_s"] if impl == "xla" else xla_fwd_bwd
      ratio = f"{r['fwd_bwd_s'] / xla_fwd_bwd:8.2f}" if xla_fwd_bwd else f"{'-':>8}"
      print(f"{spec:>15} {str(causal):>6} {impl:>7} {r['fwd_s'] * 1e3:9.2f} "
            f"{flops_fwd / r['fwd_s'] / 1e12:9.3f} {r['fwd_bwd_s'] * 1e3:9.2f} "
            f"{flops_fwd_bwd / r['fwd_bwd_s'] / 1e12:9.3f} {ratio} {r['error']:9.2e}",
            flush=True)


if __name__ == "__main__":
  main()
