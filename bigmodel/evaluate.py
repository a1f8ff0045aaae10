r"""Evaluates a run's checkpoint: ``python -m bigmodel.evaluate --workdir=DIR [--split=validation] [--step=S]``.

Runs the trainer's eval path (``train_step.eval_step`` over the validation
batches of the run's own data config, summed by ``evaluation.evaluate``) and
reports, by task:

- lm: ``eval_loss`` and ``eval_perplexity`` (next-token accuracy too);
- mlm (BERT): ``eval_accuracy`` on the masked tokens, and the loss;
- classify: ``eval_accuracy``, macro ``eval_precision`` / ``eval_recall`` /
  ``eval_f1`` and the majority-class baseline;
- seq2seq: the loss, ``eval_baseline_loss`` (a unigram predictor that
  ignores the input), and ``eval_exact_match``: the share of examples whose
  greedy generation (cached decoding, up to the target length) equals the
  target (span corruption: the loss only).

``--eval_steps`` overrides ``train.eval_steps`` (batches; 0 for classify and
seq2seq = the whole split). Writes ``--out`` (default
``DIR/eval_SPLIT_stepS.json``) and prints a table. Only the validation split
exists as an eval stream in this stack.
"""
import contextlib
import json
import os
from typing import Any, Callable, Optional

from absl import app
from absl import flags
import jax
import numpy as np

from bigmodel import cli
from bigmodel import objectives
from bigmodel import sharding
from bigmodel import run as run_lib
from bigmodel import storage
from bigmodel import train_step
from bigmodel.data import build_datasets
from bigmodel.errors import UserError, fail, user_errors_exit
from bigmodel.evaluation import classification_eval_args, evaluate
from bigmodel.generation.generator import Generator

FLAGS = flags.FLAGS
SPLITS = ("validation",)


def exact_match(generator: Generator, eval_batches, decoder_length: int) -> dict[str, float]:
  """Share of real examples whose greedy generation equals the target (EOS excluded).

  Batches hold one example per row (seq2seq evaluation); padding rows have
  ``example_mask`` 0.
  """
  matches = total = 0
  eos = generator.eos_id
  for batch in eval_batches:
    rows = np.nonzero(batch["example_mask"] > 0)[0] if "example_mask" in batch else \
        np.arange(batch["encoder_inputs"].shape[0])
    prompts, targets = [], []
    for row in rows:
      prompts.append(batch["encoder_inputs"][row][batch["encoder_segment_ids"][row] > 0].tolist())
      target = batch["decoder_targets"][row][batch["loss_mask"][row] > 0].tolist()
      targets.append(target[:target.index(eos)] if eos in target else target)
    if not prompts:
      continue
    generated = generator.generate_ids(prompts, max_new_tokens=decoder_length)
    matches += sum(g == t for g, t in zip(generated, targets))
    total += len(prompts)
  return {"eval_exact_match": matches / max(total, 1), "eval_generated_examples": float(total)}


def evaluate_run(workdir: str, split: str = "validation", step: Optional[int] = None,
                 eval_steps: Optional[int] = None, with_confusion: bool = False,
                 check_step: Optional[Callable[[int], None]] = None
                 ) -> tuple[dict[str, Any], int, dict]:
  """(metrics, step, the run's config) of checkpoint ``step`` (default: latest).

  ``with_confusion`` adds, for classifiers, ``eval_confusion`` (counts
  [true class, predicted class]) and ``eval_labels`` (the class names).
  ``check_step`` is called with the checkpoint's step before the evaluation
  (e.g. to refuse an output path named after the step that cannot be written).
  """
  if split not in SPLITS:
    raise UserError(f"--split={split} is not one of: {', '.join(SPLITS)}")
  run = run_lib.load_run(workdir, step)
  config, step, mesh, model, params = run.config, run.step, run.mesh, run.model, run.params
  if config.data.task == "preference" and not config.init_from:  # Before any data is prepared.
    raise UserError(f"the DPO run in {workdir} has no init_from: no reference model to "
                    "evaluate against")
  if check_step is not None:
    check_step(step)
  if eval_steps is not None:
    config.train.eval_steps = eval_steps
  try:
    datasets = build_datasets(config, run.local_dir)
  except OSError as e:
    # The data is prepared (or the tokenizer trained) under the workdir when
    # missing there: a read-only or full workdir fails here.
    raise UserError(f"cannot prepare the run's data for evaluation in {workdir}: "
                    f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}") from e
  if hasattr(datasets.train_iter, "close"):
    datasets.train_iter.close()  # Only the eval stream is read.
  if datasets.make_eval_iter is None:
    raise UserError(f"the run in {workdir} has no {split} data to evaluate (synthetic data, "
                    "no validation split, or eval_steps 0)")
  reference = None
  if config.data.task == "preference":  # DPO's reference: the run's starting model,
    # the very checkpoint it started from where its checkpoints say which.
    source = next((b for b in run.bases if b["reference"]), None)
    base_workdir, base_step = ((source["workdir"], source["step"]) if source
                               else (config.init_from, None))
    reference, _, _ = run_lib.restore_params(base_workdir, mesh, base_step)
  shardings_of = lambda tree: jax.tree_util.tree_map(lambda x: x.sharding, tree)  # pylint: disable=unnecessary-lambda-assignment
  eval_fn = train_step.jit_eval_step(model, mesh, shardings_of(params),
                                     objectives.for_evaluation(config, model),
                                     shardings_of(reference))
  with sharding.activate(mesh):
    metrics = evaluate(eval_fn, params, datasets.make_eval_iter(), mesh,
                       with_confusion=with_confusion, reference=reference,
                       **classification_eval_args(config, datasets))
    metrics.update(datasets.eval_baselines)
    if with_confusion and "eval_confusion" in metrics:
      metrics["eval_labels"] = list(datasets.label_names)
    if config.data.task == "seq2seq":
      generator = Generator(model, params, config, datasets.tokenizer, mesh)
      metrics.update(exact_match(generator, datasets.make_eval_iter(), datasets.decoder_length))
  return metrics, step, config.to_dict()


def format_table(metrics: dict[str, float]) -> str:
  width = max(len(k) for k in metrics)
  return "\n".join([f"{'metric'.ljust(width)}  value"] +
                   [f"{k.ljust(width)}  {v:.6g}" for k, v in sorted(metrics.items())])


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "A training run's directory.")
  flags.DEFINE_enum("split", "validation", list(SPLITS), "Which data to evaluate on.")
  flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
  flags.DEFINE_integer("eval_steps", None, "Batches (overrides train.eval_steps).")
  flags.DEFINE_string("out", None, "JSON output; default DIR/eval_SPLIT_stepS.json.")


def default_out(workdir: str, split: str, step: int) -> str:
  name = f"eval_{split}_step{step}.json"
  return f"{workdir.rstrip('/')}/{name}" if storage.is_url(workdir) else os.path.join(workdir,
                                                                                      name)


def check_output(out: Optional[str], workdir: str) -> None:
  """Raises UserError unless the record can be written: ``out``, or by default the workdir.

  Called before the evaluation, which may take long. The default file's name
  holds the step, known once the checkpoint is found (``evaluate_run``'s
  ``check_step`` checks it then).
  """
  if out:
    cli.check_output_file(out, "--out")
  elif os.path.isdir(workdir) and not os.access(workdir, os.W_OK | os.X_OK):
    raise UserError(f"cannot write to {workdir} (permission denied), where the results go "
                    "by default; give --out=PATH elsewhere")


def write_record(record: dict[str, Any], out: str) -> None:
  """Writes ``record`` as JSON to ``out`` (a path or a URL), atomically, leaving
  no temporary file."""
  text = json.dumps(record, indent=2, sort_keys=True) + "\n"
  if storage.is_url(out):  # One upload: readers see the old object or the new one.
    storage.write_bytes(out, text.encode())
    return
  tmp = f"{out}.tmp.{os.getpid()}"
  try:
    with open(tmp, "x") as f:  # "x": never truncates a file that is someone else's.
      f.write(text)
    os.replace(tmp, out)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.require_flags("workdir")
  with user_errors_exit():
    check_output(FLAGS.out, FLAGS.workdir)
    check_step = None if FLAGS.out else lambda step: cli.check_output_file(
        default_out(FLAGS.workdir, FLAGS.split, step))
    metrics, step, config = evaluate_run(FLAGS.workdir, FLAGS.split, FLAGS.step,
                                         FLAGS.eval_steps, check_step=check_step)
  out = FLAGS.out or default_out(FLAGS.workdir, FLAGS.split, step)
  record: dict[str, Any] = dict(step=step, split=FLAGS.split, family=config["model"]["family"],
                                task=config["data"]["task"], metrics=metrics)
  try:
    write_record(record, out)
  except OSError as e:  # Checked up front, but the disk may fill or the folder go.
    fail(f"cannot write {out}: {e.strerror or e}")
  print(f"{config['model']['family']} / {config['data']['task']}, step {step}, {FLAGS.split}:")
  print(format_table(metrics))
  print(f"wrote {out}", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
