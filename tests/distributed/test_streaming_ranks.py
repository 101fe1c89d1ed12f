"""A streaming train dataset on 2 DDP ranks (torchrun, gloo): each rank reads every second row of the stream, both
take the same number of micro-batches per step, and a pass ends on both ranks at the first one's end (the stream's
rows do not split evenly), so neither waits in a collective the other never reaches."""

from __future__ import annotations

import json

import pytest
import torch
from launch import WORKER, run
from trainer_helpers import demo_data

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
STREAM_WORKER = WORKER.parent / "stream_worker.py"


def test_two_ranks_split_a_stream_and_end_each_pass_together(tmp_path):
    # 13 rows of 52 tokens, two per micro-batch, buffers of 4: rank 0 plans 4 micro-batches a pass (7 rows), rank 1 3.
    rows = list(demo_data(num_train=13, num_test=1)["train"])
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    run(STREAM_WORKER, ["--data", str(data), "--out", str(tmp_path / "run"), "--max_steps", "6"],
        launcher="torchrun", ranks=2)
    ranks = [torch.load(tmp_path / f"run.rank{rank}.pt") for rank in range(2)]
    assert [r["global_step"] for r in ranks] == [6, 6] and ranks[0]["dp_size"] == 2
    for rank, result in enumerate(ranks):
        assert len(result["seen"]) == 6  # one micro-batch per step on every rank
        assert all(index % 2 == rank for batch in result["seen"] for _, index in batch)
    # Each pass: 3 micro-batches on both ranks; rank 0's fourth is left when rank 1 runs out, the next pass begins.
    for epoch in (0, 1):
        counts = [sum(1 for batch in r["seen"] if batch[0][0] == epoch) for r in ranks]
        assert counts == [3, 3]
        trained = {index for batch in ranks[0]["seen"] if batch[0][0] == epoch for _, index in batch}
        assert trained < set(range(0, 13, 2)) and {0, 2, 4, 6} <= trained
    for name, parameter in ranks[0]["parameters"].items():  # DDP: the replicas hold the same model
        torch.testing.assert_close(ranks[1]["parameters"][name], parameter, msg=name)
