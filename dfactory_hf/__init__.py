"""dfactory_hf: fine-tune block-diffusion language models (LLaDA2.0) with transformers.Trainer."""

from .models.llada2_moe import LLaDA2MoeConfig, LLaDA2MoeForCausalLM, LLaDA2MoeModel
from .models.llada2_moe import register as _register_llada2_moe

_register_llada2_moe()

__version__ = "0.1.0"
__all__ = ["LLaDA2MoeConfig", "LLaDA2MoeForCausalLM", "LLaDA2MoeModel"]
