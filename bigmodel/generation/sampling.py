"""Choosing the next token from logits: greedy, temperature, top-k, top-p.

Shapes: B rows, V vocabulary. The settings are traced values (changing a
temperature does not recompile); only which filters are on is static.
"""
import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is picked.

  temperature: 0 = greedy (argmax); otherwise logits / temperature.
  top_k: keep the k most likely tokens (0 = all).
  top_p: keep the smallest set of most likely tokens whose probability
    reaches top_p (1 = all). Applied after top_k.
  """
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0

  def static_key(self) -> tuple[bool, bool, bool]:
    """What changes the compiled program: greedy, top-k on, top-p on."""
    return (self.greedy, self.top_k > 0, self.top_p < 1.0)

  def values(self) -> dict[str, jax.Array]:
    return dict(temperature=jnp.float32(max(self.temperature, 1e-6)),
                top_k=jnp.int32(self.top_k), top_p=jnp.float32(self.top_p))


def mask_invalid(logits_BxV: jax.Array, num_valid_ids: int) -> jax.Array:
  """Ids >= ``num_valid_ids`` (embedding rows beyond the tokenizer) never win."""
  if num_valid_ids >= logits_BxV.shape[-1]:
    return logits_BxV
  return jnp.where(jnp.arange(logits_BxV.shape[-1]) < num_valid_ids, logits_BxV, NEG_INF)


def filter_logits(logits_BxV: jax.Array, values: dict[str, jax.Array], *, use_top_k: bool,
                  use_top_p: bool) -> jax.Array:
  """Temperature-scaled logits with the tokens outside top-k / top-p at -inf."""
  logits_BxV = logits_BxV / values["temperature"]
  if not (use_top_k or use_top_p):
    return logits_BxV
  # One descending sort serves both filters; k is traced, so the k-th value
  # is read from the sorted row rather than with lax.top_k (static k).
  sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
  if use_top_k:
    k = jnp.clip(values["top_k"], 1, logits_BxV.shape[-1])
    kth_Bx1 = jax.lax.dynamic_slice_in_dim(sorted_BxV, k - 1, 1, axis=-1)
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, NEG_INF, logits_BxV)
    sorted_BxV = jnp.where(jnp.arange(sorted_BxV.shape[-1]) < k, sorted_BxV, NEG_INF)
  if use_top_p:
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # A sorted token is kept if the mass before it is below top_p (so the
    # most likely token always is).
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    kept_BxV = jnp.where(before_BxV < values["top_p"], sorted_BxV, jnp.inf)
    threshold_Bx1 = jnp.min(kept_BxV, axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < threshold_Bx1, NEG_INF, logits_BxV)
  return logits_BxV


def next_token(logits_BxV: jax.Array, rng: jax.Array, values: dict[str, jax.Array], *,
               static_key: tuple[bool, bool, bool]) -> jax.Array:
  """Token ids [B] (int32) chosen by the sampling settings."""
  greedy, use_top_k, use_top_p = static_key
  if greedy:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  filtered_BxV = filter_logits(logits_BxV, values, use_top_k=use_top_k, use_top_p=use_top_p)
  return jax.random.categorical(rng, filtered_BxV, axis=-1).astype(jnp.int32)
