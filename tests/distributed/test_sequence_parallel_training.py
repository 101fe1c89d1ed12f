"""Ulysses sequence parallel in the trainer, launched as a user launches it:

    accelerate launch --config_file configs/accelerate/cpu_fsdp2.yaml --num_processes N \\
        tests/distributed/train_worker.py --sp_size S ...

each compared with one plain process on the same documents per optimizer step (fp32 SGD: logged losses, supervised
counts and final parameters within 1e-5; evaluation metrics too). Every run also proves the layout engaged: the
model ran the Ulysses attention, each rank's model received 1/sp of every (padded) row, the sp ranks of a data
replica trained on the same batches, and FSDP2 sharded the parameters over dp_shard x sp.
"""

from __future__ import annotations

import pytest
from launch import assert_same_training, run_cache

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 3
BLOCK = 4  # demo_args' block_size


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs by name, started on first use and shared by the tests of this module."""
    return run_cache(tmp_path_factory.mktemp("sp"), max_steps=STEPS)


def assert_sequence_parallel_engaged(run: dict, *, ranks: int, sp: int, full_attention: bool) -> None:
    assert run["world_size"] == ranks and run["is_fsdp2"], run["distributed_type"]
    assert run["layout"]["sp_size"] == sp
    assert run["attn_implementation"] == "ulysses_sdpa"
    assert run["num_sharded"] == run["num_params"] > 0
    shard_ranks = ranks // run["layout"]["dp_replicate_size"]
    assert run["first_local_numel"] * shard_ranks == run["first_numel"], "FSDP2 does not shard over dp_shard x sp"
    assert sorted(run["sp_ranks"]) == sorted(list(range(sp)) * (ranks // sp))
    # The sp ranks of a data replica trained on the same micro-batches; the replicas on different ones.
    by_replica = {}
    for dp_rank, _, batches in run["rank_batches"]:
        assert by_replica.setdefault(dp_rank, batches) == batches, f"sp ranks of replica {dp_rank} disagree"
    assert len(by_replica) == ranks // sp
    segments = 1 if full_attention else 2
    for lengths in run["model_input_lengths"]:
        assert len(lengths) == len(run["micro_batches"][0]) > 0  # every trained micro-batch
        for row_length, model_length in lengths:
            padded = -(-row_length // (sp * BLOCK)) * sp * BLOCK
            assert model_length == segments * padded // sp, (row_length, model_length)


CASES = [("packed", False), ("padded", False), ("packed", True), ("padded", True)]


@pytest.mark.parametrize(("layout", "full_attention"), CASES,
                         ids=[f"{layout}-{'full' if full else 'block'}" for layout, full in CASES])
def test_sp2_trains_like_one_process(runs, layout, full_attention):
    evaluate = (layout, full_attention) == ("packed", False)
    spec = dict(grad_accum=2, layout=layout, full_attention=full_attention, evaluate=evaluate)
    parallel = runs(f"sp2-{layout}-{full_attention}", launcher="accelerate", ranks=2, sp_size=2, **spec)
    assert_sequence_parallel_engaged(parallel, ranks=2, sp=2, full_attention=full_attention)
    reference = runs(f"single-{layout}-{full_attention}-ga2", launcher="plain", **spec)
    assert_same_training(parallel, reference, num_steps=STEPS, atol=1e-5)
    if evaluate:
        for key in ("eval_loss", "eval_masked_token_accuracy", "eval_supervised_tokens", "eval_loss_t0.3",
                    "eval_loss_t0.7", "eval_elbo_nll"):
            assert parallel["eval_metrics"][key] == pytest.approx(reference["eval_metrics"][key], rel=1e-5), key


def test_sp2_with_the_fused_head_loss_trains_like_one_process_with_logits(runs):
    # Each sp rank's loss applies the LM head to its own slice's supervised positions (and evaluates that way).
    spec = dict(grad_accum=2, layout="packed", full_attention=False)
    parallel = runs("sp2-fused-head", launcher="accelerate", ranks=2, sp_size=2, fused_head_loss=True, **spec)
    assert_sequence_parallel_engaged(parallel, ranks=2, sp=2, full_attention=False)
    assert parallel["head_widths"] == [[0], [0]]
    assert_same_training(parallel, runs("single-packed-False-ga2", launcher="plain", evaluate=True, **spec),
                         num_steps=STEPS, atol=1e-5)


def test_sp2_times_dp_shard2_on_four_ranks_trains_like_one_process(runs):
    parallel = runs("sp2-dp2", launcher="accelerate", ranks=4, sp_size=2, grad_accum=2, layout="packed",
                    evaluate=True)
    assert_sequence_parallel_engaged(parallel, ranks=4, sp=2, full_attention=False)
    assert parallel["layout"]["dp_size"] == 2 and len(parallel["micro_batches"]) == 2
    reference = runs("single-packed-ga4", launcher="plain", grad_accum=4, layout="packed", evaluate=True)
    assert_same_training(parallel, reference, num_steps=STEPS, atol=1e-5)
    for key in ("eval_loss", "eval_supervised_tokens", "eval_elbo_nll"):
        assert parallel["eval_metrics"][key] == pytest.approx(reference["eval_metrics"][key], rel=1e-5), key


def test_sp2_with_hsdp_on_four_ranks_trains_like_one_process(runs):
    # dp_replicate 2 x sp 2: FSDP2 shards over the sp pair of each replica and replicates across the two.
    parallel = runs("sp2-hsdp", launcher="accelerate", ranks=4, sp_size=2, dp_replicate_size=2, grad_accum=2,
                    layout="packed")
    assert_sequence_parallel_engaged(parallel, ranks=4, sp=2, full_attention=False)
    assert parallel["shard_mesh"] == ("dp_replicate", "dp_shard_cp")
    reference = runs("single-packed-ga4", launcher="plain", grad_accum=4, layout="packed", evaluate=True)
    assert_same_training(parallel, reference, num_steps=STEPS, atol=1e-5)


def test_sp4_beyond_the_kv_head_count_trains_like_one_process(runs):
    # The tiny model has 4 query heads and 2 KV heads: sp 4 needs each KV head on two ranks.
    parallel = runs("sp4", launcher="accelerate", ranks=4, sp_size=4, grad_accum=2, layout="packed")
    assert_sequence_parallel_engaged(parallel, ranks=4, sp=4, full_attention=False)
    reference = runs("single-packed-False-ga2", launcher="plain", grad_accum=2, layout="packed",
                     full_attention=False, evaluate=True)
    assert_same_training(parallel, reference, num_steps=STEPS, atol=1e-5)


def test_sp2_with_draft_and_edit_noise_and_shifted_labels_trains_like_one_process(runs):
    # The noise kinds (masked, edited, kept) slice with the targets they weigh, shifted labels included.
    spec = dict(grad_accum=2, layout="packed", edit_noise_rate=0.2, edit_keep_weight=0.5, shift_labels=True,
                evaluate=True)
    parallel = runs("sp2-edits", launcher="accelerate", ranks=2, sp_size=2, **spec)
    assert_sequence_parallel_engaged(parallel, ranks=2, sp=2, full_attention=False)
    reference = runs("single-edits-ga2", launcher="plain", **spec)
    assert_same_training(parallel, reference, num_steps=STEPS, atol=1e-5)
    for key in ("eval_loss", "eval_m2t_loss", "eval_t2t_loss", "eval_keep_loss", "eval_edit_accuracy"):
        assert parallel["eval_metrics"][key] == pytest.approx(reference["eval_metrics"][key], rel=1e-5), key
    assert reference["eval_metrics"]["eval_t2t_loss"] > 0
