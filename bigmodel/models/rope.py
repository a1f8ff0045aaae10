"""Rotary position embeddings: frequencies (plain and scaled) and their application.

Scaling methods extend a model's context beyond what it was trained on by
changing the rotation frequencies; each matches the published formula that
Hugging Face checkpoints declare in ``rope_scaling`` / ``rope_parameters``:

- ``none``: frequencies ``theta^(-2i/H)``.
- ``linear`` (position interpolation): every frequency divided by ``factor``.
- ``llama3`` (Llama 3.1+): long wavelengths (beyond ``original_max_len /
  low_freq_factor``) divided by ``factor``, short ones (below ``original_max_len
  / high_freq_factor``) kept, a smooth blend in between.
- ``yarn``: frequencies blended between interpolated and original by a linear
  ramp over the dimensions whose rotation counts fall between ``beta_slow`` and
  ``beta_fast`` within ``original_max_len``; cos and sin are scaled by the
  attention factor (default ``0.1 ln(factor) + 1``).

Frequencies are computed in float32 with numpy at trace time (they are
constants of the model), as the reference implementations do in float32.
Shape letters as in ``bigmodel.models``; ``H2`` is half the head dim.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

ROPE_SCALINGS = ("none", "linear", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeSpec:
  """A rotary embedding: base ``theta`` and an optional scaling (module doc)."""
  theta: float
  scaling: str = "none"
  factor: float = 1.0
  original_max_len: int = 0      # llama3 / yarn: the pretraining context length.
  low_freq_factor: float = 1.0   # llama3.
  high_freq_factor: float = 4.0  # llama3.
  beta_fast: float = 32.0        # yarn.
  beta_slow: float = 1.0         # yarn.
  attention_factor: float = 0.0  # yarn: 0 = 0.1 ln(factor) + 1.

  def frequencies(self, head_dim: int) -> tuple[np.ndarray, float]:
    """(inverse frequencies [H2] float32, factor on cos and sin)."""
    exponent_H2 = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    base_H2 = np.float32(self.theta) ** exponent_H2
    inv_freq_H2 = (np.float32(1.0) / base_H2).astype(np.float32)
    if self.scaling == "none":
      return inv_freq_H2, 1.0
    if self.scaling == "linear":
      return (inv_freq_H2 / np.float32(self.factor)).astype(np.float32), 1.0
    if self.scaling == "llama3":
      return self._llama3(inv_freq_H2), 1.0
    if self.scaling == "yarn":
      return self._yarn(base_H2, head_dim)
    raise ValueError(f"unknown rope scaling {self.scaling!r}; choose from {ROPE_SCALINGS}")

  def _llama3(self, inv_freq_H2: np.ndarray) -> np.ndarray:
    old_len = self.original_max_len
    wavelen_H2 = np.float32(2 * math.pi) / inv_freq_H2
    low_freq_wavelen = old_len / self.low_freq_factor
    high_freq_wavelen = old_len / self.high_freq_factor
    scaled_H2 = np.where(wavelen_H2 > low_freq_wavelen, inv_freq_H2 / self.factor, inv_freq_H2)
    smooth_H2 = ((old_len / wavelen_H2 - self.low_freq_factor)
                 / (self.high_freq_factor - self.low_freq_factor))
    smoothed_H2 = (1 - smooth_H2) * scaled_H2 / self.factor + smooth_H2 * scaled_H2
    medium_H2 = (wavelen_H2 >= high_freq_wavelen) & (wavelen_H2 <= low_freq_wavelen)
    return np.where(medium_H2, smoothed_H2, scaled_H2).astype(np.float32)

  def _yarn(self, base_H2: np.ndarray, head_dim: int) -> tuple[np.ndarray, float]:
    def correction_dim(rotations: float) -> float:
      return (head_dim * math.log(self.original_max_len / (rotations * 2 * math.pi))
              / (2 * math.log(self.theta)))

    low = max(math.floor(correction_dim(self.beta_fast)), 0)
    high = min(math.ceil(correction_dim(self.beta_slow)), head_dim - 1)
    if low == high:
      high += 0.001  # The published formula's guard against a zero-width ramp.
    ramp_H2 = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep_H2 = (1 - ramp_H2).astype(np.float32)  # 1 = original frequency (extrapolate).
    inv_freq_H2 = ((np.float32(1.0) / (np.float32(self.factor) * base_H2)) * (1 - keep_H2)
                   + (np.float32(1.0) / base_H2) * keep_H2)
    attention_factor = self.attention_factor or (
        0.1 * math.log(self.factor) + 1.0 if self.factor > 1 else 1.0)
    return inv_freq_H2.astype(np.float32), float(attention_factor)


def apply_rope(x_BxLxNxH: jax.Array, positions_BxL: jax.Array, inv_freq_H2: jax.Array,
               attention_factor: float = 1.0) -> jax.Array:
  """Rotates ``x`` by ``positions`` (rotate-half convention), in float32.

  ``inv_freq_H2`` may be traced (a per-layer choice between two frequency
  sets, e.g. Gemma's local and global layers).
  """
  angle_BxLx1xH2 = (positions_BxL[..., None].astype(jnp.float32)
                    * jnp.asarray(inv_freq_H2, jnp.float32))[:, :, None, :]
  sin = jnp.sin(angle_BxLx1xH2) * attention_factor
  cos = jnp.cos(angle_BxLx1xH2) * attention_factor
  x1, x2 = jnp.split(x_BxLxNxH.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BxLxNxH.dtype)
