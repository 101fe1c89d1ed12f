"""LoRA through PEFT: adapters on modules (`--lora_target_modules`) and on parameters such as the routed experts
(`--lora_target_parameters`, PEFT's `target_parameters`: one rank-r adapter per expert of a 3D expert tensor).

Adapter weights start from values that depend only on `--seed` and the parameter's name (`initial_adapter_value`),
not on whatever used the global RNG before: every rank of a run builds the same adapters, a one-process run and a
sharded one start equal, and a model that sits on the meta device until FSDP2 has sharded it (rank-0 or per-rank
loading, parallel/loading.py) gets the same values when its shards are filled.
"""

from __future__ import annotations

import math
import re
import zlib

import torch
from torch import nn

ADAPTER_KEYS = (".lora_A.", ".lora_B.")


def initial_adapter_value(name: str, shape: torch.Size | tuple, dtype: torch.dtype, seed: int) -> torch.Tensor | None:
    """PEFT's default LoRA init (`init_lora_weights=True`) from a generator seeded by (seed, name): A
    Kaiming-uniform as `nn.Linear` (bound 1/sqrt(fan_in)), B zeros; None for a tensor that is not an adapter."""
    if ".lora_B." in name:
        return torch.zeros(shape, dtype=dtype)
    if ".lora_A." not in name:
        return None
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    bound = 1 / math.sqrt(shape[-1])
    return ((torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound).to(dtype)


def apply_lora(model: nn.Module, args, peft_config=None) -> nn.Module:
    """`get_peft_model` with the arguments' LoRA fields (or `peft_config` as given); adapters initialised by
    `initial_adapter_value` where the config asks for PEFT's default init."""
    from peft import LoraConfig, get_peft_model
    from peft.utils.error import NoMatchingPeftModuleError

    if peft_config is None:
        targets = args.lora_target_modules
        peft_config = LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=targets[0] if targets == ["all-linear"] else targets,
            target_parameters=list(args.lora_target_parameters) or None,
        )
    _check_target_parameters(model, peft_config.target_parameters or [])
    try:
        model = get_peft_model(model, peft_config)
    except NoMatchingPeftModuleError as error:
        raise ValueError(f"--lora_target_modules ({peft_config.target_modules}): {error} Module names of this "
                         f"model: {_linear_names(model)}.") from error
    if peft_config.init_lora_weights is True:
        with torch.no_grad():
            for name, param in model.named_parameters():
                value = initial_adapter_value(name, param.shape, param.dtype, args.seed)
                if value is not None and not param.is_meta:  # meta ones are filled by the loader
                    param.copy_(value)
    return model


def _check_target_parameters(model: nn.Module, targets) -> None:
    # PEFT only warns when a target parameter matches nothing, and the run would then train without it.
    names = [name for name, _ in model.named_parameters()]
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in names):
            candidates = sorted({".".join(name.split(".")[-2:]) for name, p in model.named_parameters()
                                 if p.ndim == 3})
            raise ValueError(f"--lora_target_parameters: {target!r} matches no parameter of "
                             f"{type(model).__name__}; parameters PEFT can adapt per expert: {candidates or 'none'}.")


def _linear_names(model: nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)})


def checkpoint_key(name: str) -> str:
    """The base model's checkpoint key of a PeftModel parameter name (`base_model.model.` and `.base_layer`
    dropped); other names as they are."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    return re.sub(r"(\.base_layer)+\.", ".", name)


def base_model(model: nn.Module) -> nn.Module:
    """The model under PEFT's wrappers (itself when there are none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
