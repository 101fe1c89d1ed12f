"""What `DiffusionTrainer.__init__` checks and builds from the arguments, the tokenizer and the model, before any
data work: the special token ids, the attention backend, the collator."""

from __future__ import annotations

import math
from dataclasses import replace

from ..data.collators import PackingCollator, PaddingCollator, PositionIdCollator
from ..data.sampler import TokenBudgetBatchSampler
from ..diffusion.masks import ATTN_IMPLEMENTATIONS
from ..parallel.ulysses import base_backend
from .config import DiffusionTrainingArguments


def resolve_mask_token_id(args: DiffusionTrainingArguments, tokenizer) -> int:
    mask_token_id = args.mask_token_id if args.mask_token_id is not None else tokenizer.mask_token_id
    if mask_token_id is None:
        raise ValueError(
            "The tokenizer has no mask token and --mask_token_id is not set; set tokenizer.mask_token "
            "(e.g. '<|mask|>') or pass --mask_token_id <id> (LLaDA2.0 uses 156895)."
        )
    vocab = len(tokenizer)
    if not 0 <= mask_token_id < max(vocab, 1):
        raise ValueError(f"mask_token_id ({mask_token_id}) is outside the tokenizer's vocabulary (size {vocab}).")
    return mask_token_id


def check_special_ids_embed(vocab_size: int | None, **ids: int | None) -> None:
    """The mask, pad and EOS ids go into every batch: an id the model cannot embed fails inside the first step."""
    for name, token_id in ids.items():
        if vocab_size is not None and token_id is not None and not 0 <= token_id < vocab_size:
            raise ValueError(f"The {name} token id ({token_id}) is outside the model's vocabulary (vocab_size "
                             f"{vocab_size}); use the tokenizer the model was trained with, or a model whose "
                             "vocab_size covers it.")


def check_answer_scorer(answer_scorer, args: DiffusionTrainingArguments):
    """Generation-based evaluation needs a way to tell a right answer; the package knows no task's format."""
    if answer_scorer is not None and not callable(answer_scorer):
        raise ValueError(f"answer_scorer ({answer_scorer!r}) must be a callable (generated text, reference answer) "
                         "-> bool, e.g. dfactory_hf.demo.arithmetic.exact_match.")
    if answer_scorer is None and args.eval_generation_samples > 0:
        raise ValueError(f"--eval_generation_samples ({args.eval_generation_samples}) scores generated answers: pass "
                         "DiffusionTrainer(..., answer_scorer=<callable (generated text, reference answer) -> bool>), "
                         "e.g. dfactory_hf.demo.arithmetic.exact_match for the arithmetic demo, or set "
                         "--eval_generation_samples 0.")
    return answer_scorer


def build_collator(args: DiffusionTrainingArguments, *, mask_token_id: int, pad_token_id: int, seed: int | None = None,
                   edit_token_ids: tuple[int, ...] | None = None):
    common = dict(
        edit_noise_rate=args.edit_noise_rate,
        edit_token_ids=edit_token_ids,
        supervise_kept=args.edit_keep_weight > 0,
        mask_token_id=mask_token_id,
        pad_token_id=pad_token_id,
        block_size=args.block_size,
        noise_range_low=args.noise_range_low,
        noise_range_high=args.noise_range_high,
        complementary_masking=args.complementary_masking,
        min_masked_tokens=args.min_masked_tokens,
        seed=args.seed if seed is None else seed,
    )
    if args.packing:
        return PackingCollator(**common, max_seq_len=args.max_seq_len)
    if args.padding_free:
        return PositionIdCollator(**common)
    return PaddingCollator(**common, max_seq_len=args.max_seq_len, pad_to_max_seq_len=args.pad_to_max_seq_len)


def masking_only(collator, mask_rate: float):
    """The evaluation collator at one fixed mask rate of the ELBO grid: the bound is over the masking process
    alone, so no edit stream, no kept-token supervision and no complementary copy."""
    return replace(collator, fixed_mask_rate=mask_rate, complementary_masking=False, edit_noise_rate=0.0,
                   supervise_kept=False)


def has_given_noise(dataset) -> bool:
    return dataset is not None and "noisy_input_ids" in dataset.column_names


def check_attention_backend(model, args, *, training: bool) -> None:
    implementation = base_backend(model.config._attn_implementation)
    if implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation ({implementation!r}) cannot take the block-diffusion mask; load the model with "
            f"attn_implementation in {ATTN_IMPLEMENTATIONS} (flex_attention on GPU, sdpa elsewhere)."
        )
    if training and implementation == "flex_attention" and args.device.type == "cpu":
        raise ValueError("flex_attention has no backward pass on CPU; train on CPU with attn_implementation='sdpa' "
                         "(flex_attention is the GPU path).")


def check_generation_eval(args, eval_dataset) -> None:
    """Generation-based evaluation (and the stop on its exact match) needs held-out rows with an `answer`."""
    if args.eval_generation_samples == 0 or eval_dataset is None:  # Trainer refuses an eval_strategy without data
        return
    datasets = eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset]
    if any("answer" not in dataset.column_names for dataset in datasets):
        stop = args.stop_at_exact_match > 0
        fix = "--stop_at_exact_match 0 --eval_generation_samples 0" if stop else "--eval_generation_samples 0"
        raise ValueError(f"{'--stop_at_exact_match' if stop else '--eval_generation_samples'} needs an eval dataset "
                         f"with an `answer` column (the reference answer each generated completion is scored "
                         f"against; eval_generation_samples={args.eval_generation_samples}); add the column, or "
                         f"pass {fix}.")


def token_budget_sampler(args, dataset, parallel_state) -> TokenBudgetBatchSampler:
    """The token-budget batch sampler of the training documents (packing / max_tokens_per_micro_batch)."""
    copies = 2 if args.complementary_masking else 1
    budget = args.token_budget
    if copies == 2 and 2 * max(dataset["num_tokens"]) > budget:
        raise ValueError(
            f"complementary_masking doubles each document, and the longest ({max(dataset['num_tokens'])} tokens) "
            f"then exceeds the token budget ({budget}); raise max_tokens_per_micro_batch to at least "
            f"{copies * max(dataset['num_tokens'])}."
        )
    warmup_steps, warmup_tokens = 0, None
    if args.batch_warmup_ratio > 0:
        warmup_steps = max(1, round(args.batch_warmup_ratio * planned_optimizer_steps(args, dataset, parallel_state)))
        warmup_tokens = args.batch_warmup_initial_tokens or args.max_seq_len * copies
    return TokenBudgetBatchSampler(
        lengths=[n * copies for n in dataset["num_tokens"]],
        max_tokens_per_micro_batch=budget,
        data_parallel_rank=parallel_state.dp_rank,
        data_parallel_size=parallel_state.dp_size,
        seed=args.data_seed if args.data_seed is not None else args.seed,
        buffer_size=args.dynamic_batching_buffer_size,
        micro_batches_per_step=args.gradient_accumulation_steps,
        warmup_initial_tokens=warmup_tokens,
        num_warmup_steps=warmup_steps,
        padded=not (args.packing or args.padding_free),
        # Rows planned by the sampler (the collator refills them in order). Complementary pairs are planned
        # as one document of twice the length, which may not fit a row; those keep the token-sum plan.
        row_length=args.max_seq_len if args.packing and copies == 1 else None,
    )


def planned_optimizer_steps(args, dataset, parallel_state) -> int:
    if args.max_steps > 0:
        return args.max_steps
    tokens = sum(dataset["num_tokens"]) * (2 if args.complementary_masking else 1)
    per_step = args.token_budget * parallel_state.dp_size * args.gradient_accumulation_steps
    return max(1, math.ceil(args.num_train_epochs * tokens / per_step))
