"""`ParallelState`: the parallel degrees of a run, validated once, and the one `DeviceMesh` that holds them.

Built from the arguments by the trainer (`trainer.parallel_state`) and passed to what needs a rank, a size, a
gather or a reduce; the model never sees it. The layout follows torchtitan:

    world = dp_replicate x dp_shard x sp
    mesh dims  ("dp_replicate", "dp_shard", "sp")            (row-major: sp ranks are neighbours)
    "dp"          = dp_replicate x dp_shard   the data axis: the sampler, the token count, evaluation
    "dp_shard_cp" = dp_shard x sp             the FSDP shard axis: ranks that hold shards of the same parameters
                                              (accelerate's name for it, so its FSDP2 path finds it)
    "efsdp" x "ep" = dp_shard_cp            expert axes when ep > 1: experts borrow ranks from the shard and
                                              sequence axes and are FSDP-sharded over what remains (efsdp;
                                              with HSDP over ("dp_replicate", "efsdp"))

Every sp rank of a data replica sees the same documents; every data replica sees its own. FSDP/DDP average
gradients over all `world` ranks, which is why the loss is multiplied by `gradient_average_size`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

LAUNCH_HINT = ("launch with `accelerate launch --config_file configs/accelerate/cpu_fsdp2.yaml --num_processes N` "
               "(CPU) or configs/accelerate/fsdp2.yaml (GPUs)")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def check_size_flags(*, dp_replicate_size: int, dp_shard_size: int, sp_size: int, ep_size: int) -> None:
    """The checks that need no world size (run at argument parsing)."""
    for flag, value in (("dp_replicate_size", dp_replicate_size), ("sp_size", sp_size), ("ep_size", ep_size)):
        if value < 1:
            raise ValueError(f"--{flag} ({value}) must be >= 1; 1 switches that axis off.")
    if dp_shard_size == 0 or dp_shard_size < -1:
        raise ValueError(f"--dp_shard_size ({dp_shard_size}) must be >= 1, or -1 for every rank the other sizes "
                         "leave.")


@dataclass(frozen=True)
class ParallelSizes:
    """Validated degrees; `dp_shard` already resolved from -1."""

    world_size: int
    dp_replicate: int = 1
    dp_shard: int = 1
    sp: int = 1
    ep: int = 1

    @classmethod
    def resolve(cls, *, world_size: int, dp_replicate_size: int = 1, dp_shard_size: int = -1, sp_size: int = 1,
                ep_size: int = 1, num_experts: int | None = None) -> ParallelSizes:
        """Check the flags against the world size (and the model's expert count); raise naming flag, rule and fix."""
        check_size_flags(dp_replicate_size=dp_replicate_size, dp_shard_size=dp_shard_size, sp_size=sp_size,
                         ep_size=ep_size)
        if world_size == 1 and max(dp_replicate_size, dp_shard_size, sp_size, ep_size) > 1:
            raise ValueError(
                f"dp_replicate_size={dp_replicate_size}, dp_shard_size={dp_shard_size}, sp_size={sp_size}, "
                f"ep_size={ep_size} ask for several ranks, but this is a one-process run (world size 1); "
                f"{LAUNCH_HINT}, or set the sizes to 1 (dp_shard_size -1).")
        others = dp_replicate_size * sp_size
        if dp_shard_size == -1:
            if world_size % others:
                raise ValueError(
                    f"dp_replicate_size x sp_size ({dp_replicate_size} x {sp_size} = {others}) must divide the world "
                    f"size ({world_size}) so dp_shard_size=-1 can take the rest; use sizes whose product divides "
                    f"{world_size} ({_divisors(world_size)}).")
            dp_shard_size = world_size // others
        product = dp_replicate_size * dp_shard_size * sp_size
        if product != world_size:
            raise ValueError(
                f"dp_replicate_size x dp_shard_size x sp_size = {dp_replicate_size} x {dp_shard_size} x {sp_size} = "
                f"{product}, but the run has {world_size} processes; make the product {world_size}, e.g. "
                f"--dp_shard_size -1 to give the shard axis every rank the others leave.")
        shard_group = dp_shard_size * sp_size
        if shard_group % ep_size:
            raise ValueError(
                f"ep_size ({ep_size}) must divide dp_shard_size x sp_size ({dp_shard_size} x {sp_size} = "
                f"{shard_group}): experts borrow their ranks from the shard and sequence axes; use one of "
                f"{_divisors(shard_group)}.")
        if num_experts is not None and num_experts % ep_size:
            raise ValueError(
                f"ep_size ({ep_size}) must divide the model's routed expert count ({num_experts}) so every rank "
                f"holds the same number of experts; use one of {_divisors(num_experts)} that also divides "
                f"{shard_group}.")
        return cls(world_size=world_size, dp_replicate=dp_replicate_size, dp_shard=dp_shard_size, sp=sp_size,
                   ep=ep_size)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_shard(self) -> int:
        return self.dp_shard * self.sp

    @property
    def efsdp(self) -> int:
        """Ranks of one replica holding the same experts (FSDP shards them over these)."""
        return self.fsdp_shard // self.ep


@dataclass
class ParallelState:
    """Sizes, this process's ranks, and the mesh (None in a one-process run)."""

    sizes: ParallelSizes
    rank: int = 0
    mesh: object | None = None  # torch.distributed.device_mesh.DeviceMesh with the named dims above
    _flattened: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, sizes: ParallelSizes, *, device_type: str = "cpu") -> ParallelState:
        if sizes.world_size == 1:
            return cls(sizes=sizes)
        if not dist.is_initialized():
            raise ValueError(f"world size {sizes.world_size} but no process group; {LAUNCH_HINT}.")
        if dist.get_world_size() != sizes.world_size:
            raise ValueError(f"parallel sizes for {sizes.world_size} ranks, but the process group has "
                             f"{dist.get_world_size()}; resolve the sizes with world_size={dist.get_world_size()}.")
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device_type, (sizes.dp_replicate, sizes.dp_shard, sizes.sp),
                                mesh_dim_names=("dp_replicate", "dp_shard", "sp"))
        # Keep the flattened meshes: looking them up by name on the root mesh is deprecated in torch.
        flattened = {"dp": mesh["dp_replicate", "dp_shard"]._flatten("dp"),
                     "dp_shard_cp": mesh["dp_shard", "sp"]._flatten("dp_shard_cp")}
        if sizes.ep > 1:
            # (dp_replicate, efsdp, ep, ep_tp): transformers' EP dispatch also takes the group of ranks that hold
            # the same tokens, which is every rank alone here (size-1 "ep_tp").
            hsdp = mesh["dp_replicate", "dp_shard_cp"]
            flattened["experts"] = hsdp._unflatten(
                1, (sizes.fsdp_shard // sizes.ep, sizes.ep, 1), ("efsdp", "ep", "ep_tp"))
        return cls(sizes=sizes, rank=dist.get_rank(), mesh=mesh, _flattened=flattened)

    @classmethod
    def from_args(cls, args, *, world_size: int, num_experts: int | None = None,
                  device_type: str = "cpu") -> ParallelState:
        sizes = ParallelSizes.resolve(world_size=world_size, dp_replicate_size=args.dp_replicate_size,
                                      dp_shard_size=args.dp_shard_size, sp_size=args.sp_size, ep_size=args.ep_size,
                                      num_experts=num_experts)
        return cls.build(sizes, device_type=device_type)

    # --- sizes and ranks -------------------------------------------------------------------------------------

    @property
    def world_size(self) -> int:
        return self.sizes.world_size

    @property
    def dp_size(self) -> int:
        """Data replicas: each sees its own documents."""
        return self.sizes.dp

    @property
    def dp_rank(self) -> int:
        return self._local_rank("dp")

    @property
    def sp_size(self) -> int:
        return self.sizes.sp

    @property
    def sp_rank(self) -> int:
        return 0 if self.mesh is None else self.mesh["sp"].get_local_rank()

    @property
    def ep_size(self) -> int:
        return self.sizes.ep

    @property
    def gradient_average_size(self) -> int:
        """Ranks whose gradients FSDP/DDP average (every rank): the loss is pre-multiplied by it."""
        return self.sizes.world_size

    def submesh(self, name: str):
        """A named axis: "dp_replicate", "dp_shard", "sp", or the flattened "dp", "dp_shard_cp", "efsdp", "ep"."""
        if self.mesh is None:
            raise ValueError(f"no mesh in a one-process run (asked for {name!r})")
        if name in ("efsdp", "ep", "ep_tp"):
            return self._flattened["experts"][name]
        return self._flattened[name] if name in self._flattened else self.mesh[name]

    def expert_shard_mesh(self):
        """The ranks holding the same experts: "efsdp", with HSDP ("dp_replicate", "efsdp")."""
        experts = self._flattened["experts"]
        return experts["dp_replicate", "efsdp"] if self.sizes.dp_replicate > 1 else experts["efsdp"]

    def _local_rank(self, name: str) -> int:
        return 0 if self.mesh is None else self.submesh(name).get_local_rank()

    # --- collectives -----------------------------------------------------------------------------------------

    def sum_over_data(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over data replicas (one value per replica: sp ranks of a replica hold the same batch)."""
        if self.dp_size == 1:
            return tensor
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.submesh("dp").get_group())
        return tensor

    def sum_over_world(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over every rank: for per-rank partial sums (each sp rank holds part of a replica's positions)."""
        if self.world_size == 1:
            return tensor
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def describe(self) -> dict[str, int]:
        s = self.sizes
        return {"world_size": s.world_size, "dp_replicate_size": s.dp_replicate, "dp_shard_size": s.dp_shard,
                "sp_size": s.sp, "ep_size": s.ep, "dp_size": s.dp}

    # --- handing the mesh to accelerate ----------------------------------------------------------------------

    def accelerate_parallelism_config(self):
        """accelerate's `ParallelismConfig` carrying this mesh, so accelerate's FSDP2 shards over our
        "dp_shard_cp" axis (and "dp_replicate" for HSDP) instead of building a second mesh of its own.

        accelerate's `sp_size` means DeepSpeed Ulysses, so our sequence axis is folded into its shard size: its
        total must equal the world size, and FSDP shards over dp_shard x sp either way.
        """
        from accelerate import ParallelismConfig

        config = ParallelismConfig(dp_replicate_size=self.sizes.dp_replicate, dp_shard_size=self.sizes.fsdp_shard)
        # accelerate's get_device_mesh returns a preset mesh instead of building one.
        config.device_mesh = self.mesh
        return config
