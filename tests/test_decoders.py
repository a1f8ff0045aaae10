"""The open-weight decoder options (Llama, Qwen, Mistral, Gemma) of the gpt family.

Hugging Face parity of whole models is in ``tests/test_convert_decoders.py``;
here: rotary scaling against transformers' formulas, sliding windows, local
and global layers scanned and unrolled, the presets' published sizes.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigmodel import flops
from bigmodel.config import validate
from bigmodel.errors import UserError
from bigmodel.models import ModelConfig, build_model
from bigmodel.models.rope import RopeSpec
from model_fixtures import CONFIG_FILES, apply, init_params, tiny_config, unstack_layers

ARCHITECTURES = ("llama", "qwen", "mistral", "mixtral", "gemma")


def _init(config, seq_len=32):
  model = build_model(config.model)
  params = init_params(model, jnp.zeros((1, seq_len), jnp.int32))
  # Random norms and biases too (their initial 1s and 0s would hide a mix-up).
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return model, jax.tree_util.tree_unflatten(treedef, leaves)


@pytest.mark.parametrize("spec,hf", [
    (RopeSpec(theta=10000.0, scaling="linear", factor=4.0),
     {"rope_type": "linear", "factor": 4.0}),
    (RopeSpec(theta=500000.0, scaling="llama3", factor=8.0, original_max_len=8192,
              low_freq_factor=1.0, high_freq_factor=4.0),
     {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192,
      "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
    (RopeSpec(theta=1000000.0, scaling="yarn", factor=4.0, original_max_len=32768),
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
])
def test_rope_scaling_matches_transformers(spec, hf):
  """Frequencies and the cos/sin factor equal transformers' for the same settings."""
  transformers = pytest.importorskip("transformers")
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # pylint: disable=g-import-not-at-top
  config = transformers.LlamaConfig(
      hidden_size=512, num_attention_heads=4, head_dim=128, max_position_embeddings=131072,
      rope_parameters={"rope_theta": spec.theta, **hf})
  want_freq, want_factor = ROPE_INIT_FUNCTIONS[hf["rope_type"]](config, "cpu")
  got_freq, got_factor = spec.frequencies(128)
  np.testing.assert_allclose(got_freq, want_freq.numpy(), rtol=1e-6)
  assert got_factor == pytest.approx(want_factor)
  plain, _ = RopeSpec(theta=spec.theta).frequencies(128)
  assert not np.allclose(got_freq, plain)  # The scaling changed something.


def test_a_key_beyond_the_window_never_changes_the_output():
  config = tiny_config("mistral", num_layers=1)
  window = config.model.sliding_window
  model, params = _init(config)
  tokens = jax.random.randint(jax.random.key(2), (2, 32), 3, 128)
  logits = apply(model, params, tokens)
  changed = apply(model, params, tokens.at[:, 5].set((tokens[:, 5] + 1) % 128))
  # Query i sees keys i - window + 1 .. i: token 5 reaches positions 5 .. 5 + window - 1.
  np.testing.assert_array_equal(logits[:, 5 + window:], changed[:, 5 + window:])
  assert np.abs(np.asarray(logits[:, 5:5 + window] - changed[:, 5:5 + window])).max() > 1e-4
  # Without the window the same change reaches the end of the sequence.
  config.model.sliding_window = 0
  full = build_model(config.model)
  far = (apply(full, params, tokens)
         - apply(full, params, tokens.at[:, 5].set((tokens[:, 5] + 1) % 128)))
  assert np.abs(np.asarray(far[:, 5 + window:])).max() > 1e-4


def test_gemma_local_and_global_layers():
  """Layer 0 local (window), layer 1 global: the receptive field is exactly that."""
  config = tiny_config("gemma")
  c = ModelConfig.from_config(config.model)
  assert c.local_layers().tolist() == [True, False]
  model, params = _init(config)
  tokens = jax.random.randint(jax.random.key(3), (1, 32), 3, 128)
  base = apply(model, params, tokens)
  changed = apply(model, params, tokens.at[:, 0].set((tokens[0, 0] + 1) % 128))
  # The global layer carries token 0 everywhere.
  assert np.abs(np.asarray(base[:, 20:] - changed[:, 20:])).max() > 1e-4
  # Both layers local: token 0 reaches at most 2 * (window - 1) positions on.
  config.model.sliding_window_pattern = 0
  both_local = build_model(config.model)
  reach = 2 * (config.model.sliding_window - 1)
  a = apply(both_local, params, tokens)
  b = apply(both_local, params, tokens.at[:, 0].set((tokens[0, 0] + 1) % 128))
  np.testing.assert_array_equal(a[:, reach + 1:], b[:, reach + 1:])


@pytest.mark.parametrize("arch", ["gemma", "mistral"])
def test_scan_and_unrolled_stacks_agree_with_mixed_layers(arch):
  """A scanned stack picks each layer's window and rotary base at run time; the
  unrolled one per layer: the same function either way."""
  config = tiny_config(arch)
  model, params = _init(config)
  config.model.scan = False
  loop = build_model(config.model)
  loop_params = unstack_layers(params, config.model.num_layers)
  tokens = jax.random.randint(jax.random.key(4), (2, 32), 3, 128)
  np.testing.assert_allclose(apply(model, params, tokens),
                             apply(loop, loop_params, tokens), atol=2e-5)


def test_softcap_bounds_the_logits():
  config = tiny_config("gemma")
  model, params = _init(config)
  params = jax.tree_util.tree_map(lambda x: 30 * x, params)  # Huge logits before the cap.
  logits = apply(model, params, jnp.arange(3, 35)[None])
  assert np.abs(np.asarray(logits)).max() <= config.model.final_softcap
  assert np.abs(np.asarray(logits)).max() > 0.5 * config.model.final_softcap


# Published parameter counts (model cards; text-only models), in billions.
PUBLISHED_PARAMS = {
    ("llama", "llama3_1b"): 1.236, ("llama", "llama3_8b"): 8.030,
    ("llama", "llama3_70b"): 70.554, ("llama", "llama3_405b"): 405.85,
    ("qwen", "qwen3_0_6b"): 0.596, ("qwen", "qwen3_8b"): 8.191, ("qwen", "qwen2_5_7b"): 7.616,
    ("mistral", "mistral_7b"): 7.242, ("mixtral", "mixtral_8x7b"): 46.703,
    ("qwen", "qwen3_30b_a3b"): 30.532,
    ("gemma", "gemma2_2b"): 2.614, ("gemma", "gemma3_1b"): 0.9999, ("gemma", "gemma3_12b"): 11.766,
}


@pytest.mark.parametrize("arch,preset", sorted(PUBLISHED_PARAMS))
def test_presets_have_the_published_sizes(arch, preset):
  config = CONFIG_FILES[arch].get_config(preset)
  validate(config)
  count = flops.param_count(ModelConfig.from_config(config.model))
  assert count / 1e9 == pytest.approx(PUBLISHED_PARAMS[arch, preset], rel=2e-3)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tiny_presets_count_their_parameters(arch):
  config = CONFIG_FILES[arch].get_config("tiny")
  validate(config)
  model = build_model(config.model)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  count = sum(x.size for x in jax.tree_util.tree_leaves(shapes))
  assert flops.param_count(ModelConfig.from_config(config.model)) == count


def test_windowed_layers_count_fewer_attention_flops():
  config = tiny_config("mistral")
  c = ModelConfig.from_config(config.model)
  windowed = flops.forward_flops_per_token(c, 32)[1]
  full = flops.forward_flops_per_token(ModelConfig.from_config(
      tiny_config("mistral", sliding_window=0).model), 32)[1]
  # Causal: 32 * 32 / 2 = 512 pairs per layer; window 8: 32 * 8 - 28 = 228.
  assert windowed / full == pytest.approx(228 / 512)


@pytest.mark.parametrize("overrides,message", [
    (dict(norm_scale_offset=1.0), "norm_scale_offset"),
    (dict(position_embedding="learned", rope_scaling="linear"), "position_embedding=rope"),
    (dict(rope_scaling="llama3", rope_low_freq_factor=4.0, rope_high_freq_factor=1.0),
     "rope_high_freq_factor"),
    (dict(sliding_window_pattern=2), "sliding_window"),
    (dict(rope_scaling="ntk"), "rope_scaling"),
    (dict(sliding_window=-1), "sliding_window"),
    (dict(norm="batchnorm"), "model.norm"),
])
def test_bad_decoder_options_are_user_errors(overrides, message):
  config = tiny_config("gpt", position_embedding="rope")
  config.model.update(**overrides)
  with pytest.raises(UserError, match=message):
    validate(config)


def test_decoder_options_do_not_apply_to_other_families():
  config = tiny_config("bert")
  config.model.qk_norm = True
  with pytest.raises(UserError, match="qk_norm"):
    validate(config)


@pytest.mark.parametrize("arch,prompt_len,overrides", [
    ("gemma", 6, {}), ("gemma", 13, dict(num_layers=5, sliding_window_pattern=2)),
    ("gemma", 3, dict(num_layers=5, sliding_window_pattern=3, scan=False)),
    ("mistral", 6, {}), ("mistral", 13, {})])
def test_cached_decoding_logits_equal_the_full_forward(arch, prompt_len, overrides):
  """Prefill a prompt, then feed the rest one token at a time: each step's
  logits are the full forward pass's at that position, past the window.
  Local layers keep a ring of `window` slots, filled from a prompt shorter
  or longer than the window: every layer of Mistral; Gemma's local layers
  (scanned in groups of the pattern, then the leftover local layers; or
  unrolled), while its global layers keep every slot."""
  from bigmodel.models import families  # pylint: disable=g-import-not-at-top
  from bigmodel.models.decoding import LocalGlobalCache  # pylint: disable=g-import-not-at-top
  config = tiny_config(arch, **overrides)
  window, length = config.model.sliding_window, 24
  model, params = _init(config)
  family = families.family_of(model)
  tokens = jax.random.randint(jax.random.key(5), (1, length), 3, 128)
  want = apply(model, params, tokens)
  prefill = jax.jit(functools.partial(family.prefill, model), static_argnums=(3, 4))
  logits, state = prefill(params, tokens[:, :prompt_len], jnp.asarray([prompt_len]),
                          length - prompt_len, 0)
  cache = state.self_cache
  assert state.kv_segment_ids_BxS.shape[1] == length
  if arch == "mistral":
    assert cache.k_BxSxKxH.shape[:3] == (config.model.num_layers, 1, window)
  else:
    num_local = int(model.config.local_layers().sum())
    assert isinstance(cache, LocalGlobalCache) and 0 < num_local < config.model.num_layers
    assert cache.local.k_BxSxKxH.shape[:3] == (num_local, 1, window)
    assert cache.full.k_BxSxKxH.shape[:3] == (config.model.num_layers - num_local, 1, length)
  got, step = [logits], jax.jit(functools.partial(family.step, model))
  for i in range(prompt_len, length - 1):
    logits, state = step(params, tokens[:, i], state)
    got.append(logits)
  np.testing.assert_allclose(np.stack(got, axis=1), want[:, prompt_len - 1:length - 1],
                             atol=1e-4)


def test_gemma_layers_on_the_pallas_kernel_equal_xla():
  """Local and global layers picked at run time (lax.cond) around the flash
  kernel with window and soft-cap: logits and gradients equal the XLA path's."""
  config = tiny_config("gemma", attention_impl="xla")
  model, params = _init(config)
  pallas = build_model(tiny_config("gemma", attention_impl="pallas").model)
  tokens = jax.random.randint(jax.random.key(6), (2, 32), 3, 128)

  def loss(m):
    return jax.jit(jax.value_and_grad(lambda p: m.apply({"params": p}, tokens).std()))(params)

  (want, want_grads), (got, got_grads) = loss(model), loss(pallas)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(jax.tree_util.tree_leaves(got_grads), jax.tree_util.tree_leaves(want_grads)):
    np.testing.assert_allclose(g, w, atol=2e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_tiny_preset_trains_from_the_command_line(tmp_path, tokenizer_file, arch):
  """The preset's own tiny shape trains, evaluates and samples (cached decoding
  with its windows) through the trainer."""
  import json  # pylint: disable=g-import-not-at-top
  import sysconfig  # pylint: disable=g-import-not-at-top
  from commands import run_train  # pylint: disable=g-import-not-at-top
  corpus = sysconfig.get_paths()["stdlib"] + "/json"
  workdir = tmp_path / "w"
  result = run_train(f"--config=configs/{arch}.py:tiny", f"--workdir={workdir}",
                     f"--config.data.paths={corpus}", f"--config.data.tokenizer={tokenizer_file}",
                     "--config.data.vocab_size=400", "--config.data.seq_len=128",
                     "--config.train.steps=6", "--config.train.batch_size=4",
                     "--config.train.log_every=3", "--config.train.eval_every=6",
                     "--config.train.eval_steps=1", "--config.train.sample_tokens=8",
                     "--config.optim.warmup_steps=1", "--config.train.progress=False")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "----- sample -----" in result.stdout
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in records if "loss" in r]
  assert len(losses) == 2 and all(np.isfinite(losses))
  assert any("eval_loss" in r and np.isfinite(r["eval_loss"]) for r in records)
