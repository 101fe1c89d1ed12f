"""The per-step decisions of block decoding, as pure tensor functions (REFERENCE 3).

Inside a block, every denoising step
1. picks a token and its probability at every position (`pick_tokens`),
2. commits the still-masked positions whose probability exceeds `threshold`, or, when fewer than the
   step's scheduled number pass, the most confident ones (`select_positions_to_commit`),
where the schedule spreads the block's initially masked positions over `steps` (`transfer_schedule`).
With draft-and-edit decoding (LLaDA2.1, REFERENCE 8) the same step also
3. rewrites the already filled positions whose picked token differs from theirs with probability above
   `edit_threshold` (`select_positions_to_edit`): the token-to-token set, applied together with the commits.
Nothing here knows about models, caches or padding; `sampler.py` drives these functions.
"""

from __future__ import annotations

import torch


def transfer_schedule(num_masked: torch.Tensor | int, steps: int) -> torch.Tensor:
    """How many positions each step must commit at least: `n // steps`, plus one for the first `n % steps` steps.

    num_masked: int or long tensor [...] (masked positions at the block's start) -> long tensor [..., steps].
    `transfer_schedule(10, 4)` -> `[3, 3, 2, 2]`; the schedule always sums to `num_masked`.
    """
    num_masked = torch.as_tensor(num_masked, dtype=torch.long)
    step_index = torch.arange(steps, device=num_masked.device)
    base = (num_masked // steps).unsqueeze(-1)
    extra = (step_index < (num_masked % steps).unsqueeze(-1)).long()
    return base + extra


def select_positions_to_commit(
    confidence: torch.Tensor,
    still_masked: torch.Tensor,
    num_scheduled: torch.Tensor | int,
    threshold: float,
) -> torch.Tensor:
    """Which positions to commit at this step.

    confidence: float [..., L], the probability of the picked token; still_masked: bool [..., L];
    num_scheduled: int or long [...]. Returns bool [..., L], a subset of `still_masked`:
    the masked positions with `confidence > threshold` if there are at least `num_scheduled` of them,
    otherwise the `num_scheduled` most confident masked positions (all of them when fewer are left).
    Ties in confidence go to the earlier position.
    """
    num_scheduled = torch.as_tensor(num_scheduled, dtype=torch.long, device=confidence.device)
    above_threshold = still_masked & (confidence > threshold)
    enough_above = above_threshold.sum(dim=-1) >= num_scheduled  # [...]

    ranked = confidence.float().masked_fill(~still_masked, float("-inf"))
    order = ranked.argsort(dim=-1, descending=True, stable=True)
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)  # rank[..., i]: 0 for the most confident
    most_confident = still_masked & (rank < num_scheduled.unsqueeze(-1))

    return torch.where(enough_above.unsqueeze(-1), above_threshold, most_confident)


def select_positions_to_edit(
    confidence: torch.Tensor,
    tokens: torch.Tensor,
    current: torch.Tensor,
    editable: torch.Tensor,
    edit_threshold: float,
) -> torch.Tensor:
    """The editing (T2T) set of a step: bool [..., L], the `editable` positions (filled earlier in the block)
    whose picked token `tokens` differs from their `current` token with `confidence > edit_threshold`."""
    return editable & (tokens != current) & (confidence > edit_threshold)


def filter_logits(logits: torch.Tensor, *, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set to -inf every token outside the top-k, then outside the smallest set holding `top_p` of the mass."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth_best = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        # A token is dropped once the better tokens already hold top_p; the best token is always kept.
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick_tokens(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [..., V] -> (tokens long [...], probability of each picked token float32 [...]).

    temperature 0: the argmax, with its probability under softmax(filtered logits).
    temperature > 0: logits / temperature, top-k / top-p filtering, one draw from the softmax (with
    `generator`); the probability is the drawn token's under that filtered distribution.
    """
    scaled = logits.float()
    if temperature > 0:
        scaled = scaled / temperature
    probs = filter_logits(scaled, top_k=top_k, top_p=top_p).softmax(dim=-1)
    if temperature > 0:
        flat = probs.reshape(-1, probs.shape[-1])
        tokens = torch.multinomial(flat, num_samples=1, generator=generator).view(probs.shape[:-1])
    else:
        tokens = probs.argmax(dim=-1)
    return tokens, probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
