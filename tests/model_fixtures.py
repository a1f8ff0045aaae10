"""Small configs and batches shared by the tests."""
import jax
import numpy as np

import configs.bert as bert
import configs.gemma as gemma
import configs.gpt as gpt
import configs.llama as llama
import configs.mistral as mistral
import configs.mixtral as mixtral
import configs.qwen as qwen
import configs.t5 as t5

# Families, and open-weight architectures (the gpt family with a preset
# file's options), by the name tests pass as ``family``.
CONFIG_FILES = {"gpt": gpt, "bert": bert, "t5": t5, "llama": llama, "qwen": qwen,
                "mistral": mistral, "mixtral": mixtral, "gemma": gemma}


def family_name(name: str) -> str:
  """The model family of a ``CONFIG_FILES`` name (an architecture is a gpt)."""
  return CONFIG_FILES[name].get_config("tiny").model.family


def tiny_config(family: str = "gpt", **model_overrides):
  """A model of ``family`` (or an architecture of ``CONFIG_FILES``) small enough
  to compile and step in well under a second. Windows and rotary scaling are
  shrunk to act within its 32 positions; gemma's 2 layers are one local, one
  global."""
  config = CONFIG_FILES[family].get_config("tiny")
  m = config.model
  m.update(sliding_window=8 if m.sliding_window else 0,
           query_pre_attn_scalar=16.0 if m.query_pre_attn_scalar else 0.0,
           rope_original_max_len=16 if m.rope_original_max_len else 0)
  config.model.update(num_layers=2, num_decoder_layers=2, embed_dim=64, num_heads=4,
                      head_dim=0, mlp_dim=128, vocab_size=128, max_len=32, dropout_rate=0.0)
  config.model.update(**model_overrides)
  config.data.seq_len = 32
  config.optim.update(warmup_steps=5, learning_rate=3e-3)
  return config


def init_params(model, *inputs, seed: int = 0) -> dict:
  """``model.init``'s parameters, jitted: an eager init dispatches op by op
  (a tiny T5's took 28 s, jitted 2 s)."""
  return jax.jit(model.init)(jax.random.key(seed), *inputs)["params"]


def apply(model, params: dict, *inputs, **kwargs):
  """``model.apply`` on ``params``, jitted (one compile per input shape)."""
  return jax.jit(model.apply)({"params": params}, *inputs, **kwargs)


def jit_objective(objective, model, params: dict, batch: dict, rng=None, *reference):
  """``objective(model, params, batch, rng, *reference)``, jitted: op by op, a
  tiny T5's or MoE decoder's loss took a minute or two on a loaded 2-core CPU."""
  return jax.jit(lambda p, b, r, *ref: objective(model, p, b, r, *ref))(
      params, batch, rng, *reference)


def unstack_layers(params: dict, num_layers: int) -> dict:
  """A scanned model's parameters ([layers, ...] under ``blocks``) for the
  unrolled stack (``blocks_0``, ``blocks_1``, ...)."""
  unstacked = {k: v for k, v in params.items() if k != "blocks"}
  for i in range(num_layers):
    unstacked[f"blocks_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], params["blocks"])
  return unstacked


def random_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0,
                 num_segments: int = 1) -> dict[str, np.ndarray]:
  """A packed LM batch with ``num_segments`` documents per row."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab_size, size=(batch_size, seq_len + 1)).astype(np.int32)
  bounds = np.linspace(0, seq_len, num_segments + 1).astype(int)
  segment_ids = np.zeros(seq_len, np.int32)
  positions = np.zeros(seq_len, np.int32)
  for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
    segment_ids[lo:hi] = i + 1
    positions[lo:hi] = np.arange(hi - lo)
  loss_mask = np.ones(seq_len, np.float32)
  loss_mask[bounds[1:-1] - 1] = 0.0  # No target across a document boundary.
  tile = lambda x: np.tile(x, (batch_size, 1))
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=tile(segment_ids),
              positions=tile(positions), loss_mask=tile(loss_mask))


def random_family_batch(family: str, batch_size: int, seq_len: int, vocab_size: int,
                        seed: int = 0, num_segments: int = 1) -> dict[str, np.ndarray]:
  """A packed batch in the format ``family``'s pretraining task feeds the model."""
  batch = random_batch(batch_size, seq_len, vocab_size, seed, num_segments)
  family = family_name(family)
  if family == "gpt":
    return batch
  if family == "bert":
    rng = np.random.default_rng(seed + 100)
    chosen = rng.random(batch["inputs"].shape) < 0.15
    return dict(inputs=np.where(chosen, 3, batch["inputs"]).astype(np.int32),
                targets=batch["inputs"], segment_ids=batch["segment_ids"],
                positions=batch["positions"], type_ids=np.zeros_like(batch["inputs"]),
                loss_mask=chosen.astype(np.float32))
  half = seq_len // 2  # T5: decoder rows half as long, segments aligned.
  decoder = random_batch(batch_size, half, vocab_size, seed + 1, num_segments)
  return dict(encoder_inputs=batch["inputs"], encoder_segment_ids=batch["segment_ids"],
              encoder_positions=batch["positions"], decoder_inputs=decoder["inputs"],
              decoder_targets=decoder["targets"], decoder_segment_ids=decoder["segment_ids"],
              decoder_positions=decoder["positions"], loss_mask=decoder["loss_mask"])
