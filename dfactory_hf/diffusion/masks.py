"""Attention masks for block-diffusion (BD3-LM / LLaDA2) and full-attention (MDLM) training.

Usage, once per batch, for the FULL sequence (also under sequence parallel: every rank builds the
same mask for all 2L positions)::

    mask = build_attention_mask(batch["position_ids"], batch["attention_mask"], block_size=32,
                                block_diffusion=True, attn_implementation="sdpa")
    pos = batch["position_ids"]
    model(input_ids=torch.cat([x_t, x_0], 1), position_ids=torch.cat([pos, pos], 1),
          attention_mask=mask, ...)

Layout. Block diffusion: queries and keys live on one axis of length Q = 2L, `[x_t ; x_0]`, both
halves with the batch's position ids. Full attention (MDLM): Q = L, x_t alone. With b() the block
index inside the token's own document (`position_ids // block_size`), and always within one
document:

    x_t -> x_t  same block          x_t -> x_0  strictly earlier block
    x_0 -> x_0  b(q) >= b(k)        x_0 -> x_t  never
    full attention: the whole document.
    Row padding queries see only themselves (finite softmax; their output is never used);
    real queries never see padding keys.

Every query's keys are therefore the union of at most two contiguous intervals
`[lo1, hi1) ∪ [lo2, hi2)` of the Q axis (`KeyIntervals`, O(L) to compute). One mask function
evaluates them; sdpa (bool, True = attend) and eager (additive float) masks are built from it by
transformers' `sdpa_mask` / `eager_mask`; the flex `BlockMask` is classified tile by tile from the
intervals directly, never materialising the Q x Q mask.

Costs (bench/masks.py, batch 1, block 32, 1 thread of a busy 2-core CPU): at L = 8k the BlockMask
holds 0.75 MiB (tile indices + intervals) and builds in ~15 ms, against 256 MiB and ~2.8 s for the
dense sdpa mask; at L = 32k, 6 MiB and ~0.12 s against 4 GiB. Compiled flex does not recompile for
a new layout of the same L (the intervals are captured tensors). `check_layout=True` (default)
validates the packing contract at the price of a few device syncs; the trainer may turn it off.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask
from transformers.masking_utils import eager_mask, sdpa_mask

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")
DEFAULT_FLEX_BLOCK_SIZE = 128

MaskFunction = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class KeyIntervals:
    """Allowed keys of every query: `[lo1, hi1) ∪ [lo2, hi2)`, four long tensors `[B, Q]`.

    Coordinates are positions on the Q axis (2L in block diffusion, L in full attention). As built
    by `key_intervals`: interval 1 is never empty (every query sees itself), an unused interval 2 is
    `[0, 0)`, and the two never overlap or touch (touching ones are merged), so any run of keys inside
    the union lies inside one interval; the flex tile classification relies on that.
    """

    lo1: Tensor
    hi1: Tensor
    lo2: Tensor
    hi2: Tensor

    @property
    def query_length(self) -> int:
        return self.lo1.shape[1]


def _check_arguments(position_ids: Tensor, attention_mask: Tensor, block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size ({block_size!r}) must be a positive integer, e.g. 32")
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be 2-D [batch, seq_len]; got shape {tuple(position_ids.shape)}")
    if position_ids.is_floating_point() or position_ids.is_complex():
        raise ValueError(f"position_ids must be an integer tensor; got dtype {position_ids.dtype}")
    if tuple(attention_mask.shape) != tuple(position_ids.shape):
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} must equal position_ids shape "
            f"{tuple(position_ids.shape)} ([batch, seq_len])"
        )
    seq_len = position_ids.shape[1]
    if seq_len == 0 or seq_len % block_size != 0:
        raise ValueError(
            f"sequence length L ({seq_len}) must be a positive multiple of block_size ({block_size}); "
            "pad rows to a whole number of blocks (the collators do)"
        )


def _check_flex_block_size(flex_block_size: int) -> None:
    if isinstance(flex_block_size, bool) or not isinstance(flex_block_size, int) or flex_block_size <= 0:
        raise ValueError(f"flex_block_size ({flex_block_size!r}) must be a positive integer, e.g. 128")


def _check_layout(position_ids: Tensor, real: Tensor, block_size: int, block_diffusion: bool) -> None:
    """The packing contract of docs/design.md; costs one device sync per check."""
    if (~real[:, :-1] & real[:, 1:]).any():
        raise ValueError(
            "attention_mask must be 1 for a row's real tokens then 0 for its padding (row padding only "
            "at the end of a row); found a real token after padding"
        )
    previous = torch.nn.functional.pad(position_ids[:, :-1], (1, 0), value=-1)
    consecutive = (position_ids == 0) | (position_ids == previous + 1)
    if (real & ~consecutive).any():
        raise ValueError(
            "position_ids must be 0 at each document start and increase by 1 inside a document "
            "(among real tokens, starting with 0 at the row start)"
        )
    if block_diffusion:
        col = torch.arange(position_ids.shape[1], device=position_ids.device)
        misaligned_start = real & (position_ids == 0) & (col % block_size != 0)
        if misaligned_start.any() or (real.sum(1) % block_size != 0).any():
            raise ValueError(
                f"every document length must be a multiple of block_size ({block_size}) so that its "
                "blocks line up (preprocessing EOS-fills documents to a block boundary)"
            )


def _normalise(lo1: Tensor, hi1: Tensor, lo2: Tensor, hi2: Tensor) -> KeyIntervals:
    """Empty interval 2 -> [0, 0); overlapping or touching intervals -> merged into interval 1."""
    empty2 = lo2 >= hi2
    lo2, hi2 = lo2.masked_fill(empty2, 0), hi2.masked_fill(empty2, 0)
    joined = ~empty2 & (lo2 <= hi1) & (lo1 <= hi2)
    lo1 = torch.where(joined, torch.minimum(lo1, lo2), lo1)
    hi1 = torch.where(joined, torch.maximum(hi1, hi2), hi1)
    return KeyIntervals(lo1, hi1, lo2.masked_fill(joined, 0), hi2.masked_fill(joined, 0))


def key_intervals(
    position_ids: Tensor,
    attention_mask: Tensor,
    *,
    block_size: int,
    block_diffusion: bool,
    check_layout: bool = True,
) -> KeyIntervals:
    """Per-query key intervals `[B, Q]` (Q = 2L in block diffusion, L otherwise), O(L) work.

    `position_ids`, `attention_mask`: `[B, L]` as a collator emits them (docs/design.md).
    """
    _check_arguments(position_ids, attention_mask, block_size)
    real = attention_mask.bool()
    if check_layout:
        _check_layout(position_ids, real, block_size, block_diffusion)
    batch_size, seq_len = position_ids.shape
    pos = position_ids.long()
    col = torch.arange(seq_len, device=pos.device).expand(batch_size, seq_len)
    doc_start = col - pos
    zero = torch.zeros_like(col)

    if not block_diffusion:
        # A document ends at the next document start or at the first row-padding position.
        boundary = torch.where(real & (pos != 0), seq_len, col)
        next_boundary = torch.cat([boundary[:, 1:], torch.full_like(boundary[:, :1], seq_len)], 1)
        doc_end = next_boundary.flip(1).cummin(1).values.flip(1)
        lo1, hi1 = torch.where(real, doc_start, col), torch.where(real, doc_end, col + 1)
        return _normalise(lo1, hi1, zero, zero)

    block_start = col - pos % block_size
    # Query halves: x_t (positions p) then x_0 (positions L + p); key coordinates on the 2L axis.
    xt = (block_start, block_start + block_size, seq_len + doc_start, seq_len + block_start)
    x0 = (seq_len + doc_start, seq_len + block_start + block_size, zero, zero)
    pad_xt, pad_x0 = (col, col + 1, zero, zero), (col + seq_len, col + seq_len + 1, zero, zero)
    bounds = [
        torch.cat([torch.where(real, a, pa), torch.where(real, b, pb)], 1)
        for a, b, pa, pb in zip(xt, x0, pad_xt, pad_x0)
    ]
    return _normalise(*bounds)


def mask_function(intervals: KeyIntervals) -> MaskFunction:
    """`fn(batch_idx, head_idx, q_idx, kv_idx) -> bool`: key inside the query's intervals.

    Index-only (works broadcast, under vmap, as a flex `mask_mod`, and compiled: no bool == bool).
    """
    lo1, hi1, lo2, hi2 = intervals.lo1, intervals.hi1, intervals.lo2, intervals.hi2

    def key_in_intervals(batch_idx: Tensor, head_idx: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        in_first = (lo1[batch_idx, q_idx] <= kv_idx) & (kv_idx < hi1[batch_idx, q_idx])
        in_second = (lo2[batch_idx, q_idx] <= kv_idx) & (kv_idx < hi2[batch_idx, q_idx])
        return in_first | in_second

    return key_in_intervals


def _tile_counts(q_tile: Tensor, ranges: list[tuple[Tensor, Tensor]], num_tiles: int) -> Tensor:
    """`[B, nq, nk]` int32: per q tile, how many (query, range) pairs include each kv tile.

    Each range `[first, stop)` of kv tiles (`[B, Q]` each, first <= stop) is added to its query's
    row of a difference array, then one cumsum along kv tiles: O(Q + nq * nk).
    """
    batch_size = q_tile.shape[0]
    diff = torch.zeros(batch_size, num_tiles * (num_tiles + 1), dtype=torch.int32, device=q_tile.device)
    row_offset = q_tile * (num_tiles + 1)
    ones = torch.ones_like(q_tile, dtype=torch.int32)
    for first, stop in ranges:
        diff.scatter_add_(1, row_offset + first, ones)
        diff.scatter_add_(1, row_offset + stop, -ones)
    counts = diff.view(batch_size, num_tiles, num_tiles + 1).cumsum(-1, dtype=torch.int32)
    return counts[..., :num_tiles]


def _ordered(tiles: Tensor) -> tuple[Tensor, Tensor]:
    """Bool `[B, nq, nk]` -> (num_blocks `[B, 1, nq]`, indices `[B, 1, nq, nk]`), selected tiles first."""
    # The stable descending argsort `create_block_mask` uses, in O(n): selected tiles take slots
    # 0..num-1 in column order, the others follow in column order.
    selected_before = tiles.cumsum(-1, dtype=torch.int32)  # inclusive
    num_blocks = selected_before[..., -1]
    col = torch.arange(tiles.shape[-1], dtype=torch.int32, device=tiles.device).expand_as(selected_before)
    slot = torch.where(tiles, selected_before - 1, num_blocks[..., None] + col - selected_before)
    indices = torch.empty_like(col).scatter_(-1, slot.long(), col)
    return num_blocks.unsqueeze(1).contiguous(), indices.unsqueeze(1).contiguous()


def block_mask_from_intervals(
    intervals: KeyIntervals, *, flex_block_size: int = DEFAULT_FLEX_BLOCK_SIZE
) -> BlockMask:
    """Flex `BlockMask` (head-broadcast) classified tile by tile from the intervals.

    A (q tile, kv tile) pair is non-empty when some query's interval reaches into the kv tile, full
    when every query of a complete q tile covers the kv tile with one interval (enough, because the
    intervals never touch), partial otherwise; tiles crossing the sequence end are never full, as in
    `create_block_mask`. Memory: O(Q) plus the `(Q / flex_block_size)^2` tile tensors.
    """
    _check_flex_block_size(flex_block_size)
    tile = flex_block_size
    norm = _normalise(intervals.lo1, intervals.hi1, intervals.lo2, intervals.hi2)
    batch_size, q_len = norm.lo1.shape
    num_tiles = -(-q_len // tile)
    q_tile = (torch.arange(q_len, device=norm.lo1.device) // tile).expand(batch_size, q_len)

    def ceil_div(x: Tensor) -> Tensor:
        return torch.div(x + tile - 1, tile, rounding_mode="floor")

    def floor_div(x: Tensor) -> Tensor:
        return torch.div(x, tile, rounding_mode="floor")

    touched = [(floor_div(norm.lo1), ceil_div(norm.hi1)), (floor_div(norm.lo2), ceil_div(norm.hi2))]
    covered = []
    for lo, hi in ((norm.lo1, norm.hi1), (norm.lo2, norm.hi2)):
        first = ceil_div(lo)
        covered.append((first, torch.maximum(first, floor_div(hi))))
    nonempty = _tile_counts(q_tile, touched, num_tiles) > 0
    # A partial last q tile has fewer than `tile` queries, so it never reaches the count.
    full = _tile_counts(q_tile, covered, num_tiles) == tile
    kv_num_blocks, kv_indices = _ordered(nonempty & ~full)
    full_kv_num_blocks, full_kv_indices = _ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num_blocks,
        kv_indices,
        full_kv_num_blocks,
        full_kv_indices,
        BLOCK_SIZE=tile,
        mask_mod=mask_function(norm),
        seq_lengths=(q_len, q_len),
    )


def build_attention_mask(
    position_ids: Tensor,
    attention_mask: Tensor,
    *,
    block_size: int,
    block_diffusion: bool,
    attn_implementation: str,
    dtype: torch.dtype = torch.float32,
    flex_block_size: int = DEFAULT_FLEX_BLOCK_SIZE,
    check_layout: bool = True,
) -> Tensor | BlockMask:
    """The full-sequence attention mask for the model's attention backend.

    Returns, for Q = 2L (block diffusion) or L: "sdpa" a bool `[B, 1, Q, Q]` (True = attend),
    "eager" an additive `[B, 1, Q, Q]` of `dtype` (0 or finfo.min), "flex_attention" a `BlockMask`.
    """
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation {attn_implementation!r} cannot take a block-diffusion/document mask; "
            f"use one of {', '.join(repr(name) for name in ATTN_IMPLEMENTATIONS)}"
        )
    _check_flex_block_size(flex_block_size)
    intervals = key_intervals(
        position_ids,
        attention_mask,
        block_size=block_size,
        block_diffusion=block_diffusion,
        check_layout=check_layout,
    )
    if attn_implementation == "flex_attention":
        return block_mask_from_intervals(intervals, flex_block_size=flex_block_size)
    q_len = intervals.query_length
    # No `attention_mask=` here: transformers would AND a key-padding mask into every row, leaving
    # row-padding queries with no key at all (NaN softmax); the intervals already exclude padding keys.
    kwargs = dict(
        batch_size=position_ids.shape[0],
        q_length=q_len,
        kv_length=q_len,
        mask_function=mask_function(intervals),
        attention_mask=None,
        allow_is_bidirectional_skip=False,
        device=position_ids.device,
    )
    if attn_implementation == "sdpa":
        return sdpa_mask(**kwargs, allow_is_causal_skip=False)
    return eager_mask(**kwargs, dtype=dtype, allow_is_causal_skip=False)


def generation_key_intervals(num_padding: Tensor, *, length: int, block_size: int) -> KeyIntervals:
    """Block-causal keys of every position of a generation canvas `[B, length]` (`generation/sampler.py`), on
    the canvas axis; row i starts with `num_padding[i]` padding positions, then its real tokens.

    Blocks are absolute (`position // block_size`). A real position sees the real positions of its own block
    and of every earlier block: one interval `[num_padding, block end)`. A padding position sees only itself
    (finite softmax; no real query reads it). Interval 2 is unused.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size ({block_size!r}) must be a positive integer, e.g. 32")
    position = torch.arange(length, device=num_padding.device).expand(num_padding.shape[0], length)
    first_real = num_padding.long()[:, None]
    real = position >= first_real
    block_end = (torch.div(position, block_size, rounding_mode="floor") + 1) * block_size
    zero = torch.zeros_like(position)
    return KeyIntervals(torch.where(real, first_real.expand_as(position), position),
                        torch.where(real, block_end.clamp(max=length), position + 1), zero, zero)


def generation_attention_mask(intervals: KeyIntervals, *, query_start: int, query_end: int) -> Tensor:
    """bool `[B, 1, query_end - query_start, query_end]` (True = attend): canvas queries
    `[query_start, query_end)` over keys `[0, query_end)` (the earlier ones from the KV cache), by transformers'
    `sdpa_mask` from the intervals, as `build_attention_mask` builds the training masks."""
    return sdpa_mask(
        batch_size=intervals.lo1.shape[0],
        q_length=query_end - query_start,
        kv_length=query_end,
        q_offset=query_start,
        mask_function=mask_function(intervals),
        attention_mask=None,
        allow_is_causal_skip=False,
        allow_is_bidirectional_skip=False,
        device=intervals.lo1.device,
    )


def reference_block_diffusion_mask(
    position_ids: Tensor, attention_mask: Tensor, block_size: int, block_diffusion: bool
) -> Tensor:
    """Dense bool `[B, Q, Q]` written straight from the mask table (slow; for tests only)."""
    batch_size, seq_len = position_ids.shape
    real = attention_mask.bool()
    doc_id = torch.cumsum(real & (position_ids == 0), 1)
    if block_diffusion:
        token = torch.arange(2 * seq_len) % seq_len  # position in its own half
        in_x0 = torch.arange(2 * seq_len) >= seq_len
    else:
        token = torch.arange(seq_len)
        in_x0 = torch.zeros(seq_len, dtype=torch.bool)
    q_len = token.numel()
    doc, is_real, block = doc_id[:, token], real[:, token], position_ids[:, token] // block_size
    same_doc = (doc[:, :, None] == doc[:, None, :]) & is_real[:, :, None] & is_real[:, None, :]
    if block_diffusion:
        q_x0, k_x0 = in_x0[None, :, None], in_x0[None, None, :]
        b_q, b_k = block[:, :, None], block[:, None, :]
        xt_to_xt = ~q_x0 & ~k_x0 & (b_q == b_k)
        xt_to_x0 = ~q_x0 & k_x0 & (b_q > b_k)
        x0_to_x0 = q_x0 & k_x0 & (b_q >= b_k)
        mask = same_doc & (xt_to_xt | xt_to_x0 | x0_to_x0)
    else:
        mask = same_doc
    padding_self = ~is_real[:, :, None] & torch.eye(q_len, dtype=torch.bool)[None]
    return mask | padding_self
