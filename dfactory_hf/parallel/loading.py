"""Loading a big model into FSDP2 with about one copy of the weights per machine (`fsdp_cpu_ram_efficient_loading`).

With the launch config's `fsdp_cpu_ram_efficient_loading: true`, `from_pretrained_on_rank0` reads the checkpoint
on rank 0 only and builds the model on the meta device everywhere else (transformers 5.23's `from_pretrained`
copies the whole checkpoint into every rank's model under FSDP too). After FSDP2 has sharded that model, rank 0
broadcasts each tensor in turn and every rank keeps its own shard, so a rank's host memory peaks at its shards
plus one tensor (rank 0: the model it read plus its shards).

Why our own and not accelerate's `fsdp2_load_full_state_dict`: accelerate 1.15 assumes every state-dict entry is
a DTensor and fails on persistent buffers, which FSDP2 does not shard (LLaDA2's router keeps `expert_bias` as
one, a hub key), and it leaves non-persistent buffers (rotary `inv_freq`) as rank 0's copy only where
transformers zero-filled them. Here parameters and all buffers go through one broadcast each.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def loads_on_rank0_only(args) -> bool:
    """FSDP with `fsdp_cpu_ram_efficient_loading` in a multi-process run (creates the process group if needed)."""
    from .fsdp import fsdp_requested

    if not fsdp_requested(args) or args.world_size == 1:  # world_size sets up the process group
        return False
    plugin_args = args.fsdp_plugin_args or {}
    flag = plugin_args.get("cpu_ram_efficient_loading", os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false"))
    return str(flag).lower() == "true"


def from_pretrained_on_rank0(path: str, args, **kwargs) -> torch.nn.Module:
    """`AutoModelForCausalLM.from_pretrained(path, **kwargs)` on rank 0; the same model on the meta device
    elsewhere when the run loads on rank 0 only (see `loads_on_rank0_only`), filled when FSDP2 has sharded it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    # Under expert parallel every rank (rank 0 too) starts on meta and reads only its own pieces (ShardReader).
    if not loads_on_rank0_only(args) or (dist.get_rank() == 0 and getattr(args, "ep_size", 1) == 1):
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    config = AutoConfig.from_pretrained(path)
    dtype = kwargs.pop("dtype", "auto")
    # The dtype rank 0's from_pretrained picks ("auto": the checkpoint's), or the broadcasts would not match.
    dtype = getattr(config, "dtype", None) if dtype == "auto" else dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32, **kwargs)
    return model


def wants_rank0_loading(accelerator) -> bool:
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    return bool(accelerator.is_fsdp2 and plugin.cpu_ram_efficient_loading and accelerator.num_processes > 1)


class RankZeroBroadcastLoader:
    """Capture rank 0's weights before FSDP2 shards the model; fill every rank's shards after."""

    def __init__(self, model: torch.nn.Module, accelerator, optimizer: torch.optim.Optimizer,
                 checkpoint: str | None = None, **reader_options):
        """`checkpoint`: read every rank's own pieces from this safetensors directory instead of broadcasting rank
        0's tensors (expert parallel: the model is on meta on every rank, see `ShardReader`, which takes
        `reader_options`)."""
        from torch.distributed.fsdp import CPUOffloadPolicy

        self.device = accelerator.device
        # Parameters under CPU offload live on the CPU (FSDP2 requires it), the broadcast still runs on the device.
        offload = isinstance(accelerator.state.fsdp_plugin.cpu_offload, CPUOffloadPolicy)
        self.param_device = torch.device("cpu") if offload else self.device
        # Detached views of the host tensors (no copy), kept alive on rank 0 until broadcast: not the Parameter
        # objects, whose `.data` FSDP2 moves to the device before sharding (a full device copy per tensor).
        self.reader = ShardReader(checkpoint, model.config, **reader_options) if checkpoint is not None else None
        self.full = ({name: t.detach() for name, t in _tensors(model)} if dist.get_rank() == 0 and
                     self.reader is None else None)
        # accelerate maps the optimizer's parameters to the sharded ones by data_ptr, which is 0 for every meta
        # tensor: keep each group's parameter names to map them by name instead.
        name_of = {id(t): name for name, t in _tensors(model)}
        self.group_names = [[name_of[id(p)] for p in group["params"]] for group in optimizer.param_groups]
        # accelerate's own path would run (and fail) inside prepare; this loader replaces it.
        accelerator.state.fsdp_plugin.cpu_ram_efficient_loading = False

    def rebind_optimizer(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Point the optimizer's groups at the model's current parameters, by name (after anything that replaced
        them: expert parallel before prepare, FSDP2 in prepare)."""
        current = dict(_tensors(model))
        for group, names in zip(optimizer.param_groups, self.group_names):
            group["params"] = [current[name] for name in names]

    @torch.no_grad()
    def load_into(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        self.rebind_optimizer(model, optimizer)
        if any(t.is_meta for _, t in _tensors(model)):
            model.to_empty(device=self.param_device)  # DTensor parameters keep their identity (the optimizer's)
        if self.reader is not None:
            self.reader.load_into(model)
            return
        for name, tensor in _tensors(model):
            if self.full is not None:
                full = self.full.pop(name).detach().to(self.device, tensor.dtype).contiguous()
            else:
                full = torch.empty(tensor.shape, dtype=tensor.dtype, device=self.device)
            dist.broadcast(full, src=0)
            if isinstance(tensor, DTensor):
                # src_data_rank=None: every rank already holds `full`, so each just keeps its own slice.
                shard = distribute_tensor(full, tensor.device_mesh, tensor.placements, src_data_rank=None)
                tensor.to_local().copy_(shard.to_local())
            else:
                tensor.copy_(full.to(tensor.device))
        assert not self.full, f"not in the sharded model: {sorted(self.full)[:5]}"


def _tensors(model: torch.nn.Module):
    # Activation checkpointing wraps layers after the capture; names are compared without the wrapper.
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        yield name.replace("_checkpoint_wrapped_module.", ""), tensor


class ShardReader:
    """Fill an FSDP2 / expert-parallel model (after `to_empty`) from a safetensors directory, each rank reading
    only what it holds of the routed experts: its ep range of experts (hub per-expert keys, dFactory's merged
    keys or fused keys, by `get_slice`), then its FSDP chunk of that. Other tensors are read whole, one at a time,
    and cut to the rank's shard. Host memory for experts is about 1/ep of them (`expert_bytes_read` counts it).
    Buffers the checkpoint does not hold (rotary `inv_freq`) are recomputed by the model's `_init_weights`.

    `key_of(name)`: the checkpoint key of a model tensor (a wrapped model's names differ, e.g. PEFT's);
    `initial_value(name, shape, dtype)`: the full value of a tensor the checkpoint cannot hold (LoRA adapters), or
    None; any other tensor missing from the checkpoint is an error."""

    def __init__(self, directory: str, config, *, key_of=None, initial_value=None):
        from ..models.llada2_moe.conversion import checkpoint_files

        self.directory = directory
        self.files = checkpoint_files(directory)
        self.num_experts = config.num_experts
        self.expert_bytes_read = 0
        self.key_of = key_of or (lambda name: name)
        self.initial_value = initial_value or (lambda name, shape, dtype: None)

    def _read(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.files[key], framework="pt") as handle:
            piece = handle.get_slice(key)
            return piece[rows[0]:rows[1]] if rows is not None else piece[:]

    def _expert_block(self, name: str, first: int, stop: int) -> torch.Tensor:
        """Experts [first, stop) of the fused parameter `name` (`...experts.gate_up_proj` or `...down_proj`)."""
        prefix, _, fused = name.rpartition(".")
        prefix += "."
        if f"{prefix}{first}.down_proj.weight" in self.files:  # hub: one key per expert and projection
            def stack(proj):
                return torch.stack([self._read(f"{prefix}{e}.{proj}.weight") for e in range(first, stop)])
            block = torch.cat([stack("gate_proj"), stack("up_proj")], 1) if fused == "gate_up_proj" else \
                stack("down_proj")
        elif fused == "gate_up_proj" and prefix + "gate_proj" in self.files:  # merged
            block = torch.cat([self._read(prefix + "gate_proj", (first, stop)),
                               self._read(prefix + "up_proj", (first, stop))], 1)
        elif prefix + fused in self.files:  # fused (or merged down_proj, the same key and shape)
            block = self._read(prefix + fused, (first, stop))
        else:
            raise ValueError(f"{self.directory} has no routed-expert tensors for {name} (hub, merged or fused keys)")
        self.expert_bytes_read += block.numel() * block.element_size()
        return block

    def _expert_piece(self, name: str, tensor) -> torch.Tensor:
        mesh = tensor.device_mesh
        names = mesh.mesh_dim_names
        ep_size, ep_rank = mesh.size(names.index("ep")), mesh.get_local_rank("ep")
        per_rank = self.num_experts // ep_size
        block = self._expert_block(name, ep_rank * per_rank, (ep_rank + 1) * per_rank)
        if "efsdp" in names:  # FSDP2 shards the rank's experts on dim 0 over efsdp, torch.chunk-style
            chunks = block.chunk(mesh.size(names.index("efsdp")))
            rank = mesh.get_local_rank("efsdp")
            block = chunks[rank] if rank < len(chunks) else block[:0]
        return block

    @torch.no_grad()
    def load_into(self, model: torch.nn.Module) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        def plain(name: str) -> str:
            return name.replace("_checkpoint_wrapped_module.", "")

        missing_buffers = {plain(name) for name, _ in model.named_buffers()
                           if self.key_of(plain(name)) not in self.files}
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under PEFT's wrapper
        for module_name, module in model.named_modules():
            own = {plain(f"{module_name}.{b}" if module_name else b) for b, _ in module.named_buffers(recurse=False)}
            if own & missing_buffers:
                base._init_weights(module)
        for name, tensor in _tensors(model):
            if name in missing_buffers:
                continue
            target = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            key = self.key_of(name)
            if isinstance(tensor, DTensor) and "ep" in (tensor.device_mesh.mesh_dim_names or ()):
                piece = self._expert_piece(key, tensor)
            else:
                full = self.initial_value(name, tensor.shape, tensor.dtype) if key not in self.files else None
                if full is None:
                    if key not in self.files:
                        raise ValueError(f"{self.directory} has no tensor {key!r} (for the model's {name}); is it "
                                         "a checkpoint of this model?")
                    full = self._read(key)
                piece = (distribute_tensor(full, tensor.device_mesh, tensor.placements, src_data_rank=None).to_local()
                         if isinstance(tensor, DTensor) else full)
            if tuple(piece.shape) != tuple(target.shape):
                raise ValueError(f"{self.directory}: {name} gives this rank a {tuple(piece.shape)} piece, the model "
                                 f"holds {tuple(target.shape)}")
            target.copy_(piece.to(target.dtype))
