"""The output projection and its cross-entropy in sequence chunks, never
holding a batch's [B, L, V] logits.

With 128k-256k vocabularies (Llama 3, Gemma) the float32 logits of a batch
and their gradient are the largest activations of a step. ``cross_entropy``
runs the projection, the softmax and the loss over chunks of C positions (a
``lax.scan``), so one chunk's [B, C, V] is alive at a time. Under
differentiation it also computes the gradients of the hidden states and of
the head in the same pass (Liger's fused linear cross-entropy): the
backward pass only scales them, so no logits are saved or recomputed and the
head costs the same three matmuls as the unfused loss. That is why the
differentiable output is the weighted loss sum (a scalar cotangent), not
per-token losses: a per-token cotangent would reach inside the head's
gradient. MaxText's ``num_vocab_tiling`` is the same idea with recomputation.

One caveat on meshes: each chunk's head gradient is a sum over the batch,
so data-parallel runs reduce it once per chunk rather than once per step.

Shape letters as in ``bigmodel.models``; C is a chunk's length here.
"""
import functools
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp

from bigmodel.models.layers import constrain


@flax.struct.dataclass
class OutputHead:
  """What turns final hidden states into logits: x @ kernel (+ bias), then
  an optional soft cap, computed in ``dtype`` with float32 logits."""
  kernel_DxV: jax.Array
  bias_V: Optional[jax.Array] = None
  softcap: float = flax.struct.field(pytree_node=False, default=0.0)
  dtype: Any = flax.struct.field(pytree_node=False, default=jnp.float32)

  def logits_and_tanh(self, x_BxCxD: jax.Array) -> tuple[jax.Array, Optional[jax.Array]]:
    """float32 logits [B, C, V] and, for the gradient, the cap's tanh (or None)."""
    z_BxCxV = jnp.einsum("bcd,dv->bcv", x_BxCxD.astype(self.dtype),
                         self.kernel_DxV.astype(self.dtype),
                         preferred_element_type=jnp.float32)
    if self.bias_V is not None:
      z_BxCxV = z_BxCxV + self.bias_V.astype(self.dtype).astype(jnp.float32)
    tanh_BxCxV = None
    if self.softcap:
      tanh_BxCxV = jnp.tanh(z_BxCxV / self.softcap)
      z_BxCxV = self.softcap * tanh_BxCxV
    return constrain(z_BxCxV, ("batch", "length", "act_vocab")), tanh_BxCxV


def cross_entropy(x_BxLxD: jax.Array, head: OutputHead, targets_BxL: jax.Array,
                  weights_BxL: jax.Array, chunk_len: int
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Cross-entropy of ``head``'s logits of ``x_BxLxD``, chunk by chunk.

  Returns (sum of weights x losses: a scalar, differentiable in ``x_BxLxD``
  and ``head``; the per-token losses [B, L] and argmax predictions [B, L],
  both without gradient). ``chunk_len`` positions per chunk; a length it
  does not divide is padded with zero-weight positions.
  """
  length = x_BxLxD.shape[1]
  chunk_len = min(chunk_len, length)
  # The activation layout (batch split, width whole) whatever layer made x
  # (BERT's MLM transform leaves its width split over ``tensor``): measured,
  # GSPMD's gradients of the chunk scan came out wrong on a 2 x 2 x 2 mesh
  # with the width split (tests/test_sharding.py).
  x_BxLxD = constrain(x_BxLxD, ("batch", "length", "act_embed"))
  pad = -length % chunk_len
  if pad:
    x_BxLxD = jnp.pad(x_BxLxD, ((0, 0), (0, pad), (0, 0)))
    targets_BxL = jnp.pad(targets_BxL, ((0, 0), (0, pad)))
    weights_BxL = jnp.pad(weights_BxL, ((0, 0), (0, pad)))
  loss_sum, losses_BxL, predictions_BxL = _fused(
      chunk_len, x_BxLxD, head, targets_BxL, weights_BxL.astype(jnp.float32))
  return (loss_sum, jax.lax.stop_gradient(losses_BxL[:, :length]),
          predictions_BxL[:, :length])


def _chunked(x_BxLx: jax.Array, chunk_len: int) -> jax.Array:
  """[B, L, ...] -> [L / C, B, C, ...]: the scan runs over chunks; each keeps
  the batch axis (and its sharding)."""
  b, length = x_BxLx.shape[:2]
  return jnp.moveaxis(x_BxLx.reshape(b, length // chunk_len, chunk_len, *x_BxLx.shape[2:]), 1, 0)


def _unchunked(x_nxBxCx: jax.Array) -> jax.Array:
  n, b, c = x_nxBxCx.shape[:3]
  return jnp.moveaxis(x_nxBxCx, 0, 1).reshape(b, n * c, *x_nxBxCx.shape[3:])


def _chunk_loss(head: OutputHead, x_BxCxD, targets_BxC):
  """(softmax [B, C, V], the logits' tanh or None, per-token losses, predictions).

  One reduction gives both the prediction and the max that log-sum-exp
  subtracts, and one exp serves the loss and the softmax (XLA:CPU is
  memory-bound over [B, C, V]: each pass costs about as much as another).
  """
  z_BxCxV, tanh_BxCxV = head.logits_and_tanh(x_BxCxD)
  predictions_BxC = jnp.argmax(z_BxCxV, axis=-1)
  max_BxC = jnp.take_along_axis(z_BxCxV, predictions_BxC[..., None], axis=-1)[..., 0]
  exp_BxCxV = jnp.exp(z_BxCxV - max_BxC[..., None])
  sum_BxC = exp_BxCxV.sum(axis=-1)
  target_BxC = jnp.take_along_axis(z_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
  losses_BxC = max_BxC + jnp.log(sum_BxC) - target_BxC
  return exp_BxCxV / sum_BxC[..., None], tanh_BxCxV, losses_BxC, predictions_BxC


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(chunk_len, x_BxLxD, head, targets_BxL, weights_BxL):
  """Without differentiation: the losses only (no gradient work)."""
  def body(_, chunk):
    x_BxCxD, targets_BxC = chunk
    _, _, losses_BxC, predictions_BxC = _chunk_loss(head, x_BxCxD, targets_BxC)
    return None, (losses_BxC, predictions_BxC)

  _, (losses, predictions) = jax.lax.scan(
      body, None, (_chunked(x_BxLxD, chunk_len), _chunked(targets_BxL, chunk_len)))
  losses_BxL = _unchunked(losses)
  return (losses_BxL * weights_BxL).sum(), losses_BxL, _unchunked(predictions)


def _fused_forward(chunk_len, x_BxLxD, head, targets_BxL, weights_BxL):
  """The losses and, per chunk, the gradients of the weighted loss sum."""
  dtype, vocab = head.dtype, head.kernel_DxV.shape[1]

  def body(carry, chunk):
    d_kernel_DxV, d_bias_V = carry
    x_BxCxD, targets_BxC, weights_BxC = chunk
    p_BxCxV, tanh_BxCxV, losses_BxC, predictions_BxC = _chunk_loss(head, x_BxCxD, targets_BxC)
    # d(sum of w * loss) / d logits = w (softmax - one_hot(target)).
    g_BxCxV = (p_BxCxV - jax.nn.one_hot(targets_BxC, vocab, dtype=jnp.float32)
               ) * weights_BxC[..., None]
    if tanh_BxCxV is not None:  # Through cap * tanh(z / cap).
      g_BxCxV = g_BxCxV * (1.0 - tanh_BxCxV * tanh_BxCxV)
    g_BxCxV = g_BxCxV.astype(dtype)
    dx_BxCxD = jnp.einsum("bcv,dv->bcd", g_BxCxV, head.kernel_DxV.astype(dtype),
                          preferred_element_type=jnp.float32).astype(x_BxCxD.dtype)
    d_kernel_DxV = d_kernel_DxV + jnp.einsum("bcd,bcv->dv", x_BxCxD.astype(dtype), g_BxCxV,
                                             preferred_element_type=jnp.float32)
    if d_bias_V is not None:
      d_bias_V = d_bias_V + g_BxCxV.astype(jnp.float32).sum(axis=(0, 1))
    return (d_kernel_DxV, d_bias_V), (losses_BxC, predictions_BxC, dx_BxCxD)

  zeros = (jnp.zeros(head.kernel_DxV.shape, jnp.float32),
           None if head.bias_V is None else jnp.zeros(head.bias_V.shape, jnp.float32))
  (d_kernel_DxV, d_bias_V), (losses, predictions, dx) = jax.lax.scan(
      body, zeros, (_chunked(x_BxLxD, chunk_len), _chunked(targets_BxL, chunk_len),
                    _chunked(weights_BxL, chunk_len)))
  losses_BxL = _unchunked(losses)
  outputs = ((losses_BxL * weights_BxL).sum(), losses_BxL, _unchunked(predictions))
  return outputs, (_unchunked(dx), d_kernel_DxV, d_bias_V, head)


def _fused_backward(chunk_len, residuals, cotangents):
  # The per-token outputs leave ``cross_entropy`` without gradient, so only
  # the loss sum's (scalar) cotangent arrives non-zero.
  del chunk_len
  dx_BxLxD, d_kernel_DxV, d_bias_V, head = residuals
  scale = cotangents[0]
  d_head = head.replace(
      kernel_DxV=(scale * d_kernel_DxV).astype(head.kernel_DxV.dtype),
      bias_V=None if d_bias_V is None else (scale * d_bias_V).astype(head.bias_V.dtype))
  return (scale * dx_BxLxD).astype(dx_BxLxD.dtype), d_head, None, None


_fused.defvjp(_fused_forward, _fused_backward)
