"""Llama, Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3, Mixtral and Qwen3-MoE through
``bigmodel.convert``.

The fixtures (``tests/fixtures/hf/{llama,...}``, from
``tests/fixtures/make_hf_fixtures.py``) are tiny random models with every
option of their architecture on; ``reference.npz`` holds transformers'
float32 logits on inputs longer than the sliding windows, and 20 greedy
tokens of ``generate``. Each is imported once (``imported``) and exported
once (``exported``) per module. Loading an export needs transformers and
torch: those tests are skipped without them.
"""
import copy
import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from bigmodel.errors import UserError
from bigmodel.generation.generator import load as load_generator
from bigmodel.hf import FAMILIES, exporter
from bigmodel.hf.interop import export_hf, import_hf
from bigmodel.models.config import ModelConfig
from commands import assert_user_error
from test_convert import _FIXTURES, convert, load, logits

_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "mixtral",
                  "qwen3_moe")
# Fixture -> the HF class it is.
_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM",
            "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
            "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
_TOLERANCE = 1e-4


@pytest.fixture(name="imported", scope="module")
def fixture_imported(tmp_path_factory):
  """Each fixture (and the sharded Llama) imported once, family read from config.json.

  Returns name -> workdir.
  """
  workdirs = {}
  for name in _ARCHITECTURES + ("llama_sharded",):
    workdirs[name] = str(tmp_path_factory.mktemp(name) / "workdir")
    summary = import_hf(os.path.join(_FIXTURES, name), None, workdirs[name])
    assert summary["family"] == name.replace("_sharded", "") and not summary["unused"]
  return workdirs


@pytest.fixture(name="exported", scope="module")
def fixture_exported(imported, tmp_path_factory):
  """Each imported fixture exported once: name -> HF directory."""
  out = {}
  for name in _ARCHITECTURES:
    out[name] = str(tmp_path_factory.mktemp(name) / "hf")
    assert export_hf(imported[name], out[name])["family"] == name
  return out


def _reference(name):
  return np.load(os.path.join(_FIXTURES, name, "reference.npz"))


@pytest.mark.parametrize("name", _ARCHITECTURES + ("llama_sharded",))
def test_import_matches_the_reference_logits(name, imported):
  reference = _reference(name)
  got = np.asarray(logits(imported[name], reference))
  diff = float(np.abs(got - reference["logits"]).max())
  print(f"{name}: import max |logit difference| = {diff:.2e}")
  assert diff <= _TOLERANCE
  assert float(np.abs(reference["logits"]).max()) > 1.0  # A wrong map moves them by O(1).


def test_the_sharded_checkpoint_imports_the_same_parameters(imported):
  one, sharded = load(imported["llama"])[0], load(imported["llama_sharded"])[0]
  jax.tree_util.tree_map(np.testing.assert_array_equal, one, sharded)


# What each fixture's options import as: every option the fixture turns on.
_OPTIONS = {
    "llama": dict(attention_qkv_bias=True, attention_out_bias=True, mlp_bias=True,
                  tie_embeddings=False, rope_theta=20000.0, rope_scaling="llama3",
                  rope_scaling_factor=8.0, rope_original_max_len=100, rope_low_freq_factor=1.0,
                  rope_high_freq_factor=4.0, sliding_window=0),
    "qwen2": dict(attention_qkv_bias=True, attention_out_bias=False, mlp_bias=False,
                  tie_embeddings=True, sliding_window=6, sliding_window_pattern=0,
                  rope_scaling="yarn", rope_scaling_factor=4.0, rope_original_max_len=32,
                  rope_yarn_beta_fast=16.0, rope_yarn_beta_slow=0.5, rope_attention_factor=0.0),
    "qwen3": dict(qk_norm=True, attention_qkv_bias=True, attention_out_bias=True,
                  rope_theta=1e6, rope_scaling="none", sliding_window=0),
    "mistral": dict(attention_qkv_bias=False, attention_out_bias=False, sliding_window=5,
                    sliding_window_pattern=0, rope_theta=1e6),
    "gemma2": dict(norm_scale_offset=1.0, embed_scale=True, post_norms=True, qk_norm=False,
                   mlp_activation="gelu_tanh", head_dim=16, query_pre_attn_scalar=24.0,
                   attn_softcap=2.0, final_softcap=5.0, sliding_window=6,
                   sliding_window_pattern=2, rope_local_theta=0.0),
    # transformers' Gemma 3 ignores attn_logit_softcapping (set in the fixture).
    "gemma3": dict(qk_norm=True, post_norms=True, attn_softcap=0.0, final_softcap=6.0,
                   sliding_window=7, sliding_window_pattern=6, rope_theta=1e6,
                   rope_scaling="linear", rope_scaling_factor=8.0, rope_local_theta=1e4),
    # Experts: 4, two per token; Mixtral renormalises the two gates, this Qwen3-MoE not.
    "mixtral": dict(num_experts=4, experts_per_token=2, moe_normalize_top_k=True,
                    moe_mlp_dim=0, moe_router="softmax", moe_load_balance_weight=0.001,
                    attention_qkv_bias=False, sliding_window=5, rope_theta=1e6),
    "qwen3_moe": dict(num_experts=4, experts_per_token=2, moe_normalize_top_k=False,
                      moe_mlp_dim=24, qk_norm=True, attention_qkv_bias=True, sliding_window=0),
}


@pytest.mark.parametrize("name", _ARCHITECTURES)
def test_every_option_is_imported(name, imported):
  model = load(imported[name])[1]["model"]
  assert {k: model[k] for k in _OPTIONS[name]} == _OPTIONS[name]
  common = dict(family="gpt", position_embedding="rope", norm="rmsnorm", mlp_gated=True,
                num_heads=4, num_kv_heads=2, embed_dim=32, max_len=128)
  assert {k: model[k] for k in common} == common


@pytest.mark.parametrize("name", _ARCHITECTURES)
def test_greedy_generation_matches_transformers(name, imported):
  """bigmodel's cached decoding (windows and all) picks transformers' 20 tokens."""
  reference = _reference(name)
  generator = load_generator(imported[name])
  got = generator.generate_ids([reference["prompt_ids"][0].tolist()], max_new_tokens=20,
                               stop_at_eos=False)[0]
  assert got == reference["greedy_ids"].tolist()


@pytest.mark.parametrize("name", _ARCHITECTURES)
def test_export_gives_back_the_original_tensors_and_config(name, imported, exported):
  original = load_file(os.path.join(_FIXTURES, name, "model.safetensors"))
  tensors = load_file(os.path.join(exported[name], "model.safetensors"))
  assert set(tensors) == set(original)
  for key, value in tensors.items():
    np.testing.assert_array_equal(value, original[key], err_msg=key)
  hf = json.load(open(os.path.join(exported[name], "config.json")))
  assert hf["architectures"] == [_CLASSES[name]] and hf["eos_token_id"] == 299
  # Read back, the exported config.json is the same bigmodel model.
  model = load(imported[name])[1]["model"]
  again = FAMILIES[name].model_config(hf)
  assert again == {k: model[k] for k in again}


@pytest.mark.parametrize("name", _ARCHITECTURES)
def test_transformers_loads_the_export_with_the_same_logits(name, exported):
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  reference = _reference(name)
  model = transformers.AutoModelForCausalLM.from_pretrained(exported[name]).eval()
  assert type(model).__name__ == _CLASSES[name]
  with torch.no_grad():
    got = model(torch.tensor(reference["input_ids"])).logits.numpy()
  diff = float(np.abs(got - reference["logits"]).max())
  print(f"{name}: export max |logit difference| = {diff:.2e}")
  assert diff <= _TOLERANCE


def _legacy(name, hf):
  """A transformers 4 style config.json: rope_theta + rope_scaling, no layer_types."""
  hf = copy.deepcopy(hf)
  rope = hf.pop("rope_parameters")
  hf.pop("layer_types", None)
  if name == "gemma3":
    hf.update(rope_theta=rope["full_attention"]["rope_theta"],
              rope_local_base_freq=rope["sliding_attention"]["rope_theta"],
              rope_scaling={k: v for k, v in rope["full_attention"].items() if k != "rope_theta"},
              sliding_window_pattern=6)
  else:
    hf["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    if kind != "default":  # Older configs said "type".
      hf["rope_scaling"] = {**rope, "type": kind}
  return hf


@pytest.mark.parametrize("name", _ARCHITECTURES)
def test_older_config_forms_read_the_same(name):
  hf = json.load(open(os.path.join(_FIXTURES, name, "config.json")))
  assert FAMILIES[name].model_config(_legacy(name, hf)) == FAMILIES[name].model_config(hf)


def _broken(tmp_path, name, update=None, drop=()):
  """A copy of fixture ``name`` with config.json keys changed (``update``) or removed."""
  target = str(tmp_path / name)
  shutil.copytree(os.path.join(_FIXTURES, name), target)
  config = json.load(open(os.path.join(target, "config.json")))
  config.update(update or {})
  for key in drop:
    del config[key]
  json.dump(config, open(os.path.join(target, "config.json"), "w"))
  return target


@pytest.mark.parametrize("name,update,message", [
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
     "config.json rope_parameters rope_type='dynamic' is not supported; supported: default, "
     "linear, llama3, yarn"),
    ("mistral", {"hidden_act": "gelu_fast"},
     "config.json hidden_act='gelu_fast' is not supported; supported: gelu_new, "
     "gelu_pytorch_tanh, gelu, relu, silu, swish"),
    ("qwen2", {"num_experts": 4},
     "config.json num_experts=4: mixture-of-experts models are not supported"),
    ("llama", {"intermediate_size": 48},
     "tensor model.layers.0.mlp.gate_proj.weight has shape (64, 32) but config.json implies "
     "(48, 32)"),
], ids=["rope_type", "hidden_act", "moe", "shape"])
def test_bad_input_on_the_command_line_is_one_error_line(name, update, message, tmp_path):
  workdir = tmp_path / "workdir"
  result = convert(f"--from_hf={_broken(tmp_path, name, update)}", f"--workdir={workdir}")
  assert_user_error(result, message)
  assert not os.path.exists(workdir)  # Nothing written.


@pytest.mark.parametrize("name,update,drop,message", [
    ("qwen2", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "mscale": 0.7,
                                   "mscale_all_dim": 0.7}}, (),
     r"rope_parameters mscale=0\.7 / mscale_all_dim=0\.7 is not supported"),
    ("llama", {"partial_rotary_factor": 0.5}, (), r"partial_rotary_factor=0\.5 is not supported"),
    ("qwen3", {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.25}}, (),
     r"rope_parameters partial_rotary_factor=0\.25 is not supported"),
    # Qwen's default layers: the first max_window_layers full, the rest windowed.
    ("qwen2", {"max_window_layers": 1}, ("layer_types",),
     r"max_window_layers=1 slides the window on layers \[1, 2\] only; supported: every layer, "
     "or all but every p-th"),
    ("gemma2", {"layer_types": ["sliding_attention", "full_attention", "full_attention",
                                "sliding_attention"]}, (),
     r"layer_types slides the window on layers \[0, 3\] only"),
    ("gemma3", {"rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}}, (),
     r"rope_parameters\.sliding_attention rope_type='linear' is not supported"),
    ("gemma3", {"use_bidirectional_attention": True}, (),
     "use_bidirectional_attention=true is not supported"),
    ("llama", {"architectures": ["LlamaForSequenceClassification"]}, (),
     "only LlamaForCausalLM converts"),
    ("mistral", {"num_local_experts": 8}, (), "num_local_experts=8: mixture-of-experts"),
    ("llama", {"rope_scaling": {"type": "longrope", "factor": 2.0}}, (),
     r"config\.json rope_scaling rope_type='longrope' is not supported"),
    ("qwen3_moe", {"mlp_only_layers": [1]}, (),
     r"mlp_only_layers=\[1\] is not supported \(every layer a mixture of experts"),
    ("qwen3_moe", {"decoder_sparse_step": 2}, (), "decoder_sparse_step=2 is not supported"),
    ("qwen3_moe", {"use_sliding_window": True, "sliding_window": 4}, (),
     "use_sliding_window=true is not supported for qwen3_moe"),
], ids=["yarn_mscale", "partial_rotary", "partial_rotary_nested", "qwen_max_window_layers",
        "irregular_layer_types", "scaled_local_rope", "bidirectional", "classifier", "mixtral",
        "legacy_rope_type", "dense_layers_among_experts", "sparse_step", "moe_window"])
def test_unsupported_options_are_refused_by_name(name, update, drop, message, tmp_path):
  workdir = tmp_path / "workdir"
  with pytest.raises(UserError, match=message):
    import_hf(_broken(tmp_path, name, update, drop), None, str(workdir))
  assert not os.path.exists(workdir)


def test_family_mismatch_is_refused(tmp_path):
  with pytest.raises(UserError, match=r"describes a 'llama' model .* not gemma2"):
    import_hf(os.path.join(_FIXTURES, "llama"), "gemma2", str(tmp_path / "a"))


def _model(**options):
  """A Llama-shaped ModelConfig with ``options`` changed."""
  base = dict(family="gpt", vocab_size=300, num_layers=4, num_heads=4, num_kv_heads=2,
              embed_dim=32, mlp_dim=64, max_len=128, position_embedding="rope", norm="rmsnorm",
              mlp_gated=True, mlp_activation="silu", attention_qkv_bias=False,
              attention_out_bias=False, mlp_bias=False, head_dim=8)
  return ModelConfig(**{**base, **options})


@pytest.mark.parametrize("options,family", [
    ({}, "llama"),
    (dict(attention_qkv_bias=True, attention_out_bias=True, mlp_bias=True), "llama"),
    (dict(sliding_window=16), "mistral"),
    (dict(attention_qkv_bias=True, sliding_window=16, sliding_window_pattern=2), "qwen2"),
    (dict(qk_norm=True, sliding_window=16), "qwen3"),
    (dict(norm_scale_offset=1.0, embed_scale=True, post_norms=True, attn_softcap=50.0), "gemma2"),
    (dict(norm_scale_offset=1.0, embed_scale=True, post_norms=True, qk_norm=True,
          sliding_window=16, sliding_window_pattern=2, rope_local_theta=1e4), "gemma3"),
    (dict(position_embedding="learned", norm="layernorm", mlp_gated=False, num_kv_heads=0),
     "gpt2"),
    (dict(num_experts=4, sliding_window=16), "mixtral"),
    (dict(num_experts=8, experts_per_token=4, qk_norm=True, moe_mlp_dim=16,
          moe_normalize_top_k=False), "qwen3_moe"),
], ids=["llama", "llama_biases", "mistral", "qwen2_windows", "qwen3", "gemma2", "gemma3", "gpt2",
        "mixtral", "qwen3_moe"])
def test_export_picks_an_architecture_that_expresses_the_model(options, family):
  name, name_map = exporter(_model(**options))
  assert name == family
  name_map.hf_config(_model(**options))  # No refusal.


@pytest.mark.parametrize("options,message", [
    (dict(norm="layernorm"),
     "the closest, LlamaForCausalLM, cannot express model.norm='layernorm'"),
    (dict(sliding_window=16, sliding_window_pattern=2),
     "LlamaForCausalLM, cannot express model.sliding_window=16 with sliding_window_pattern=2"),
    (dict(num_experts=4, moe_router="sigmoid"),
     "MixtralForCausalLM, cannot express model.moe_router='sigmoid'"),
], ids=["layernorm_rope", "alternating_windows", "sigmoid_router"])
def test_export_refuses_what_no_architecture_expresses(options, message):
  with pytest.raises(UserError, match=f"^no Hugging Face architecture expresses this model .*"
                                      f"{message}$"):
    exporter(_model(**options))
