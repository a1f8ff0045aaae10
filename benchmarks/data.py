r"""Data throughput: tokenizing, the token cache, preparing, and the data wait of a step.

    python -m benchmarks.data [--runs_dir=/tmp/data_bench] [--workers=0] [--batches=200]
                              [--small_steps=4]

On the default corpus (the Python standard library, ``data.paths=""``) and
the GPT ``tiny`` config, in ``RUNS_DIR`` (a temporary folder by default):

1. preparing the corpus cold (a fresh workdir: ArrayRecord of the files, the
   tokenizer trained) and warm (again: everything reused), through
   ``python -m bigmodel.prepare``'s function without the token cache;
2. tokenizing it into the token cache with 1 worker process and with
   ``--workers`` (0: one per core): characters/s and tokens/s;
3. reading batches (packed rows of ``seq_len`` + 1, batched) for
   ``--batches`` batches from text (tokenized as read) and from the token
   cache: tokens/s of this host;
4. with ``--small_steps`` > 0, the real trainer on the ``small`` preset
   (GPT-2 small shape, 4 x 512 tokens) for that many steps from the token cache: the share of
   its step time spent waiting for the next batch (goodput's ``data_wait``
   over ``data_wait`` + ``step``, the first, compiling, step left out).

Prints a Markdown table; medians of 3 repeats where a row is quick.
"""
import os
import statistics
import tempfile
import time

from absl import app
from absl import flags

_RUNS_DIR = flags.DEFINE_string("runs_dir", None, "Where the runs go (default: a temporary folder).")
_WORKERS = flags.DEFINE_integer("workers", 0, "Tokenizing processes of the parallel row "
                                "(0: one per core).")
_BATCHES = flags.DEFINE_integer("batches", 200, "Batches read per loader measurement.")
_SMALL_STEPS = flags.DEFINE_integer("small_steps", 4, "Steps of the small preset (0: skip).")


def _tiny(**data):
  import configs.gpt as gpt  # pylint: disable=g-import-not-at-top
  config = gpt.get_config("tiny")
  config.data.update(**data)
  return config


def _prepare_seconds(workdir: str, **data) -> float:
  from bigmodel.data import build_datasets  # pylint: disable=g-import-not-at-top
  config = _tiny(**data)
  os.makedirs(workdir, exist_ok=True)
  start = time.perf_counter()
  build_datasets(config, workdir).train_iter.close()
  return time.perf_counter() - start


def _tokenize(workdir: str, cache: str, workers: int) -> dict[str, float]:
  """Fills a fresh token cache; seconds, characters and tokens of the corpus."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from bigmodel.data import corpus as corpus_lib  # pylint: disable=g-import-not-at-top
  from bigmodel.data import token_cache  # pylint: disable=g-import-not-at-top
  from bigmodel.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  config = _tiny()
  source = corpus_lib.load_corpus(config.data, workdir)
  tokenizer = Tokenizer.load(os.path.join(workdir, "tokenizer.model"))
  start = time.perf_counter()
  cached = token_cache.cached_source(source, tokenizer, cache, workers=workers)
  seconds = time.perf_counter() - start
  characters = sum(len(source.text(source.train[i])) for i in range(len(source.train)))
  tokens = sum(len(np.frombuffer(cached.train[i], np.int32)) for i in range(len(cached.train)))
  if source.validation is not None:
    characters += sum(len(source.text(r)) for r in source.validation)
    tokens += sum(len(np.frombuffer(r, np.int32)) for r in cached.validation)
  return dict(seconds=seconds, characters=characters, tokens=tokens)


def _read_tokens_per_second(workdir: str, batches: int, **data) -> float:
  from bigmodel.data import build_datasets  # pylint: disable=g-import-not-at-top
  config = _tiny(tokenizer=os.path.join(workdir, "tokenizer.model"), **data)
  datasets = build_datasets(config, workdir)
  next(datasets.train_iter)  # Start-up (threads, first reads) is not throughput.
  start = time.perf_counter()
  tokens = 0
  for _ in range(batches):
    tokens += int(next(datasets.train_iter)["segment_ids"].astype(bool).sum())
  seconds = time.perf_counter() - start
  datasets.train_iter.close()
  return tokens / seconds


def _small_data_wait(workdir: str, steps: int) -> dict[str, float]:
  """Runs ``small`` for ``steps`` steps; its data wait as a share of step time."""
  import json  # pylint: disable=g-import-not-at-top
  import configs.gpt as gpt  # pylint: disable=g-import-not-at-top
  from bigmodel import api  # pylint: disable=g-import-not-at-top
  config = gpt.get_config("small")
  # The shape benchmarks/train_step.py and docs/performance.md use on this machine.
  config.train.update(steps=steps, eval_every=0, eval_steps=0, sample_tokens=0,
                      progress=False, trackers="", log_every=1, batch_size=4)
  config.data.seq_len = 512
  config.checkpoint.save_every = 10 * steps
  config.data.update(token_cache="auto", tokenizer=os.path.join(workdir, "tiny", "tokenizer.model"),
                     data_dir=os.path.join(workdir, "tiny", "data"))
  run_dir = os.path.join(workdir, "small")
  api.train(config, run_dir)
  timelines = []
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if record.get("event") == "timeline":
        timelines.append((record["step"], record["seconds"]))
  first = next(s for step, s in timelines if step >= 1)  # After the compiling step.
  last = timelines[-1][1]
  step = last["step"] - first["step"]
  wait = last["data_wait"] - first["data_wait"]
  return dict(step_seconds=step / max(1, steps - 1), data_wait_share=wait / (wait + step))


def main(argv):
  del argv
  root = _RUNS_DIR.value or tempfile.mkdtemp(prefix="data_bench_")
  workers = _WORKERS.value or os.cpu_count() or 1
  rows = []
  tiny = os.path.join(root, "tiny")
  cold = _prepare_seconds(tiny)
  warm = statistics.median(_prepare_seconds(tiny) for _ in range(3))
  rows.append(("prepare the default corpus (files + tokenizer)", f"cold {cold:.1f} s",
               f"warm {warm:.2f} s", f"{cold / warm:.0f}x"))
  for count in sorted({1, workers}):
    done = _tokenize(tiny, os.path.join(root, f"cache_{count}"), count)
    rows.append((f"tokenize into the cache, {count} worker(s)",
                 f"{done['characters'] / done['seconds'] / 1e6:.2f} M chars/s",
                 f"{done['tokens'] / done['seconds'] / 1e6:.2f} M tokens/s",
                 f"{done['seconds']:.1f} s, {done['tokens'] / 1e6:.1f} M tokens"))
  cache = os.path.join(root, f"cache_{workers}")
  text = statistics.median(_read_tokens_per_second(tiny, _BATCHES.value) for _ in range(3))
  ids = statistics.median(_read_tokens_per_second(tiny, _BATCHES.value, token_cache=cache)
                          for _ in range(3))
  rows.append(("read packed batches (tiny: 16 x 257)", f"text {text / 1e6:.2f} M tokens/s",
               f"cache {ids / 1e6:.2f} M tokens/s", f"{ids / text:.1f}x"))
  if _SMALL_STEPS.value:
    small = _small_data_wait(root, _SMALL_STEPS.value)
    rows.append((f"small preset (4 x 512), {_SMALL_STEPS.value} steps from the cache",
                 f"{small['step_seconds']:.1f} s/step",
                 f"data wait {small['data_wait_share']:.2%} of step time", "goal < 2%"))
  print(f"\nData benchmark ({os.cpu_count()} cores; runs in {root})\n")
  print("| measurement | | | |\n| --- | --- | --- | --- |")
  for row in rows:
    print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
  app.run(main)
