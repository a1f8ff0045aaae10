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
  _gcs_emulator_honours_create_only_writes()
  _gcs_emulator_sends_generation_headers()
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


def _gcs_emulator_sends_generation_headers() -> None:
  """Real GCS answers every media download with the object's
  ``x-goog-generation`` and ``x-goog-metageneration`` headers;
  gcp-storage-emulator sends neither. tensorstore reads the generation of a
  ranged read from that header, takes a missing one as generation 0 and then
  refuses its own next conditional read of the object ("Malformed
  StorageGeneration"): the OCDBT manifest of a checkpoint failed that way in
  most runs. This adds the two headers to the emulator's download handler."""
  from gcp_storage_emulator import server  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator.handlers import objects  # pylint: disable=import-outside-toplevel
  download = objects.download
  if getattr(download, "sends_generation", False):
    return

  def download_with_generation(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except NotFound:
      obj = {}
    if obj.get("generation"):
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    return download(request, response, storage, *args, **kwargs)

  download_with_generation.sends_generation = True
  objects.download = download_with_generation  # objects.get calls it through this name.
  for _, handlers in server.HANDLERS:
    for method, handler in handlers.items():
      if handler is download:
        handlers[method] = download_with_generation


def _gcs_emulator_honours_create_only_writes() -> None:
  """gcp-storage-emulator ignores GCS's ``ifGenerationMatch=0`` precondition
  (write only if there is no such object), which real GCS answers with 412
  and gcsfs's ``mode="create"`` sends; the run lock relies on it. This adds
  that one rule to the emulator's upload handler, for run locks only:
  tensorstore's OCDBT writer sends the precondition too, and its recovery
  from a 412 needs object generations that the emulator does not keep."""
  from http import HTTPStatus  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator import server  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator.handlers import objects  # pylint: disable=import-outside-toplevel
  insert = objects.insert
  if getattr(insert, "honours_create_only", False):
    return

  def insert_unless_exists(request, response, storage, *args, **kwargs):
    name = None
    if request.query.get("ifGenerationMatch") == ["0"]:
      name = (request.query.get("name") or [None])[0]
      if name is None and isinstance(request.data, dict):
        name = request.data.get("meta", {}).get("name")
    if name and name.endswith("/run.lock"):
      try:
        storage.get_file_obj(request.params["bucket_name"], name)
      except NotFound:
        pass
      else:
        response.status = HTTPStatus.PRECONDITION_FAILED
        return None
    return insert(request, response, storage, *args, **kwargs)

  insert_unless_exists.honours_create_only = True
  objects.insert = insert_unless_exists  # The server's fallback route looks it up here.
  for _, handlers in server.HANDLERS:
    for method, handler in handlers.items():
      if handler is insert:
        handlers[method] = insert_unless_exists
