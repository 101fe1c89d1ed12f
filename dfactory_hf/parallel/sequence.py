"""The batch side of Ulysses sequence parallel: which positions of a row each sp rank holds.

A model row is `num_segments` equal segments: `[x_t ; x_0]` in block diffusion (2 segments of L), `x_t`
alone in full-attention mode (1 segment). Rank r of the sp group holds piece r of EVERY segment::

    full row, sp = 2, block diffusion:   x_t[0:L/2] x_t[L/2:L] | x_0[0:L/2] x_0[L/2:L]
    rank 0 holds                         x_t[0:L/2]            | x_0[0:L/2]
    rank 1 holds                                    x_t[L/2:L] |            x_0[L/2:L]

so every rank holds 1/sp of the x_t positions, whose logits are the only ones computed: the `lm_head` and
loss work is balanced (a split of the 2L row in the middle would give rank 0 all of it). Rows are padded to a
multiple of sp x block_size first (`pad_rows`); the padding is row padding (attention_mask 0, labels -100),
which the mask builder keeps from ever being attended and the loss from ever being supervised.

The attention side (`ulysses.py`) turns the all-to-all output back into the full order of the mask with one
permute, from the same `num_segments`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..diffusion.loss import IGNORE_INDEX


@dataclass(frozen=True)
class SequenceShard:
    """This rank's part of the sequence-parallel layout; handed to the model call as `sequence_shard=`."""

    group: object  # torch.distributed.ProcessGroup of the sp axis
    size: int
    rank: int
    num_segments: int = 1

    def __post_init__(self):
        assert 0 <= self.rank < self.size and self.num_segments >= 1, self

    @classmethod
    def from_parallel_state(cls, state, *, num_segments: int) -> SequenceShard | None:
        """None when the run has no sequence axis (sp = 1)."""
        if state.sp_size == 1:
            return None
        return cls(group=state.submesh("sp").get_group(), size=state.sp_size, rank=state.sp_rank,
                   num_segments=num_segments)

    def piece(self, x: Tensor) -> Tensor:
        """`[B, L, ...]` (one segment) -> this rank's `[B, L / sp, ...]`."""
        seq_len = x.shape[1]
        if seq_len % self.size:
            raise ValueError(f"a segment of {seq_len} positions does not split over sp_size={self.size} ranks; "
                             "pad the rows first (pad_rows)")
        length = seq_len // self.size
        return x[:, self.rank * length:(self.rank + 1) * length]

    def local(self, *segments: Tensor) -> Tensor:
        """This rank's pieces of the given segments, concatenated: its slice of `torch.cat(segments, 1)`."""
        assert len(segments) == self.num_segments, (len(segments), self.num_segments)
        return torch.cat([self.piece(segment) for segment in segments], dim=1)


_ROW_PADDING = {"labels": IGNORE_INDEX, "position_ids": 0, "attention_mask": 0, "mask_rate": 0, "noise_kind": 0}


def pad_rows(batch: dict[str, Tensor], *, multiple: int) -> dict[str, Tensor]:
    """Row padding appended to every `[B, L]` tensor of a collated batch so L is a multiple of `multiple`.

    Token ids are padded with each row's last id (a collator's padding or EOS fill; any in-vocabulary id would
    do, since padding is never attended by a real token nor supervised); labels -100, attention_mask,
    position_ids, mask_rate and noise_kind 0, as the collators pad.
    """
    seq_len = batch["input_ids"].shape[1]
    extra = -seq_len % multiple
    if extra == 0:
        return batch
    padded = {}
    for key, value in batch.items():
        if not (isinstance(value, Tensor) and value.dim() == 2 and value.shape[1] == seq_len):
            padded[key] = value
            continue
        fill = _ROW_PADDING.get(key)
        tail = value[:, -1:].expand(-1, extra) if fill is None else value.new_full((value.shape[0], extra), fill)
        padded[key] = torch.cat([value, tail], dim=1)
    return padded
