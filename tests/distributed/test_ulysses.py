"""Ulysses attention against plain attention in float64 (forward and every gradient), 2 and 4 sp ranks, through
`accelerate launch` as a user starts a run; block-diffusion and full-attention masks over packed rows with row
padding; KV-head counts below sp (the tiny model's 2 KV heads at sp 4, one KV head at sp 2 and 4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from launch import run

WORKER = Path(__file__).parent / "ulysses_worker.py"

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.mark.parametrize("ranks", [2, 4])
def test_ulysses_attention_matches_plain_attention(tmp_path, ranks):
    out = tmp_path / "ulysses.json"
    run(WORKER, ["--out", str(out)], launcher="accelerate", ranks=ranks)
    record = json.loads(out.read_text())
    assert record["world_size"] == ranks
    cases = [case for rank in record["ranks"] for case in rank]
    assert len(cases) == ranks * 14
    for case in cases:
        name = f"{case['heads']}q/{case['kv_heads']}kv {case['backend']} block_diffusion={case['block_diffusion']}"
        # The layout engaged: the Ulysses variant ran, on 1/sp of every row, with the KV repeats sp needs.
        assert case["attn_implementation"] == "ulysses_" + case["backend"], name
        assert case["local_input"] == [2, case["full_length"] // ranks], name
        expected_repeats = max(1, ranks // case["kv_heads"]) if case["kv_heads"] % ranks else 1
        assert case["kv_repeats"] == expected_repeats, name
        if case["trained"]:
            assert case["num_grads"] > 0
            assert case["logits_diff"] <= 1e-12, name
            assert case["grad_diff"] <= 1e-10, name
            assert case["router_grad_diff"] <= 1e-6, name
        else:  # flex: float32 forward (no float64 and no backward on CPU)
            assert case["logits_diff"] <= 1e-5, name
    assert any(case["kv_repeats"] > 1 for case in cases) == (ranks > 1)
