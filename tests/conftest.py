import os
import sys
import sysconfig

import pytest

# Tests import their shared fixtures (model_fixtures.py) as plain modules.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# One persistent XLA compilation cache for the session: both xdist workers and
# every command, notebook and script the tests start (they inherit the
# environment) reuse what another has compiled; the same tiny models compile
# again and again across the suite (a DPO run and its resume: 63 s -> 47 s
# cold, 35 s warm). Set before JAX is imported; a clean clone starts empty.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(_ROOT, ".pytest_cache", "jax_compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
from commands import run_train  # pylint: disable=wrong-import-position


# A GPT run trained 2 steps on part of the stdlib, shared by test_generate.py
# and test_evaluate.py (its training also prints a sample: cached decoding).
_GPT_RUN_ARGS = [
    "--config=configs/gpt.py:tiny", "--config.train.steps=2", "--config.train.batch_size=4",
    "--config.model.num_layers=2", "--config.model.embed_dim=64", "--config.model.num_heads=4",
    "--config.model.mlp_dim=128", "--config.model.max_len=64", "--config.model.vocab_size=512",
    "--config.data.vocab_size=400", "--config.data.seq_len=64", "--config.train.eval_steps=1",
    "--config.train.sample_tokens=8", "--config.train.progress=False",
]


@pytest.fixture(name="tokenizer_file", scope="session")
def fixture_tokenizer_file(tmp_path_factory) -> str:
  """A 400-piece sentencepiece tokenizer trained once on the json package."""
  from bigmodel.data.tokenizer import train_tokenizer  # pylint: disable=g-import-not-at-top
  stdlib_json = os.path.join(sysconfig.get_paths()["stdlib"], "json")
  texts = [open(os.path.join(stdlib_json, name)).read()
           for name in sorted(os.listdir(stdlib_json)) if name.endswith(".py")]
  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  path.write_bytes(train_tokenizer(texts, 400).model_proto)
  return str(path)


@pytest.fixture(name="gpt_workdir", scope="session")
def fixture_gpt_workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("gpt_run"))
  stdlib_json = os.path.join(sysconfig.get_paths()["stdlib"], "json")
  result = run_train(*_GPT_RUN_ARGS, f"--workdir={workdir}", f"--config.data.paths={stdlib_json}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "----- sample -----" in result.stdout
  return workdir
