"""Data parallel for real: 2 gloo ranks under torchrun against one process doing the same global steps.

Each optimizer step of a 2-rank run with gradient accumulation G covers the same documents as one process with
accumulation 2G (the token-budget sampler plans per step of data_parallel_size x micro_batches_per_step
micro-batches; the padded path shards consecutive batches across ranks), so with a global token-mean loss the
SGD updates must agree to fp32 rounding. A per-rank mean, or Trainer's default normalisation, would not.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_helpers import demo_model

WORKER = Path(__file__).parent / "distributed" / "train_worker.py"


def _run(out: Path, *, grad_accum: int, layout: str, ranks: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    args = [str(WORKER), "--out", str(out), "--grad_accum", str(grad_accum), "--layout", layout]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    command = launcher + args if ranks > 1 else [sys.executable] + args
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return torch.load(out)


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_two_ranks_train_like_one_process_with_twice_the_accumulation(tmp_path, layout):
    ddp = _run(tmp_path / "ddp.pt", grad_accum=2, layout=layout, ranks=2)
    single = _run(tmp_path / "single.pt", grad_accum=4, layout=layout, ranks=1)
    assert ddp["world_size"] == 2 and single["world_size"] == 1

    # Same documents in every optimizer step, split over ranks; no document twice within a step.
    def per_step(micro_batches_of_ranks, per_rank):
        steps = []
        for step in range(3):
            ids = [i for rank in micro_batches_of_ranks for mb in rank[step * per_rank:(step + 1) * per_rank]
                   for i in mb]
            assert len(ids) == len(set(ids))
            steps.append(sorted(ids))
        return steps

    assert per_step(ddp["micro_batches"], 2) == per_step(single["micro_batches"], 4)
    assert all(ddp["micro_batches"][0][i] != ddp["micro_batches"][1][i] for i in range(6))

    # The same global token-mean loss and supervised-token count, hence the same updates.
    assert ddp["supervised"] == single["supervised"]
    torch.testing.assert_close(torch.tensor(ddp["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=1e-6)
    for name, value in single["parameters"].items():
        torch.testing.assert_close(ddp["parameters"][name], value, rtol=1e-4, atol=1e-6, msg=name)
    # ...and the runs did train: every parameter moved away from its initial value.
    initial = dict(demo_model(seed=0).named_parameters())
    for name, value in ddp["parameters"].items():
        assert not torch.equal(value, initial[name]), f"{name} did not change"
