"""Attention kernels. ``reference`` is the jnp oracle and XLA fallback;
``flash_attention`` is the fused Pallas kernel (Triton on GPU, Mosaic on TPU,
interpreted on CPU)."""
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.flash_common import BlockSizes
from pallas_kernels.reference import (attention_mask, attention_reference,
                                      check_window_and_softcap)

__all__ = ["BlockSizes", "attention_mask", "attention_reference", "check_window_and_softcap",
           "flash_attention"]
