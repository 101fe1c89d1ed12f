"""ParallelSizes / ParallelState: size resolution and its refusals; the mesh on fake 8-rank worlds in one process."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
import torch.distributed as dist
from accelerate import ParallelismConfig
from torch.testing._internal.distributed.fake_pg import FakeStore

from dfactory_hf import DiffusionTrainingArguments
from dfactory_hf.parallel.state import ParallelSizes, ParallelState, check_size_flags


def _args(tmp_path, **overrides) -> DiffusionTrainingArguments:
    return DiffusionTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **overrides)


# --- ParallelSizes.resolve: what -1 becomes -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (dict(dp_replicate_size=2), (2, 4, 1)),
        (dict(dp_replicate_size=2, sp_size=2), (2, 2, 2)),
        (dict(sp_size=4), (1, 2, 4)),
        (dict(), (1, 8, 1)),
    ],
)
def test_dp_shard_minus_one_takes_the_ranks_the_others_leave(flags, expected):
    sizes = ParallelSizes.resolve(world_size=8, dp_shard_size=-1, **flags)
    assert (sizes.dp_replicate, sizes.dp_shard, sizes.sp) == expected
    assert sizes.world_size == 8


def test_dp_and_fsdp_shard_properties():
    sizes = ParallelSizes.resolve(world_size=8, dp_replicate_size=2, dp_shard_size=2, sp_size=2, ep_size=2)
    assert sizes.dp == 4  # dp_replicate x dp_shard: the data replicas
    assert sizes.fsdp_shard == 4  # dp_shard x sp: the FSDP shard group
    assert sizes.ep == 2
    uneven = ParallelSizes.resolve(world_size=12, dp_replicate_size=3, dp_shard_size=1, sp_size=4)
    assert (uneven.dp, uneven.fsdp_shard) == (3, 4)


def test_explicit_sizes_whose_product_is_the_world_are_kept():
    sizes = ParallelSizes.resolve(world_size=8, dp_replicate_size=4, dp_shard_size=2)
    assert (sizes.dp_replicate, sizes.dp_shard, sizes.sp, sizes.ep) == (4, 2, 1, 1)


def test_one_process_defaults_resolve_to_ones():
    sizes = ParallelSizes.resolve(world_size=1)
    assert (sizes.dp_replicate, sizes.dp_shard, sizes.sp, sizes.ep, sizes.dp) == (1, 1, 1, 1, 1)


def test_ep_dividing_shard_group_and_expert_count_is_accepted():
    sizes = ParallelSizes.resolve(world_size=8, dp_replicate_size=1, sp_size=2, ep_size=4, num_experts=8)
    assert (sizes.dp_shard, sizes.ep) == (4, 4)


# --- ParallelSizes.resolve / check_size_flags: refusals -------------------------------------------------------


@pytest.mark.parametrize("flag", ["dp_replicate_size", "sp_size", "ep_size"])
@pytest.mark.parametrize("value", [0, -1])
def test_size_below_one_is_refused_naming_the_flag(flag, value):
    with pytest.raises(ValueError, match=rf"--{flag} \({value}\) must be >= 1"):
        ParallelSizes.resolve(world_size=8, **{flag: value})


@pytest.mark.parametrize("value", [0, -2, -8])
def test_dp_shard_size_zero_or_below_minus_one_is_refused(value):
    with pytest.raises(ValueError, match=rf"--dp_shard_size \({value}\) must be >= 1, or -1"):
        ParallelSizes.resolve(world_size=8, dp_shard_size=value)


@pytest.mark.parametrize(
    "flags", [dict(dp_replicate_size=2), dict(dp_shard_size=2), dict(sp_size=2), dict(ep_size=2)]
)
def test_sizes_above_one_in_a_one_process_run_point_at_accelerate_launch(flags):
    with pytest.raises(ValueError, match=r"one-process run \(world size 1\).*accelerate launch"):
        ParallelSizes.resolve(world_size=1, **flags)


def test_product_not_equal_to_world_size_shows_product_and_world():
    with pytest.raises(ValueError, match=r"= 2 x 2 x 1 = 4, but the run has 8 processes; make the product 8"):
        ParallelSizes.resolve(world_size=8, dp_replicate_size=2, dp_shard_size=2)
    with pytest.raises(ValueError, match=r"= 1 x 3 x 2 = 6, but the run has 4 processes"):
        ParallelSizes.resolve(world_size=4, dp_shard_size=3, sp_size=2)


def test_replicate_times_sp_not_dividing_world_is_refused_with_minus_one():
    with pytest.raises(ValueError, match=r"dp_replicate_size x sp_size \(3 x 1 = 3\) must divide the world size "
                                         r"\(8\).*\(1, 2, 4, 8\)"):
        ParallelSizes.resolve(world_size=8, dp_replicate_size=3, dp_shard_size=-1)
    with pytest.raises(ValueError, match=r"\(2 x 2 = 4\) must divide the world size \(6\)"):
        ParallelSizes.resolve(world_size=6, dp_replicate_size=2, sp_size=2)


def test_ep_not_dividing_shard_group_lists_valid_divisors():
    with pytest.raises(ValueError, match=r"ep_size \(3\) must divide dp_shard_size x sp_size \(2 x 2 = 4\).*"
                                         r"use one of 1, 2, 4\."):
        ParallelSizes.resolve(world_size=8, dp_replicate_size=2, dp_shard_size=2, sp_size=2, ep_size=3)


def test_ep_not_dividing_expert_count_is_refused():
    with pytest.raises(ValueError, match=r"ep_size \(4\) must divide the model's routed expert count \(6\).*"
                                         r"use one of 1, 2, 3, 6 that also divides 8"):
        ParallelSizes.resolve(world_size=8, ep_size=4, num_experts=6)


def test_check_size_flags_accepts_defaults_and_refuses_bad_values():
    check_size_flags(dp_replicate_size=1, dp_shard_size=-1, sp_size=1, ep_size=1)
    check_size_flags(dp_replicate_size=4, dp_shard_size=3, sp_size=2, ep_size=8)  # no world size needed
    with pytest.raises(ValueError, match=r"--dp_replicate_size \(0\) must be >= 1; 1 switches that axis off"):
        check_size_flags(dp_replicate_size=0, dp_shard_size=-1, sp_size=1, ep_size=1)
    with pytest.raises(ValueError, match=r"--sp_size \(-3\) must be >= 1"):
        check_size_flags(dp_replicate_size=1, dp_shard_size=-1, sp_size=-3, ep_size=1)
    with pytest.raises(ValueError, match=r"--ep_size \(0\) must be >= 1"):
        check_size_flags(dp_replicate_size=1, dp_shard_size=-1, sp_size=1, ep_size=0)
    with pytest.raises(ValueError, match=r"--dp_shard_size \(0\) must be >= 1, or -1"):
        check_size_flags(dp_replicate_size=1, dp_shard_size=0, sp_size=1, ep_size=1)
    with pytest.raises(ValueError, match=r"--dp_shard_size \(-2\)"):
        check_size_flags(dp_replicate_size=1, dp_shard_size=-2, sp_size=1, ep_size=1)


# --- ParallelState on a fake process group --------------------------------------------------------------------


@pytest.fixture
def fake_world() -> Iterator[Callable[[int, int], None]]:
    """Start a fake process group (one process pretending to be `rank` of `world_size`); always torn down."""
    assert not dist.is_initialized()

    def start(rank: int, world_size: int) -> None:
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)

    try:
        yield start
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _hsdp_sp_ep_state() -> ParallelState:
    sizes = ParallelSizes.resolve(world_size=8, dp_replicate_size=2, dp_shard_size=2, sp_size=2, ep_size=2)
    return ParallelState.build(sizes)


def test_build_world_8_rank_5_mesh_and_submeshes(fake_world):
    fake_world(5, 8)
    state = _hsdp_sp_ep_state()
    assert state.rank == 5
    assert state.mesh.mesh_dim_names == ("dp_replicate", "dp_shard", "sp")
    assert tuple(state.mesh.shape) == (2, 2, 2)
    # Row-major over (dp_replicate, dp_shard, sp): rank 5 = (1, 0, 1).
    assert state.dp_size == 4
    assert state.dp_rank == 5 // 2 == 2
    assert state.sp_size == 2
    assert state.sp_rank == 5 % 2 == 1
    assert state.ep_size == 2
    assert state.world_size == 8
    assert state.gradient_average_size == 8
    assert state.submesh("dp_shard_cp").size() == 4
    assert state.submesh("dp_shard_cp").mesh.tolist() == [4, 5, 6, 7]  # the ranks of rank 5's replica
    assert state.submesh("ep").size() == 2
    assert state.submesh("efsdp").size() == 2
    assert state.submesh("ep").mesh.tolist() == [4, 5]
    assert state.submesh("efsdp").mesh.tolist() == [5, 7]
    assert state.submesh("dp").mesh.tolist() == [1, 3, 5, 7]  # every rank with sp rank 1
    assert state.submesh("sp").mesh.tolist() == [4, 5]
    assert state.submesh("dp_replicate").mesh.tolist() == [1, 5]
    assert state.submesh("dp_shard").mesh.tolist() == [5, 7]
    assert state.describe() == {"world_size": 8, "dp_replicate_size": 2, "dp_shard_size": 2, "sp_size": 2,
                                "ep_size": 2, "dp_size": 4}


@pytest.mark.parametrize("rank", range(8))
def test_build_world_8_ranks_follow_row_major_layout(fake_world, rank):
    fake_world(rank, 8)
    state = _hsdp_sp_ep_state()
    assert state.dp_rank == rank // 2
    assert state.sp_rank == rank % 2
    assert state.submesh("dp").mesh.tolist() == [r for r in range(8) if r % 2 == rank % 2]
    assert state.submesh("sp").mesh.tolist() == [rank - rank % 2, rank - rank % 2 + 1]
    assert rank in state.submesh("dp_shard_cp").mesh.tolist()


def test_build_without_ep_has_no_expert_axes(fake_world):
    fake_world(3, 4)
    state = ParallelState.build(ParallelSizes.resolve(world_size=4))
    assert tuple(state.mesh.shape) == (1, 4, 1)
    assert (state.dp_size, state.dp_rank, state.sp_rank) == (4, 3, 0)
    assert state.submesh("dp_shard_cp").size() == 4
    with pytest.raises(KeyError):
        state.submesh("ep")


def test_build_with_several_ranks_but_no_process_group_is_refused():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match=r"world size 4 but no process group; launch with `accelerate launch"):
        ParallelState.build(ParallelSizes.resolve(world_size=4))


@pytest.mark.filterwarnings("ignore:Slicing a flattened dim from root mesh:UserWarning")
def test_accelerate_parallelism_config_carries_our_mesh(fake_world):
    fake_world(5, 8)
    state = _hsdp_sp_ep_state()
    config = state.accelerate_parallelism_config()
    assert isinstance(config, ParallelismConfig)
    assert config.dp_replicate_size == 2
    assert config.dp_shard_size == 4  # dp_shard x sp: accelerate's sp means Ulysses, so sp is folded in
    assert config.total_size == 8
    assert config.device_mesh is state.mesh
    assert config.get_device_mesh("cpu") is state.mesh  # no second mesh is built
    fsdp_mesh = state.mesh[tuple(config.fsdp_dim_names)]  # what accelerate's FSDP2 path slices
    assert fsdp_mesh.mesh_dim_names == ("dp_replicate", "dp_shard_cp")
    assert tuple(fsdp_mesh.shape) == (2, 4)


# --- one process ----------------------------------------------------------------------------------------------


def test_one_process_state_has_no_mesh(tmp_path):
    state = ParallelState.from_args(_args(tmp_path), world_size=1)
    assert state.mesh is None
    assert (state.rank, state.dp_rank, state.sp_rank, state.dp_size, state.gradient_average_size) == (0, 0, 0, 1, 1)
    tensor = torch.tensor([3.0, 4.0])
    assert state.sum_over_data(tensor) is tensor
    assert torch.equal(tensor, torch.tensor([3.0, 4.0]))
    state.barrier()  # no process group needed
    with pytest.raises(ValueError, match=r"no mesh in a one-process run \(asked for 'dp'\)"):
        state.submesh("dp")
    assert state.describe() == {"world_size": 1, "dp_replicate_size": 1, "dp_shard_size": 1, "sp_size": 1,
                                "ep_size": 1, "dp_size": 1}


# --- DiffusionTrainingArguments -------------------------------------------------------------------------------


def test_arguments_refuse_ep_in_a_one_process_run(tmp_path):
    with pytest.raises(ValueError, match=r"ep_size=2.*one-process run \(world size 1\)"):
        _args(tmp_path, ep_size=2)


def test_arguments_refuse_sp_in_a_one_process_run(tmp_path):
    with pytest.raises(ValueError, match=r"sp_size=2.*one-process run \(world size 1\)"):
        _args(tmp_path, sp_size=2)


def test_arguments_refuse_rows_shorter_than_sp_blocks(tmp_path):
    with pytest.raises(ValueError, match=r"--max_seq_len \(8\) must be >= sp_size x block_size \(4 x 4 = 16\)"):
        _args(tmp_path, sp_size=4, max_seq_len=8, block_size=4)


def test_arguments_refuse_dp_shard_size_zero(tmp_path):
    with pytest.raises(ValueError, match=r"--dp_shard_size \(0\) must be >= 1, or -1"):
        _args(tmp_path, dp_shard_size=0)


def test_arguments_refuse_dp_replicate_size_zero(tmp_path):
    with pytest.raises(ValueError, match=r"--dp_replicate_size \(0\) must be >= 1"):
        _args(tmp_path, dp_replicate_size=0)


def test_arguments_accept_the_defaults(tmp_path):
    args = _args(tmp_path)
    assert (args.dp_replicate_size, args.dp_shard_size, args.sp_size, args.ep_size) == (1, -1, 1, 1)
    explicit = _args(tmp_path, dp_replicate_size=1, dp_shard_size=1)  # 1 x 1 is this one-process world
    assert (explicit.dp_replicate_size, explicit.dp_shard_size) == (1, 1)


def test_arguments_refuse_sizes_for_several_ranks_in_one_process_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"ask for several ranks, but this is a one-process run .*`accelerate launch"):
        _args(tmp_path, dp_replicate_size=2, dp_shard_size=4)
