"""DDP for real: 2 gloo ranks under torchrun against one process doing the same global steps.

Each optimizer step of a 2-rank run with gradient accumulation G covers the same documents as one process with
accumulation 2G (the token-budget sampler plans per step of data_parallel_size x micro_batches_per_step
micro-batches; the padded path shards consecutive batches across ranks), so with a global token-mean loss the
SGD updates must agree to fp32 rounding. A per-rank mean, or Trainer's default normalisation, would not.
"""

from __future__ import annotations

import pytest
from launch import assert_same_training, train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_two_ranks_train_like_one_process_with_twice_the_accumulation(tmp_path, layout):
    ddp = train(tmp_path / "ddp.pt", launcher="torchrun", ranks=2, grad_accum=2, layout=layout)
    single = train(tmp_path / "single.pt", launcher="plain", grad_accum=4, layout=layout)
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert not ddp["is_fsdp2"] and ddp["num_sharded"] == 0  # this one is the DDP layout

    # Each rank trained its own micro-batches...
    assert all(ddp["micro_batches"][0][i] != ddp["micro_batches"][1][i] for i in range(6))
    # ...and together the same documents per step, the same global token-mean loss, hence the same updates.
    assert_same_training(ddp, single, num_steps=3, atol=1e-5)
