"""BERT and T5: bidirectionality, causality, padding, packing and cross-attention masks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigmodel import sharding
from bigmodel.models import build_model
from bigmodel.models.layers import RelativePositionBias
from bigmodel.optim import make_optimizer
from bigmodel.state import create_sharded_state
from bigmodel.train_step import make_train_step
from model_fixtures import apply, init_params, random_family_batch, tiny_config


def _bert(**overrides):
  config = tiny_config("bert", **overrides)
  model = build_model(config.model)
  params = init_params(model, jnp.zeros((1, 32), jnp.int32))
  return lambda tokens, **kw: apply(model, params, tokens, **kw)


def _t5():
  config = tiny_config("t5")
  model = build_model(config.model)
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = init_params(model, tokens, tokens)
  return lambda enc, dec, **kw: apply(model, params, enc, dec, **kw)


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_bert_is_bidirectional_and_padding_is_invisible(norm_position):
  bert = _bert(norm_position=norm_position)
  tokens = jax.random.randint(jax.random.key(1), (2, 20), 4, 128)
  logits = bert(tokens)
  assert logits.shape == (2, 20, 128)
  changed = bert(tokens.at[:, 15].set((tokens[:, 15] + 1) % 128))
  assert np.abs(np.asarray(changed[:, 3] - logits[:, 3])).max() > 1e-4  # Sees the future.
  # 12 padding tokens (segment 0) appended: the real positions are unchanged.
  padded = jnp.concatenate([tokens, jnp.full((2, 12), 7, jnp.int32)], axis=1)
  segments = jnp.concatenate([jnp.ones((2, 20), jnp.int32), jnp.zeros((2, 12), jnp.int32)], 1)
  np.testing.assert_allclose(bert(padded, segment_ids_BxL=segments)[:, :20], logits, atol=1e-5)


def test_bert_classification_head():
  bert = _bert(num_classes=3)
  tokens = jax.random.randint(jax.random.key(1), (4, 20), 4, 128)
  logits = bert(tokens)
  assert logits.shape == (4, 3) and logits.dtype == jnp.float32
  # Padding (segment 0) appended is invisible to the pooled first token.
  padded = jnp.concatenate([tokens, jnp.full((4, 9), 7, jnp.int32)], axis=1)
  segments = jnp.concatenate([jnp.ones((4, 20), jnp.int32), jnp.zeros((4, 9), jnp.int32)], 1)
  np.testing.assert_allclose(bert(padded, segment_ids_BxL=segments), logits, atol=1e-5)
  # The head pools the first token: changing it changes every row's logits.
  first_changed = bert(tokens.at[:, 0].set((tokens[:, 0] + 1) % 128))
  assert np.abs(np.asarray(first_changed - logits)).max(axis=-1).min() > 1e-4


def test_t5_decoder_causal_encoder_bidirectional_and_padding_invisible():
  t5 = _t5()
  enc = jax.random.randint(jax.random.key(1), (2, 16), 4, 128)
  dec = jax.random.randint(jax.random.key(2), (2, 8), 4, 128)
  logits = t5(enc, dec)
  assert logits.shape == (2, 8, 128)
  later = t5(enc, dec.at[:, 5].set((dec[:, 5] + 1) % 128))
  np.testing.assert_allclose(later[:, :5], logits[:, :5], atol=1e-5)
  assert np.abs(np.asarray(later[:, 5:] - logits[:, 5:])).max() > 1e-4
  # Every decoder position sees the last encoder token.
  enc_changed = t5(enc.at[:, 15].set((enc[:, 15] + 1) % 128), dec)
  assert np.abs(np.asarray(enc_changed[:, 0] - logits[:, 0])).min() > 0
  padded_enc = jnp.concatenate([enc, jnp.full((2, 6), 9, jnp.int32)], axis=1)
  enc_segments = jnp.concatenate([jnp.ones((2, 16), jnp.int32), jnp.zeros((2, 6), jnp.int32)], 1)
  np.testing.assert_allclose(t5(padded_enc, dec, encoder_segment_ids_BxE=enc_segments), logits,
                             atol=1e-5)


def test_t5_packed_examples_do_not_see_each_other():
  t5 = _t5()
  enc = jax.random.randint(jax.random.key(3), (1, 16), 4, 128)
  dec = jax.random.randint(jax.random.key(4), (1, 8), 4, 128)
  enc_seg = jnp.array([[1] * 10 + [2] * 6])
  dec_seg = jnp.array([[1] * 5 + [2] * 3])
  packed = t5(enc, dec, encoder_segment_ids_BxE=enc_seg, decoder_segment_ids_BxT=dec_seg)
  # Example 2 alone gives the same logits as inside the pack (relative
  # positions do not depend on where an example starts).
  alone = t5(enc[:, 10:], dec[:, 5:])
  np.testing.assert_allclose(packed[:, 5:], alone, atol=1e-5)
  # Changing example 1's encoder tokens leaves example 2's logits alone.
  other = t5(enc.at[:, :10].set(5), dec, encoder_segment_ids_BxE=enc_seg,
             decoder_segment_ids_BxT=dec_seg)
  np.testing.assert_allclose(other[:, 5:], packed[:, 5:], atol=1e-5)


def test_relative_position_buckets_match_t5():
  bidirectional = RelativePositionBias(32, 128, num_heads=1, bidirectional=True)
  causal = RelativePositionBias(32, 128, num_heads=1, bidirectional=False)
  relative = jnp.array([-1, 1, -20, -200, 0, 5, 300])
  # By hand from T5's formula: bidirectional 16 buckets a side, exact below 8, then
  # log-spaced up to 128; causal 32 buckets, exact below 16.
  assert bidirectional.bucket(relative).tolist() == [1, 17, 10, 15, 0, 21, 31]
  assert causal.bucket(relative).tolist() == [1, 0, 17, 31, 0, 0, 0]


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_tiny_encoder_families_learn_a_fixed_batch(family):
  config = tiny_config(family)
  config.optim.update(name="adamw", learning_rate=3e-3, warmup_steps=5, weight_decay=0.0)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  model = build_model(config.model)
  opt, schedule = make_optimizer(config.optim, 100)
  batch = random_family_batch(family, 8, 32, 128, seed=3)
  with sharding.activate(mesh):
    state, _ = create_sharded_state(config, model, opt, mesh)
    step = jax.jit(make_train_step(model, opt, schedule, 1), donate_argnums=(0,))
    losses = []
    for _ in range(60):
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.5 * losses[0], losses[::10]


@pytest.mark.parametrize("config_module,preset,millions", [
    ("bert", "base", 110), ("bert", "large", 335), ("t5", "small", 77), ("t5", "base", 248),
    ("gpt", "small", 124),
])
def test_preset_parameter_counts_match_the_papers(config_module, preset, millions):
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"configs.{config_module}").get_config(preset)
  from bigmodel.config import validate  # pylint: disable=g-import-not-at-top
  validate(config)
  model = build_model(config.model)
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  inputs = (tokens, tokens) if config_module == "t5" else (tokens,)
  shapes = jax.eval_shape(lambda *x: model.init(jax.random.key(0), *x), *inputs)
  count = sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))
  # Within 3%: our vocabularies are padded to a multiple of 128 (e.g. GPT-2's
  # 50257 -> 50304) and BERT has no next-sentence head.
  assert count / 1e6 == pytest.approx(millions, rel=0.03)


def test_classification_metrics_by_hand():
  from bigmodel.evaluation import classification_metrics, confusion_matrix, text_to_class  # pylint: disable=g-import-not-at-top
  labels = np.array([0, 0, 0, 1, 1, 2, 0])
  predictions = np.array([0, 0, 1, 1, 3, 2, 2])  # 3 = a text-to-text answer that is no label.
  weights = np.array([1, 1, 1, 1, 1, 1, 0])      # The last row is padding.
  m = classification_metrics(predictions, labels, weights, num_classes=3)
  assert m["eval_accuracy"] == pytest.approx(4 / 6)
  # precision: class 0 2/2, class 1 1/2, class 2 1/1; recall: 2/3, 1/2, 1/1.
  assert m["eval_precision"] == pytest.approx((1 + 0.5 + 1) / 3)
  assert m["eval_recall"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
  f1 = [2 * p * r / (p + r) for p, r in ((1, 2 / 3), (0.5, 0.5), (1, 1))]
  assert m["eval_f1"] == pytest.approx(sum(f1) / 3)
  assert m["eval_majority_baseline"] == pytest.approx(3 / 6)
  # [true, predicted]; the answer 3 (no class) and the padding row count nowhere.
  assert confusion_matrix(predictions, labels, weights, 3).tolist() == [
      [2, 1, 0], [0, 1, 0], [0, 0, 1]]
  classes = text_to_class(np.array([[5, 2, 9], [6, 7, 2], [5, 9, 9]]),
                          np.array([[1, 1, 0], [1, 1, 1], [1, 1, 0]]), [(5, 2), (6, 7, 2)])
  assert classes.tolist() == [0, 1, 2]
