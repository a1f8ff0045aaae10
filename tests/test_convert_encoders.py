"""Hugging Face import / export of original T5 and of BERT without its MLM head.

Fixtures (``tests/fixtures/make_hf_fixtures.py``): ``t5_original`` (t5-small's
settings: ungated ReLU MLP, the head tied to the embedding with the decoder
output scaled by d_model ** -0.5), ``bert_model`` (a bare ``BertModel``: no
MLM head, no "bert." prefix; its reference is the last hidden state) and
``bert_classify`` (a 3-label ``BertForSequenceClassification``). Only the
test that loads exports with ``from_pretrained`` needs transformers.
"""
import json
import os
import shutil

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from bigmodel.errors import UserError
from bigmodel.hf import t5
from bigmodel.hf.interop import export_hf, import_hf
from bigmodel.models import ModelConfig, build_model
from commands import run_train
from test_convert import _FIXTURES, load, logits

_NAMES = ("t5_original", "bert_model", "bert_classify")
_MLM_HEAD = ["mlm_bias", "mlm_dense/bias", "mlm_dense/kernel", "mlm_ln/bias", "mlm_ln/scale"]


def reference(name):
  return np.load(os.path.join(_FIXTURES, name, "reference.npz"))


def tensors(name):
  return load_file(os.path.join(_FIXTURES, name, "model.safetensors"))


@pytest.fixture(name="imported", scope="module")
def fixture_imported(tmp_path_factory):
  """Each fixture imported once: name -> (workdir, import summary)."""
  result = {}
  for name in _NAMES:
    workdir = str(tmp_path_factory.mktemp(name))
    result[name] = workdir, import_hf(os.path.join(_FIXTURES, name), None, workdir)
  return result


def hidden_states(workdir, ref):
  """An MLM BERT's final hidden states [B, L, D]: what its MLM head reads."""
  params, config = load(workdir)
  seen = {}

  def grab(next_fun, args, kwargs, context):
    if context.module.name == "mlm_dense":
      seen["x"] = args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(grab):
    build_model(ml_collections.ConfigDict(config["model"])).apply(
        {"params": params}, ref["input_ids"], type_ids_BxL=ref["token_type_ids"])
  return np.asarray(seen["x"])


def assert_close(got, want, name):
  diff = float(np.abs(got - want).max())
  print(f"{name}: max |difference| = {diff:.2e}")
  assert got.shape == want.shape and diff < 1e-4
  assert float(np.abs(want).max()) > 0.1  # Not trivially equal: a wrong map moves it by O(1).


def test_original_t5_matches_the_reference_logits(imported):
  workdir, summary = imported["t5_original"]
  assert summary["unused"] == [] and summary["fresh"] == []
  params, config = load(workdir)
  assert config["model"]["t5_mlp_gated"] is False and config["model"]["mlp_activation"] == "relu"
  assert set(params["encoder"]["blocks"]["mlp"]) == {"wi", "wo"}
  assert_close(np.asarray(logits(workdir, reference("t5_original"))),
               reference("t5_original")["logits"], "t5_original")


def test_a_headless_bert_matches_the_reference_hidden_states(imported):
  workdir, summary = imported["bert_model"]
  # The MLM head starts fresh, and the pooler (bigmodel's MLM BERT has none) is left out.
  assert summary["fresh"] == _MLM_HEAD
  assert summary["unused"] == ["pooler.dense.bias", "pooler.dense.weight"]
  assert load(workdir)[1]["model"]["num_classes"] == 0
  ref = reference("bert_model")
  assert_close(hidden_states(workdir, ref), ref["last_hidden_state"], "bert_model")


def test_a_classifying_bert_matches_the_reference_logits(imported):
  workdir, summary = imported["bert_classify"]
  assert summary["unused"] == [] and summary["fresh"] == []
  config = load(workdir)[1]
  assert config["model"]["num_classes"] == 3
  # Fine-tuning or evaluating it reads labels by the indices the model learnt.
  assert config["data"]["task"] == "classify"
  assert config["data"]["labels"] == "negative,neutral,positive"
  assert_close(np.asarray(logits(workdir, reference("bert_classify"))),
               reference("bert_classify")["logits"], "bert_classify")


def test_placeholder_label_names_leave_the_labels_to_the_data(tmp_path):
  placeholders = {str(i): f"LABEL_{i}" for i in range(3)}
  import_hf(_edited(tmp_path, "bert_classify", {"id2label": placeholders}), None,
            str(tmp_path / "workdir"))
  config = json.load(open(tmp_path / "workdir" / "config.json"))
  assert (config["data"]["task"], config["data"]["labels"]) == ("classify", "")


def test_a_prefixed_headless_bert_imports_the_same(imported, tmp_path):
  """A BertModel saved with "bert." names (as a wrapper's state dict) reads the same."""
  model = tmp_path / "prefixed"
  shutil.copytree(os.path.join(_FIXTURES, "bert_model"), model)
  save_file({f"bert.{k}": v for k, v in tensors("bert_model").items()},
            str(model / "model.safetensors"), metadata={"format": "pt"})
  summary = import_hf(str(model), "bert", str(tmp_path / "workdir"))
  assert summary["fresh"] == _MLM_HEAD
  assert summary["unused"] == ["bert.pooler.dense.bias", "bert.pooler.dense.weight"]
  jax.tree_util.tree_map(np.testing.assert_array_equal, load(imported["bert_model"][0])[0],
                         load(str(tmp_path / "workdir"))[0])


def test_a_headless_bert_fine_tunes_into_a_classifier(tmp_path):
  """init_from with a classification head: every encoder weight is copied; the
  pooler and classifier, which the import has not, start fresh."""
  model, workdir = tmp_path / "hf", str(tmp_path / "bm")
  shutil.copytree(os.path.join(_FIXTURES, "bert_model"), model)
  for name in ("tokenizer.json", "tokenizer_config.json"):  # A real run has its tokenizer.
    shutil.copy(os.path.join(_FIXTURES, "bert", name), model)
  import_hf(str(model), None, workdir)
  result = run_train(f"--config=configs/from_workdir.py:{workdir}", f"--workdir={tmp_path / 'ft'}",
                     "--config.model.num_classes=8", "--config.data.task=classify",
                     "--config.data.seq_len=32", "--config.train.steps=2",
                     "--config.train.batch_size=4", "--config.train.eval_steps=1",
                     "--config.train.progress=False", "--config.train.sample_tokens=0")
  assert result.returncode == 0, result.stderr[-3000:]
  assert (f"initialised 21 of 25 parameter arrays from {workdir} (step 0); fresh: "
          "classifier/bias, classifier/kernel, pooler/bias, pooler/kernel") in result.stdout


@pytest.mark.parametrize("name", _NAMES)
def test_export_writes_the_hf_tensors_and_reimports_identically(name, imported, tmp_path):
  out, again = str(tmp_path / "hf"), str(tmp_path / "again")
  export_hf(imported[name][0], out)
  hf = json.load(open(os.path.join(out, "config.json")))
  original, exported = tensors(name), load_file(os.path.join(out, "model.safetensors"))
  if name == "t5_original":  # The tied, scaled head becomes an untied v1.1 head.
    assert (hf["feed_forward_proj"], hf["tie_word_embeddings"]) == ("relu", False)
    np.testing.assert_array_equal(exported.pop("lm_head.weight"),
                                  original["shared.weight"] * np.float32(32 ** -0.5))
  elif name == "bert_model":  # A masked LM, its fresh head included, "bert."-prefixed.
    assert hf["architectures"] == ["BertForMaskedLM"]
    assert {k for k in exported if k.startswith("cls.")} == {
        "cls.predictions.bias", "cls.predictions.transform.dense.weight",
        "cls.predictions.transform.dense.bias", "cls.predictions.transform.LayerNorm.weight",
        "cls.predictions.transform.LayerNorm.bias"}
    original = {f"bert.{k}": v for k, v in original.items() if not k.startswith("pooler.")}
    exported = {k: v for k, v in exported.items() if not k.startswith("cls.")}
  else:
    assert hf["architectures"] == ["BertForSequenceClassification"]
    assert hf["id2label"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}
  assert set(exported) == set(original)
  for key, value in exported.items():
    np.testing.assert_array_equal(value, original[key], err_msg=key)
  import_hf(out, None, again)
  before, config_before = load(imported[name][0])
  after, config_after = load(again)
  assert config_after["model"] == config_before["model"]
  jax.tree_util.tree_map(np.testing.assert_array_equal, before, after)


def test_transformers_loads_the_exports(imported, tmp_path):
  """Only where transformers (and torch) are installed: from_pretrained on each export."""
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  classes = {"t5_original": transformers.T5ForConditionalGeneration,
             "bert_classify": transformers.BertForSequenceClassification}
  for name, cls in classes.items():
    out = str(tmp_path / name)
    export_hf(imported[name][0], out)
    ref = reference(name)
    inputs = {k: torch.tensor(ref[k]) for k in
              ("input_ids", "token_type_ids", "decoder_input_ids") if k in ref}
    with torch.no_grad():
      got = cls.from_pretrained(out).eval()(**inputs).logits.numpy()
    np.testing.assert_allclose(got, ref["logits"], atol=1e-4, err_msg=name)


def _edited(tmp_path, name, config_update=None, drop=None):
  """A copy of fixture ``name`` with config.json updated or a tensor dropped."""
  target = tmp_path / "edited"
  shutil.copytree(os.path.join(_FIXTURES, name), target)
  if config_update:
    config = json.load(open(target / "config.json"))
    json.dump(dict(config, **config_update), open(target / "config.json", "w"))
  if drop:
    save_file({k: v for k, v in tensors(name).items() if k != drop},
              str(target / "model.safetensors"), metadata={"format": "pt"})
  return str(target)


@pytest.mark.parametrize("name,config_update,drop,message", [
    ("bert_classify", {"id2label": {"0": "no", "1": "yes"}, "label2id": {"no": 0, "yes": 1}},
     None, r"^tensor classifier\.weight has shape \(3, 32\) but config\.json implies \(2, 32\)$"),
    ("bert_classify", {"id2label": {"0": "a", "1": "a", "2": "b"}}, None,
     r"expected 3 distinct label names without commas"),
    ("bert_classify", {"problem_type": "multi_label_classification"}, None,
     r"problem_type='multi_label_classification' is not supported"),
    ("bert_classify", {"id2label": {"0": "score"}, "label2id": {"score": 0}}, None,
     r"has 1 label: a regression head is not supported"),
    ("bert_model", {"architectures": ["BertForTokenClassification"]}, None,
     r"architectures=\['BertForTokenClassification'\] is not supported; supported: "
     r"BertForMaskedLM, BertForPreTraining, BertModel, BertForSequenceClassification$"),
    ("bert_model", {"is_decoder": True}, None, r"is_decoder=true \(causal attention\)"),
    # Only a BertModel may lack the MLM head; a masked LM missing part of it is broken.
    ("bert", None, "cls.predictions.transform.dense.weight",
     r"^tensor cls\.predictions\.transform\.dense\.weight is missing from "),
    # A v1.1 (gated) checkpoint whose config says original T5's "relu".
    ("t5", {"feed_forward_proj": "relu"}, None,
     r"^tensor encoder\.block\.0\.layer\.1\.DenseReluDense\.wi\.weight is missing from "),
], ids=["classifier_shape", "duplicate_label_names", "multi_label", "regression", "token_classification", "causal",
        "mlm_head_part_missing", "t5_gated_tensors_relu_config"])
def test_bad_input_is_refused_by_name(name, config_update, drop, message, tmp_path):
  with pytest.raises(UserError, match=message):
    import_hf(_edited(tmp_path, name, config_update, drop), None, str(tmp_path / "workdir"))
  assert not os.path.exists(tmp_path / "workdir")


def test_a_t5_mlp_hf_cannot_express_is_refused_on_export():
  model = ModelConfig(family="t5", vocab_size=8, num_layers=1, num_heads=1, embed_dim=4,
                      mlp_dim=4, max_len=8, mlp_activation="gelu_exact", t5_mlp_gated=False)
  with pytest.raises(UserError, match=r"^HF T5 has no gelu_exact MLP \(feed_forward_proj: "):
    t5.hf_config(model)


def test_a_switch_t5_is_refused_on_export():
  model = ModelConfig(family="t5", vocab_size=8, num_layers=1, num_heads=1, embed_dim=4,
                      mlp_dim=4, max_len=8, num_experts=4, experts_per_token=1)
  with pytest.raises(UserError, match=r"^model.num_experts=4: HF T5 has dense MLPs only"):
    t5.hf_config(model)
