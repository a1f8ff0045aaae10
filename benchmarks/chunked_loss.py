r"""Full logits vs the chunked output projection + loss (``model.loss_chunk_len``).

    python -m benchmarks.chunked_loss --config=configs/gpt.py:small \
        --config.data.seq_len=512 --config.train.batch_size=4 --chunks=0,128,512 [--rounds=6]
    python -m benchmarks.chunked_loss --config=configs/llama.py:llama3_8b \
        --config.data.seq_len=8192 --config.train.batch_size=1 --chunks=0,1024 --compile_only

For each chunk length (0 = full logits) the trainer's own compiled step
(``benchmarks.variants.measure``): XLA's compiled per-device memory
(temporaries and peak) and the planner's (``bigmodel.memory``). Without
``--compile_only`` the variants then step in turns on the same synthetic
batches (A B C A B C ...: a noisy machine slows them alike) and the table
adds each one's median step time, tokens/s and its ratio to full logits.
"""
from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from benchmarks import variants
from bigmodel import flops
from bigmodel.config import validate
from bigmodel.errors import UserError

_MIB = 2 ** 20


def variant(config, chunk_len: int):
  """``config`` with ``model.loss_chunk_len`` set."""
  config = config.copy_and_resolve_references()
  config.model.loss_chunk_len = chunk_len
  validate(config)
  return config


def measure(config, chunks: list[int], rounds: int, compile_only: bool) -> list[dict]:
  """One row per chunk length: memory, and (unless ``compile_only``) speed."""
  rows = variants.measure([(str(c), variant(config, c), {}) for c in chunks], rounds,
                          compile_only)
  for row, chunk_len in zip(rows, chunks):
    row["chunk_len"] = chunk_len
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
        f"{c.model.vocab_size}, {jax.device_count()} x {flops.device_description()}")
  print(format_table(rows, flags.FLAGS.compile_only))


if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/gpt.py:small", "Model config.")
  flags.DEFINE_list("chunks", ["0", "128", "512"], "model.loss_chunk_len values (0 = full).")
  flags.DEFINE_integer("rounds", 6, "Timed steps per variant, taken in turns.")
  flags.DEFINE_bool("compile_only", False, "Memory only (abstract state, no steps).")
  app.run(lambda argv: main(argv, _CONFIG))
