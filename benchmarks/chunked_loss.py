r"""Full logits vs the chunked output projection + loss (``model.loss_chunk_len``).

    python -m benchmarks.chunked_loss --config=configs/gpt.py:small \
        --config.data.seq_len=512 --config.train.batch_size=4 --chunks=0,128,512 [--rounds=6]
    python -m benchmarks.chunked_loss --config=configs/llama.py:llama3_8b \
        --config.data.seq_len=8192 --config.train.batch_size=1 --chunks=0,1024 --compile_only

For each chunk length (0 = full logits) the trainer's own compiled step
(``benchmarks.train_step.compile_step``): XLA's compiled per-device memory
(temporaries and peak) and the planner's (``bigmodel.memory``). Without
``--compile_only`` the variants then step in turns on the same synthetic
batches (A B C A B C ...: a noisy machine slows them alike) and the table
adds each one's median step time, tokens/s and its ratio to full logits.
"""
import statistics
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from benchmarks.train_step import compile_step, compiled_memory
from bigmodel import memory, sharding
from bigmodel.config import validate
from bigmodel.data.synthetic import SyntheticIterator
from bigmodel.errors import UserError
from bigmodel.state import create_sharded_state

_MIB = 2 ** 20


def variant(config, chunk_len: int):
  """``config`` with ``model.loss_chunk_len`` set."""
  config = config.copy_and_resolve_references()
  config.model.loss_chunk_len = chunk_len
  return config


def measure(config, chunks: list[int], rounds: int, compile_only: bool) -> list[dict]:
  """One row per chunk length: memory, and (unless ``compile_only``) speed."""
  mesh = sharding.make_mesh(config.mesh)
  rows, steps = [], []
  with sharding.activate(mesh):
    for chunk_len in chunks:
      cfg = variant(config, chunk_len)
      validate(cfg)
      compiled, pieces, times = compile_step(cfg, mesh)
      planned = memory.estimate(cfg, dict(mesh.shape), jax.default_backend())
      rows.append(dict(chunk_len=chunk_len, compile_s=times["compile_s"],
                       planned=planned.total, **compiled_memory(compiled)))
      steps.append((compiled, pieces))
    if compile_only:
      return rows
    data = SyntheticIterator(vocab_size=config.model.vocab_size, seq_len=config.data.seq_len,
                             batch_size=config.train.batch_size, seed=config.train.seed)
    batches = [sharding.global_batch(next(data), mesh) for _ in range(2)]
    states = []
    for compiled, (_, model, optimizer, _, _) in steps:
      state, _ = create_sharded_state(config, model, optimizer, mesh)
      state, _ = compiled(state, batches[0])  # Warm-up.
      states.append(jax.block_until_ready(state))
    times = [[] for _ in steps]
    for r in range(rounds):
      for i, (compiled, _) in enumerate(steps):
        start = time.perf_counter()
        states[i], metrics = jax.block_until_ready(compiled(states[i], batches[r % 2]))
        times[i].append(time.perf_counter() - start)
        rows[i].setdefault("losses", []).append(float(metrics["loss"]))
  tokens = config.train.batch_size * config.data.seq_len
  for row, t in zip(rows, times):
    row.update(step_s=statistics.median(t), tokens_per_s=tokens / statistics.median(t))
  return rows


def format_table(rows: list[dict], compile_only: bool) -> str:
  head = ["chunk", "compile s", "temp MiB", "peak MiB", "planned MiB"]
  if not compile_only:
    head += ["step s (median)", "tokens/s", "vs full logits"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  base = rows[0].get("tokens_per_s")
  for row in rows:
    cells = [str(row["chunk_len"] or "full logits"), f"{row['compile_s']:.1f}",
             f"{row['temp'] / _MIB:,.0f}", f"{row['peak'] / _MIB:,.0f}",
             f"{row['planned'] / _MIB:,.0f}"]
    if not compile_only:
      cells += [f"{row['step_s']:.3f}", f"{row['tokens_per_s']:,.0f}",
                f"{row['tokens_per_s'] / base:.3f}x"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv, config_flag):
  del argv
  chunks = [int(x) for x in flags.FLAGS.chunks]
  if not chunks or min(chunks) < 0:
    raise UserError(f"--chunks={','.join(flags.FLAGS.chunks)}: chunk lengths >= 0 (0 = full)")
  rows = measure(config_flag.value, chunks, flags.FLAGS.rounds, flags.FLAGS.compile_only)
  c = config_flag.value
  print(f"{c.get('preset', '')}: batch {c.train.batch_size} x {c.data.seq_len}, vocabulary "
        f"{c.model.vocab_size}, {jax.device_count()} x {jax.devices()[0].device_kind}")
  print(format_table(rows, flags.FLAGS.compile_only))


if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/gpt.py:small", "Model config.")
  flags.DEFINE_list("chunks", ["0", "128", "512"], "model.loss_chunk_len values (0 = full).")
  flags.DEFINE_integer("rounds", 6, "Timed steps per variant, taken in turns.")
  flags.DEFINE_bool("compile_only", False, "Memory only (abstract state, no steps).")
  app.run(lambda argv: main(argv, _CONFIG))
