r"""Generates text from a trained run: ``python -m bigmodel.generate --workdir=DIR --prompt=...``.

Other flags: ``--prompts_file`` (one prompt per line), ``--max_new_tokens``,
``--temperature`` (0 = greedy, the default), ``--top_k``, ``--top_p``,
``--num_beams`` (> 1 = beam search, with ``--length_penalty``), ``--stop``
(repeatable), ``--seed``, ``--step`` (default: the latest checkpoint),
``--chat`` (each prompt is a user message in the model's chat template, with
``--system`` before it; the reply ends at the end-of-turn token).
Prints each completion (the new text only; with several prompts each after a
``----- i -----`` line). See docs/generation.md.

In Python (notebooks), the same loader::

    from bigmodel import api
    generator = api.load_generator("runs/gpt")     # latest checkpoint
    generator.generate(["def add(a, b):"], max_new_tokens=32)

The flags are defined only when this runs as a program, so importing it
(e.g. next to ``bigmodel.train``) defines none.
"""
import io
import os

from absl import app
from absl import flags

from bigmodel import cli
from bigmodel.errors import UserError, fail, user_errors_exit
from bigmodel.generation.generator import load

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "A training run's directory.")
  flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
  flags.DEFINE_multi_string("prompt", None, "A prompt (repeatable).")
  flags.DEFINE_string("prompts_file", None, "A file with one prompt per line.")
  flags.DEFINE_integer("max_new_tokens", 64, "New tokens per prompt at most.")
  flags.DEFINE_float("temperature", 0.0, "0 = greedy; else sample at it.")
  flags.DEFINE_integer("top_k", 0, "Sample among the k most likely (0 = all).")
  flags.DEFINE_float("top_p", 1.0, "Sample within this probability mass (nucleus).")
  flags.DEFINE_integer("num_beams", 1, "> 1: beam search with this many beams.")
  flags.DEFINE_float("length_penalty", 1.0, "Beam score = log p / length ** this.")
  flags.DEFINE_multi_string("stop", [], "Cut a completion at this string (repeatable).")
  flags.DEFINE_integer("seed", 0, "Random seed of sampling.")
  flags.DEFINE_bool("chat", False, "Each prompt is a user message, rendered by the model's "
                    "chat template; prints the assistant's reply.")
  flags.DEFINE_string("system", None, "With --chat: a system message before each prompt.")


def _read_prompts() -> list[str]:
  prompts = list(FLAGS.prompt or [])
  if FLAGS.prompts_file:
    path = FLAGS.prompts_file
    if not os.path.exists(path):
      raise UserError(f"--prompts_file={path} does not exist")
    if not os.path.isfile(path):
      raise UserError(f"--prompts_file={path} is not a file")
    try:
      with open(path, "rb") as f:
        data = f.read()
    except OSError as e:
      raise UserError(f"cannot read --prompts_file={path}: {e.strerror or e}") from e
    try:
      # UTF-8 whatever the locale; decoded whole so that the offset is the file's.
      text = data.decode("utf-8")
    except UnicodeDecodeError as e:
      raise UserError(f"--prompts_file={path} is not UTF-8 text (byte {e.start} is "
                      f"{data[e.start]:#04x}); save it as UTF-8") from e
    # Universal newlines, as reading the file as text would.
    prompts += [line.rstrip("\n") for line in io.StringIO(text, newline=None)]
  if not prompts:
    raise UserError("give --prompt or --prompts_file")
  return prompts


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.require_flags("workdir")
  with user_errors_exit():
    prompts = _read_prompts()
    if FLAGS.system is not None and not FLAGS.chat:
      raise UserError("--system needs --chat")
    generator = load(FLAGS.workdir, FLAGS.step)
    if FLAGS.chat:
      prompts = [generator.chat_prompt(p, FLAGS.system) for p in prompts]
    completions = generator.generate(
        prompts, max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
        top_k=FLAGS.top_k, top_p=FLAGS.top_p, num_beams=FLAGS.num_beams,
        length_penalty=FLAGS.length_penalty, stop=FLAGS.stop, seed=FLAGS.seed,
        templated=FLAGS.chat)
  for i, completion in enumerate(completions):
    if len(completions) > 1:
      print(f"----- {i} -----")
    print(completion, flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
