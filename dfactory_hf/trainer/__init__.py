"""Block-diffusion SFT on transformers.Trainer: arguments, trainer, the shared forward step."""

from .config import DiffusionTrainingArguments
from .forward import DiffusionObjective, diffusion_step
from .trainer import DiffusionTrainer

__all__ = ["DiffusionObjective", "DiffusionTrainer", "DiffusionTrainingArguments", "diffusion_step"]
