"""Block-diffusion / full-attention masks: intervals vs the literal table, and the three backends."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask, flex_attention
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask
from transformers.models.llama.modeling_llama import eager_attention_forward

from dfactory_hf.diffusion.masks import (
    build_attention_mask,
    generation_attention_mask,
    generation_key_intervals,
    key_intervals,
    mask_function,
    reference_block_diffusion_mask,
)

# The uncompiled flex path is the slow reference implementation; that is what these tests want.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def random_layout(
    seed: int, batch_size: int, seq_len: int, block_size: int, *, single_document: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows: documents of random whole-block lengths, then (sometimes) row padding."""
    generator = torch.Generator().manual_seed(seed)
    num_blocks = seq_len // block_size
    position_ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
    attention_mask = torch.zeros(batch_size, seq_len, dtype=torch.long)
    for row in range(batch_size):
        padded = not single_document and torch.rand((), generator=generator) < 0.6
        pad_blocks = int(torch.randint(0, num_blocks // 2 + 1, (), generator=generator)) if padded else 0
        real_blocks = num_blocks - pad_blocks
        start = 0
        while start < real_blocks * block_size:
            left = real_blocks - start // block_size
            doc_blocks = left if single_document else int(torch.randint(1, left + 1, (), generator=generator))
            length = doc_blocks * block_size
            position_ids[row, start : start + length] = torch.arange(length)
            start += length
        attention_mask[row, :start] = 1
    return position_ids, attention_mask


def build(position_ids, attention_mask, block_size, block_diffusion, impl, **kwargs):
    return build_attention_mask(
        position_ids,
        attention_mask,
        block_size=block_size,
        block_diffusion=block_diffusion,
        attn_implementation=impl,
        **kwargs,
    )


def dense(position_ids, attention_mask, block_size, block_diffusion):
    mask = build(position_ids, attention_mask, block_size, block_diffusion, "sdpa")
    assert mask.dtype == torch.bool and mask.shape[1] == 1
    return mask[:, 0]


# (block_size, L)
CASES = [(1, 1), (1, 5), (1, 12), (2, 2), (2, 10), (2, 26), (4, 4), (4, 12), (4, 40), (32, 32), (32, 96), (32, 160)]


@pytest.mark.parametrize("block_diffusion", [True, False], ids=["bd", "full"])
@pytest.mark.parametrize("block_size,seq_len", CASES)
def test_interval_mask_equals_table(block_size, seq_len, block_diffusion):
    for seed, single in [(0, True), (1, False), (2, False), (3, False)]:
        position_ids, attention_mask = random_layout(seed, 3, seq_len, block_size, single_document=single)
        expected = reference_block_diffusion_mask(position_ids, attention_mask, block_size, block_diffusion)
        got = dense(position_ids, attention_mask, block_size, block_diffusion)
        assert got.shape == (3, (2 if block_diffusion else 1) * seq_len, (2 if block_diffusion else 1) * seq_len)
        assert torch.equal(got, expected), (seed, position_ids, attention_mask)
        assert got.diagonal(dim1=1, dim2=2).all()  # every query sees at least itself


def test_table_on_a_hand_written_layout():
    # One row: document A (4 tokens), document B (2 tokens), 2 padding; block_size 2, 2L = 16.
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 0, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])
    mask = dense(position_ids, attention_mask, 2, True)[0]
    allowed = lambda q: mask[q].nonzero().flatten().tolist()  # noqa: E731
    assert allowed(0) == [0, 1]  # x_t of A, block 0: its own block only
    assert allowed(3) == [2, 3, 8, 9]  # x_t of A, block 1: own block + x_0 block 0
    assert allowed(4) == [4, 5]  # x_t of B: never A's keys
    assert allowed(11) == [8, 9, 10, 11]  # x_0 of A, block 1: x_0 blocks 0..1
    assert allowed(12) == [12, 13]
    assert allowed(6) == [6] and allowed(15) == [15]  # padding queries: only themselves
    full = dense(position_ids, attention_mask, 2, False)[0]
    assert full[0].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert full[5].nonzero().flatten().tolist() == [4, 5]


def test_all_padding_row_and_full_row():
    position_ids = torch.stack([torch.zeros(8, dtype=torch.long), torch.arange(8)])
    attention_mask = torch.tensor([[0] * 8, [1] * 8])
    for block_diffusion in (True, False):
        expected = reference_block_diffusion_mask(position_ids, attention_mask, 4, block_diffusion)
        assert torch.equal(dense(position_ids, attention_mask, 4, block_diffusion), expected)


def test_mask_function_under_vmap_matches_broadcast():
    position_ids, attention_mask = random_layout(7, 2, 24, 4)
    intervals = key_intervals(position_ids, attention_mask, block_size=4, block_diffusion=True)
    fn = mask_function(intervals)
    kwargs = dict(batch_size=2, q_length=48, kv_length=48, mask_function=fn, allow_is_causal_skip=False)
    assert torch.equal(sdpa_mask(**kwargs, use_vmap=True), sdpa_mask(**kwargs, use_vmap=False))


def test_eager_mask_is_additive_float():
    position_ids, attention_mask = random_layout(3, 2, 16, 4)
    for dtype in (torch.float32, torch.bfloat16):
        mask = build(position_ids, attention_mask, 4, True, "eager", dtype=dtype)
        assert mask.dtype == dtype and mask.shape == (2, 1, 32, 32)
        allowed = dense(position_ids, attention_mask, 4, True)[:, None]
        assert torch.equal(mask == 0, allowed)
        assert bool((mask[~allowed] == torch.finfo(dtype).min).all())


def effective_flex_mask(block_mask: BlockMask) -> torch.Tensor:
    """What a block-sparse kernel computes: full tiles, plus mask_mod inside partial tiles; `[B, Q, Q]`."""
    q_len, kv_len = block_mask.seq_lengths
    q_tile, kv_tile = block_mask.BLOCK_SIZE
    full_tiles = BlockMask.from_kv_blocks(
        block_mask.full_kv_num_blocks, block_mask.full_kv_indices, BLOCK_SIZE=block_mask.BLOCK_SIZE
    ).to_dense()
    any_tiles = block_mask.to_dense()  # partial | full

    def expand(tiles: torch.Tensor) -> torch.Tensor:
        tokens = tiles.bool().repeat_interleave(q_tile, -2).repeat_interleave(kv_tile, -1)
        return tokens[..., :q_len, :kv_len]

    full, partial = expand(full_tiles), expand(any_tiles) & ~expand(full_tiles)
    batch_size = block_mask.kv_num_blocks.shape[0]
    mod = create_mask(block_mask.mask_mod, batch_size, 1, q_len, kv_len, device="cpu")
    return (full | (partial & mod))[:, 0]


@pytest.mark.parametrize("block_diffusion", [True, False], ids=["bd", "full"])
@pytest.mark.parametrize(
    "block_size,seq_len,flex_block_size", [(4, 100, 16), (4, 100, 128), (2, 70, 8), (32, 320, 128), (1, 37, 4)]
)
def test_block_mask_matches_dense_and_create_block_mask(block_size, seq_len, flex_block_size, block_diffusion):
    for seed in range(3):
        position_ids, attention_mask = random_layout(seed, 2, seq_len, block_size, single_document=seed == 0)
        block_mask = build(
            position_ids, attention_mask, block_size, block_diffusion, "flex_attention", flex_block_size=flex_block_size
        )
        expected = dense(position_ids, attention_mask, block_size, block_diffusion)
        q_len = expected.shape[-1]
        assert block_mask.seq_lengths == (q_len, q_len)
        assert torch.equal(effective_flex_mask(block_mask), expected)
        # Tile classification identical to torch's dense-then-classify builder.
        torch_mask = create_block_mask(
            block_mask.mask_mod, 2, 1, q_len, q_len, device="cpu", BLOCK_SIZE=flex_block_size
        )
        for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
            assert torch.equal(getattr(block_mask, name), getattr(torch_mask, name)), name


class _Attention(nn.Module):
    is_causal = False
    num_key_value_groups = 1
    layer_idx = 0


def attention_outputs(position_ids, attention_mask, block_size, block_diffusion, q, k, v, *, compiled=False):
    """Output `[B, Q, H, D]` of sdpa, eager and flex on the same layout."""
    module, scaling = _Attention().eval(), q.shape[-1] ** -0.5
    masks = {
        impl: build(position_ids, attention_mask, block_size, block_diffusion, impl)
        for impl in ("sdpa", "eager", "flex_attention")
    }
    flex = torch.compile(flex_attention) if compiled else flex_attention
    return {
        "sdpa": sdpa_attention_forward(module, q, k, v, masks["sdpa"], scaling=scaling)[0],
        "eager": eager_attention_forward(module, q, k, v, masks["eager"], scaling=scaling)[0],
        "flex": flex(q, k, v, block_mask=masks["flex_attention"], scale=scaling).transpose(1, 2),
    }


@pytest.mark.parametrize("block_diffusion", [True, False], ids=["bd", "full"])
def test_backends_agree(block_diffusion):
    torch.manual_seed(0)
    position_ids, attention_mask = random_layout(11, 2, 96, 8)
    q_len = 2 * 96 if block_diffusion else 96
    q, k, v = torch.randn(3, 2, 4, q_len, 16).unbind(0)
    out = attention_outputs(position_ids, attention_mask, 8, block_diffusion, q, k, v)
    assert all(bool(o.isfinite().all()) for o in out.values())
    torch.testing.assert_close(out["eager"], out["sdpa"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["flex"], out["sdpa"], atol=1e-5, rtol=0)


def test_compiled_flex_agrees_with_sdpa():
    # The compiled kernel skips empty tiles and mask_mod on full tiles: checks the tile classification.
    torch.manual_seed(1)
    # Row 0: one long document (full tiles exist only when whole 128-query tiles share a document);
    # row 1: packed documents and padding. L = 500 leaves a partial last tile (Q = 1000).
    layouts = [random_layout(5, 1, 500, 4, single_document=True), random_layout(6, 1, 500, 4)]
    position_ids, attention_mask = (torch.cat(parts) for parts in zip(*layouts))
    block_mask = build(position_ids, attention_mask, 4, True, "flex_attention")
    assert bool((block_mask.kv_num_blocks > 0).all()) and block_mask.full_kv_num_blocks[0].sum() > 0
    assert not bool(attention_mask[1].all())
    q, k, v = torch.randn(3, 2, 2, 1000, 16).unbind(0)
    out = attention_outputs(position_ids, attention_mask, 4, True, q, k, v, compiled=True)
    torch.testing.assert_close(out["flex"], out["sdpa"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("block_diffusion", [True, False], ids=["bd", "full"])
def test_documents_do_not_leak(block_diffusion):
    torch.manual_seed(2)
    seq_len, block_size = 48, 4
    # Row 0: documents of 16, 12 and 12 tokens, then 8 padding.
    pieces = [torch.arange(16), torch.arange(12), torch.arange(12), torch.zeros(8, dtype=torch.long)]
    position_ids = torch.cat(pieces)[None]
    attention_mask = (torch.arange(seq_len) < 40).long()[None]
    doc = torch.tensor([0] * 16 + [1] * 12 + [2] * 12 + [3] * 8)
    half = torch.cat([doc, doc]) if block_diffusion else doc
    q_len = half.numel()
    q, k, v = torch.randn(3, 1, 2, q_len, 8).unbind(0)
    before = attention_outputs(position_ids, attention_mask, block_size, block_diffusion, q, k, v)
    for changed in (1, 3):  # a middle document, then the row padding
        k2, v2 = k.clone(), v.clone()
        k2[:, :, half == changed] += 5 * torch.randn_like(k2[:, :, half == changed])
        v2[:, :, half == changed] += 5 * torch.randn_like(v2[:, :, half == changed])
        after = attention_outputs(position_ids, attention_mask, block_size, block_diffusion, q, k2, v2)
        for impl in before:
            others = (half != changed) & (half != 3)  # real queries of the other documents
            torch.testing.assert_close(after[impl][:, others], before[impl][:, others], atol=1e-6, rtol=0)
            assert not torch.allclose(after[impl][:, half == changed], before[impl][:, half == changed])


def test_eager_padding_rows_stay_finite():
    position_ids, attention_mask = random_layout(4, 1, 32, 4)
    attention_mask[:, 16:] = 0
    position_ids[:, 16:] = 0
    q, k, v = torch.randn(3, 1, 2, 64, 8).unbind(0)
    for dtype in (torch.float32, torch.bfloat16):
        mask = build(position_ids, attention_mask, 4, True, "eager", dtype=dtype)
        q_, k_, v_ = q.to(dtype), k.to(dtype), v.to(dtype)
        out, weights = eager_attention_forward(_Attention(), q_, k_, v_, mask, scaling=0.3)
        assert bool(out.isfinite().all()) and bool(weights.isfinite().all())
        # A padding query attends only to itself, so it returns its own value.
        torch.testing.assert_close(out[0, 16:32].float(), v[0, :, 16:32].transpose(0, 1).to(dtype).float())


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_flex_path_never_materialises_the_dense_mask():
    seq_len = 4096  # Q = 8192, 64 x 64 tiles
    position_ids, attention_mask = random_layout(9, 2, seq_len, 32)
    with _LargestTensor() as probe:
        block_mask = build(position_ids, attention_mask, 32, True, "flex_attention")
    num_tiles = 2 * seq_len // 128
    assert block_mask.kv_indices.shape == (2, 1, num_tiles, num_tiles)
    assert probe.numel <= max(2 * 2 * seq_len, 2 * num_tiles * (num_tiles + 1)) * 2, probe.numel


GOOD_POS, GOOD_MASK = torch.tensor([[0, 1, 2, 3, 0, 1, 0, 0]]), torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])


@pytest.mark.parametrize(
    "position_ids,attention_mask,kwargs,message",
    [
        (GOOD_POS, GOOD_MASK, dict(block_size=0), r"block_size \(0\) must be a positive integer"),
        (GOOD_POS, GOOD_MASK, dict(block_size=3), r"sequence length L \(8\) must be a positive multiple of "
         r"block_size \(3\); pad rows to a whole number of blocks"),
        (GOOD_POS, GOOD_MASK[:, :6], {}, r"attention_mask shape \(1, 6\) must equal position_ids shape \(1, 8\)"),
        (GOOD_POS[0], GOOD_MASK[0], {}, r"position_ids must be 2-D \[batch, seq_len\]; got shape \(8,\)"),
        (GOOD_POS.float(), GOOD_MASK, {}, r"position_ids must be an integer tensor; got dtype torch.float32"),
        (GOOD_POS, GOOD_MASK, dict(attn_implementation="flash_attention_2"),
         r"attn_implementation 'flash_attention_2' cannot take a block-diffusion/document mask"),
        (GOOD_POS, GOOD_MASK, dict(attn_implementation="flex_attention", flex_block_size=0),
         r"flex_block_size \(0\) must be a positive integer"),
        (GOOD_POS, torch.tensor([[1, 1, 0, 0, 1, 1, 0, 0]]), {}, r"row padding only at the end of a row"),
        (torch.tensor([[0, 1, 3, 4, 0, 1, 0, 0]]), GOOD_MASK, {}, r"increase by 1 inside a document"),
        (torch.tensor([[0, 1, 2, 0, 1, 2, 0, 0]]), GOOD_MASK, {},
         r"every document length must be a multiple of block_size \(2\)"),
    ],
)
def test_errors(position_ids, attention_mask, kwargs, message):
    arguments = dict(block_size=2, block_diffusion=True, attn_implementation="sdpa") | kwargs
    with pytest.raises(ValueError, match=message):
        build_attention_mask(position_ids, attention_mask, **arguments)


def test_error_lists_valid_implementations_and_layout_check_can_be_skipped():
    with pytest.raises(ValueError, match="use one of 'sdpa', 'eager', 'flex_attention'"):
        build_attention_mask(GOOD_POS, GOOD_MASK, block_size=2, block_diffusion=True, attn_implementation="paged")
    # Full attention ignores block alignment; so does block diffusion with check_layout=False (no sync).
    odd = torch.tensor([[0, 1, 2, 0, 1, 2, 0, 0]])
    assert build(odd, GOOD_MASK, 2, False, "sdpa").shape == (1, 1, 8, 8)
    assert build(odd, GOOD_MASK, 2, True, "sdpa", check_layout=False).shape == (1, 1, 16, 16)


# --- generation: the block-causal mask of a left-padded canvas ---------------------------------------------------


def literal_generation_mask(num_padding: torch.Tensor, block_size: int, query_start: int, query_end: int):
    """The mask generation/sampler.py built before it used masks.py, restated: bool [B, 1, Q, K]."""
    is_real = torch.arange(query_end)[None, :] >= num_padding[:, None]  # [B, K]
    query, key = torch.arange(query_start, query_end), torch.arange(query_end)
    same_or_earlier_block = (key[None, :] // block_size) <= (query[:, None] // block_size)
    mask = same_or_earlier_block[None] & is_real[:, None, :]
    itself = key[None, :] == query[:, None]
    return torch.where(is_real[:, query_start:query_end, None], mask, itself[None])[:, None]


@pytest.mark.parametrize("block_size", [1, 3, 4])
def test_generation_mask_is_block_causal_over_real_keys(block_size):
    generator = torch.Generator().manual_seed(block_size)
    num_blocks = 4
    length = num_blocks * block_size
    checked = 0
    for _ in range(10):
        num_padding = torch.randint(0, length, (3,), generator=generator)
        intervals = generation_key_intervals(num_padding, length=length, block_size=block_size)
        for start in range(0, length, block_size):  # every query block, over the keys up to its end and beyond
            for end in range(start + block_size, length + 1, block_size):
                mask = generation_attention_mask(intervals, query_start=start, query_end=end)
                assert mask.dtype == torch.bool
                assert torch.equal(mask, literal_generation_mask(num_padding, block_size, start, end)), (start, end)
                checked += 1
    assert checked == 10 * num_blocks * (num_blocks + 1) // 2


def test_generation_mask_rejects_a_bad_block_size():
    with pytest.raises(ValueError, match=r"block_size \(0\) must be a positive integer"):
        generation_key_intervals(torch.zeros(1, dtype=torch.long), length=4, block_size=0)
