"""Masked-token diffusion loss: cross-entropy at supervised positions, 1/t weighting, CAP, accuracy.

Usage (inside the trainer's `compute_loss`)::

    selector, targets = gather_supervised(batch["labels"], shift=False)  # [B, L] bool, [N]
    logits = model(..., logits_to_keep=selector_over_2L).logits          # [N, V], row-major order
    weights = loss_weights(batch["mask_rate"][selector], "elbo")          # [N]
    out = diffusion_loss(logits, targets, weights=weights, num_items=num_items_in_batch,
                         confidence_beta=2.0, chunk_size=4096)
    out.loss.backward()

`loss = (sum_i w_i * CE_i + confidence_beta * sum_{i: argmax_i == y_i} H_i) / num_items`, where
`num_items` is the number of supervised tokens across all gradient-accumulation micro-batches
and data-parallel ranks of the optimiser step, so summing the micro-batch losses (and the ranks'
gradients) gives the token-weighted mean of the whole step however tokens are split.

Memory: the fp32 log-probabilities of [N, V] logits are the big tensor (N = 16k supervised tokens
at V = 157k is 10 GB in fp32). `chunk_size=c` computes them c rows at a time and recomputes each
chunk in backward (activation checkpointing), so peak extra memory is ~3 fp32 [c, V] buffers
(c = 4096: ~7.7 GB -> use 1024 for ~1.9 GB) at the cost of a second softmax pass in backward. The [N, V]
logits themselves and their gradient remain; with `head_weight=lm_head.weight` and the hidden states [N, H] in
place of the logits, each chunk's logits are made from the hidden states and recomputed in backward too, so no
[N, V] tensor exists at all (the trainer's `--fused_head_loss`, `trainer/forward.py` `loss_at_head`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
LOSS_WEIGHTING_MODES = ("mean", "elbo")


@dataclass(frozen=True)
class DiffusionLossOutput:
    """What `diffusion_loss` returns. All tensors are 0-d and, except `loss`, detached."""

    loss: torch.Tensor  # fp32, the value to backpropagate (already divided by num_items)
    ce_sum: torch.Tensor  # fp32, sum of unweighted CE over the N tokens (no 1/t, no normalisation)
    cap_sum: torch.Tensor  # fp32, sum of entropies at tokens with argmax == label (before confidence_beta)
    num_correct: torch.Tensor  # int64, tokens with argmax == label
    num_tokens: int  # N, supervised tokens in this micro-batch
    # With `groups`: per group g (e.g. the noise kinds), fp32 CE sum, int64 correct and token counts, [G] each.
    group_ce_sum: torch.Tensor | None = None
    group_correct: torch.Tensor | None = None
    group_tokens: torch.Tensor | None = None


def loss_weights(mask_rate: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-token loss weights (float32, shaped like `mask_rate`) from each token's document mask rate t.

    "mean": 1 everywhere (dFactory's plain token mean). "elbo": 1/t (MDLM's ELBO weight).
    Pass the mask rates of the supervised tokens only (`mask_rate[selector]`): they are > 0 by
    construction, whereas row padding carries t = 0.
    """
    if mode == "mean":
        return torch.ones_like(mask_rate, dtype=torch.float32)
    if mode == "elbo":
        return mask_rate.float().reciprocal()
    raise ValueError(
        f"mode ({mode!r}) must be one of {', '.join(repr(m) for m in LOSS_WEIGHTING_MODES)}: 'mean' "
        "weights every supervised token 1, 'elbo' weights it 1/t of its document"
    )


def stream_weights(mask_rate: torch.Tensor, noise_kind: torch.Tensor, mode: str, *,
                   keep_weight: float = 0.0, kept_kind: int = 3) -> torch.Tensor:
    """Per-token weights of draft-and-edit training: `loss_weights(mask_rate, mode)` at masked and edited tokens
    (a corrupted token of a document gets that document's weight, so given noise weighs as before), times
    `keep_weight` at kept tokens (`noise_kind == kept_kind`, supervised with themselves). mask_rate, noise_kind:
    [N] at the supervised tokens."""
    weights = loss_weights(mask_rate, mode)
    if keep_weight != 1.0:
        weights = torch.where(noise_kind == kept_kind, weights * keep_weight, weights)
    return weights


def at_targets(values: torch.Tensor, selector: torch.Tensor, *, shift: bool) -> torch.Tensor:
    """[B, L] per-position values -> [N] at the positions of the targets `gather_supervised` returned (the
    supervised token's own position: p + 1 for the logit at p when shifted), in the same order."""
    return values[:, 1:][selector[:, :-1]] if shift else values[selector]


def gather_supervised(
    labels: torch.Tensor, *, shift: bool, position_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which logits are supervised and their target ids, for same-position or next-token labels.

    labels: [B, L] long, the batch's `labels` (x_0 id where x_t is masked, -100 elsewhere).
    Returns `(selector, targets)`: selector [B, L] bool marks the positions whose logits enter
    the loss; targets [N] are their target ids, in row-major order of the True entries of
    `selector`, i.e. the order of `hidden[selector]` and of `logits_to_keep=selector`.

    shift=False (same position, LLaDA2): the logit at p predicts the clean token at p.
        selector = labels != -100, targets = labels[selector].
    shift=True (next token, dFactory's code default): the logit at p predicts the clean token at
        p + 1. selector[:, p] = labels[:, p + 1] != -100 for p < L - 1, selector[:, L - 1] = False,
        targets = labels[:, 1:][selector[:, :-1]]. A supervised token at p = 0 is never predicted.
        With packed rows, pass `position_ids` ([B, L], 0 at each document start): a position then
        never predicts the first token of the next document (which it cannot see). Without it,
        documents whose first token is supervised (prompt_length 0) would be predicted across
        the boundary.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels ({tuple(labels.shape)}) must be [batch, seq_len]")
    if not shift:
        selector = labels != IGNORE_INDEX
        return selector, labels[selector]

    selector = torch.zeros_like(labels, dtype=torch.bool)
    predicts_next = labels[:, 1:] != IGNORE_INDEX  # [B, L-1]
    if position_ids is not None:
        if position_ids.shape != labels.shape:
            raise ValueError(
                f"position_ids ({tuple(position_ids.shape)}) must have the shape of labels ({tuple(labels.shape)})"
            )
        predicts_next = predicts_next & (position_ids[:, 1:] != 0)
    selector[:, :-1] = predicts_next
    return selector, labels[:, 1:][predicts_next]


def _token_terms(
    logits: torch.Tensor, labels: torch.Tensor, entropy_requires_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row CE and entropy in fp32 for logits [n, V]: (-log softmax[label], -(p * log p).sum()), and whether
    the argmax is the label (argmax of the raw logits equals that of their fp32 upcast: the cast is monotone)."""
    log_probs = logits.float().log_softmax(dim=-1)  # [n, V] fp32
    ce = -log_probs.gather(1, labels.unsqueeze(1)).squeeze(1)
    with torch.set_grad_enabled(entropy_requires_grad and torch.is_grad_enabled()):
        entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return ce, entropy, logits.detach().argmax(dim=-1) == labels


def _head_terms(
    hidden: torch.Tensor, labels: torch.Tensor, head_weight: torch.Tensor, entropy_requires_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_token_terms` of the logits `hidden @ head_weight.T` of n rows, computed here (under autocast in its
    dtype, as the LM head would)."""
    return _token_terms(torch.nn.functional.linear(hidden, head_weight), labels, entropy_requires_grad)


def diffusion_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    num_items: int | torch.Tensor | None = None,
    confidence_beta: float = 0.0,
    chunk_size: int | None = None,
    groups: torch.Tensor | None = None,
    num_groups: int = 0,
    head_weight: torch.Tensor | None = None,
) -> DiffusionLossOutput:
    """Weighted masked-token CE plus the CAP entropy term, normalised by the global token count.

    logits: [N, V] (any float dtype; computed in fp32) at the supervised positions only, finite. With
        `head_weight`, the hidden states [N, H] that enter the LM head instead (see below).
    labels: [N] target ids in [0, V) in the same order (no -100: `gather_supervised` removed them).
    weights: [N] per-token weights (`loss_weights`), None for all ones. They scale the CE only.
    num_items: supervised tokens across all micro-batches and ranks of the optimiser step (a
        0-d tensor is fine and avoids a host sync); None divides by max(N, 1). A count of 0 is
        treated as 1, so the loss is never NaN.
    confidence_beta: CAP (dParallel) coefficient: adds beta * sum of the predictive entropy at
        tokens whose argmax equals the label, normalised by num_items like the CE (so it is the
        entropy averaged over all supervised tokens, not over the correct ones). 0 disables it
        (cap_sum is still reported, computed without a graph).
    chunk_size: rows per chunk for the fp32 softmax, recomputed in backward; None = all at once.
        Chunked and unchunked results are equal.
    groups: [N] ids in [0, num_groups): also report CE sums, correct and token counts per group (metrics only).
    head_weight: [V, H], the LM head's weight (no bias): the loss applies the head itself, `chunk_size` rows at a
        time, and recomputes each chunk's logits in backward, so the [N, V] logits and their gradient never
        exist (a fused linear-cross-entropy in plain torch). Equal to passing the head's logits, within matmul
        rounding; costs one more head matmul in backward.

    N == 0 gives a loss of exactly 0 that is still attached to `logits`, so backward runs and
    produces zero (finite) gradients on every parameter that produced the logits.
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"logits ({tuple(logits.shape)}) must be [N, {'hidden' if head_weight is not None else 'vocab'}] and "
            f"labels ({tuple(labels.shape)}) [N]; gather the supervised positions first (gather_supervised)"
        )
    if head_weight is not None and (head_weight.dim() != 2 or head_weight.shape[1] != logits.shape[1]):
        raise ValueError(f"head_weight ({tuple(head_weight.shape)}) must be [vocab, hidden] with hidden = "
                         f"{logits.shape[1]}, the width of the hidden states")
    num_tokens = logits.shape[0]
    if weights is not None and weights.shape != labels.shape:
        raise ValueError(f"weights ({tuple(weights.shape)}) must be [N] like labels ({tuple(labels.shape)})")
    if not (math.isfinite(confidence_beta) and confidence_beta >= 0.0):
        raise ValueError(f"confidence_beta ({confidence_beta}) must be >= 0; use 0 to disable CAP, 2.0 is typical")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size ({chunk_size!r}) must be a positive int or None (no chunking)")
    if isinstance(num_items, int) and num_items < num_tokens:
        raise ValueError(
            f"num_items ({num_items}) must be >= the supervised tokens of this micro-batch ({num_tokens}); "
            "pass the count summed over all micro-batches and ranks of the optimiser step"
        )

    if num_items is None:
        denominator: int | torch.Tensor = max(num_tokens, 1)
    elif isinstance(num_items, torch.Tensor):
        denominator = num_items.clamp(min=1)
    else:
        denominator = max(num_items, 1)

    if groups is not None and groups.shape != labels.shape:
        raise ValueError(f"groups ({tuple(groups.shape)}) must be [N] like labels ({tuple(labels.shape)})")

    def per_group(ce: torch.Tensor, is_correct: torch.Tensor) -> dict[str, torch.Tensor]:
        if groups is None:
            return {}
        index = groups.long()
        return dict(
            group_ce_sum=ce.new_zeros(num_groups).index_add_(0, index, ce.detach()),
            group_correct=torch.zeros(num_groups, dtype=torch.long, device=ce.device).index_add_(
                0, index, is_correct.long()),
            group_tokens=torch.zeros(num_groups, dtype=torch.long, device=ce.device).index_add_(
                0, index, torch.ones_like(index)),
        )

    zero = logits.new_zeros((), dtype=torch.float32)
    if num_tokens == 0:
        # Keeps the graph so backward still reaches every parameter that produced the logits (finite zeros).
        attached = logits.float().sum() * 0.0
        if head_weight is not None:
            attached = attached + head_weight.float().sum() * 0.0
        return DiffusionLossOutput(
            loss=attached,
            ce_sum=zero,
            cap_sum=zero,
            num_correct=torch.zeros((), dtype=torch.long, device=logits.device),
            num_tokens=0,
            **per_group(zero.new_zeros(0), torch.zeros(0, dtype=torch.bool, device=logits.device)),
        )

    with_cap = confidence_beta > 0.0
    if head_weight is None:
        terms = functools.partial(_token_terms, entropy_requires_grad=with_cap)
    else:
        terms = functools.partial(_head_terms, head_weight=head_weight, entropy_requires_grad=with_cap)
    fused = head_weight is not None
    if (chunk_size is None or chunk_size >= num_tokens) and not fused:
        ce, entropy, is_correct = terms(logits, labels)
    else:
        # Fused: checkpointed even as one chunk, else its [N, V] logits would be saved for backward.
        checkpointed = torch.is_grad_enabled() and (logits.requires_grad or (fused and head_weight.requires_grad))
        rows, pieces = chunk_size or num_tokens, []
        # split (not slicing) so backward concatenates the chunk gradients once.
        for logits_chunk, labels_chunk in zip(logits.split(rows), labels.split(rows)):
            if checkpointed:
                pieces.append(checkpoint(terms, logits_chunk, labels_chunk, use_reentrant=False))
            else:
                pieces.append(terms(logits_chunk, labels_chunk))
        ce, entropy, is_correct = (torch.cat(parts) for parts in zip(*pieces))

    confident_entropy = torch.where(is_correct, entropy, torch.zeros_like(entropy))
    weighted_ce = ce if weights is None else ce * weights.to(ce.dtype)
    objective = weighted_ce.sum()
    if with_cap:
        objective = objective + confidence_beta * confident_entropy.sum()
    return DiffusionLossOutput(
        loss=objective / denominator,
        ce_sum=ce.detach().sum(),
        cap_sum=confident_entropy.detach().sum(),
        num_correct=is_correct.sum(),
        num_tokens=num_tokens,
        **per_group(ce, is_correct),
    )
