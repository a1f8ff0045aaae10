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
# A size limit turns on the cache's file lock (jax._src.lru_cache): without one
# JAX writes an entry in place, unlocked, and another process can read it
# half-written (suspected, not shown, in one SIGABRT of tests/sharded_steps.py
# in a full run). 4 GiB is far above what the suite writes (~120 MB): nothing
# is evicted.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
from commands import TEST_XLA_FLAGS, free_port, run_train  # pylint: disable=wrong-import-position
import gcs_emulator  # pylint: disable=wrong-import-position
os.environ.setdefault("XLA_FLAGS", TEST_XLA_FLAGS)  # Before JAX is imported.


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


@pytest.fixture(name="object_stores", scope="session")
def fixture_object_stores():
  """moto's S3 server and gcp-storage-emulator, in threads of this process on
  127.0.0.1 (one pair per test process: fsspec caches its clients with their
  endpoints), with a ``runs`` bucket in each; sets, and yields, the
  environment that points clients (and the commands the tests start) at them.
  Nothing reaches a real cloud: fake credentials, no GCE metadata lookup."""
  import fsspec  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator.server import create_server  # pylint: disable=import-outside-toplevel
  from moto.server import ThreadedMotoServer  # pylint: disable=import-outside-toplevel
  gcs_emulator.behave_like_gcs()
  s3_port, gcs_port = free_port(), free_port()
  s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
  s3.start()
  gcs = create_server("127.0.0.1", gcs_port, in_memory=True, default_bucket="runs")
  gcs.start()
  env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
         "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
         "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{gcs_port}",
         # gcsfs: no GCE metadata server lookup, no gRPC bucket-type probe.
         "NO_GCE_CHECK": "true", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
  saved = {key: os.environ.get(key) for key in env}
  os.environ.update(env)
  fsspec.filesystem("s3").mkdir("runs")
  yield env
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value
  s3.stop()
  gcs.stop()
