"""Sequence parallel pieces that need no process group: KV repeats, validation, the model switch, the 2D-mask
refusal, the batch layout. The all-to-all paths are in tests/distributed/test_ulysses.py and
tests/distributed/test_sequence_parallel_training.py."""

from __future__ import annotations

import json

import pytest
import torch
from model_helpers import tiny_model

from dfactory_hf.parallel.sequence import SequenceShard, pad_rows
from dfactory_hf.parallel.ulysses import (apply_sequence_parallel, base_backend, check_sequence_parallel_heads,
                                          kv_repeats)


@pytest.mark.parametrize(("heads", "kv_heads", "sp", "expected"), [
    (16, 4, 1, 1), (16, 4, 2, 1), (16, 4, 4, 1), (16, 4, 8, 2), (16, 4, 16, 4),  # LLaDA2.0-mini
    (4, 2, 4, 2), (4, 1, 2, 2), (4, 1, 4, 4), (12, 4, 6, 3), (16, 16, 16, 1), (32, 8, 16, 2),
])
def test_kv_repeats(heads, kv_heads, sp, expected):
    assert kv_repeats(heads, kv_heads, sp) == expected


@pytest.mark.parametrize("heads, kv_heads", [(16, 4), (12, 4), (12, 6), (24, 8), (8, 8), (6, 2), (16, 1)])
def test_each_rank_receives_the_kv_heads_its_query_heads_read(heads, kv_heads):
    """Restatement: rank j's query heads [j H/sp, (j+1) H/sp) read KV head q // (H/K); after repeating each KV head
    r times (repeat_interleave), rank j's contiguous chunk of the repeated heads must hold exactly those KV heads,
    with one consistent query-per-KV ratio (what sdpa's GQA path assumes)."""
    for sp in (d for d in range(1, heads + 1) if heads % d == 0):
        r = kv_repeats(heads, kv_heads, sp)
        repeated = [h // r for h in range(kv_heads * r)]  # original KV head of each repeated head
        q_per_rank, kv_per_rank = heads // sp, kv_heads * r // sp
        assert kv_heads * r % sp == 0 and q_per_rank % kv_per_rank == 0
        groups = q_per_rank // kv_per_rank
        for rank in range(sp):
            local_kv = repeated[rank * kv_per_rank:(rank + 1) * kv_per_rank]
            for i, q in enumerate(range(rank * q_per_rank, (rank + 1) * q_per_rank)):
                assert local_kv[i // groups] == q // (heads // kv_heads), (heads, kv_heads, sp, rank, q)


def test_sp_must_divide_the_heads():
    with pytest.raises(ValueError, match=r"--sp_size \(3\) must divide the model's num_attention_heads \(16\).*"
                                         r"use one of 1, 2, 4, 8, 16"):
        check_sequence_parallel_heads(16, 4, 3)


def test_apply_switches_to_the_ulysses_variant_and_back_names_the_backend(tmp_path):
    model = tiny_model()
    model.set_attn_implementation("sdpa")
    assert apply_sequence_parallel(model, 2) == "sdpa"
    assert model.config._attn_implementation == "ulysses_sdpa"
    assert apply_sequence_parallel(model, 2) == "sdpa"  # idempotent
    assert base_backend(model.config._attn_implementation) == "sdpa"
    # Saved checkpoints do not carry the variant (a fresh process without dfactory_hf could not resolve it).
    model.save_pretrained(tmp_path)
    assert "ulysses" not in json.dumps(json.loads((tmp_path / "config.json").read_text()))


def test_apply_refuses_a_backend_that_cannot_take_the_mask():
    model = tiny_model()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match=r"--sp_size \(2\) needs an attention backend.*flash_attention_2.*"
                                         r"attn_implementation in \('sdpa', 'eager', 'flex_attention'\)"):
        apply_sequence_parallel(model, 2)


def test_apply_refuses_sp_not_dividing_the_heads():
    with pytest.raises(ValueError, match=r"--sp_size \(3\) must divide the model's num_attention_heads \(4\)"):
        apply_sequence_parallel(tiny_model(), 3)


def test_a_2d_padding_mask_is_refused_not_dropped():
    model = tiny_model()
    model.set_attn_implementation("sdpa")
    apply_sequence_parallel(model, 2)
    ids = torch.randint(0, 128, (2, 8))
    with pytest.raises(ValueError, match="2D padding mask.*full-length 4D mask or BlockMask"):
        model(input_ids=ids, attention_mask=torch.ones(2, 8, dtype=torch.long))


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_without_a_shard_the_variant_is_the_plain_backend(backend):
    """Generation and other unsharded calls after training under sp: the same logits as the plain backend."""
    from dfactory_hf.diffusion.masks import build_attention_mask

    model = tiny_model()
    model.set_attn_implementation(backend)
    positions = torch.arange(8).repeat(2, 1)
    mask = build_attention_mask(positions, torch.ones(2, 8), block_size=4, block_diffusion=False,
                                attn_implementation=backend)
    ids = torch.randint(0, 128, (2, 8))
    plain = model(input_ids=ids, position_ids=positions, attention_mask=mask).logits
    apply_sequence_parallel(model, 2)
    assert model.config._attn_implementation == f"ulysses_{backend}"
    torch.testing.assert_close(model(input_ids=ids, position_ids=positions, attention_mask=mask).logits, plain)


def test_shard_pieces_hold_a_slice_of_every_segment():
    x_t, x_0 = torch.arange(8).view(1, 8), torch.arange(100, 108).view(1, 8)
    pieces = [SequenceShard(group=None, size=2, rank=r, num_segments=2).local(x_t, x_0) for r in range(2)]
    assert pieces[0].tolist() == [[0, 1, 2, 3, 100, 101, 102, 103]]
    assert pieces[1].tolist() == [[4, 5, 6, 7, 104, 105, 106, 107]]
    with pytest.raises(ValueError, match="6 positions does not split over sp_size=4"):
        SequenceShard(group=None, size=4, rank=0).piece(torch.zeros(1, 6))


def test_pad_rows_appends_row_padding():
    batch = dict(input_ids=torch.tensor([[5, 6, 7, 9]]), noisy_input_ids=torch.tensor([[5, 1, 1, 9]]),
                 labels=torch.tensor([[-100, 6, 7, -100]]), position_ids=torch.tensor([[0, 1, 2, 0]]),
                 attention_mask=torch.tensor([[1, 1, 1, 0]]), mask_rate=torch.tensor([[0.5, 0.5, 0.5, 0.0]]),
                 sample_index=torch.tensor([3]))
    padded = pad_rows(batch, multiple=8)
    assert padded["input_ids"].tolist() == [[5, 6, 7, 9, 9, 9, 9, 9]]
    assert padded["noisy_input_ids"].tolist() == [[5, 1, 1, 9, 9, 9, 9, 9]]
    assert padded["labels"].tolist() == [[-100, 6, 7, -100] + [-100] * 4]
    assert padded["position_ids"].tolist() == [[0, 1, 2, 0, 0, 0, 0, 0]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0]]
    assert padded["mask_rate"].tolist() == [[0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0]]
    assert padded["sample_index"].tolist() == [3]
    assert pad_rows(batch, multiple=4) is batch
