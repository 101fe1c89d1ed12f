"""Block-diffusion generation: `generate` (batched, KV-cached) and its per-step decision functions."""

from .decoding import filter_logits, pick_tokens, select_positions_to_commit, transfer_schedule
from .sampler import DenoisingStep, generate

__all__ = [
    "DenoisingStep",
    "filter_logits",
    "generate",
    "pick_tokens",
    "select_positions_to_commit",
    "transfer_schedule",
]
