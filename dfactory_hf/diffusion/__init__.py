"""Pure tensor functions of masked / block diffusion training: no Trainer, no model."""

from dfactory_hf.diffusion.masks import (
    ATTN_IMPLEMENTATIONS,
    KeyIntervals,
    block_mask_from_intervals,
    build_attention_mask,
    generation_attention_mask,
    generation_key_intervals,
    key_intervals,
    mask_function,
    reference_block_diffusion_mask,
)

__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "KeyIntervals",
    "block_mask_from_intervals",
    "build_attention_mask",
    "generation_attention_mask",
    "generation_key_intervals",
    "key_intervals",
    "mask_function",
    "reference_block_diffusion_mask",
]
