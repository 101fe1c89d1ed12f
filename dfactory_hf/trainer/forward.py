"""One diffusion forward pass on a collated batch: the part of the training step that is not Trainer plumbing.

Shared by `DiffusionTrainer` (train and eval) and `bench/throughput.py`, so the benchmark measures exactly
what training runs. Block-diffusion mode feeds `[x_t ; x_0]` (2L tokens, positions `[pos ; pos]`) with the
block-diffusion mask; full-attention mode feeds x_t alone with a document mask. `logits_to_keep` selects the
supervised x_t positions, so the x_0 half and unsupervised positions never reach `lm_head`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..diffusion.loss import DiffusionLossOutput, diffusion_loss, gather_supervised, loss_weights
from ..diffusion.masks import build_attention_mask


@dataclass(frozen=True)
class DiffusionObjective:
    block_size: int = 32
    block_diffusion: bool = True
    shift_labels: bool = False
    loss_weighting: str = "mean"
    confidence_beta: float = 0.0
    loss_chunk_size: int | None = 4096

    @classmethod
    def from_args(cls, args) -> DiffusionObjective:
        return cls(
            block_size=args.block_size,
            block_diffusion=args.block_diffusion_mode,
            shift_labels=not args.same_token_labels,
            loss_weighting=args.loss_weighting,
            confidence_beta=args.confidence_beta,
            loss_chunk_size=args.loss_chunk_size,
        )

    def supervised(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(selector bool [B, L], targets [N]): the positions whose logits the loss needs."""
        return gather_supervised(batch["labels"], shift=self.shift_labels, position_ids=batch["position_ids"])


@dataclass
class StepOutput:
    loss: DiffusionLossOutput
    num_model_tokens: int  # tokens the model processed, padding included (B x 2L in block diffusion)
    num_real_tokens: torch.Tensor  # document tokens, each counted once
    mask_rate_sum: torch.Tensor  # sum of t over documents
    num_documents: torch.Tensor


def model_inputs(batch: dict[str, torch.Tensor], objective: DiffusionObjective, *, attn_implementation: str,
                 mask_dtype: torch.dtype, selector: torch.Tensor) -> dict:
    """The keyword arguments for the causal-LM forward."""
    x_t, x_0, positions = batch["noisy_input_ids"], batch["input_ids"], batch["position_ids"]
    mask = build_attention_mask(
        positions,
        batch["attention_mask"],
        block_size=objective.block_size,
        block_diffusion=objective.block_diffusion,
        attn_implementation=attn_implementation,
        dtype=mask_dtype,
    )
    if objective.block_diffusion:
        input_ids = torch.cat([x_t, x_0], dim=1)
        positions = torch.cat([positions, positions], dim=1)
        selector = torch.cat([selector, torch.zeros_like(selector)], dim=1)
    else:
        input_ids = x_t
    return dict(input_ids=input_ids, position_ids=positions, attention_mask=mask, logits_to_keep=selector,
                use_cache=False)


def diffusion_step(model, batch: dict[str, torch.Tensor], objective: DiffusionObjective, *,
                   attn_implementation: str, mask_dtype: torch.dtype = torch.float32,
                   num_items: torch.Tensor | int | None = None) -> StepOutput:
    selector, targets = objective.supervised(batch)
    inputs = model_inputs(batch, objective, attn_implementation=attn_implementation, mask_dtype=mask_dtype,
                          selector=selector)
    logits = model(**inputs).logits  # [N, V]
    weights = loss_weights(batch["mask_rate"][selector], objective.loss_weighting)
    loss = diffusion_loss(
        logits,
        targets,
        weights=weights,
        num_items=num_items,
        confidence_beta=objective.confidence_beta,
        chunk_size=objective.loss_chunk_size,
    )
    real = batch["attention_mask"].bool()
    starts = real & (batch["position_ids"] == 0)
    return StepOutput(
        loss=loss,
        num_model_tokens=inputs["input_ids"].numel(),
        num_real_tokens=real.sum(),
        mask_rate_sum=batch["mask_rate"][starts].sum(),
        num_documents=starts.sum(),
    )
