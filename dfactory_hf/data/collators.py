"""Collators: documents -> one batch contract, with the diffusion noise drawn here.

Every collator emits, for R rows of length L (L a multiple of `block_size`)::

    input_ids        long    [R, L]  clean x_0
    noisy_input_ids  long    [R, L]  x_t (masked response tokens = mask_token_id)
    labels           long    [R, L]  x_0 at masked positions, -100 elsewhere
    position_ids     long    [R, L]  0.. per document, 0 at row padding
    attention_mask   long    [R, L]  1 real token (EOS fill included), 0 row padding
    mask_rate        float32 [R, L]  t of the position's document, 0 at row padding
    noise_kind       int8    [R, L]  what the noise did there: 0 nothing (prompt, padding, an unsupervised kept
                                     token), 1 masked (M2T), 2 edited (T2T: a random token, label x_0),
                                     3 kept and supervised (label: itself; only with `supervise_kept`)

- `PaddingCollator`: one document per row, rows padded to the batch's longest document (already a multiple of
  `block_size`) or, with `pad_to_max_seq_len`, to `max_seq_len` (the public recipe's baseline).
- `PackingCollator`: whole documents packed best-fit into rows of at most `max_seq_len`; the mask builder keeps
  documents apart (docs/design.md, "Masks").
- `PositionIdCollator`: all documents in one row, no padding at all (full-attention / padding-free mode); can
  add flash-attention varlen kwargs (`cu_seq_lens_q/k`, `max_length_q/k`).

Noise is seeded per document from (seed, sample_index, epoch), so a document gets the same x_t whatever its
batch, row or rank, and a resumed run draws what an uninterrupted one would. The epoch comes with the feature
(`epoch`, added by the trainer's samplers, data/keys.py), so a collator never changes during training and DataLoader
workers may persist; a feature without one (direct calls) takes the collator's `epoch` (`set_epoch`). The packing
collator lays out the rows the token-budget sampler planned (`row`) and packs only features that bring none.
With `complementary_masking` each document yields two documents whose masks together cover every response token
exactly once (both land in the same batch).

Draft-and-edit (LLaDA2.1, `edit_noise_rate` > 0): after masking, each response token left visible is replaced by
a random token from `edit_token_ids` with that probability and supervised with its clean token (REFERENCE 8).
With complementary masking each instance draws its own edits among its own visible tokens, so every response
token is still masked in exactly one instance, and may be edited in the other. Given noise (`noisy_input_ids`
in the data) is used as given: its supervised positions count as masked where x_t holds the mask token and as
edited elsewhere.

Multi-turn chats: a document may carry `assistant_masks` (0/1 per token, preprocessing.py; empty = every token from
`prompt_length` on). Only its 1 positions are masked, edited, complemented or kept-and-supervised; the user turns
between assistant turns stay clean in x_t like the prompt (`supervisable` in diffusion/noise.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..diffusion.loss import IGNORE_INDEX
from ..diffusion.noise import (
    complement_mask_rate,
    complementary_pair,
    document_generator,
    edit_document,
    mask_document,
    sample_mask_rate,
)
from .packing import best_fit, check_fits, fewest_rows

NOT_SUPERVISED, MASKED, EDITED, KEPT = 0, 1, 2, 3  # `noise_kind` values


class NoisedDocument(NamedTuple):
    x_0: torch.Tensor  # [n]
    x_t: torch.Tensor  # [n]
    labels: torch.Tensor  # [n]
    mask_rate: float
    noise_kind: torch.Tensor  # [n] int8


def noised_document(x_0: torch.Tensor, x_t: torch.Tensor, is_masked: torch.Tensor, is_edited: torch.Tensor,
                    is_kept: torch.Tensor, mask_rate: float) -> NoisedDocument:
    """Labels and noise kinds from the position sets (disjoint bool [n] tensors)."""
    kind = torch.zeros(x_0.shape, dtype=torch.int8)
    kind[is_masked], kind[is_edited], kind[is_kept] = MASKED, EDITED, KEPT
    return NoisedDocument(x_0, x_t, torch.where(kind > 0, x_0, IGNORE_INDEX), mask_rate, kind)


@dataclass
class DiffusionCollator:
    """Base class: noises documents; subclasses choose how documents are laid out into rows."""

    mask_token_id: int
    pad_token_id: int
    block_size: int
    noise_range_low: float = 0.3
    noise_range_high: float = 0.8
    complementary_masking: bool = False
    min_masked_tokens: int = 1
    seed: int = 0
    epoch: int = 0
    fixed_mask_rate: float | None = None  # every document masked at exactly this t (evaluation grids),
    # given noise (noisy_input_ids) included
    edit_noise_rate: float = 0.0  # draft-and-edit: P(a visible response token becomes a random token)
    edit_token_ids: tuple[int, ...] | None = None  # distinct ids the replacements are drawn from
    supervise_kept: bool = False  # label the visible, unedited response tokens with themselves (noise_kind 3)

    def __post_init__(self):
        if self.edit_noise_rate > 0 and (self.edit_token_ids is None or len(set(self.edit_token_ids)) < 2):
            raise ValueError(f"edit_noise_rate ({self.edit_noise_rate}) needs edit_token_ids: at least 2 distinct "
                             "ids to draw replacement tokens from (the vocabulary minus special tokens)")
        self._edit_token_ids = (torch.tensor(sorted(set(self.edit_token_ids)), dtype=torch.long)
                                if self.edit_token_ids else None)

    def set_epoch(self, epoch: int) -> None:
        """The epoch of features that carry none (direct calls); the trainer's batch items carry their own."""
        self.epoch = epoch

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        noised = [self.noise(feature) for feature in features]
        documents = [doc for docs in noised for doc in docs]
        planned = None
        if features and all("row" in feature for feature in features):  # rows the token-budget sampler planned
            planned = [int(feature["row"]) for feature, docs in zip(features, noised) for _ in docs]
        rows = self.layout(documents, planned)
        return rows_to_batch(rows, self.row_length(rows), self.pad_token_id)

    def layout(self, documents: list[NoisedDocument], planned: list[int] | None = None) -> list[list[NoisedDocument]]:
        """Documents into rows; `planned` (a row number per document, rows listed in order) where a sampler chose."""
        raise NotImplementedError

    def row_length(self, rows: list[list[NoisedDocument]]) -> int:
        return max(sum(len(doc.x_0) for doc in row) for row in rows)

    def noise(self, feature: dict) -> list[NoisedDocument]:
        x_0 = torch.as_tensor(feature["input_ids"], dtype=torch.long)
        prompt_length = int(feature["prompt_length"])
        if len(x_0) % self.block_size:
            raise ValueError(
                f"Document {feature.get('sample_index')} has {len(x_0)} tokens, not a multiple of block_size "
                f"({self.block_size}); build datasets with dfactory_hf.data.preprocessing.prepare_dataset."
            )
        # A fixed rate (the evaluation grid) masks every document itself: given noise would make every rate of
        # the grid score the same noise, and the ELBO bound apply rates that were never applied.
        if feature.get("noisy_input_ids") and self.fixed_mask_rate is None:
            x_t = torch.as_tensor(feature["noisy_input_ids"], dtype=torch.long)
            labels = torch.as_tensor(feature["labels"], dtype=torch.long)
            supervised = labels != IGNORE_INDEX
            kind = torch.where(x_t == self.mask_token_id, MASKED, EDITED).to(torch.int8) * supervised
            rate = int(supervised.sum()) / max(len(x_0) - prompt_length, 1)
            return [NoisedDocument(x_0, x_t, labels, rate, kind)]
        epoch = int(feature["epoch"]) if "epoch" in feature else self.epoch
        generator = document_generator(self.seed, int(feature["sample_index"]), epoch)
        if self.fixed_mask_rate is not None:
            t = self.fixed_mask_rate
        else:
            t = float(sample_mask_rate(1, self.noise_range_low, self.noise_range_high, generator)[0])
        supervisable = supervisable_positions(feature, len(x_0))
        x_t, is_masked = mask_document(x_0, prompt_length, t, self.mask_token_id, generator,
                                       min_masked=self.min_masked_tokens, supervisable=supervisable)
        documents = [self._edited(x_0, x_t, prompt_length, is_masked, t, generator, supervisable)]
        if self.complementary_masking:
            x_t_c, is_masked_c = complementary_pair(x_0, prompt_length, is_masked, self.mask_token_id,
                                                    supervisable=supervisable)
            documents.append(self._edited(x_0, x_t_c, prompt_length, is_masked_c, complement_mask_rate(t), generator,
                                          supervisable))
        return documents

    def _edited(self, x_0, x_t, prompt_length: int, is_masked, t: float, generator,
                supervisable: torch.Tensor | None = None) -> NoisedDocument:
        """The document after the optional edit stream (no draw at all when edit_noise_rate is 0)."""
        is_edited = torch.zeros_like(is_masked)
        if self.edit_noise_rate > 0:
            x_t, is_edited = edit_document(x_t, prompt_length, is_masked, self.edit_noise_rate,
                                           self._edit_token_ids, generator, supervisable=supervisable)
        is_kept = torch.zeros_like(is_masked)
        if self.supervise_kept:
            is_kept[prompt_length:] = True
            is_kept &= ~is_masked & ~is_edited
            if supervisable is not None:
                is_kept &= supervisable
        return noised_document(x_0, x_t, is_masked, is_edited, is_kept, t)


@dataclass
class PaddingCollator(DiffusionCollator):
    max_seq_len: int | None = None
    pad_to_max_seq_len: bool = False

    def layout(self, documents, planned=None):
        return [[doc] for doc in documents]

    def row_length(self, rows):
        longest = super().row_length(rows)
        if not self.pad_to_max_seq_len:
            return longest
        if self.max_seq_len is None or longest > self.max_seq_len:
            raise ValueError(f"pad_to_max_seq_len needs max_seq_len ({self.max_seq_len}) >= the longest document "
                             f"({longest}); set max_seq_len or prepare documents with it.")
        return self.max_seq_len


@dataclass
class PackingCollator(DiffusionCollator):
    max_seq_len: int = 2048

    def layout(self, documents, planned=None):
        if planned is None:  # no sampler planned the rows (direct use, complementary pairs)
            sizes = [len(doc.x_0) for doc in documents]
            return [[documents[position] for position in row] for row in fewest_rows(sizes, self.max_seq_len)]
        rows: list[list[NoisedDocument]] = [[] for _ in range(max(planned) + 1)]
        for doc, row in zip(documents, planned):
            rows[row].append(doc)
        for number, row in enumerate(rows):
            if not row or sum(len(doc.x_0) for doc in row) > self.max_seq_len:
                raise ValueError(f"The planned row {number} holds {sum(len(doc.x_0) for doc in row)} tokens, not 1 to "
                                 f"max_seq_len={self.max_seq_len}: the sampler planned rows of another length; "
                                 f"pass the same max_seq_len to both")
        return rows


@dataclass
class PositionIdCollator(DiffusionCollator):
    return_flash_attn_kwargs: bool = False

    def layout(self, documents, planned=None):
        return [documents]

    def __call__(self, features):
        batch = super().__call__(features)
        if self.return_flash_attn_kwargs:
            starts = (batch["position_ids"][0] == 0).nonzero().flatten()
            bounds = torch.cat([starts, torch.tensor([batch["position_ids"].shape[1]])]).to(torch.int32)
            longest = int((bounds[1:] - bounds[:-1]).max())
            batch.update(cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=longest, max_length_k=longest)
        return batch


def supervisable_positions(feature: dict, num_tokens: int) -> torch.Tensor | None:
    """bool [n] from a document's `assistant_masks` (multi-turn chats), or None: everything after the prompt."""
    assistant_masks = feature.get("assistant_masks")
    if not assistant_masks:
        return None
    if len(assistant_masks) != num_tokens:
        raise ValueError(f"Document {feature.get('sample_index')} has {len(assistant_masks)} assistant_masks values "
                         f"for {num_tokens} tokens; build datasets with "
                         "dfactory_hf.data.preprocessing.prepare_dataset.")
    return torch.as_tensor(assistant_masks, dtype=torch.bool)


def edit_token_ids(tokenizer, *, vocab_size: int) -> tuple[int, ...]:
    """The ids an edit may write: the tokenizer's tokens that the model can embed, minus special tokens (mask,
    EOS, padding, control tokens: an edit never forges structure)."""
    special = set(tokenizer.all_special_ids)
    return tuple(i for i in range(min(len(tokenizer), vocab_size)) if i not in special)


def pack_best_fit(documents: list[NoisedDocument], capacity: int) -> list[list[NoisedDocument]]:
    """Best-fit decreasing: each document (longest first) goes to the fullest row it still fits in."""
    sizes = [len(doc.x_0) for doc in documents]
    check_fits(sizes, capacity)
    return [[documents[position] for position in row] for row in best_fit(sizes, capacity)]


def rows_to_batch(rows: list[list[NoisedDocument]], row_length: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    num_rows = len(rows)
    batch = {
        "input_ids": torch.full((num_rows, row_length), pad_token_id, dtype=torch.long),
        "noisy_input_ids": torch.full((num_rows, row_length), pad_token_id, dtype=torch.long),
        "labels": torch.full((num_rows, row_length), IGNORE_INDEX, dtype=torch.long),
        "position_ids": torch.zeros((num_rows, row_length), dtype=torch.long),
        "attention_mask": torch.zeros((num_rows, row_length), dtype=torch.long),
        "mask_rate": torch.zeros((num_rows, row_length), dtype=torch.float32),
        "noise_kind": torch.zeros((num_rows, row_length), dtype=torch.int8),
    }
    for r, row in enumerate(rows):
        start = 0
        for doc in row:
            end = start + len(doc.x_0)
            batch["input_ids"][r, start:end] = doc.x_0
            batch["noisy_input_ids"][r, start:end] = doc.x_t
            batch["labels"][r, start:end] = doc.labels
            batch["position_ids"][r, start:end] = torch.arange(len(doc.x_0))
            batch["attention_mask"][r, start:end] = 1
            batch["mask_rate"][r, start:end] = doc.mask_rate
            batch["noise_kind"][r, start:end] = doc.noise_kind
            start = end
    return batch
