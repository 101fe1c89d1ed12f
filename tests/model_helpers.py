"""Shared test helpers: tiny LLaDA2 models and hub-layout checkpoints written from state dicts."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

import dfactory_hf  # noqa: F401  (registers llada2_moe)
from dfactory_hf.models.llada2_moe import LLaDA2MoeForCausalLM, shipped_config


def tiny_model(seed: int = 0, **overrides) -> LLaDA2MoeForCausalLM:
    torch.manual_seed(seed)
    model = LLaDA2MoeForCausalLM(shipped_config("tiny", **overrides))
    # Non-zero expert bias so selection-only bias is exercised.
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "expert_bias"):
                module.expert_bias.copy_(torch.randn_like(module.expert_bias) * 0.05)
    return model.eval()


def to_hub_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fused in-memory experts -> the hub's per-expert keys (a literal restatement of REFERENCE 4)."""
    hub = {}
    for key, value in state_dict.items():
        if key.endswith("mlp.experts.gate_up_proj"):
            prefix = key.removesuffix("gate_up_proj")
            gate, up = value.chunk(2, dim=1)
            for expert in range(value.shape[0]):
                hub[f"{prefix}{expert}.gate_proj.weight"] = gate[expert].clone()
                hub[f"{prefix}{expert}.up_proj.weight"] = up[expert].clone()
        elif key.endswith("mlp.experts.down_proj"):
            prefix = key.removesuffix("down_proj")
            for expert in range(value.shape[0]):
                hub[f"{prefix}{expert}.down_proj.weight"] = value[expert].clone()
        else:
            hub[key] = value.clone()
    return hub


def to_merged_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fused -> dFactory's merged keys: experts.{gate,up,down}_proj [E, ...] without `.weight`."""
    merged = {}
    for key, value in state_dict.items():
        if key.endswith("mlp.experts.gate_up_proj"):
            prefix = key.removesuffix("gate_up_proj")
            gate, up = value.chunk(2, dim=1)
            merged[prefix + "gate_proj"], merged[prefix + "up_proj"] = gate.clone(), up.clone()
        else:
            merged[key] = value.clone()
    return merged


def write_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], config, **config_extra) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / "model.safetensors", metadata={"format": "pt"})
    fields = config.to_dict()
    fields.update(config_extra)
    (directory / "config.json").write_text(json.dumps(fields, indent=2))
    return directory


def literal_block_diffusion_mask(length: int, block_size: int) -> torch.Tensor:
    """Dense bool [2L, 2L] mask of REFERENCE 1 for one document, straight from the table."""
    mask = torch.zeros(2 * length, 2 * length, dtype=torch.bool)
    for i in range(2 * length):
        for j in range(2 * length):
            q_noisy, k_noisy = i < length, j < length
            bq, bk = (i % length) // block_size, (j % length) // block_size
            if q_noisy and k_noisy:
                mask[i, j] = bq == bk
            elif q_noisy:
                mask[i, j] = bq > bk
            elif not k_noisy:
                mask[i, j] = bq >= bk
    return mask
