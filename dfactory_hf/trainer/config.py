"""`DiffusionTrainingArguments`: `TrainingArguments` plus the block-diffusion SFT knobs.

Names follow the public LLaDA2 recipe (dFactory) where it had one (`block_diffusion_mode`, `block_size`,
`noise_range_low/high`, `same_token_labels`, `confidence_beta`, `max_seq_len`). Parsed by
`trl.TrlParser` / `HfArgumentParser`, so every field is a CLI flag and can come from `--config recipe.yaml`.
Validation lives in an idempotent `__post_init__` and names the flag, its value, the rule and the fix.
"""

from __future__ import annotations

import math
import os
from dataclasses import MISSING, dataclass, field, fields

import torch
from transformers import TrainingArguments

from ..data.preprocessing import SUPERVISE_TURNS
from ..diffusion.loss import LOSS_WEIGHTING_MODES
from ..diffusion.noise import validate_edit_noise_rate, validate_noise_range
from ..parallel.state import ParallelSizes
from .checkpoints import check_resume_path
from .profiling import parse_profile_steps

OVERLONG_POLICIES = ("skip", "truncate")


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


SEED_RANGE = 2**32  # numpy's seed range: transformers' set_seed seeds numpy too

# Ranges of the numeric `TrainingArguments` flags that reach the diffusion run: (flag, accepts(value), rule, fix).
# Checked before anything else, so a value out of range is refused at parsing, not by torch after data preparation
# (a batch size of 0, a negative learning rate) nor by a run that exits 0 having trained nothing (gradient
# accumulation -1). `None` is accepted wherever the field is optional.
TRAINING_RANGES = (
    ("per_device_train_batch_size", lambda v: v >= 1, ">= 1", "use 1 or more (documents per device per micro-batch)"),
    ("per_device_eval_batch_size", lambda v: v >= 1, ">= 1", "use 1 or more"),
    ("gradient_accumulation_steps", lambda v: v >= 1, ">= 1",
     "use 1 for no accumulation (micro-batches per optimizer step)"),
    ("eval_accumulation_steps", lambda v: v >= 1, ">= 1", "leave it unset to keep every prediction on the device"),
    ("learning_rate", lambda v: _finite(v) and v >= 0, "a finite number >= 0",
     "the LLaDA2 recipe uses 1e-5, the tiny demo 3e-3"),
    ("weight_decay", lambda v: _finite(v) and v >= 0, "a finite number >= 0", "use 0 to disable it (the recipe uses 0.1)"),
    ("adam_beta1", lambda v: _finite(v) and 0 <= v < 1, "in [0, 1)", "the default is 0.9"),
    ("adam_beta2", lambda v: _finite(v) and 0 <= v < 1, "in [0, 1)", "the default is 0.999"),
    ("adam_epsilon", lambda v: _finite(v) and v >= 0, "a finite number >= 0", "the default is 1e-8"),
    ("max_grad_norm", lambda v: _finite(v) and v >= 0, "a finite number >= 0", "use 0 to disable clipping (the "
                                                                                "recipe uses 1.0)"),
    ("num_train_epochs", _finite, "a finite number", "use 1 or more"),
    ("warmup_steps", lambda v: _finite(v) and v >= 0, "a finite number >= 0",
     "a count of steps, or a fraction < 1 of the planned steps (the recipe uses 0.03)"),
    ("logging_steps", lambda v: _finite(v) and v > 0, "> 0", "a count of steps, or a fraction < 1 of the planned steps"),
    ("save_steps", lambda v: _finite(v) and v > 0, "> 0", "a count of steps, or a fraction < 1 of the planned steps"),
    ("eval_steps", lambda v: _finite(v) and v > 0, "> 0", "leave it unset to evaluate every --logging_steps"),
    ("save_total_limit", lambda v: v >= 0, ">= 0", "checkpoints kept in output_dir; leave it unset to keep all"),
    ("dataloader_num_workers", lambda v: v >= 0, ">= 0", "use 0 to load in the main process"),
    ("dataloader_prefetch_factor", lambda v: v >= 1, ">= 1", "leave it unset for torch's default"),
    ("seed", lambda v: 0 <= v < SEED_RANGE, f"in [0, {SEED_RANGE})", "e.g. 42"),
    ("data_seed", lambda v: 0 <= v < SEED_RANGE, f"in [0, {SEED_RANGE})", "leave it unset to use --seed"),
    ("label_smoothing_factor", lambda v: v == 0, "0", "the diffusion loss does not take label smoothing; remove it"),
)



@dataclass
class DiffusionTrainingArguments(TrainingArguments):
    # --- the diffusion objective -------------------------------------------------------------------------
    block_diffusion_mode: bool = field(
        default=True,
        metadata={"help": "True: block diffusion (one forward over [x_t ; x_0], 2L tokens, block-causal over "
                          "clean blocks, bidirectional inside the noisy block). False: full-attention masked "
                          "diffusion (MDLM) over x_t alone (L tokens)."},
    )
    block_size: int = field(
        default=32,
        metadata={"help": "Tokens per diffusion block (> 0). Responses are EOS-filled to a multiple of it; "
                          "max_seq_len must be a multiple of it. LLaDA2 uses 32."},
    )
    noise_range_low: float = field(
        default=0.3, metadata={"help": "Lower end of the per-sample mask rate t ~ U[low, high], in (0, 1]."}
    )
    noise_range_high: float = field(
        default=0.8, metadata={"help": "Upper end of the per-sample mask rate t, in [noise_range_low, 1]."}
    )
    same_token_labels: bool = field(
        default=True,
        metadata={"help": "True: the logit at position p predicts the clean token at p (LLaDA2). False: it "
                          "predicts the token at p + 1 (next-token shift, dFactory's code default)."},
    )
    confidence_beta: float = field(
        default=0.0,
        metadata={"help": "Weight (>= 0) of the CAP auxiliary loss: entropy at supervised positions whose argmax "
                          "is already right. 0 disables it; dFactory recommends 2.0."},
    )
    complementary_masking: bool = field(
        default=False,
        metadata={"help": "Turn each sample into two rows with complementary masks over its response, so every "
                          "response token is supervised exactly once per pair (doubles tokens per sample)."},
    )
    loss_weighting: str = field(
        default="mean",
        metadata={"help": "'mean': plain mean over supervised tokens (dFactory). 'elbo': weight 1/t per sample "
                          "(the MDLM ELBO)."},
    )
    edit_noise_rate: float = field(
        default=0.0,
        metadata={"help": "Draft-and-edit training (LLaDA2.1), in [0, 1): after masking, each response token left "
                          "visible becomes a random token (the vocabulary minus special tokens) with this "
                          "probability and learns to be put back (the T2T stream). 0 = off (mask-only noise)."},
    )
    edit_keep_weight: float = field(
        default=0.0,
        metadata={"help": "Draft-and-edit: loss weight (>= 0) of the response tokens left visible and unedited, "
                          "supervised with themselves so the model learns to leave right tokens alone. 0 = not "
                          "supervised. Counted in the token normalisation like any supervised token."},
    )
    mask_token_id: int | None = field(
        default=None,
        metadata={"help": "Id of the mask token. Default: the tokenizer's mask token; refused when it has none."},
    )
    min_masked_tokens: int = field(
        default=1,
        metadata={"help": "Each document masks at least this many response tokens (>= 0), so none is left "
                          "unsupervised by chance."},
    )
    loss_chunk_size: int | None = field(
        default=1024,
        metadata={"help": "Supervised rows per fp32 cross-entropy chunk (recomputed in backward), bounding the "
                          "fp32 softmax memory to a few chunk x vocab buffers (1024 x 157k: 0.6 GiB each). "
                          "None: one chunk. Results do not depend on it."},
    )
    fused_head_loss: bool = field(
        default=False,
        metadata={"help": "Apply the LM head inside the loss, loss_chunk_size rows at a time, recomputing each "
                          "chunk in backward: the [supervised x vocab] logits and their gradient are never made "
                          "(bench/memory_vocab.py), for one more head matmul in backward. Plain torch, any device."},
    )
    # --- data --------------------------------------------------------------------------------------------
    max_seq_len: int = field(
        default=2048,
        metadata={"help": "Longest document, and the row length for packing (a multiple of block_size). In block "
                          "diffusion mode the model sees 2 x max_seq_len tokens per row."},
    )
    overlong_document_policy: str = field(
        default="skip",
        metadata={"help": "Documents longer than max_seq_len: 'skip' (counted and reported) or 'truncate' the "
                          "response to fit (counted and reported). Prompts longer than max_seq_len are skipped."},
    )
    supervise_turns: str = field(
        default="all",
        metadata={"help": "Multi-turn chats: 'all' supervises every assistant turn (user and system turns stay clean "
                          "context, never masked nor supervised); 'last' only the last assistant turn, everything "
                          "before it being the prompt. Single-turn data is the same either way."},
    )
    pad_to_max_seq_len: bool = field(
        default=False,
        metadata={"help": "Pad every row to max_seq_len, as the public recipe does (the baseline; wasteful). "
                          "Default: pad to the batch's longest row rounded up to block_size."},
    )
    packing: bool = field(
        default=False,
        metadata={"help": "Pack whole documents into rows of max_seq_len with a document-level mask (no padding "
                          "between documents); batches come from the token-budget sampler."},
    )
    padding_free: bool = field(
        default=False,
        metadata={"help": "Full-attention mode only: put all documents of a micro-batch into one row with no "
                          "padding at all (position ids restart per document; the mask keeps documents apart)."},
    )
    max_tokens_per_micro_batch: int | None = field(
        default=None,
        metadata={"help": "Token budget per micro-batch for dynamic batching (>= max_seq_len). With packing: "
                          "rows x max_seq_len (the sampler packs documents best-fit into rows and gives each "
                          "micro-batch budget // max_seq_len rows); default per_device_train_batch_size x "
                          "max_seq_len. Without packing: padded rows x their length; padding_free: the sum of "
                          "document lengths."},
    )
    dynamic_batching_buffer_size: int = field(
        default=512, metadata={"help": "Documents considered at once for best-fit batching (>= 1)."}
    )
    batch_warmup_ratio: float = field(
        default=0.0,
        metadata={"help": "Fraction (in [0, 1)) of the planned optimizer steps over which the token budget ramps "
                          "linearly from batch_warmup_initial_tokens to the full budget (token-budget path only)."},
    )
    batch_warmup_initial_tokens: int | None = field(
        default=None, metadata={"help": "Token budget at the start of batch-size warmup (default: max_seq_len)."}
    )
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for dataset tokenization."})
    # --- evaluation -----------------------------------------------------------------------------------------
    eval_mask_rates: list[float] = field(
        default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9],
        metadata={"help": "Fixed grid of mask rates t for the held-out Monte-Carlo ELBO / perplexity estimate; "
                          "per-t losses are logged. Empty list disables it."},
    )
    eval_generation_samples: int = field(
        default=0,
        metadata={"help": "Held-out rows (with an `answer` column) to answer by generation at each evaluation, "
                          "each scored by DiffusionTrainer(answer_scorer=...) and logged as eval_exact_match. "
                          "0 disables it."},
    )
    eval_gen_length: int = field(default=64, metadata={"help": "Tokens generated per evaluation answer."})
    eval_gen_threshold: float = field(
        default=0.9, metadata={"help": "Confidence threshold for committing tokens during evaluation generation."}
    )
    stop_at_exact_match: float = field(
        default=0.0,
        metadata={"help": "Stop training at the first evaluation whose exact match (eval_generation_samples "
                          "answered by generation) is >= this value, in (0, 1]; needs an eval_strategy and "
                          "eval_generation_samples > 0. max_steps stays the budget (and the schedule's length). "
                          "0 disables it."},
    )
    # --- parallelism (one DeviceMesh; dfactory_hf/parallel/state.py) ------------------------------------------
    dp_replicate_size: int = field(
        default=1,
        metadata={"help": "Data-parallel replicas (>= 1) that each hold a full copy of the (FSDP-sharded) model: "
                          "HSDP when > 1 with dp_shard_size > 1. world = dp_replicate x dp_shard x sp."},
    )
    dp_shard_size: int = field(
        default=-1,
        metadata={"help": "Ranks (>= 1) that FSDP2 shards parameters, gradients and optimizer state over, together "
                          "with sp_size; -1 = every rank the other sizes leave (world / (dp_replicate x sp))."},
    )
    sp_size: int = field(
        default=1,
        metadata={"help": "Ulysses sequence-parallel degree (>= 1): ranks that split every row's sequence (each "
                          "holds 1/sp of the x_t and of the x_0 half); must divide the model's attention heads; "
                          "rows are padded to a multiple of sp x block_size. The sp ranks of a data replica "
                          "train on the same batch."},
    )
    ep_size: int = field(
        default=1,
        metadata={"help": "Expert-parallel degree (>= 1): ranks that split the routed experts (each holds "
                          "num_experts / ep of every MoE layer; tokens move by all-to-all); must divide "
                          "dp_shard_size x sp_size and the expert count; needs an FSDP2 launch config."},
    )
    router_bias_update_rate: float = field(
        default=0.0,
        metadata={"help": "Aux-loss-free router balancing (>= 0; 0 = off, 1e-3 is DeepSeek-V3's): after each "
                          "optimizer step every MoE gate's expert_bias += rate x sign(mean load - load), the load "
                          "counted over the whole step on all ranks. Per-layer load imbalance (max / mean) is "
                          "logged either way."},
    )
    # --- LoRA ---------------------------------------------------------------------------------------------
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of the full model."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float | None = field(
        default=None,
        metadata={"help": "Dropout on the LoRA path, in [0, 1); default 0.05, or 0 with --lora_target_parameters "
                          "(PEFT's adapters on parameters take no dropout)."},
    )
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["query_key_value", "dense"],
        metadata={"help": "Module names that get adapters (LLaDA2 attention: query_key_value, dense; dense MLP "
                          "and shared experts: gate_proj, up_proj, down_proj) or 'all-linear'. Works with "
                          "--ep_size > 1."},
    )
    lora_target_parameters: list[str] = field(
        default_factory=list,
        metadata={"help": "Parameters that get adapters through PEFT's target_parameters, e.g. the routed experts: "
                          "experts.gate_up_proj experts.down_proj (one rank-r adapter per expert). Not with "
                          "--ep_size > 1."},
    )

    # --- faults ---------------------------------------------------------------------------------------------
    save_on_interrupt: bool = field(
        default=False,
        metadata={"help": "On SIGTERM (what schedulers send before killing a job), finish the current optimizer "
                          "step, save a checkpoint in output_dir and exit with status 143; resume with "
                          "--resume_from_checkpoint last."},
    )
    profile_steps: str | None = field(
        default=None,
        metadata={"help": "'a-b' (0 <= a <= b): record optimizer steps a to b (counted from 0, as global_step "
                          "before the step) with torch.profiler and write a Chrome trace per rank to "
                          "output_dir/profile/trace_steps_a-b_rank<r>.json. Unset = no profiling."},
    )

    def __post_init__(self):
        # Our collators emit columns the model's forward does not name (prompt_length, noisy_input_ids, ...).
        self.remove_unused_columns = False
        self.validate_training_ranges()  # before TrainingArguments reads them (it divides and seeds with them)
        if not self.use_cpu and not torch.accelerator.is_available():
            # No GPU: train on the CPU. Without use_cpu a multi-process launch would leave every rank training
            # alone (accelerate's multi-process launcher does not pass a config's `use_cpu: true` on).
            self.use_cpu = True
        self.validate_parallel_fields()  # before TrainingArguments sets up the distributed state
        super().__post_init__()
        self.validate_diffusion_fields()

    def validate_training_ranges(self) -> None:
        """Every numeric `TrainingArguments` flag the run uses, against its range (TRAINING_RANGES)."""
        for name, accepts, rule, fix in TRAINING_RANGES:
            value = getattr(self, name)
            if value is not None and not accepts(value):
                raise ValueError(f"--{name} ({value!r}) must be {rule}; {fix}.")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"--max_steps ({self.max_steps}) must be > 0, or -1 to train for --num_train_epochs.")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            # Trainer would run no step, save the untrained model and exit 0.
            raise ValueError(f"--num_train_epochs ({self.num_train_epochs}) must be > 0 when --max_steps is not set: "
                             "it would train nothing; use 1 or more, or set --max_steps.")
        resume = self.resume_from_checkpoint
        if isinstance(resume, str) and resume not in ("last", "true", "True", "false", "False", ""):
            if not os.path.exists(resume):
                raise ValueError(f"--resume_from_checkpoint ({resume}) does not exist; pass a checkpoint-N directory "
                                 "written by this trainer, or `last` for the newest complete one in --output_dir.")
            check_resume_path(resume)  # before data preparation; the layout is checked by the trainer
        if os.path.isfile(self.output_dir):
            raise ValueError(f"--output_dir ({self.output_dir}) is a file; pass a directory (created if missing).")

    def validate_diffusion_fields(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size ({self.block_size}) must be > 0; LLaDA2 uses 32.")
        if self.max_seq_len <= 0 or self.max_seq_len % self.block_size:
            fix = (self.max_seq_len // self.block_size + 1) * self.block_size
            raise ValueError(
                f"max_seq_len ({self.max_seq_len}) must be a positive multiple of block_size ({self.block_size}); "
                f"use {max(fix, self.block_size)}."
            )
        validate_noise_range(self.noise_range_low, self.noise_range_high)
        if not (_finite(self.confidence_beta) and self.confidence_beta >= 0):
            raise ValueError(f"confidence_beta ({self.confidence_beta}) must be >= 0; 0 disables CAP.")
        validate_edit_noise_rate(self.edit_noise_rate)
        if not (math.isfinite(self.edit_keep_weight) and self.edit_keep_weight >= 0):
            raise ValueError(f"edit_keep_weight ({self.edit_keep_weight}) must be >= 0 (0 = kept tokens are not "
                             "supervised); e.g. 0.1.")
        if self.mask_token_id is not None and self.mask_token_id < 0:
            raise ValueError(f"--mask_token_id ({self.mask_token_id}) must be >= 0; leave it unset to use the "
                             "tokenizer's mask token.")
        if self.dataset_num_proc is not None and self.dataset_num_proc < 1:
            raise ValueError(f"--dataset_num_proc ({self.dataset_num_proc}) must be >= 1; leave it unset to "
                             "tokenize in the main process.")
        if not (_finite(self.eval_gen_threshold) and 0 < self.eval_gen_threshold <= 1):
            raise ValueError(f"--eval_gen_threshold ({self.eval_gen_threshold}) must be in (0, 1]; the default is 0.9.")
        if self.loss_weighting not in LOSS_WEIGHTING_MODES:
            raise ValueError(f"loss_weighting ({self.loss_weighting!r}) must be one of {LOSS_WEIGHTING_MODES}.")
        if self.overlong_document_policy not in OVERLONG_POLICIES:
            raise ValueError(
                f"overlong_document_policy ({self.overlong_document_policy!r}) must be one of {OVERLONG_POLICIES}."
            )
        if self.supervise_turns not in SUPERVISE_TURNS:
            raise ValueError(f"supervise_turns ({self.supervise_turns!r}) must be one of {SUPERVISE_TURNS}: 'all' "
                             "supervises every assistant turn of a multi-turn chat, 'last' only the last one.")
        if self.min_masked_tokens < 0:
            raise ValueError(f"min_masked_tokens ({self.min_masked_tokens}) must be >= 0.")
        if self.loss_chunk_size is not None and self.loss_chunk_size <= 0:
            raise ValueError(f"loss_chunk_size ({self.loss_chunk_size}) must be > 0, or None for one chunk.")
        if self.packing and self.pad_to_max_seq_len:
            raise ValueError("packing=True and pad_to_max_seq_len=True exclude each other; choose one.")
        if self.padding_free and (self.block_diffusion_mode or self.packing or self.pad_to_max_seq_len):
            raise ValueError(
                "padding_free=True is the full-attention layout: it needs block_diffusion_mode=False and excludes "
                "packing and pad_to_max_seq_len (in block diffusion mode use packing=True)."
            )
        if self.max_tokens_per_micro_batch is not None and self.max_tokens_per_micro_batch < self.max_seq_len:
            raise ValueError(
                f"max_tokens_per_micro_batch ({self.max_tokens_per_micro_batch}) must be >= max_seq_len "
                f"({self.max_seq_len}) so the longest allowed document fits; raise it or lower max_seq_len."
            )
        if self.max_tokens_per_micro_batch is not None and self.pad_to_max_seq_len:
            raise ValueError("max_tokens_per_micro_batch with pad_to_max_seq_len=True would pad every row to "
                             "max_seq_len anyway; use per_device_train_batch_size, or packing=True instead.")
        if self.batch_warmup_ratio > 0 and not self.uses_token_budget:
            raise ValueError(f"batch_warmup_ratio ({self.batch_warmup_ratio}) needs the token-budget path: set "
                             "packing=True or max_tokens_per_micro_batch.")
        if self.dynamic_batching_buffer_size < 1:
            raise ValueError(f"dynamic_batching_buffer_size ({self.dynamic_batching_buffer_size}) must be >= 1.")
        if not 0.0 <= self.batch_warmup_ratio < 1.0:
            raise ValueError(f"batch_warmup_ratio ({self.batch_warmup_ratio}) must be in [0, 1).")
        if self.batch_warmup_initial_tokens is not None and self.batch_warmup_initial_tokens < self.max_seq_len:
            raise ValueError(
                f"batch_warmup_initial_tokens ({self.batch_warmup_initial_tokens}) must be >= max_seq_len "
                f"({self.max_seq_len}) so every document fits from the first step."
            )
        if any(not 0.0 < t <= 1.0 for t in self.eval_mask_rates):
            raise ValueError(f"eval_mask_rates ({self.eval_mask_rates}) must all lie in (0, 1].")
        if self.eval_generation_samples < 0 or self.eval_gen_length <= 0:
            raise ValueError(
                f"eval_generation_samples ({self.eval_generation_samples}) must be >= 0 and eval_gen_length "
                f"({self.eval_gen_length}) > 0."
            )
        if not (_finite(self.stop_at_exact_match) and 0 <= self.stop_at_exact_match <= 1):
            raise ValueError(f"--stop_at_exact_match ({self.stop_at_exact_match}) must be in (0, 1], e.g. 0.95; "
                             "0 trains for max_steps.")
        if self.stop_at_exact_match > 0:
            if self.eval_strategy == "no" or self.eval_generation_samples == 0:
                raise ValueError(f"--stop_at_exact_match ({self.stop_at_exact_match}) is checked at evaluations "
                                 "that answer by generation: set --eval_strategy steps --eval_steps N and "
                                 "--eval_generation_samples > 0.")
        if self.dataloader_persistent_workers and self.dataloader_num_workers == 0:
            raise ValueError("--dataloader_persistent_workers keeps DataLoader workers between epochs and needs "
                             "--dataloader_num_workers > 0 (it is 0); set --dataloader_num_workers, or leave "
                             "persistent workers off.")
        if not (math.isfinite(self.router_bias_update_rate) and self.router_bias_update_rate >= 0):
            raise ValueError(f"--router_bias_update_rate ({self.router_bias_update_rate}) must be >= 0 (0 = off); "
                             "1e-3 is a common choice.")
        profiled = parse_profile_steps(self.profile_steps)
        if profiled and self.max_steps > 0 and profiled[1] >= self.max_steps:
            raise ValueError(f"--profile_steps ({self.profile_steps}) reaches past the last optimizer step "
                             f"({self.max_steps - 1} with --max_steps {self.max_steps}, counted from 0); use a range "
                             f"within 0-{self.max_steps - 1}.")
        if self.use_peft and self.lora_r <= 0:
            raise ValueError(f"lora_r ({self.lora_r}) must be > 0 with use_peft.")
        if self.use_peft and self.lora_alpha <= 0:
            raise ValueError(f"--lora_alpha ({self.lora_alpha}) must be > 0 with use_peft; 2 x lora_r is common.")
        if self.lora_target_parameters and not self.use_peft:
            raise ValueError(f"--lora_target_parameters ({' '.join(self.lora_target_parameters)}) adds LoRA "
                             "adapters: add --use_peft true.")
        if self.lora_dropout is None:
            self.lora_dropout = 0.0 if self.lora_target_parameters else 0.05
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"--lora_dropout ({self.lora_dropout}) must be in [0, 1).")
        if self.lora_target_parameters and self.lora_dropout:
            raise ValueError(f"--lora_dropout ({self.lora_dropout}) with --lora_target_parameters: PEFT's adapters "
                             "on parameters cannot apply dropout; set --lora_dropout 0 (the default with "
                             "--lora_target_parameters).")

    def validate_parallel_fields(self) -> None:
        """At argument parsing, before a model is loaded; the trainer checks again with the process group and the
        model's expert count (`ParallelState.from_args`)."""
        if self.ep_size > 1 and self.lora_target_parameters:
            raise ValueError(
                f"--lora_target_parameters ({' '.join(self.lora_target_parameters)}) with --ep_size ({self.ep_size}): "
                "under expert parallel each rank holds a slice of the routed experts, which PEFT's parameter "
                "adapters cannot wrap; use --ep_size 1 (FSDP2 still shards the experts), or keep --ep_size and "
                "adapt attention, dense MLPs and shared experts with --lora_target_modules only.")
        if self.sp_size > 1 and isinstance(self.block_size, int) and self.max_seq_len < self.sp_size * self.block_size:
            raise ValueError(
                f"--max_seq_len ({self.max_seq_len}) must be >= sp_size x block_size ({self.sp_size} x "
                f"{self.block_size} = {self.sp_size * self.block_size}): sequence parallel gives each of the sp "
                "ranks whole blocks of every row; raise --max_seq_len or lower --sp_size.")
        # Sizes < 1, then against the world size: `WORLD_SIZE` is how torchrun and accelerate launch tell each
        # process the world size.
        ParallelSizes.resolve(world_size=int(os.environ.get("WORLD_SIZE", "1")),
                              dp_replicate_size=self.dp_replicate_size, dp_shard_size=self.dp_shard_size,
                              sp_size=self.sp_size, ep_size=self.ep_size)
        if self.parallelism_config is not None:
            raise ValueError("Set the parallel layout with --dp_replicate_size / --dp_shard_size (dfactory_hf builds "
                             "the mesh and hands it to accelerate), not with TrainingArguments.parallelism_config.")

    @property
    def uses_token_budget(self) -> bool:
        return self.packing or self.padding_free or self.max_tokens_per_micro_batch is not None

    @property
    def token_budget(self) -> int:
        """Tokens per micro-batch on the token-budget path."""
        if self.max_tokens_per_micro_batch is not None:
            return self.max_tokens_per_micro_batch
        return self.per_device_train_batch_size * self.max_seq_len

    @classmethod
    def from_training_arguments(cls, args: TrainingArguments) -> DiffusionTrainingArguments:
        """Plain `TrainingArguments` (an existing HF script) -> ours, with the diffusion defaults."""
        if isinstance(args, cls):
            return args
        values = args.to_dict()
        values["hub_token"] = args.hub_token  # `to_dict` masks secrets
        init_names = {f.name for f in fields(TrainingArguments) if f.init}
        return cls(**{name: value for name, value in values.items() if name in init_names})


def arguments_markdown_table() -> str:
    """The README's argument reference: `python -m dfactory_hf.trainer` prints it."""
    own = [f for f in fields(DiffusionTrainingArguments) if f.name not in {g.name for g in fields(TrainingArguments)}]
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for f in own:
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        rows.append(f"| `--{f.name}` | `{default}` | {f.metadata['help']} |")
    return "\n".join(rows)
