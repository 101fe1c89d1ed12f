"""FSDP2 through accelerate, with one code path on GPU (nccl) and CPU (gloo).

accelerate only turns an FSDP request into FSDP for GPU-like backends: on CPU (`MULTI_CPU`) it silently falls
back to DDP (and `ParallelismConfig` refuses `MULTI_CPU`). `engage_fsdp_on_cpu` relabels the process state as
multi-device before the `Accelerator` is built, so accelerate takes its FSDP2 branch; the device stays the CPU
and the process group stays gloo. `check_fsdp_engaged` then fails loudly if FSDP2 still did not engage.
"""

from __future__ import annotations

import os

import torch

FSDP_ENV = "ACCELERATE_USE_FSDP"  # set by `accelerate launch` from an FSDP config


def fsdp_requested(args) -> bool:
    """FSDP asked for by the launch config (`accelerate launch --config_file fsdp*.yaml`) or by `--fsdp`."""
    return args.fsdp_plugin_args is not None or os.environ.get(FSDP_ENV, "false").lower() == "true"


def engage_fsdp_on_cpu(args) -> None:
    from accelerate.state import DistributedType, PartialState

    if not fsdp_requested(args):
        return
    state = PartialState()
    if state.distributed_type == DistributedType.MULTI_CPU:
        # accelerate has no CPU FSDP branch although FSDP2 runs on gloo; without this it trains DDP silently.
        # Only the label changes (the device and backend stay CPU / gloo); pinned to accelerate 1.15 in setup.cfg.
        state.distributed_type = DistributedType.MULTI_GPU


def check_fsdp_engaged(accelerator, args) -> None:
    if not fsdp_requested(args):
        return
    if not accelerator.is_fsdp2:
        version = getattr(getattr(accelerator.state, "fsdp_plugin", None), "fsdp_version", None)
        raise ValueError(
            f"FSDP was requested but accelerate set up {accelerator.distributed_type} (fsdp_version {version}); "
            "dfactory_hf trains with FSDP2 only: set `fsdp_version: 2` in the launch config "
            "(configs/accelerate/cpu_fsdp2.yaml on CPU) and launch with `accelerate launch`.")


def check_fsdp_layout(model: torch.nn.Module, args, sizes) -> None:
    """Before any data work (accelerate would only say so when train() starts): something to shard over, and
    the sharding unit named by the launch config (or `--fsdp_config`) present in the model."""
    if sizes.world_size > 1 and sizes.fsdp_shard == 1:
        raise ValueError(
            f"FSDP is requested but dp_shard_size x sp_size is 1 (dp_replicate_size={sizes.dp_replicate} takes all "
            f"{sizes.world_size} ranks): nothing to shard over. Use --dp_shard_size -1, or launch without the FSDP "
            "config for plain data parallel.")
    check_fsdp_wrap_classes(model, args)


def check_fsdp_wrap_classes(model: torch.nn.Module, args) -> None:
    plugin_args = args.fsdp_plugin_args or {}
    names = plugin_args.get("transformer_cls_names_to_wrap") or os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP")
    if not names:
        return  # accelerate then wraps the model's `_no_split_modules`
    present = {type(m).__name__ for m in model.modules()}
    missing = [name for name in names.split(",") if name.strip() and name.strip() not in present]
    if missing:
        layers = getattr(model, "_no_split_modules", None)
        raise ValueError(f"fsdp_transformer_layer_cls_to_wrap ({names}) names no module of {type(model).__name__} "
                         f"(missing: {missing}); set it to the model's decoder layer class ({layers}).")


def unpin_cpu_offload(accelerator) -> None:
    """CPU offload on a machine without an accelerator: pinned host memory needs a device, so do not pin."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if accelerator.device.type == "cpu" and isinstance(getattr(plugin, "cpu_offload", None), CPUOffloadPolicy):
        plugin.cpu_offload = CPUOffloadPolicy(pin_memory=False)


def take_activation_checkpointing_switch(args) -> bool:
    """One switch for activation checkpointing: the recipe's `gradient_checkpointing`.

    Under FSDP2 it is applied as FSDP's own checkpoint wrapper around each decoder layer (transformers refuses
    both at once, and its own checkpointing adds an all-gather in backward), so it is taken off the arguments
    before the Accelerator is built and handed to the FSDP plugin after (`apply_activation_checkpointing`). A
    launch config that also sets `fsdp_activation_checkpointing: true` asks for the same thing: not an error.
    """
    if not (fsdp_requested(args) and args.activation_checkpointing):
        return False
    args.activation_checkpointing = args.gradient_checkpointing = False
    return True


def apply_activation_checkpointing(accelerator, requested: bool) -> None:
    if requested:
        accelerator.state.fsdp_plugin.activation_checkpointing = True


def sharded_parameter_count(model: torch.nn.Module) -> tuple[int, int]:
    """(DTensor parameters, all parameters): FSDP2 engaged iff the first is the second."""
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    return sum(isinstance(p, DTensor) for p in params), len(params)
