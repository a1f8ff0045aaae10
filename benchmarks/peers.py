r"""bigmodel's trainer side by side with MaxText and PyTorch + transformers.

    python -m benchmarks.peers --maxtext_python=/path/to/venv/bin/python \
        [--rounds=3] [--steps=6] [--maxtext_remat=minimal,full] [--torch] \
        [--results=benchmarks/results.jsonl]

One shape for everyone (issue 25's): a GPT-2-small decoder (d768, 12 layers,
12 heads, MLP 3072, vocabulary 32,768), sequence 512, global batch 4, float32,
AdamW, synthetic tokens, one device. Each system is its own trainer run as a
subprocess, the way its users start it:

- bigmodel: ``python -m bigmodel.train --config=configs/gpt.py:small`` with
  ``data.source=synthetic`` (scan over layers, ``remat=dots_with_no_batch_dims_saveable``);
- MaxText: ``maxtext.trainers.pre_train.train`` with its ``gpt3`` decoder block
  (fused QKV, learned positions, tied output), ``dataset_type=synthetic``, once
  per ``--maxtext_remat`` policy; MaxText needs Python >= 3.12, so it runs from
  its own environment (docs/performance.md says how that one was built);
- ``--torch``: transformers' ``GPT2LMHeadModel`` in eager PyTorch (SDPA
  attention), the same shape, ``torch.optim.AdamW``.

The systems take turns, round after round, so load on a shared machine falls
on all of them alike. From each run the first ``--skip`` steps (compilation)
are dropped; a system's figure is the median over the rest of its steps in
all rounds. MFU divides bigmodel's model-FLOP count of this shape (the same
work for every system: ``bigmodel.flops.train_flops_per_step``) by the best of
the float32 matmul probes taken before every run, so a loaded moment cannot
shrink the peak.
"""
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

from bigmodel import api
from bigmodel import flops
from bigmodel.errors import fail
from bigmodel.models import ModelConfig

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPE = dict(embed_dim=768, num_layers=12, num_heads=12, mlp_dim=3072, vocab_size=32768,
             seq_len=512, batch_size=4)

_FLAGS = flags.FLAGS
flags.DEFINE_string("maxtext_python", "", "A Python interpreter with maxtext installed "
                    "(empty: no MaxText rows).")
flags.DEFINE_list("maxtext_remat", ["minimal"], "MaxText remat policies to run, one row each.")
flags.DEFINE_bool("torch", False, "Add eager PyTorch + transformers GPT-2 (needs torch).")
flags.DEFINE_integer("rounds", 3, "Turns each system takes.")
flags.DEFINE_integer("steps", 6, "Training steps per run.")
flags.DEFINE_integer("skip", 2, "Leading steps of each run not timed (compilation).")
flags.DEFINE_string("results", "", "Append the record as one JSON line to this file.")


def bigmodel_step_seconds(steps: int) -> list[float]:
  """Step times of one ``bigmodel.train`` run, from its metrics.jsonl."""
  s = SHAPE
  with tempfile.TemporaryDirectory() as workdir:
    subprocess.run(
        [sys.executable, "-m", "bigmodel.train", "--config=configs/gpt.py:small",
         f"--workdir={workdir}", "--config.data.source=synthetic",
         f"--config.data.seq_len={s['seq_len']}", f"--config.train.batch_size={s['batch_size']}",
         f"--config.model.vocab_size={s['vocab_size']}", f"--config.train.steps={steps}",
         "--config.train.log_every=1", "--config.train.eval_every=0",
         "--config.train.sample_tokens=0"],
        cwd=_ROOT, check=True, capture_output=True)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      records = [json.loads(line) for line in f]
  tokens = s["seq_len"] * s["batch_size"]
  # tokens_per_sec is logged from the second step on (the first one compiles).
  return [tokens / r["tokens_per_sec"] for r in records if "tokens_per_sec" in r]


def maxtext_package(python: str) -> str:
  """The folder of the maxtext package ``python`` imports (``error:`` and
  exit 2 when it cannot)."""
  probe = "import maxtext, os; print(os.path.dirname(maxtext.__file__))"
  try:
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True)
  except OSError as e:
    fail(f"--maxtext_python={python}: {e.strerror}")
  if done.returncode:
    fail(f"--maxtext_python={python} cannot import maxtext: "
         f"{(done.stderr.strip().splitlines() or ['?'])[-1]}")
  return done.stdout.strip()


def maxtext_command(python: str, package: str, remat: str, steps: int,
                    output_dir: str) -> list[str]:
  """MaxText's pre-training entry point with its gpt3 block at SHAPE."""
  s = SHAPE
  return [python, "-m", "maxtext.trainers.pre_train.train",
          os.path.join(package, "configs", "base.yml"), "run_name=peers",
          f"base_output_directory={output_dir}", "hardware=cpu", "dataset_type=synthetic",
          "enable_checkpointing=false", "enable_tensorboard=false",
          "skip_jax_distributed_system=true", f"steps={steps}", "log_period=1000",
          f"per_device_batch_size={s['batch_size']}", f"max_target_length={s['seq_len']}",
          "dtype=float32", "weight_dtype=float32", "decoder_block=gpt3",
          f"base_emb_dim={s['embed_dim']}", f"base_num_query_heads={s['num_heads']}",
          f"base_num_kv_heads={s['num_heads']}", f"base_mlp_dim={s['mlp_dim']}",
          f"base_num_decoder_layers={s['num_layers']}",
          f"head_dim={s['embed_dim'] // s['num_heads']}", f"vocab_size={s['vocab_size']}",
          "mlp_activations=[gelu]", "logits_via_embedding=true",
          "normalize_embedding_logits=false", "use_iota_embed=true", "fused_qkv=true",
          f"trainable_position_size={s['seq_len']}", "enable_dropout=false",
          "opt_type=adamw", "attention=dot_product", f"remat_policy={remat}"]


_MAXTEXT_STEP = re.compile(r"completed step: (\d+), seconds: ([0-9.]+)")


def maxtext_step_seconds(python: str, package: str, remat: str, steps: int) -> list[float]:
  """Step times of one MaxText run, from its ``completed step`` log lines."""
  with tempfile.TemporaryDirectory() as output_dir:
    done = subprocess.run(maxtext_command(python, package, remat, steps, output_dir),
                          cwd=output_dir, check=True, capture_output=True, text=True)
  found = _MAXTEXT_STEP.findall(done.stdout + done.stderr)
  # Step k's seconds run from step k-1's dispatch to step k's: steps 0 and 1
  # time dispatch and compilation, the rest the steady loop.
  return [float(seconds) for step, seconds in found if int(step) >= 1]


_TORCH_SCRIPT = """
import json, sys, time
import torch, transformers
s = json.loads(sys.argv[1]); steps = int(sys.argv[2])
torch.manual_seed(0)
config = transformers.GPT2Config(vocab_size=s["vocab_size"], n_positions=s["seq_len"],
    n_embd=s["embed_dim"], n_layer=s["num_layers"], n_head=s["num_heads"],
    n_inner=s["mlp_dim"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
model = transformers.GPT2LMHeadModel(config).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
tokens = torch.randint(0, s["vocab_size"], (s["batch_size"], s["seq_len"]))
for _ in range(steps):
  start = time.perf_counter()
  loss = model(input_ids=tokens, labels=tokens).loss
  loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
  print("step_seconds", time.perf_counter() - start, flush=True)
"""


def torch_step_seconds(steps: int) -> list[float]:
  """Step times of eager PyTorch + transformers GPT-2 at SHAPE."""
  done = subprocess.run([sys.executable, "-c", _TORCH_SCRIPT, json.dumps(SHAPE), str(steps)],
                        check=True, capture_output=True, text=True)
  return [float(line.split()[1]) for line in done.stdout.splitlines()
          if line.startswith("step_seconds")]


def model_flops_per_step() -> float:
  """bigmodel's model-FLOP count of one training step at SHAPE (the config the
  bigmodel row trains)."""
  s = SHAPE
  config = api.get_config("gpt:small", {"model.vocab_size": s["vocab_size"],
                                        "data.seq_len": s["seq_len"]})
  return flops.train_flops_per_step(ModelConfig.from_config(config.model),
                                    {"inputs": (s["batch_size"], s["seq_len"])})


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if _FLAGS.rounds < 1 or _FLAGS.skip < 2 or _FLAGS.steps <= _FLAGS.skip:
    fail(f"need --rounds >= 1, --skip >= 2 (compilation) and --steps > --skip; got "
         f"{_FLAGS.rounds}, {_FLAGS.skip}, {_FLAGS.steps}")
  systems = {"bigmodel": lambda: bigmodel_step_seconds(_FLAGS.steps)}
  if _FLAGS.maxtext_python:
    package = maxtext_package(_FLAGS.maxtext_python)
    for remat in _FLAGS.maxtext_remat:
      systems[f"maxtext (remat {remat})"] = (
          lambda remat=remat: maxtext_step_seconds(_FLAGS.maxtext_python, package, remat,
                                                   _FLAGS.steps))
  if _FLAGS.torch:
    systems["pytorch + transformers (eager)"] = lambda: torch_step_seconds(_FLAGS.steps)

  times = {name: [] for name in systems}
  peaks = []
  for round_index in range(_FLAGS.rounds):
    for name, run in systems.items():
      peaks.append(flops.time_matmul_tflops("float32"))
      start = time.perf_counter()
      seconds = run()
      # bigmodel logs from its second step; the others from their first.
      skip = _FLAGS.skip - 1 if name == "bigmodel" else _FLAGS.skip
      times[name].extend(seconds[skip:])
      print(f"round {round_index + 1}/{_FLAGS.rounds}: {name}: "
            f"{', '.join(f'{t:.2f}' for t in seconds[skip:])} s per step "
            f"({time.perf_counter() - start:.0f} s run)", flush=True)

  tokens = SHAPE["seq_len"] * SHAPE["batch_size"]
  step_flops = model_flops_per_step()
  peak = max(peaks)
  rows = {}
  for name, seconds in times.items():
    median = statistics.median(seconds)
    rows[name] = dict(step_seconds=median, tokens_per_sec=tokens / median,
                      mfu=step_flops / median / (peak * 1e12), steps=len(seconds))
  base = rows["bigmodel"]["tokens_per_sec"]
  print(f"\nshape {SHAPE}, float32, AdamW, 1 device; {_FLAGS.rounds} rounds; "
        f"peak {peak:.3f} TFLOP/s (best of {len(peaks)} probes; median "
        f"{statistics.median(peaks):.3f}); model {step_flops / 1e12:.3f} TFLOP per step\n")
  print("| system | step (median) | tokens/s | MFU | bigmodel's speed-up | steps timed |")
  print("| --- | ---: | ---: | ---: | ---: | ---: |")
  for name, row in rows.items():
    print(f"| {name} | {row['step_seconds']:.2f} s | {row['tokens_per_sec']:.0f} | "
          f"{row['mfu']:.1%} | {base / row['tokens_per_sec']:.2f}x | {row['steps']} |")
  if _FLAGS.results:
    record = dict(benchmark="peers", time=time.time(), shape=SHAPE, peak_tflops=peak,
                  peak_probes=peaks, rounds=_FLAGS.rounds, rows=rows)
    with open(_FLAGS.results, "a") as f:
      f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
  app.run(main)
