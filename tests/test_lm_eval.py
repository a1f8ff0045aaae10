"""The lm-evaluation-harness adapter (``bigmodel.lm_eval``) against direct computations.

Log-likelihoods, rolling log-likelihoods and greedy generation of the
``bigmodel`` LM equal the model run directly on the same ids (GPT: the
session's trained ``gpt_workdir``; T5: the committed Hugging Face fixture,
imported); the GPT-2 fixture, imported and exported again, scores the same
per request and gets the same accuracy through lm-eval's ``hf`` backend
(transformers + torch) as through ``bigmodel`` on the offline stdlib task.
Nothing is downloaded: datasets and the hub are offline.
"""
import json
import os
import subprocess
import sys

# Before datasets (imported by lm-eval) reads them.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position
from lm_eval.api.instance import Instance  # pylint: disable=wrong-import-position

from bigmodel import run as run_lib  # pylint: disable=wrong-import-position
from bigmodel.errors import UserError  # pylint: disable=wrong-import-position
from bigmodel.generation.generator import Generator  # pylint: disable=wrong-import-position
from bigmodel.hf.interop import export_hf, import_hf  # pylint: disable=wrong-import-position
from bigmodel.lm_eval import BigmodelLM, ModelPieces  # pylint: disable=wrong-import-position
from bigmodel.lm_eval import evaluate_tasks, run_harness, write_stdlib_task  # pylint: disable=wrong-import-position
from bigmodel.lm_eval import tasks as tasks_lib  # pylint: disable=wrong-import-position
from commands import ROOT, assert_user_error  # pylint: disable=wrong-import-position
from model_fixtures import tiny_config  # pylint: disable=wrong-import-position

_FIXTURES = os.path.join(ROOT, "tests", "fixtures", "hf")
_TASK = tasks_lib.STDLIB_TASK


def _requests(kind, *args_list):
  return [Instance(request_type=kind, doc={}, arguments=args, idx=i)
          for i, args in enumerate(args_list)]


def _token_logps(model, params, ids, length=64):
  """log p(ids[i + 1] | ids[:i + 1]) [len - 1] and the greedy flags: one row,
  run alone at one fixed length (one compilation for every test). Its
  padding is another token than the adapter's, so padding that leaked into
  real positions would show."""
  fn = _DIRECT.setdefault(id(model), (model, jax.jit(
      lambda p, x: model.apply({"params": p}, x))))[1]
  row = np.full((1, length), 7, np.int32)
  row[0, :len(ids) - 1] = ids[:-1]
  logits = fn(params, row)[0, :len(ids) - 1]
  logp = np.asarray(jax.nn.log_softmax(logits.astype(np.float32), axis=-1))
  targets = np.asarray(ids[1:])
  return logp[np.arange(len(targets)), targets], np.argmax(logp, axis=-1) == targets


_DIRECT = {}


@pytest.fixture(name="gpt2_workdir", scope="module")
def fixture_gpt2_workdir(tmp_path_factory):
  """The GPT-2 fixture (random weights, a byte-level BPE tokenizer) imported."""
  workdir = str(tmp_path_factory.mktemp("lm_eval_gpt2") / "run")
  import_hf(os.path.join(_FIXTURES, "gpt2"), "gpt2", workdir)
  return workdir


@pytest.fixture(name="gpt_run", scope="module")
def fixture_gpt_run(gpt_workdir):
  return run_lib.load_run(gpt_workdir)


@pytest.fixture(name="gpt_lm", scope="module")
def fixture_gpt_lm(gpt_run):
  return BigmodelLM(run=gpt_run, batch_size=4)


@pytest.fixture(name="task_dir", scope="module")
def fixture_task_dir(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("lm_eval_tasks") / "stdlib")
  write_stdlib_task(folder)
  return folder


def test_loglikelihood_equals_a_direct_forward(gpt_run, gpt_lm):
  tok, model, params = gpt_run.tokenizer, gpt_run.model, gpt_run.params
  long_context = "import json\n" * 40  # Far beyond the model's 64 positions.
  assert len(tok.encode(long_context)) > 64
  pairs = [("def f(x):\n  return", " x + 1"), ("def f(x):\n  return ", "x + 1"),
           ("def f(x):", "\n  return x"), ("", "import os"), (long_context, " = 3"),
           ("x =", " 1")]
  results = gpt_lm.loglikelihood(_requests("loglikelihood", *pairs))
  for (context, continuation), (logp, greedy) in zip(pairs, results):
    # Expected split: the context's trailing spaces go to the continuation;
    # the continuation's ids are those of BOS + whole text after the context's.
    stripped = context.rstrip()
    context_ids = [tok.bos_id] + tok.encode(stripped)
    whole = [tok.bos_id] + tok.encode(context + continuation)
    if stripped:
      continuation_ids = whole[len(context_ids):]
    else:
      continuation_ids = tok.encode(context + continuation)
    assert gpt_lm.encode_pair(context, continuation) == (context_ids, continuation_ids)
    row = (context_ids + continuation_ids)[-65:]  # Cut from the left to max_len + 1.
    token_logp, token_greedy = _token_logps(model, params, row)
    n = len(continuation_ids)
    np.testing.assert_allclose(logp, token_logp[-n:].sum(), rtol=1e-5, atol=1e-4)
    assert greedy == bool(token_greedy[-n:].all())
  # " x + 1" after "return" and "x + 1" after "return " are the same text.
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
  # Six requests of several lengths: batches of 4 rows, two length buckets at most.
  assert {shape[0] for shape in gpt_lm.scorer.shapes} == {4}
  assert len(gpt_lm.scorer.shapes) <= 2


def test_loglikelihood_rolling_equals_the_direct_sum(gpt_run, gpt_lm):
  tok, model, params = gpt_run.tokenizer, gpt_run.model, gpt_run.params
  short, long = "x = 1\n", "def f(a, b):\n    return a + b\n" * 12
  context = gpt_lm.max_length
  expected = []
  for text in (short, long):
    ids = tok.encode(text)
    # Windows: the first C tokens after BOS; then each next C tokens after
    # the C tokens just before the last of them (the context fills up).
    total = _token_logps(model, params, [tok.bos_id] + ids[:context])[0].sum()
    for start in range(context, len(ids), context):
      end = min(start + context, len(ids))
      total += _token_logps(model, params, ids[end - context - 1:end])[0][-(end - start):].sum()
    expected.append(total)
  assert len(tok.encode(short)) < context < 2 * context < len(tok.encode(long))
  results = gpt_lm.loglikelihood_rolling(_requests("loglikelihood_rolling", (short,), (long,)))
  np.testing.assert_allclose(results, expected, rtol=1e-5)


def test_greedy_generate_until_equals_the_generator_cut_at_the_stop(gpt2_workdir):
  # The GPT-2 fixture: its random weights write varied text (the trained
  # run's two steps repeat one character).
  lm = BigmodelLM(workdir=gpt2_workdir, batch_size=4)
  run = lm.pieces
  generator = Generator(run.model, run.params, run.config, run.tokenizer, run.mesh)
  prompts = ["def f(x):\n", "import "]
  full = [run.tokenizer.decode(ids) for ids in generator.generate_ids(
      [generator.prompt_ids(p) for p in prompts], max_new_tokens=12)]
  text = full[0]
  cut = next(i for i, c in enumerate(text) if c != text[0])  # Past the first character.
  stop = text[cut:cut + 2]
  assert text.find(stop) == cut > 0
  results = lm.generate_until(_requests(
      "generate_until", *[(p, {"until": [stop], "max_gen_toks": 12}) for p in prompts]))
  assert results == [t.split(stop)[0] for t in full]
  assert results[0] == text[:cut]


def test_t5_scores_like_a_direct_encoder_decoder_forward(tmp_path):
  workdir = str(tmp_path / "t5")
  import_hf(os.path.join(_FIXTURES, "t5"), "t5", workdir)
  lm = BigmodelLM(workdir=workdir, batch_size=4)
  run = lm.pieces
  tok = run.tokenizer
  pairs = [("translate: the house", " das Haus"), ("question: 2 + 2 =", " 4"),
           ("", "hello world")]
  results = lm.loglikelihood(_requests("loglikelihood", *pairs))
  direct = jax.jit(lambda p, e, s, d: run.model.apply({"params": p}, e, d,
                                                       encoder_segment_ids_BxE=s))
  for (context, continuation), (logp, greedy) in zip(pairs, results):
    stripped = context.rstrip()
    encoder = (tok.encode(stripped) if stripped else []) + [tok.eos_id]
    target = tok.encode(context[len(stripped):] + continuation)
    assert lm.encode_pair(context, continuation) == (encoder, target)
    # One row alone at fixed lengths (one compilation), padded with another
    # token than the adapter's: encoder padding masked by segment id 0.
    encoder_row, segment_row, decoder_row = (np.full((1, 32), 7, np.int32),
                                             np.zeros((1, 32), np.int32),
                                             np.full((1, 16), 7, np.int32))
    encoder_row[0, :len(encoder)], segment_row[0, :len(encoder)] = encoder, 1
    decoder_row[0, :len(target)] = [tok.decoder_start_id] + target[:-1]
    logits = direct(run.params, encoder_row, segment_row, decoder_row)[0, :len(target)]
    token_logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    np.testing.assert_allclose(logp, token_logp[np.arange(len(target)), target].sum(),
                               rtol=1e-5, atol=1e-4)
    assert greedy == bool((token_logp.argmax(-1) == target).all())


def test_the_stdlib_task_is_deterministic_and_reads_offline(task_dir, tmp_path):
  again = str(tmp_path / "again")
  info = write_stdlib_task(again)
  for name in os.listdir(task_dir):
    if name.endswith(".jsonl"):
      with open(os.path.join(task_dir, name)) as a, open(os.path.join(again, name)) as b:
        assert a.read() == b.read()
  import datasets  # pylint: disable=import-outside-toplevel
  files = tasks_lib.stdlib_task_config(again)["dataset_kwargs"]["data_files"]
  test = datasets.load_dataset("json", data_files=files, cache_dir=str(tmp_path / "cache"))["test"]
  assert len(test) == info["test"] >= 100
  answers = [row["choices"][row["answer"]] for row in test]
  assert all(len(set(row["choices"])) == 4 for row in test)
  assert all(row["path"].split("/")[0] == answer for row, answer in zip(test, answers))
  assert len(set(answers[:16])) >= 4  # Shuffled: a small --limit sees several packages.
  # The next-line task: the right choice is what follows the context in its file.
  # The word-order task: the same line, its distractors the same words reordered.
  next_line, word_order = info["also"]
  assert next_line["task"] == tasks_lib.NEXT_LINE_TASK and next_line["test"] >= 100
  assert word_order["task"] == tasks_lib.WORD_ORDER_TASK and word_order["test"] >= 100
  import sysconfig  # pylint: disable=import-outside-toplevel
  for task in (tasks_lib.NEXT_LINE_TASK, tasks_lib.WORD_ORDER_TASK):
    with open(os.path.join(again, f"{task}_test.jsonl")) as f:
      rows = [json.loads(line) for line in f][:50]
    for row in rows:
      assert len(set(row["choices"])) == 4 and row["text"].endswith("\n")
      with open(os.path.join(sysconfig.get_paths()["stdlib"], row["path"]),
                encoding="utf-8") as f:
        assert row["text"] + row["choices"][row["answer"]] + "\n" in f.read(), row["path"]
      if task == tasks_lib.WORD_ORDER_TASK:
        assert len({tuple(sorted(choice.split())) for choice in row["choices"]}) == 1


def test_hf_backend_scores_the_export_the_same(gpt2_workdir, task_dir, tmp_path):
  from lm_eval.models.huggingface import HFLM  # pylint: disable=import-outside-toplevel
  workdir, hf_dir = gpt2_workdir, str(tmp_path / "gpt2_hf")
  export_hf(workdir, hf_dir)
  # BOS first, as bigmodel trains and prompts (the GPT-2 tokenizer adds none itself).
  hf = HFLM(pretrained=hf_dir, device="cpu", dtype="float32", add_bos_token=True, batch_size=8)
  ours = BigmodelLM(workdir=workdir, batch_size=8)
  assert hf.max_length == ours.max_length == 64
  got = {}
  for name, lm in (("hf", hf), ("bigmodel", ours)):
    results = run_harness(lm, _TASK, limit=12, include_path=task_dir, log_samples=True)
    samples = sorted(results["samples"][_TASK], key=lambda s: s["doc_id"])
    got[name] = (np.array([[r[0][0] for r in s["resps"]] for s in samples]),
                 results["results"][_TASK]["acc,none"], results["results"][_TASK]["acc_norm,none"])
  difference = np.abs(got["hf"][0] - got["bigmodel"][0]).max()
  print(f"\nhf vs bigmodel: {got['hf'][0].size} log-likelihoods, max |difference| "
        f"{difference:.2e}; acc {got['hf'][1]} vs {got['bigmodel'][1]}, "
        f"acc_norm {got['hf'][2]} vs {got['bigmodel'][2]}")
  assert got["hf"][0].shape == (12, 4)
  assert difference < 1e-4
  assert got["hf"][1:] == got["bigmodel"][1:]


def test_evaluate_tasks_takes_a_trainers_pieces(gpt_run, task_dir):
  pieces = ModelPieces(model=gpt_run.model, params=gpt_run.params, config=gpt_run.config,
                       tokenizer=gpt_run.tokenizer, mesh=gpt_run.mesh, step=gpt_run.step)
  metrics = evaluate_tasks(pieces, [_TASK], num_fewshot=1, limit=4, include_path=task_dir,
                           batch_size=4)
  assert set(metrics) == {f"lm_eval/{_TASK}/{m}" for m in ("acc", "acc_norm", "acc_stderr",
                                                            "acc_norm_stderr")}
  assert 0.0 <= metrics[f"lm_eval/{_TASK}/acc"] <= 1.0


def test_bad_input_is_refused_before_anything_is_written(gpt_run, task_dir, tmp_path):
  bert = tiny_config("bert")
  with pytest.raises(UserError, match="a bert model cannot be evaluated"):
    BigmodelLM(run=ModelPieces(model=None, params=None, config=bert,
                               tokenizer=gpt_run.tokenizer, mesh=gpt_run.mesh))
  manager = tasks_lib.task_manager([_TASK], task_dir)
  with pytest.raises(UserError, match="did you mean stdlib_package_mc"):
    tasks_lib.check_tasks(manager, ["stdlib_package_mx"], task_dir)
  with pytest.raises(UserError, match="no such folder"):
    tasks_lib.task_manager([_TASK], str(tmp_path / "missing"))
  # A task whose data file lies outside its folder.
  outside, data = tmp_path / "outside", tmp_path / "data.jsonl"
  outside.mkdir()
  data.write_text("{}\n")
  config = tasks_lib.stdlib_task_config(task_dir)
  config["task"] = "escaping"
  config["dataset_kwargs"]["data_files"] = {"test": str(outside / ".." / "data.jsonl")}
  (outside / "escaping.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n"
                                                 for k, v in config.items()))
  manager = tasks_lib.task_manager(["escaping"], str(outside))
  with pytest.raises(UserError, match="outside its --include_path folder"):
    tasks_lib.check_tasks(manager, ["escaping"], str(outside))
  # The command line: one error line, status 2, no output file.
  out = tmp_path / "out.json"
  result = subprocess.run(
      [sys.executable, "-m", "bigmodel.lm_eval", f"--workdir={tmp_path / 'no_run'}",
       f"--tasks={_TASK}", f"--include_path={task_dir}", f"--output={out}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ))
  assert_user_error(result, "does not exist")
  assert not out.exists()


def test_a_training_hook_logs_what_the_command_computes(gpt_workdir, task_dir, tmp_path):
  """``--config.lm_eval.every``: the trainer logs the task's metrics; they are
  what evaluating the saved checkpoint gives (the same parameters)."""
  from commands import run_train  # pylint: disable=g-import-not-at-top
  saved = json.load(open(os.path.join(gpt_workdir, "config.json")))
  workdir = str(tmp_path / "hooked")
  shapes = [f"--config.model.{k}={saved['model'][k]}"
            for k in ("num_layers", "embed_dim", "num_heads", "mlp_dim", "vocab_size", "max_len")]
  result = run_train(
      "--config=configs/gpt.py:tiny", f"--workdir={workdir}", *shapes,
      f"--config.init_from={gpt_workdir}", f"--config.data.tokenizer={gpt_workdir}/tokenizer.model",
      f"--config.data.paths={saved['data']['paths']}", f"--config.data.seq_len={saved['data']['seq_len']}",
      "--config.train.steps=2", "--config.train.batch_size=4", "--config.train.eval_every=0",
      "--config.train.sample_tokens=0", "--config.train.progress=False",
      "--config.lm_eval.every=2", f"--config.lm_eval.tasks={_TASK}",
      f"--config.lm_eval.include_path={task_dir}", "--config.lm_eval.limit=4",
      "--config.lm_eval.num_fewshot=1", "--config.lm_eval.batch_size=4")
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  logged = [r for r in records if f"lm_eval/{_TASK}/acc" in r]
  assert [r["step"] for r in logged] == [2]
  direct = evaluate_tasks(workdir, [_TASK], num_fewshot=1, limit=4, include_path=task_dir,
                          batch_size=4)
  for name in ("acc", "acc_norm"):
    key = f"lm_eval/{_TASK}/{name}"
    assert logged[0][key] == direct[key], (logged[0], direct)
