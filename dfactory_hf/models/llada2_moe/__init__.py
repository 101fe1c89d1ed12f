"""LLaDA2-MoE for transformers 5 (`model_type="llada2_moe"`); `register()` wires it into the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_llada2_moe import LLaDA2MoeConfig
from .conversion import convert_checkpoint, load_checkpoint_weights, register_conversions, validate_expert_tensors
from .modeling_llada2_moe import LLaDA2MoeForCausalLM, LLaDA2MoeModel, LLaDA2MoePreTrainedModel
from .shipped import SHIPPED_CONFIGS, shipped_config


def register() -> None:
    """Make `AutoModelForCausalLM.from_pretrained(path)` build ours for `model_type` llada2_moe (idempotent)."""
    AutoConfig.register("llada2_moe", LLaDA2MoeConfig, exist_ok=True)
    AutoModel.register(LLaDA2MoeConfig, LLaDA2MoeModel, exist_ok=True)
    AutoModelForCausalLM.register(LLaDA2MoeConfig, LLaDA2MoeForCausalLM, exist_ok=True)
    register_conversions()


__all__ = [
    "LLaDA2MoeConfig",
    "LLaDA2MoeForCausalLM",
    "LLaDA2MoeModel",
    "LLaDA2MoePreTrainedModel",
    "SHIPPED_CONFIGS",
    "convert_checkpoint",
    "load_checkpoint_weights",
    "register",
    "shipped_config",
    "validate_expert_tensors",
]
