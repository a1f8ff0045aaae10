"""Attention kernels. ``reference`` is the jnp oracle and XLA fallback."""
from pallas_kernels.reference import attention_mask, attention_reference

__all__ = ["attention_mask", "attention_reference"]
