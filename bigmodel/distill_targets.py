"""Sequence-level distillation data: a teacher's outputs as the targets.

    python -m bigmodel.distill_targets --teacher=WORKDIR --input=train.jsonl \\
        --out=distilled/train.jsonl [--num_beams=4] [--max_new_tokens=64]

For an encoder-decoder (T5) teacher and a seq2seq task file (CSV, JSON lines
or Parquet with ``--text_column`` and ``--target_column``), writes a JSON-lines
file whose target is the teacher's output for each input (greedy, or beam
search with ``--num_beams``), with the original target kept as
``original_target``: sequence-level knowledge distillation (Kim & Rush,
2016). The student then trains on it as on any seq2seq file
(``configs/t5_finetune.py``, ``data.task=seq2seq``, ``data.paths=distilled``),
learning the teacher's mode rather than matching its per-token
distributions (which ``config.distill`` does in the training step).

Generation uses the teacher's KV-cache generator in fixed shape buckets
(``bigmodel.generation``). The output is written to a temporary file and
renamed at the end: an existing ``--out`` is refused, never overwritten.
Bad input (a decoder-only teacher, a missing column, an unreadable file) is
one ``error:`` line, exit 2.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from absl import app
from absl import flags

from bigmodel import cli
from bigmodel.errors import UserError, fail, user_errors_exit

# Inputs generated per call: a few shape buckets' worth.
_BATCH = 32


def define_flags() -> None:
  flags.DEFINE_string("teacher", None, "The teacher run's workdir (an encoder-decoder).")
  flags.DEFINE_integer("step", None, "The teacher's checkpoint step; default: the latest.")
  flags.DEFINE_string("input", None, "A seq2seq task file: .jsonl(.gz/.zst), .csv or .parquet.")
  flags.DEFINE_string("out", None, "The JSON-lines file to write (must not exist).")
  flags.DEFINE_string("text_column", "text", "Column of the input text.")
  flags.DEFINE_string("target_column", "target", "Column of the target text.")
  flags.DEFINE_integer("max_new_tokens", 64, "Target tokens generated at most.")
  flags.DEFINE_integer("num_beams", 1, "> 1: beam search with this many beams.")


def write_teacher_targets(teacher: str, input_path: str, out: str, *,
                          text_column: str = "text", target_column: str = "target",
                          max_new_tokens: int = 64, num_beams: int = 1,
                          step: Optional[int] = None) -> int:
  """Writes ``input_path``'s rows with the teacher's outputs as targets to
  ``out`` (JSON lines: ``text_column``, ``target_column``,
  ``original_target``); returns the number of rows.

  Raises:
    UserError: ``out`` exists or cannot be written, the input cannot be
      read, or the teacher is not an encoder-decoder.
  """
  from bigmodel.data import records  # pylint: disable=g-import-not-at-top
  from bigmodel.generation.generator import load  # pylint: disable=g-import-not-at-top
  if os.path.exists(out):
    raise UserError(f"--out={out} exists; give a new file (it is never overwritten)")
  cli.check_output_file(out, "--out")
  if not os.path.isfile(input_path):
    raise UserError(f"--input={input_path}: no such file")
  rows = records.read_task_file(input_path, text_column, target_column, "seq2seq")
  generator = load(teacher, step)
  if not generator.is_encoder_decoder:
    raise UserError(f"--teacher={teacher} is a decoder-only model; sequence-level targets "
                    "here are for encoder-decoder (T5) teachers (distil a decoder with "
                    "config.distill)")
  tmp = f"{out}.tmp.{os.getpid()}"
  try:
    with open(tmp, "x", encoding="utf-8") as f:
      for start in range(0, len(rows), _BATCH):
        chunk = rows[start:start + _BATCH]
        outputs = generator.generate([text for text, _ in chunk], max_new_tokens=max_new_tokens,
                                     num_beams=num_beams)
        for (text, target), output in zip(chunk, outputs):
          f.write(json.dumps({text_column: text, target_column: output,
                              "original_target": target}, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return len(rows)


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.require_flags("teacher", "input", "out")
  f = flags.FLAGS
  with user_errors_exit():
    count = write_teacher_targets(f.teacher, f.input, f.out, text_column=f.text_column,
                                  target_column=f.target_column,
                                  max_new_tokens=f.max_new_tokens, num_beams=f.num_beams,
                                  step=f.step)
  print(f"wrote {count} rows with {f.teacher}'s targets to {f.out}", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
