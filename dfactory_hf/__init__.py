"""dfactory_hf: fine-tune block-diffusion language models (LLaDA2.0) with transformers.Trainer."""

from .generation import generate
from .models.llada2_moe import LLaDA2MoeConfig, LLaDA2MoeForCausalLM, LLaDA2MoeModel
from .models.llada2_moe import register as _register_llada2_moe
from .trainer import DiffusionTrainer, DiffusionTrainingArguments

_register_llada2_moe()

__version__ = "0.1.0"
__all__ = [
    "DiffusionTrainer",
    "DiffusionTrainingArguments",
    "LLaDA2MoeConfig",
    "LLaDA2MoeForCausalLM",
    "LLaDA2MoeModel",
    "generate",
]
