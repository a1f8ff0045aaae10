r"""How long a checkpoint save takes, and how much an async save slows the steps around it.

    python benchmarks/checkpoint_save.py [--preset=small] [--batch_size=1] [--seq_len=256] [--store=s3]

Trains on synthetic tokens; times steps with no save nearby, the steps that
overlap an async save, the time ``save()`` blocks the loop (device-to-host
copy), the time until the save is durable, and a synchronous save for
comparison. Prints a table of medians.

``--store=s3`` also times copying each checkpoint up to an ``s3://`` workdir
(``bigmodel.remote_workdir``; a moto S3 server that this script starts on
127.0.0.1): in the loop (push and wait, what the trainer did before the copy
moved to a background thread) and in the background (how long ``push()``
blocks the loop, the steps that overlap the copy, the time until it is up).
"""
import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from bigmodel import sharding
from bigmodel import run as run_lib
from bigmodel.models import build_model
from bigmodel.optim import make_optimizer
from bigmodel.state import create_sharded_state
from bigmodel.train_step import jit_train_step
from configs.gpt import get_config


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--preset", default="small")
  parser.add_argument("--batch_size", type=int, default=1)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--steps_between_saves", type=int, default=6)
  parser.add_argument("--saves", type=int, default=3)
  parser.add_argument("--store", choices=["", "s3"], default="")
  args = parser.parse_args()

  config = get_config(args.preset)
  config.data.seq_len = args.seq_len
  mesh = sharding.make_mesh(config.mesh)
  model = build_model(config.model)
  optimizer, schedule = make_optimizer(config.optim, 1000)
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, config.model.vocab_size, (args.batch_size, args.seq_len + 1))
  batch = dict(inputs=tokens[:, :-1].astype(np.int32), targets=tokens[:, 1:].astype(np.int32),
               segment_ids=np.ones((args.batch_size, args.seq_len), np.int32),
               positions=np.tile(np.arange(args.seq_len, dtype=np.int32), (args.batch_size, 1)),
               loss_mask=np.ones((args.batch_size, args.seq_len), np.float32))

  with sharding.activate(mesh):
    state, shardings = create_sharded_state(config, model, optimizer, mesh)
    step_fn = jit_train_step(model, optimizer, schedule, 1, mesh, shardings)
    batch = sharding.global_batch(batch, mesh)
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    num_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))

    def timed_step(state):
      start = time.perf_counter()
      state, metrics = step_fn(state, batch)
      jax.block_until_ready(metrics)
      return state, time.perf_counter() - start

    quiet, overlapped, blocking, durable, sync_saves = [], [], [], [], []
    upload = {"in_loop": [], "push": [], "overlapped": [], "until_up": []}
    with tempfile.TemporaryDirectory() as async_dir, tempfile.TemporaryDirectory() as sync_dir, (
        _s3_server() if args.store else contextlib.nullcontext()):
      if args.store:
        from bigmodel.remote_workdir import RemoteWorkdir  # pylint: disable=g-import-not-at-top
        # Two workdirs with the same mirror: each copies every checkpoint up once.
        in_loop, background = (RemoteWorkdir(f"s3://bench/{name}", local=sync_dir)
                               for name in ("in_loop", "background"))
      async_ckpt = run_lib.checkpointer(async_dir, keep=1, async_save=True)
      sync_ckpt = run_lib.checkpointer(sync_dir, keep=1, async_save=False)
      step = 1
      for _ in range(args.saves):
        for _ in range(args.steps_between_saves):
          state, seconds = timed_step(state)
          quiet.append(seconds)
          step += 1
        start = time.perf_counter()
        async_ckpt.save(step, state, {}, config)
        blocking.append(time.perf_counter() - start)
        # Steps run while the write goes on in the background.
        while async_ckpt.is_saving():
          state, seconds = timed_step(state)
          overlapped.append(seconds)
          step += 1
        durable.append(time.perf_counter() - start)
        start = time.perf_counter()
        sync_ckpt.save(step, state, {}, config)
        sync_ckpt.wait()
        sync_saves.append(time.perf_counter() - start)
        if args.store:
          start = time.perf_counter()
          in_loop.push()
          in_loop.wait()
          upload["in_loop"].append(time.perf_counter() - start)
          start = time.perf_counter()
          background.push()
          upload["push"].append(time.perf_counter() - start)
          while background.uploading():
            state, seconds = timed_step(state)
            upload["overlapped"].append(seconds)
            step += 1
          background.wait()
          upload["until_up"].append(time.perf_counter() - start)
      async_ckpt.close()
      sync_ckpt.close()

  median = statistics.median
  print(f"\npreset {args.preset}: state {num_bytes / 2**20:.0f} MiB "
        f"(params + optimizer), batch {args.batch_size} x {args.seq_len}, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s)")
  rows = [
      ("step, no save in flight", median(quiet)),
      ("step, overlapping an async save", median(overlapped) if overlapped else float("nan")),
      ("async save(): loop blocked", median(blocking)),
      ("async save: until durable", median(durable)),
      ("synchronous save, until durable", median(sync_saves)),
  ]
  if args.store:
    rows += [
        (f"copy up to {args.store}, in the loop", median(upload["in_loop"])),
        ("background copy: push() blocked", median(upload["push"])),
        ("step, overlapping a background copy",
         median(upload["overlapped"]) if upload["overlapped"] else float("nan")),
        ("background copy: until up", median(upload["until_up"])),
    ]
  print(f"{'what':36s} {'median s':>9s}")
  for name, seconds in rows:
    print(f"{name:36s} {seconds:9.3f}")
  if overlapped:
    print(f"slowdown of overlapped steps: {median(overlapped) / median(quiet):.2f}x "
          f"({len(overlapped)} steps overlapped {args.saves} saves)")
  if upload["overlapped"]:
    print(f"slowdown of steps overlapping a copy up: "
          f"{median(upload['overlapped']) / median(quiet):.2f}x "
          f"({len(upload['overlapped'])} steps overlapped {args.saves} copies)")


@contextlib.contextmanager
def _s3_server():
  """A moto S3 server in its own process on 127.0.0.1 (as a remote store
  would be), with a ``bench`` bucket; points this process's clients at it."""
  import fsspec  # pylint: disable=g-import-not-at-top
  with socket.socket() as probe:  # A free port.
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
  server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                     "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
  try:
    deadline = time.time() + 60
    while True:
      try:
        fsspec.filesystem("s3", skip_instance_cache=True).mkdir("bench")
        break
      except Exception:  # pylint: disable=broad-except
        if time.time() > deadline:
          raise
        time.sleep(0.5)
    yield
  finally:
    server.terminate()
    server.wait()


if __name__ == "__main__":
  main()
