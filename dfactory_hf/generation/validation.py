"""Argument checks for `generate`: each ValueError names the argument, its value, the rule and the fix."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

# Backends that take the 4D boolean masks `generate` builds (flex attention needs a BlockMask instead).
SUPPORTED_ATTENTION = ("sdpa", "eager")


def validate_generation_args(
    *,
    gen_length: int,
    block_length: int,
    steps: int,
    threshold: float,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    mask_token_id: int | None,
    edit_threshold: float | None = None,
    edit_steps: int = 0,
) -> None:
    if gen_length <= 0:
        raise ValueError(f"gen_length ({gen_length}) must be > 0: it is the number of tokens to generate per prompt.")
    if block_length <= 0:
        raise ValueError(
            f"block_length ({block_length}) must be > 0; "
            "use the block size the model was trained with (32 for LLaDA2.0)."
        )
    if steps <= 0:
        raise ValueError(f"steps ({steps}) must be > 0: it is the most denoising steps per block (default 32).")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(
            f"threshold ({threshold}) must be in (0, 1]: positions whose probability exceeds it are committed; "
            "1.0 commits only the scheduled number per step."
        )
    if edit_threshold is not None and not 0.0 < edit_threshold <= 1.0:
        raise ValueError(
            f"edit_threshold ({edit_threshold}) must be in (0, 1]: a filled position is rewritten when the model's "
            "top token differs from it with probability above it (None = no editing; e.g. 0.9)."
        )
    if isinstance(edit_steps, bool) or not isinstance(edit_steps, int) or edit_steps < 0:
        raise ValueError(f"edit_steps ({edit_steps!r}) must be an integer >= 0: the extra denoising passes per "
                         "block that may only edit, once nothing is masked (e.g. 8).")
    if temperature < 0:
        raise ValueError(f"temperature ({temperature}) must be >= 0; use 0 for greedy decoding.")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k ({top_k}) must be a positive integer; use None to disable top-k filtering.")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p ({top_p}) must be in (0, 1]; use None or 1.0 to disable nucleus filtering.")
    if mask_token_id is None:
        raise ValueError(
            "mask_token_id is None; pass the tokenizer's mask token id (tokenizer.mask_token_id, 156895 for LLaDA2.0)."
        )


def normalize_prompts(prompt_ids: Sequence[Sequence[int]] | torch.Tensor) -> list[list[int]]:
    """A LongTensor [B, P] (B prompts of exactly P tokens) or a list of token-id lists -> list of int lists."""
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() != 2:
            raise ValueError(
                f"prompt_ids is a tensor of shape {tuple(prompt_ids.shape)}; pass a LongTensor [batch, prompt_length] "
                "or a list of token-id lists (for prompts of different lengths)."
            )
        prompts = prompt_ids.tolist()
    else:
        try:
            prompts = [[operator.index(token) for token in row] for row in prompt_ids]
        except TypeError:
            raise ValueError(
                "prompt_ids must be a list of token-id lists (one per prompt) or a LongTensor [batch, prompt_length]; "
                "wrap a single prompt as [token_ids]."
            ) from None
    if not prompts:
        raise ValueError("prompt_ids holds no prompt; pass at least one row of token ids.")
    for row, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(
                f"prompt_ids row {row} is empty; every prompt needs at least one token (apply the chat template first)."
            )
    return prompts


def check_prompt_lengths(prompts: list[list[int]], *, gen_length: int, max_positions: int | None) -> None:
    if max_positions is None:
        return
    for row, prompt in enumerate(prompts):
        if len(prompt) + gen_length > max_positions:
            raise ValueError(
                f"prompt_ids row {row}: prompt ({len(prompt)} tokens) + gen_length ({gen_length}) = "
                f"{len(prompt) + gen_length} exceeds model.config.max_position_embeddings ({max_positions}); "
                "shorten the prompt or lower gen_length."
            )


def check_attention_backend(config) -> None:
    backend = getattr(config, "_attn_implementation", None)
    if backend is not None and backend not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"the model's attention implementation is {backend!r}, but generate passes 4D boolean masks, which only "
            f"{' and '.join(SUPPORTED_ATTENTION)} take; call model.set_attn_implementation('sdpa') first."
        )
