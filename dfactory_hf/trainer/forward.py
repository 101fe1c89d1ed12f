"""One diffusion forward pass on a collated batch: the part of the training step that is not Trainer plumbing.

Shared by `DiffusionTrainer` (train and eval) and `bench/throughput.py`, so the benchmark measures exactly
what training runs. Block-diffusion mode feeds `[x_t ; x_0]` (2L tokens, positions `[pos ; pos]`) with the
block-diffusion mask; full-attention mode feeds x_t alone with a document mask. `logits_to_keep` selects the
supervised x_t positions, so the x_0 half and unsupervised positions never reach `lm_head`. Under Ulysses
sequence parallel each rank runs its slice of every row (`parallel/sequence.py`) with the full-length mask.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from accelerate.utils import extract_model_from_parallel

from ..diffusion.loss import (IGNORE_INDEX, DiffusionLossOutput, at_targets, diffusion_loss, gather_supervised,
                              stream_weights)
from ..diffusion.masks import build_attention_mask
from ..parallel.sequence import SequenceShard, pad_rows


NUM_NOISE_KINDS = 4  # collators.py: not supervised, masked, edited, kept


@dataclass(frozen=True)
class DiffusionObjective:
    block_size: int = 32
    block_diffusion: bool = True
    shift_labels: bool = False
    loss_weighting: str = "mean"
    confidence_beta: float = 0.0
    loss_chunk_size: int | None = 1024
    fused_head_loss: bool = False  # the loss applies the LM head itself, chunk by chunk (`loss_at_head`)
    edit_keep_weight: float = 0.0  # draft-and-edit: weight of the kept tokens (noise_kind 3)
    edit_streams: bool = False  # report the loss per noise kind (M2T, T2T, kept)

    @classmethod
    def from_args(cls, args) -> DiffusionObjective:
        return cls(
            block_size=args.block_size,
            block_diffusion=args.block_diffusion_mode,
            shift_labels=not args.same_token_labels,
            loss_weighting=args.loss_weighting,
            confidence_beta=args.confidence_beta,
            loss_chunk_size=args.loss_chunk_size,
            fused_head_loss=args.fused_head_loss,
            edit_keep_weight=args.edit_keep_weight,
            edit_streams=args.edit_noise_rate > 0 or args.edit_keep_weight > 0,
        )

    def supervised(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(selector bool [B, L], targets [N]): the positions whose logits the loss needs."""
        return gather_supervised(batch["labels"], shift=self.shift_labels, position_ids=batch["position_ids"])


@dataclass
class StepOutput:
    loss: DiffusionLossOutput
    num_model_tokens: int  # tokens this rank's model call processed, padding included (B x 2L in block diffusion)
    # Per data replica (reported by sp rank 0 only, so a sum over every rank counts each replica once):
    num_row_tokens: int  # row positions of the collated batch, padding included
    num_real_tokens: torch.Tensor  # document tokens, each counted once
    mask_rate_sum: torch.Tensor  # sum of t over documents
    num_documents: torch.Tensor


def model_inputs(batch: dict[str, torch.Tensor], objective: DiffusionObjective, *, attn_implementation: str,
                 mask_dtype: torch.dtype, selector: torch.Tensor,
                 sequence_shard: SequenceShard | None = None) -> dict:
    """The keyword arguments for the causal-LM forward; under sequence parallel this rank's slice of the
    sequence with the full-length mask (parallel/sequence.py)."""
    x_t, x_0, positions = batch["noisy_input_ids"], batch["input_ids"], batch["position_ids"]
    # In training sdpa gets the additive float form: given a bool mask, it converts it to float in every layer and
    # keeps each conversion for backward (num_layers x 4 bytes per mask entry, the largest saved tensors at long
    # rows; see bench/sequence_parallel.py). The float mask is built once and shared by all layers; results are
    # equal. Without gradients nothing is kept, and the bool mask is the 4x smaller one.
    training = torch.is_grad_enabled()
    mask_form = "eager" if attn_implementation == "sdpa" and training else attn_implementation
    mask = build_attention_mask(
        positions,
        batch["attention_mask"],
        block_size=objective.block_size,
        block_diffusion=objective.block_diffusion,
        attn_implementation=mask_form,
        dtype=mask_dtype,
    )
    if objective.block_diffusion:
        segments = dict(input_ids=(x_t, x_0), position_ids=(positions, positions),
                        logits_to_keep=(selector, torch.zeros_like(selector)))
    else:
        segments = dict(input_ids=(x_t,), position_ids=(positions,), logits_to_keep=(selector,))
    join = sequence_shard.local if sequence_shard is not None else (lambda *parts: torch.cat(parts, dim=1))
    inputs = {key: join(*parts) for key, parts in segments.items()}
    inputs.update(attention_mask=mask, use_cache=False)
    if sequence_shard is not None:
        inputs["sequence_shard"] = sequence_shard
    return inputs


def diffusion_step(model, batch: dict[str, torch.Tensor], objective: DiffusionObjective, *,
                   attn_implementation: str, mask_dtype: torch.dtype = torch.float32,
                   num_items: torch.Tensor | int | None = None,
                   sequence_shard: SequenceShard | None = None,
                   supervised: tuple[torch.Tensor, torch.Tensor] | None = None) -> StepOutput:
    """Forward and loss of one micro-batch. Under sequence parallel (`sequence_shard`) this rank computes
    logits at its own supervised positions only and its loss is the local cross-entropy sum over the global
    count `num_items`, so the sp ranks' losses (and gradients) add up to one process's. `supervised` is
    `objective.supervised(batch)` where the caller has it already (sequence parallel pads the rows: recomputed)."""
    num_row_tokens = batch["input_ids"].numel()
    replica = replica_counts(batch)
    if sequence_shard is not None:
        batch = pad_rows(batch, multiple=sequence_shard.size * objective.block_size)
    selector, targets = (supervised if supervised is not None and sequence_shard is None
                         else objective.supervised(batch))
    mask_rate = batch["mask_rate"]
    noise_kind = batch.get("noise_kind")
    if noise_kind is None:  # a batch from elsewhere: every supervised token counts as masked
        noise_kind = (batch["labels"] != IGNORE_INDEX).to(torch.int8)
    kinds = at_targets(noise_kind, selector, shift=objective.shift_labels)  # [N]
    inputs = model_inputs(batch, objective, attn_implementation=attn_implementation, mask_dtype=mask_dtype,
                          selector=selector, sequence_shard=sequence_shard)
    if sequence_shard is not None:
        # Targets sit at the positions whose logits predict them (shifted or not), so they slice like positions.
        target_at = torch.full_like(batch["labels"], IGNORE_INDEX)
        target_at[selector] = targets
        kind_at = torch.zeros_like(noise_kind)
        kind_at[selector] = kinds
        selector, mask_rate = sequence_shard.piece(selector), sequence_shard.piece(mask_rate)
        targets, kinds = sequence_shard.piece(target_at)[selector], sequence_shard.piece(kind_at)[selector]
        if sequence_shard.rank != 0:
            num_row_tokens, replica = 0, {key: torch.zeros_like(value) for key, value in replica.items()}
    weights = stream_weights(mask_rate[selector], kinds, objective.loss_weighting,
                             keep_weight=objective.edit_keep_weight)
    loss_of = functools.partial(diffusion_loss, labels=targets, weights=weights, num_items=num_items,
                                confidence_beta=objective.confidence_beta, chunk_size=objective.loss_chunk_size,
                                groups=kinds if objective.edit_streams else None, num_groups=NUM_NOISE_KINDS)
    if objective.fused_head_loss:
        with loss_at_head(model, loss_of) as taken:
            model(**inputs)
        loss = taken.output
    else:
        loss = loss_of(model(**inputs).logits)  # logits [N, V] (this rank's N under sequence parallel)
    return StepOutput(loss=loss, num_model_tokens=inputs["input_ids"].numel(), num_row_tokens=num_row_tokens,
                      **replica)


def replica_counts(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    real = batch["attention_mask"].bool()
    starts = real & (batch["position_ids"] == 0)
    return dict(num_real_tokens=real.sum(), mask_rate_sum=batch["mask_rate"][starts].sum(),
                num_documents=starts.sum())


def output_head(model) -> torch.nn.Linear:
    """The model's LM head, refused unless it is a plain bias-free `nn.Linear` (a LoRA-wrapped head is not)."""
    head = extract_model_from_parallel(model).get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        raise ValueError(f"--fused_head_loss needs the model's output head to be a bias-free nn.Linear; it is "
                         f"{type(head).__name__}{' with a bias' if getattr(head, 'bias', None) is not None else ''}. "
                         "Train without --fused_head_loss (and keep the LM head out of the LoRA targets).")
    return head


class _TakenLoss:
    output: DiffusionLossOutput | None = None


@contextmanager
def loss_at_head(model, loss_of):
    """While inside, the LM head's call computes `loss_of(hidden, head_weight=weight)` and returns empty logits
    [N, 0]: the loss runs where the model applies its head, so under FSDP2 the weight it reads is the gathered
    one (the root's parameters are unsharded for its whole forward), and the [N, V] logits are never made.
    The model is not changed: only this call's `forward` of the head is replaced, and restored on exit.
    Liger's and cut-cross-entropy's fused kernels do this in Triton (GPU only); this is plain torch, chunked."""
    head, taken = output_head(model), _TakenLoss()

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        taken.output = loss_of(hidden, head_weight=head.weight)
        return hidden[..., :0]

    head.forward = forward
    try:
        yield taken
    finally:
        del head.forward  # the class's forward again
    if taken.output is None:
        raise RuntimeError(f"--fused_head_loss: {type(model).__name__} never called its output head "
                           f"{type(head).__name__}, so no loss was computed")
