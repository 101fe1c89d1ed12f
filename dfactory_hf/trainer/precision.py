"""bf16 compute for the routed experts under autocast (Trainer's `bf16=True` without FSDP2's mixed precision).

Why: `torch.nn.functional.grouped_mm` is not on autocast's cast list, and transformers' grouped-mm experts kernel
casts the activations to the weights' dtype. With fp32 master weights under bf16 autocast, every routed expert
(most of LLaDA2's FLOPs) then runs in fp32 while attention and the dense layers run in bf16. The registered
variant `grouped_mm_autocast` casts the expert weights to the autocast dtype for the call (differentiably, as
autocast does for `nn.Linear`: gradients reach the fp32 master weights) and runs transformers' own kernel on
them. Outside autocast, or when the weights already have that dtype (FSDP2's `MixedPrecisionPolicy` all-gathers
them in bf16), it is transformers' kernel unchanged.
"""

from __future__ import annotations

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, grouped_mm_experts_forward

AUTOCAST_GROUPED_MM = "grouped_mm_autocast"
_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias")


class _CastWeights:
    """The experts module seen with its weight tensors cast to `dtype` (everything else is the module's own)."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype):
        self._module = module
        for name in _WEIGHTS:
            weight = getattr(module, name, None)
            if isinstance(weight, torch.Tensor):
                setattr(self, name, weight.to(dtype))

    def __getattr__(self, name: str):
        return getattr(self._module, name)


def autocast_grouped_mm_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                                        top_k_weights: torch.Tensor) -> torch.Tensor:
    device_type = hidden_states.device.type
    if not torch.is_autocast_enabled(device_type):
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    dtype = torch.get_autocast_dtype(device_type)
    experts = self if self.down_proj.dtype == dtype else _CastWeights(self, dtype)
    return grouped_mm_experts_forward(experts, hidden_states.to(dtype), top_k_index, top_k_weights.to(dtype))


ALL_EXPERTS_FUNCTIONS.register(AUTOCAST_GROUPED_MM, autocast_grouped_mm_experts_forward)


def use_autocast_experts(model: torch.nn.Module) -> bool:
    """Switch a model whose experts run transformers' `grouped_mm` to the autocast-aware variant; True if so."""
    config = getattr(model, "config", None)
    if getattr(config, "_experts_implementation", None) != "grouped_mm":
        return False
    model.set_experts_implementation(AUTOCAST_GROUPED_MM)
    return True
