"""Small configs and batches shared by the tests."""
import numpy as np

from configs.gpt import get_config


def tiny_config(**model_overrides):
  """A GPT small enough to compile and step in well under a second."""
  config = get_config("tiny")
  config.model.update(num_layers=2, embed_dim=64, num_heads=4, mlp_dim=128,
                      vocab_size=128, max_len=32)
  config.model.update(**model_overrides)
  config.data.seq_len = 32
  config.optim.update(warmup_steps=5, learning_rate=3e-3)
  return config


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
