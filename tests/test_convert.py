"""Hugging Face import / export (``bigmodel.convert``) against committed fixtures.

The fixtures (``tests/fixtures/hf``, made by ``tests/fixtures/make_hf_fixtures.py``)
are tiny random HF models with their logits on fixed inputs; none of these
tests needs torch or transformers except the last, which is skipped without them.
"""
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import jax
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from bigmodel.run import load_run
from commands import assert_user_error, flip_a_stored_bit, run_train
from model_fixtures import apply
from bigmodel.errors import UserError
from bigmodel.hf.interop import export_hf, import_hf
from bigmodel.hf.tokenizer import HfTokenizer
from bigmodel.models import build_model

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FIXTURES = os.path.join(_ROOT, "tests", "fixtures", "hf")
_FAMILY = {"gpt2": "gpt2", "gpt2_sharded": "gpt2", "bert": "bert", "t5": "t5"}


def convert(*args):
  return subprocess.run([sys.executable, "-m", "bigmodel.convert", *args], cwd=_ROOT,
                        capture_output=True, text=True, timeout=300)


def load(workdir):
  run = load_run(workdir)
  return jax.device_get(run.params), run.config.to_dict()


def logits(workdir, reference):
  """The converted model's logits on the fixture's inputs."""
  params, config = load(workdir)
  model = build_model(ml_collections.ConfigDict(config["model"]))
  if config["model"]["family"] == "t5":
    return apply(model, params, reference["input_ids"], reference["decoder_input_ids"])
  if config["model"]["family"] == "bert":
    return apply(model, params, reference["input_ids"], type_ids_BxL=reference["token_type_ids"])
  return apply(model, params, reference["input_ids"])


@pytest.fixture(name="imported", scope="module")
def fixture_imported(tmp_path_factory):
  """Each fixture imported once: name -> workdir."""
  workdirs = {}
  for name, family in _FAMILY.items():
    workdirs[name] = str(tmp_path_factory.mktemp(name))
    import_hf(os.path.join(_FIXTURES, name), family, workdirs[name])
  return workdirs


@pytest.mark.parametrize("name", list(_FAMILY))
def test_import_matches_the_reference_logits(name, imported):
  reference = np.load(os.path.join(_FIXTURES, name, "reference.npz"))
  got = np.asarray(logits(imported[name], reference))
  assert got.shape == reference["logits"].shape
  diff = float(np.abs(got - reference["logits"]).max())
  print(f"{name}: max |logit difference| = {diff:.2e}")
  assert diff < 1e-4
  # The logits are not trivially equal: a wrong map would move them by O(1).
  assert float(np.abs(reference["logits"]).max()) > 0.1


@pytest.mark.parametrize("name", ["gpt2", "bert", "t5"])
def test_export_reproduces_the_hf_tensors_and_reimports_identically(name, imported, tmp_path):
  out, again = str(tmp_path / "hf"), str(tmp_path / "again")
  export_hf(imported[name], out)
  original = load_file(os.path.join(_FIXTURES, name, "model.safetensors"))
  exported = load_file(os.path.join(out, "model.safetensors"))
  # Every weight comes back bit for bit; only tied copies and buffers are not written.
  assert set(exported) <= set(original)
  for key, value in exported.items():
    np.testing.assert_array_equal(value, original[key], err_msg=key)
  import_hf(out, _FAMILY[name], again)
  before, config_before = load(imported[name])
  after, config_after = load(again)
  assert config_after["model"] == config_before["model"]
  jax.tree_util.tree_map(np.testing.assert_array_equal, before, after)


def test_the_command_line_imports_and_exports(tmp_path):
  workdir, out = str(tmp_path / "gpt2"), str(tmp_path / "hf")
  result = convert(f"--from_hf={_FIXTURES}/gpt2", "--family=gpt2", f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-2000:]
  assert ("imported a gpt2 model (37,120 parameters) into "
          f"{workdir}; tokenizer: tokenizer.json, tokenizer_config.json") in result.stdout
  config = json.load(open(os.path.join(workdir, "config.json")))
  assert config["model"]["mlp_activation"] == "gelu_tanh" and config["model"]["max_len"] == 64
  result = convert(f"--to_hf={out}", f"--workdir={workdir}", "--step=0")
  assert result.returncode == 0, result.stderr[-2000:]
  hf = json.load(open(os.path.join(out, "config.json")))
  assert (hf["model_type"], hf["n_embd"], hf["n_layer"]) == ("gpt2", 32, 2)
  assert hf["bos_token_id"] == hf["eos_token_id"] == 299  # <|endoftext|> in the tokenizer.
  assert {"tokenizer.json", "model.safetensors"} <= set(os.listdir(out))


def _broken_copy(tmp_path, drop=None, config_update=None):
  """The GPT-2 fixture with a tensor dropped or config.json changed."""
  target = str(tmp_path / "broken")
  shutil.copytree(f"{_FIXTURES}/gpt2", target)
  if drop:
    tensors = load_file(f"{target}/model.safetensors")
    del tensors[drop]
    save_file(tensors, f"{target}/model.safetensors", metadata={"format": "pt"})
  if config_update:
    config = json.load(open(f"{target}/config.json"))
    config.update(config_update)
    json.dump(config, open(f"{target}/config.json", "w"))
  return target


@pytest.mark.parametrize("drop,config_update,message", [
    ("transformer.h.1.mlp.c_fc.bias", None,
     "error: tensor transformer.h.1.mlp.c_fc.bias is missing from"),
    (None, {"n_inner": 64},
     "error: tensor transformer.h.0.mlp.c_fc.weight has shape (32, 128) but config.json "
     "implies (32, 64)"),
])
def test_bad_input_is_one_error_line_and_status_2(tmp_path, drop, config_update, message):
  broken = _broken_copy(tmp_path, drop, config_update)
  result = convert(f"--from_hf={broken}", "--family=gpt2", f"--workdir={tmp_path / 'out'}")
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2, result.stderr[-2000:]
  # The last line (JAX may log before it), and the only one saying error.
  assert lines[-1].startswith(message), result.stderr[-2000:]
  assert [line for line in lines if "error" in line.lower()] == lines[-1:]
  assert "Traceback" not in result.stderr
  assert not os.path.exists(tmp_path / "out" / "checkpoints")


def test_other_architectures_and_options_are_refused(tmp_path):
  with pytest.raises(UserError, match=r"describes a 'gpt2' model .* not bert"):
    import_hf(f"{_FIXTURES}/gpt2", "bert", str(tmp_path / "a"))
  with pytest.raises(UserError, match="'falcon' model; supported: gpt2, bert, t5, llama"):
    import_hf(_broken_copy(tmp_path, config_update={"model_type": "falcon"}), None,
              str(tmp_path / "b"))
  t5 = str(tmp_path / "t5")
  shutil.copytree(f"{_FIXTURES}/t5", t5)
  config = json.load(open(f"{t5}/config.json"))
  json.dump(dict(config, feed_forward_proj="gelu"), open(f"{t5}/config.json", "w"))
  with pytest.raises(UserError, match="feed_forward_proj='gelu' is not supported"):
    import_hf(t5, "t5", str(tmp_path / "c"))


@pytest.mark.parametrize("name", ["gpt2", "bert", "t5"])
def test_the_tokenizer_matches_the_hf_one(name, imported):
  reference = np.load(os.path.join(_FIXTURES, name, "reference.npz"))
  config = json.load(open(os.path.join(imported[name], "config.json")))
  tokenizer = HfTokenizer(config["data"]["tokenizer"])
  text, want = str(reference["sample_text"]), reference["sample_ids"].tolist()
  ids = tokenizer.encode(text)
  if name == "bert":  # HF adds [CLS] ... [SEP]; bigmodel's pipelines add bos / eos.
    ids = [tokenizer.bos_id] + ids + [tokenizer.eos_id]
  assert ids == want
  assert tokenizer.decode(ids) == str(reference["sample_decoded"])
  assert text.startswith(tokenizer.decode(ids)[:12])  # Not vacuous: the text comes back.


def test_fine_tuning_starts_from_the_imported_weights(imported, tmp_path):
  """train with the converted config (its HF tokenizer on real text) and init_from."""
  corpus = os.path.join(sysconfig.get_paths()["stdlib"], "email")
  result = subprocess.run(
      [sys.executable, "-m", "bigmodel.train",
       f"--config=configs/from_workdir.py:{imported['gpt2']}", f"--workdir={tmp_path / 'ft'}",
       f"--config.data.paths={corpus}", "--config.data.seq_len=32", "--config.train.steps=2",
       "--config.train.batch_size=4", "--config.train.eval_steps=1",
       "--config.train.progress=False", "--config.train.sample_tokens=0"],
      cwd=_ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"initialised 20 of 20 parameter arrays from {imported['gpt2']}" in result.stdout


def test_transformers_loads_the_export(imported, tmp_path):
  """Only where transformers (and torch) are installed: from_pretrained on the export."""
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  classes = {"gpt2": transformers.GPT2LMHeadModel, "bert": transformers.BertForMaskedLM,
             "t5": transformers.T5ForConditionalGeneration}
  for name, cls in classes.items():
    out = str(tmp_path / name)
    export_hf(imported[name], out)
    reference = np.load(os.path.join(_FIXTURES, name, "reference.npz"))
    inputs = {k: torch.tensor(reference[k]) for k in
              ("input_ids", "token_type_ids", "decoder_input_ids") if k in reference}
    model = cls.from_pretrained(out).eval()
    with torch.no_grad():
      got = model(**inputs).logits.numpy()
    np.testing.assert_allclose(got, reference["logits"], atol=1e-4, err_msg=name)


def test_an_imported_workdir_holds_parameters_only_and_refuses_to_resume(tmp_path):
  """Import writes no optimizer state (the host never holds one); training in
  the imported workdir says to use init_from, and touches nothing."""
  workdir = tmp_path / "gpt2"
  import_hf(os.path.join(_FIXTURES, "gpt2"), "gpt2", str(workdir))
  step_dir = workdir / "checkpoints" / "0"
  assert (step_dir / "params_only").is_dir()
  assert not (step_dir / "data").exists()
  before = sorted(os.listdir(workdir)), sorted(os.listdir(workdir / "checkpoints"))
  result = run_train("--config=configs/from_workdir.py:" + str(workdir),
                     f"--workdir={workdir}", "--config.train.steps=2")
  assert_user_error(result, "holds parameters only")
  assert (sorted(os.listdir(workdir)), sorted(os.listdir(workdir / "checkpoints"))) == before


def test_a_flipped_bit_in_imported_parameters_is_detected(tmp_path):
  workdir = tmp_path / "gpt2"
  import_hf(os.path.join(_FIXTURES, "gpt2"), "gpt2", str(workdir))
  flip_a_stored_bit(workdir / "checkpoints" / "0" / "state")
  with pytest.raises(ValueError, match="do not match the digests"):
    load_run(str(workdir))
