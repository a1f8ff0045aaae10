"""PEFT LoRA adapters in and out (``bigmodel.hf.peft``; ``convert --to_peft`` / ``--from_peft``).

A tiny LoRA run per case starts from an imported fixture (``tests/fixtures/hf``)
with random adapters; its ``--to_peft`` adapter on the fixture's ``--to_hf``
base must give, through ``transformers`` + ``peft``, bigmodel's merged logits,
and import back to the same adapters. Adapters that PEFT itself made (a dense
fused ``c_attn``, per-module ranks, rsLoRA, a classifier in ``modules_to_save``)
import with PEFT's logits. Bad input is one ``error:`` line, nothing written.
"""
import copy
import functools
import json
import os
import types

import flax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from bigmodel.errors import UserError
from bigmodel.hf import interop
from bigmodel.hf.interop import export_hf, import_hf
from bigmodel.hf.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, export_peft, import_peft
from bigmodel.models import lora
from bigmodel.run import load_run
from commands import assert_user_error
from test_convert import _FIXTURES, convert, logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# Fixture -> lora.targets: Llama's q, v and down projections; GPT-2's c_attn with two of
# its three parts adapted and the attention's c_proj (not the MLP's c_proj); BERT's q, v,
# the MLP output (``output.dense``, not ``attention.output.dense``) and the MLM head's dense.
_CASES = {"llama": "attn/(query|value)|mlp/wo", "gpt2": "attn/(query|value|out)",
          "bert": "attn/(query|value)|mlp/wo|mlm_dense"}
_RANK, _ALPHA = 2, 6.0
_TOLERANCE = 1e-4


def _flat(tree):
  return flax.traverse_util.flatten_dict(tree, sep="/")


def _lora_run(base, targets, workdir, seed=0):
  """A LoRA run of ``base``'s model with random adapters, saved as a checkpoint."""
  run = load_run(base)
  config = copy.deepcopy(run.config)
  config.lora.update(rank=_RANK, alpha=_ALPHA, targets=targets)
  config.init_from = base
  params = {k: np.asarray(v) for k, v in _flat(run.params).items()}
  rng = np.random.default_rng(seed)
  for name, value in interop.abstract_params(config).items():
    if lora.is_adapter(name):
      params[name] = rng.normal(0.0, 0.3, value.shape).astype(np.float32)
  save = interop._save_params  # pylint: disable=protected-access
  save(workdir, config, flax.traverse_util.unflatten_dict(params, sep="/"))  # A step-0 checkpoint.
  return workdir


@pytest.fixture(name="cases", scope="module")
def fixture_cases(tmp_path_factory):
  """Per case: the base workdir, its ``--to_hf`` export, the LoRA run and its ``--to_peft``."""
  cases = {}
  for name, targets in _CASES.items():
    root = tmp_path_factory.mktemp(name)
    case = types.SimpleNamespace(base=str(root / "base"), hf=str(root / "hf"),
                                 lora=str(root / "lora"), peft=str(root / "peft"))
    import_hf(os.path.join(_FIXTURES, name), None, case.base)
    export_hf(case.base, case.hf)
    _lora_run(case.base, targets, case.lora)
    assert export_peft(case.lora, case.peft)["rank"] == _RANK
    cases[name] = case
  return cases


def _reference(name):
  return np.load(os.path.join(_FIXTURES, name, "reference.npz"))


@functools.lru_cache
def _merged_logits(workdir, name):
  """bigmodel's logits (a LoRA run's adapters merged) on fixture ``name``'s inputs."""
  return np.asarray(logits(workdir, _reference(name)))


def _hf_logits(model, name):
  reference = _reference(name)
  inputs = {"input_ids": torch.tensor(reference["input_ids"])}
  if "decoder_input_ids" in reference:
    inputs["decoder_input_ids"] = torch.tensor(reference["decoder_input_ids"])
  if "token_type_ids" in reference:
    inputs["token_type_ids"] = torch.tensor(reference["token_type_ids"])
  with torch.no_grad():
    return model(**inputs).logits.numpy()


def _hf_model(hf_dir):
  architecture = json.load(open(os.path.join(hf_dir, "config.json")))["architectures"][0]
  return getattr(transformers, architecture).from_pretrained(hf_dir).eval()


@pytest.mark.parametrize("name", list(_CASES))
def test_peft_loads_the_export_with_bigmodel_merged_logits(name, cases):
  case = cases[name]
  model = peft.PeftModel.from_pretrained(_hf_model(case.hf), case.peft).eval()
  tensors = load_file(os.path.join(case.peft, ADAPTER_WEIGHTS))
  # Every tensor is one PEFT expects, and every adapter PEFT made is in the file.
  assert set(peft.get_peft_model_state_dict(model)) == set(tensors)
  got = _hf_logits(model, name)
  diff = float(np.abs(got - _merged_logits(case.lora, name)).max())
  print(f"{name}: PEFT vs bigmodel merged max |logit difference| = {diff:.2e}")
  assert diff <= _TOLERANCE
  assert float(np.abs(got - _hf_logits(_hf_model(case.hf), name)).max()) > 0.1  # Adapters act.


def test_the_names_and_the_fused_c_attn(cases):
  config = json.load(open(os.path.join(cases["gpt2"].peft, ADAPTER_CONFIG)))
  assert (config["peft_type"], config["task_type"], config["fan_in_fan_out"]) == (
      "LORA", "CAUSAL_LM", True)
  assert config["target_modules"] == ["attn.c_proj", "c_attn"]
  assert config["rank_pattern"] == {"c_attn": 2 * _RANK}
  assert config["alpha_pattern"] == {"c_attn": 2 * _ALPHA}
  assert config["base_model_name_or_path"] == ""  # init_from is a bigmodel workdir.
  tensors = load_file(os.path.join(cases["gpt2"].peft, ADAPTER_WEIGHTS))
  b = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]  # [3 x 32, 2 r]
  assert b.shape == (96, 2 * _RANK) and tensors[
      "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (2 * _RANK, 32)
  assert not b[32:64].any() and not b[:32, _RANK:].any() and not b[64:, :_RANK].any()
  lora_run = _flat(load_run(cases["gpt2"].lora, merge_lora=False).params)
  np.testing.assert_array_equal(b[:32, :_RANK], lora_run["blocks/attn/query/kernel_lora_b"][0].T)
  config = json.load(open(os.path.join(cases["llama"].peft, ADAPTER_CONFIG)))
  assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
  assert "base_model.model.model.layers.2.self_attn.v_proj.lora_B.weight" in load_file(
      os.path.join(cases["llama"].peft, ADAPTER_WEIGHTS))
  config = json.load(open(os.path.join(cases["bert"].peft, ADAPTER_CONFIG)))
  assert config["task_type"] is None and config["target_modules"] == [
      "0.output.dense", "1.output.dense", "query", "transform.dense", "value"]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_an_exported_adapter_imports_back_to_the_same_adapters(name, cases, tmp_path):
  case, workdir = cases[name], str(tmp_path / "imported")
  summary = import_peft(case.hf, case.peft, workdir)
  assert (summary["rank"], summary["alpha"]) == (_RANK, _ALPHA)
  before = load_run(case.lora, merge_lora=False)
  after = load_run(workdir, merge_lora=False)
  assert after.config.lora.rank == _RANK and after.config.lora.alpha == _ALPHA
  want = {k: v for k, v in _flat(before.params).items() if lora.is_adapter(k)}
  got = {k: v for k, v in _flat(after.params).items() if lora.is_adapter(k)}
  assert set(got) == set(want)
  for key, value in got.items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(want[key]), err_msg=key)
  if name == "gpt2":  # Equal adapters and config make equal models; checked once.
    np.testing.assert_allclose(_merged_logits(workdir, name), _merged_logits(case.lora, name),
                               atol=1e-5)


def _peft_made(base, out, **options):
  """An adapter PEFT makes (random A and B) on the HF model in ``base``; its model."""
  model = peft.get_peft_model(_hf_model(base), peft.LoraConfig(init_lora_weights=False, **options))
  torch.manual_seed(0)
  with torch.no_grad():
    for key, value in model.named_parameters():
      if "lora_B" in key or "modules_to_save" in key:
        value.normal_(0.0, 0.3)
  model.save_pretrained(out)
  return model.eval()


@pytest.mark.parametrize("name,options", [
    ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                  rank_pattern={"c_fc": 2}, alpha_pattern={"c_fc": 3})),
    ("bert_classify", dict(r=2, lora_alpha=4, target_modules=["query", "dense"], use_rslora=True,
                           task_type="SEQ_CLS")),
], ids=["gpt2_dense_c_attn_rank_pattern", "bert_classifier_rslora"])
def test_an_adapter_peft_made_imports_with_its_logits(name, options, tmp_path):
  base, out, workdir = os.path.join(_FIXTURES, name), str(tmp_path / "peft"), str(tmp_path / "w")
  model = _peft_made(base, out, **options)
  summary = import_peft(base, out, workdir)
  if name == "bert_classify":
    assert summary["replaced"] == ["base_model.model.classifier.bias",
                                   "base_model.model.classifier.weight"]
  got = np.asarray(logits(workdir, _reference(name)))
  np.testing.assert_allclose(got, _hf_logits(model, name), atol=_TOLERANCE)
  assert float(np.abs(got - _reference(name)["logits"]).max()) > 0.1


def _edited(case, tmp_path, config=None, tensors=None):
  """A copy of ``case``'s adapter with ``config`` keys changed, tensors edited."""
  out = tmp_path / "edited"
  os.makedirs(out)
  adapter = json.load(open(os.path.join(case.peft, ADAPTER_CONFIG)))
  json.dump({**adapter, **(config or {})}, open(out / ADAPTER_CONFIG, "w"))
  weights = load_file(os.path.join(case.peft, ADAPTER_WEIGHTS))
  save_file((tensors or (lambda t: t))(weights), out / ADAPTER_WEIGHTS)
  return out


_Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def test_bad_input_on_the_command_line_is_one_error_line(cases, tmp_path):
  # An adapter made for a base of another width: lora_A [r, 16] where the base has 32.
  narrow = _edited(cases["llama"], tmp_path, tensors=lambda t: {**t, _Q_A: t[_Q_A][:, :16]})
  workdir = tmp_path / "workdir"
  result = convert(f"--from_hf={cases['llama'].hf}", f"--from_peft={narrow}",
                   f"--workdir={workdir}")
  assert_user_error(result, f"tensor {_Q_A} has shape (2, 16), but the base model")
  assert not workdir.exists()
  # An existing --to_peft directory stays as it was.
  existing = tmp_path / "existing"
  os.makedirs(existing)
  (existing / "notes.txt").write_text("mine")
  result = convert(f"--to_peft={existing}", f"--workdir={cases['llama'].lora}")
  assert_user_error(result, "already exists and is not an empty directory")
  assert os.listdir(existing) == ["notes.txt"] and (existing / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("config,message", [
    ({"peft_type": "IA3"}, "adapter_config.json peft_type='IA3' is not supported: only LORA"),
    ({"use_dora": True}, "use_dora=True is not supported"),
    ({"bias": "lora_only"}, "bias='lora_only' is not supported"),
    ({"init_lora_weights": "pissa_niter_4"}, "changes the base weights"),
    ({"r": 0}, "adapter_config.json r=0 is not a positive integer"),
], ids=["ia3", "dora", "bias", "pissa", "rank_zero"])
def test_unsupported_adapters_are_refused(config, message, cases, tmp_path):
  workdir = tmp_path / "workdir"
  with pytest.raises(UserError, match=message):
    import_peft(cases["llama"].hf, str(_edited(cases["llama"], tmp_path, config)), str(workdir))
  assert not workdir.exists()


def test_other_bad_input_is_refused(cases, tmp_path):
  workdir = str(tmp_path / "workdir")
  with pytest.raises(UserError, match=r"adapts transformer\.h\.0\.attn\.c_attn, which is no "
                                      "dense layer of this llama model"):
    import_peft(cases["llama"].hf, cases["gpt2"].peft, workdir)
  outside = tmp_path / "outside"
  os.makedirs(outside)
  os.symlink(os.path.join(cases["llama"].peft, ADAPTER_WEIGHTS), outside / ADAPTER_WEIGHTS)
  os.symlink(os.path.join(cases["llama"].peft, ADAPTER_CONFIG), outside / ADAPTER_CONFIG)
  with pytest.raises(UserError, match="outside the model directory"):
    import_peft(cases["llama"].hf, str(outside), workdir)
  lonely = _edited(cases["llama"], tmp_path, tensors=lambda t: {
      k: v for k, v in t.items() if k != _Q_A})
  with pytest.raises(UserError, match=r"q_proj has .*q_proj\.lora_B\.weight but no lora_A"):
    import_peft(cases["llama"].hf, str(lonely), workdir)
  assert not os.path.exists(workdir)
  with pytest.raises(UserError, match=r"has no LoRA adapters \(lora\.rank is 0\)"):
    export_peft(cases["llama"].base, str(tmp_path / "none"))
  assert not os.path.exists(tmp_path / "none")
  assert set(os.listdir(tmp_path)) == {"outside", "edited"}  # No partial export left behind.
