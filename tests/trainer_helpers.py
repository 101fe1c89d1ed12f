"""Shared pieces for Trainer-level tests: the shipped tokenizer, tiny models, small arithmetic datasets."""

from __future__ import annotations

import torch

import dfactory_hf  # noqa: F401
from dfactory_hf import DiffusionTrainer, DiffusionTrainingArguments
from dfactory_hf.demo.arithmetic import make_arithmetic_dataset
from dfactory_hf.demo.tokenizer import load_demo_tokenizer
from dfactory_hf.models.llada2_moe import LLaDA2MoeForCausalLM, shipped_config

TOKENIZER = load_demo_tokenizer()


def demo_model(seed: int = 0, attn_implementation: str = "sdpa", **overrides) -> LLaDA2MoeForCausalLM:
    torch.manual_seed(seed)
    config = shipped_config("tiny", pad_token_id=TOKENIZER.pad_token_id, eos_token_id=TOKENIZER.eos_token_id,
                            **overrides)
    config._attn_implementation = attn_implementation
    return LLaDA2MoeForCausalLM(config)


def demo_data(num_train: int = 64, num_test: int = 16, seed: int = 0, task: str = "add2"):
    return make_arithmetic_dataset(num_train, num_test, seed=seed, task=task)


def demo_args(tmp_path, **overrides) -> DiffusionTrainingArguments:
    values = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        block_size=4,
        max_seq_len=64,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=3e-3,
        max_steps=4,
        logging_steps=2,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        eval_mask_rates=[],
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
    )
    values.update(overrides)
    return DiffusionTrainingArguments(**values)


def demo_trainer(tmp_path, model=None, data=None, answer_scorer=None, **overrides) -> DiffusionTrainer:
    data = data if data is not None else demo_data()
    return DiffusionTrainer(
        model=model if model is not None else demo_model(),
        args=demo_args(tmp_path, **overrides),
        train_dataset=data["train"],
        eval_dataset=data["test"],
        processing_class=TOKENIZER,
        answer_scorer=answer_scorer,
    )


def record_collated(trainer, keep=lambda features: features) -> list:
    """What the trainer's collator receives, one entry per micro-batch (`keep(features)`), in order."""
    seen = []
    original = trainer.data_collator.__call__

    class Recording(type(trainer.data_collator)):
        def __call__(self, features):
            seen.append(keep(features))
            return original(features)

    trainer.data_collator.__class__ = Recording
    return seen
