r"""Quantization: bytes, eval loss and decode speed as float32, bf16, int8, int4; QAT vs float.

    python -m benchmarks.quantization --config=configs/gpt.py:tiny \
        [--config.train.steps=300] [--qat_steps=300] [--out_dir=D] \
        [--group_size=128] [--eval_steps=16] [--new_tokens=64] [--repeats=5]

Trains ``--config`` (any family's: e.g. ``configs/gpt.py:tiny``,
``configs/bert.py:tiny`` (MLM) or ``configs/t5.py:tiny`` (span corruption), on
the default offline data, the Python standard library) in ``D/float``, or
takes the trained run ``--workdir=W`` (instead of ``--config``), then writes
its bf16 copy (``model.param_dtype`` bfloat16) and its int8 and int4
(``--group_size``) weight-quantized copies with ``bigmodel.quantize`` and
reports, for each: parameter bytes (all, and the dense kernels alone, with
their ratio to float32), the eval loss ``bigmodel.evaluate`` computes
(``evaluate.evaluate_run`` on ``--eval_steps`` validation batches) and, for
families that generate (the decoders and T5; BERT shows ``n/a``), decode
tokens/s (greedy, ``--decode_batch`` rows of a 16-token prompt,
``--new_tokens`` new tokens without stopping at EOS; the median of
``--repeats`` runs after a compile run, through
``Generator.generate_ids``). Then trains the same config with int8
quantized training for ``--qat_steps`` (in ``D/qat_int8``; a float run of as
many steps, if the float run has another length) and compares their eval
losses. Ends with the goals: int8 within 1% of float's eval loss, int4 within
5%, dense kernels 4x / 8x smaller than float32.
"""
import os
import statistics
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bigmodel import cli
from bigmodel import flops
from bigmodel import run as run_lib
from bigmodel import quantize
# The trainer's own flags: --config (the run to train) and --workdir (a trained
# run to measure instead); it defines them when imported.
from bigmodel import train as train_lib
from bigmodel.config import config_from_dict, validate
from bigmodel.errors import UserError, fail, user_errors_exit
from bigmodel.models import ModelConfig, families, quantization

_FLAGS = flags.FLAGS
PROMPT_LEN = 16


def _define_flags():
  flags.DEFINE_string("out_dir", None, "Where the runs and copies go (default: a new "
                      "temporary folder).")
  flags.DEFINE_integer("qat_steps", None, "Steps of the int8 QAT run (default: the float "
                       "run's); a float run of as many steps is trained to compare if needed.")
  flags.DEFINE_integer("group_size", 128, "int4's inputs per scale.")
  flags.DEFINE_integer("eval_steps", 16, "Validation batches per eval loss.")
  flags.DEFINE_integer("new_tokens", 64, "New tokens per decode run.")
  flags.DEFINE_integer("decode_batch", 8, "Rows decoded together.")
  flags.DEFINE_integer("repeats", 5, "Decode runs timed (the median is reported).")


def _train(config: ml_collections.ConfigDict, workdir: str) -> str:
  if not os.path.isdir(run_lib.RunDir(workdir).checkpoints):
    start = time.perf_counter()
    train_lib.Trainer(config, workdir).run()
    print(f"trained {workdir} ({config.train.steps} steps, {time.perf_counter() - start:.0f} s)",
          flush=True)
  return workdir


def _bf16_copy(workdir: str, out: str) -> str:
  """``workdir``'s run with bfloat16 parameters, as a workdir (``model.param_dtype``)."""
  if not os.path.isdir(out):
    run = run_lib.load_run(workdir)
    config = ml_collections.ConfigDict(run.config.to_dict())
    config.model.param_dtype = "bfloat16"
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), run.params)
    quantize.write_workdir(out, run.step, config, params, workdir)
  return out


def _decode_tokens_per_s(workdir: str, vocab: int) -> float:
  from bigmodel.generation.generator import load  # pylint: disable=g-import-not-at-top
  generator = load(workdir)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, vocab, PROMPT_LEN).tolist() for _ in range(_FLAGS.decode_batch)]
  decode = lambda: generator.generate_ids(prompts, max_new_tokens=_FLAGS.new_tokens,  # pylint: disable=g-long-lambda
                                          stop_at_eos=False)
  decode()  # Compiles.
  times = []
  for _ in range(_FLAGS.repeats):
    start = time.perf_counter()
    decode()
    times.append(time.perf_counter() - start)
  return _FLAGS.decode_batch * _FLAGS.new_tokens / statistics.median(times)


def _measure(name: str, workdir: str, generates: bool, vocab: int) -> dict:
  from bigmodel.evaluate import evaluate_run  # pylint: disable=g-import-not-at-top
  run = run_lib.load_run(workdir)
  row = dict(name=name, params=quantization.param_bytes(run.params),
             kernels=quantization.param_bytes(run.params, kernels_only=True))
  del run
  metrics, _, _ = evaluate_run(workdir, eval_steps=_FLAGS.eval_steps)
  row["loss"] = metrics["eval_loss"]
  row["tok_s"] = _decode_tokens_per_s(workdir, vocab) if generates else None
  print(f"measured {name}", flush=True)
  return row


def _table(rows: list[dict]) -> str:
  base = rows[0]
  lines = [f"{'format':22} {'params MiB':>10} {'kernels MiB':>11} {'kernels vs f32':>14} "
           f"{'eval loss':>9} {'vs float':>8} {'decode tok/s':>12}"]
  for r in rows:
    tok_s = f"{r['tok_s']:12.0f}" if r["tok_s"] else f"{'n/a':>12}"
    lines.append(f"{r['name']:22} {r['params'] / 2**20:10.3f} {r['kernels'] / 2**20:11.3f} "
                 f"{base['kernels'] / r['kernels']:13.2f}x {r['loss']:9.4f} "
                 f"{(r['loss'] / base['loss'] - 1) * 100:+7.2f}% {tok_s}")
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict) -> str:
  """Trains ``config`` (unless --workdir), measures, and returns the report."""
  config = ml_collections.ConfigDict(config.to_dict())
  out_dir = _FLAGS.out_dir or tempfile.mkdtemp(prefix="quantization_bench.")
  os.makedirs(out_dir, exist_ok=True)
  if _FLAGS.workdir:
    config, _ = run_lib.saved_config(_FLAGS.workdir)
    config = config_from_dict(config.to_dict())
  config.train.update(sample_tokens=0, progress=False)
  validate(config)
  if config.lora.rank:
    raise UserError("give a run without LoRA (or merge it first): QAT refuses adapters")
  group = _FLAGS.group_size
  problem = quantization.group_size_problem(ModelConfig.from_config(config.model), group)
  if problem:
    raise UserError(problem)
  float_dir = _FLAGS.workdir or _train(config, os.path.join(out_dir, "float"))
  steps = run_lib.saved_config(float_dir)[1]
  copies = [("float32", float_dir), ("bfloat16", _bf16_copy(float_dir, f"{out_dir}/bf16"))]
  for bits, group_size, label in ((8, 0, "int8 (per channel)"),
                                  (4, group, f"int4 (groups of {group})")):
    out = os.path.join(out_dir, f"int{bits}")
    if not os.path.isdir(out):
      quantize.quantize_run(float_dir, out, bits, group_size)
    copies.append((label, out))
  generates = families.get(config.model.family).generates
  rows = [_measure(name, wd, generates, config.model.vocab_size) for name, wd in copies]
  qat_steps = _FLAGS.qat_steps or steps
  trial = ml_collections.ConfigDict(config.to_dict())
  trial.train.steps, trial.init_from = qat_steps, ""
  # The float run's tokenizer and prepared data: the same tokens, nothing prepared again.
  source = run_lib.RunDir(float_dir)
  if not trial.data.tokenizer and os.path.isfile(source.tokenizer_model):
    trial.data.tokenizer = os.path.abspath(source.tokenizer_model)
  if not trial.data.data_dir and os.path.isdir(source.data):
    trial.data.data_dir = os.path.abspath(source.data)
  reference = float_dir if qat_steps == steps else _train(trial, f"{out_dir}/float_{qat_steps}")
  trial.model.quantization = "int8"
  qat_dir = _train(trial, f"{out_dir}/qat_int8_{qat_steps}")
  from bigmodel.evaluate import evaluate_run  # pylint: disable=g-import-not-at-top
  losses = {name: evaluate_run(wd, eval_steps=_FLAGS.eval_steps)[0]["eval_loss"]
            for name, wd in (("float", reference), ("qat", qat_dir))}
  m = config.model
  header = (f"{m.family}, {m.num_layers} layers x {m.embed_dim} wide, trained {steps} steps "
            f"({float_dir}); eval: {_FLAGS.eval_steps} validation batches; decode: "
            f"{_FLAGS.decode_batch} rows x {_FLAGS.new_tokens} new tokens, median of "
            f"{_FLAGS.repeats} ({flops.device_description()})")
  int8, int4 = rows[2], rows[3]
  gap = lambda r: (r["loss"] / rows[0]["loss"] - 1) * 100  # pylint: disable=unnecessary-lambda-assignment
  goals = [f"int8 eval loss within 1% of float: {'met' if abs(gap(int8)) <= 1 else 'NOT met'} "
           f"({gap(int8):+.2f}%)",
           f"int4 within 5%: {'met' if abs(gap(int4)) <= 5 else 'NOT met'} ({gap(int4):+.2f}%)",
           f"dense kernels 4x / 8x smaller than float32: "
           f"{rows[0]['kernels'] / int8['kernels']:.2f}x / {rows[0]['kernels'] / int4['kernels']:.2f}x"]
  qat_gap = (losses["qat"] / losses["float"] - 1) * 100
  return "\n".join([header, _table(rows), "",
                    f"QAT int8 after {qat_steps} steps: eval loss {losses['qat']:.4f} vs float "
                    f"{losses['float']:.4f} ({qat_gap:+.2f}%)", "",
                    "goals: " + "; ".join(goals)])


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _FLAGS.workdir:
    cli.require_flags("config")
  with user_errors_exit():
    print(run(_FLAGS.config), flush=True)


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
