"""What every saved model folder carries besides the weights: decoding defaults and a model card.

`save_run_files(trainer, folder)` runs after each save (final `save_model`, training checkpoints, the save that
`push_to_hub` uploads) on the main process:

- `generation_config.json`: the block-diffusion decoding defaults of this run (generation/defaults.py), read by
  `dfactory-hf generate` and `dfactory_hf.generate` when a value is not given;
- `README.md`: a model card. Trainer's own (`TrainingSummary`: hub metadata, the optimisation hyperparameters,
  the evaluation table, framework versions) names neither the diffusion recipe nor a data source it cannot see,
  and takes a local base-model directory for "trained from scratch"; ours is that card plus a section with the
  base model, the data, the objective, the non-default arguments and the final metrics. Under PEFT the card is
  then updated by PEFT (`library_name: peft`, `base_model`), as Trainer.create_model_card does.

Remote-code files of a hub checkpoint are the model's business (models/llada2_moe/conversion.py).
"""

from __future__ import annotations

import os
from dataclasses import MISSING, fields

from transformers import TrainingArguments
from transformers.modelcard import TrainingSummary

from ..generation.defaults import diffusion_generation_config
from .config import DiffusionTrainingArguments
from ..paths import is_hub_id as is_hub_repo_id
from .lora import base_model

# The recipe a card lists: the optimisation arguments of TrainingArguments and our own (diffusion, data, parallel
# layout, LoRA), less those that say nothing about the model (where the trace goes, how to stop).
OPTIMISATION_ARGUMENTS = ("learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm",
                          "optim", "adam_beta1", "adam_beta2", "adam_epsilon", "per_device_train_batch_size",
                          "gradient_accumulation_steps", "max_steps", "num_train_epochs", "seed", "bf16", "fp16")
NOT_RECIPE = ("profile_steps", "save_on_interrupt", "dataset_num_proc", "lora_dropout")
FINAL_TRAIN_KEYS = ("loss", "ce_loss", "masked_token_accuracy")


def run_generation_config(trainer):
    args = trainer.args
    return diffusion_generation_config(
        block_length=args.block_size, steps=args.block_size, threshold=args.eval_gen_threshold,
        gen_length=args.eval_gen_length, mask_token_id=trainer.mask_token_id,
        eos_token_id=trainer.processing_class.eos_token_id, pad_token_id=trainer.pad_token_id)


def non_default_arguments(args: DiffusionTrainingArguments) -> dict:
    """The recipe: each recipe argument (above) whose value differs from its default."""
    own = {f.name for f in fields(TrainingArguments)}
    changed = {}
    for f in fields(DiffusionTrainingArguments):
        if f.name in NOT_RECIPE or (f.name in own and f.name not in OPTIMISATION_ARGUMENTS):
            continue
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        value = getattr(args, f.name)
        if value != default:
            changed[f.name] = value.value if hasattr(value, "value") else value
    return changed


def recipe_section(trainer) -> str:
    args, state = trainer.args, trainer.state
    base = trainer.base_model_description or "trained from scratch"
    data = "; ".join(trainer.data_sources) if trainer.data_sources else "not recorded (pass data_sources= to " \
                                                                          "DiffusionTrainer)"
    mode = (f"block diffusion, block_size {args.block_size}" if args.block_diffusion_mode
            else "full-attention masked diffusion (MDLM)")
    rows = [
        ("base model", base),
        ("data", data),
        ("objective", f"{mode}; mask rate t ~ U[{args.noise_range_low}, {args.noise_range_high}]; loss "
                      f"{args.loss_weighting}; {'same-position' if args.same_token_labels else 'shifted'} labels"),
        ("optimizer steps", f"{state.global_step} (max_steps {state.max_steps})"),
        ("recipe (non-default arguments)",
         " ".join(f"`--{k} {v}`" for k, v in non_default_arguments(args).items()) or "the defaults"),
    ]
    train_logs = [log for log in state.log_history if "loss" in log]
    if train_logs:
        last = train_logs[-1]
        rows.append((f"final training log (step {last.get('step')})",
                     ", ".join(f"{k} {last[k]:.4g}" for k in FINAL_TRAIN_KEYS if k in last)))
    eval_logs = [log for log in state.log_history if "eval_loss" in log]
    if eval_logs:
        last = eval_logs[-1]
        rows.append((f"final evaluation (step {last.get('step')})",
                     ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k.startswith("eval_")
                               and isinstance(v, (int, float)) and not k.endswith(("_runtime", "_time", "per_second")))))
    generation = run_generation_config(trainer)
    lines = ["", "## Block-diffusion recipe (dfactory_hf)", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    lines += ["", "## Generation", "",
              "`generation_config.json` holds this run's decoding defaults (block_length "
              f"{generation.block_length}, steps {generation.steps}, threshold {generation.threshold}, gen_length "
              f"{generation.gen_length}, mask token id {generation.mask_token_id}), read when not given:", "",
              "```bash", 'dfactory-hf generate --model <this folder or hub id> --prompt "..."', "```", ""]
    return "\n".join(lines)


def model_card(trainer, **kwargs) -> str:
    """Trainer's TrainingSummary card (kwargs as Trainer.create_model_card's) plus the recipe section."""
    source = trainer.base_model_description
    # TrainingSummary links a hub id (and takes a local directory or "" for "trained from scratch"); a local
    # directory or a from-scratch note is named in our section only.
    is_hub_id = bool(source) and not os.path.isdir(source) and is_hub_repo_id(source)
    for key in ("dataset_tags", "dataset_args", "dataset_metadata"):
        # No inference from the prepared dataset's builder name (None for ours); the data is named in our section
        # (its metadata field wants hub dataset ids).
        kwargs.setdefault(key, [])
    tags = kwargs.pop("tags", None) or []
    tags = [tags] if isinstance(tags, str) else list(tags)
    tags += [tag for tag in ("dfactory_hf", "block-diffusion") if tag not in tags]
    given = "finetuned_from" in kwargs
    kwargs.setdefault("finetuned_from", "")  # "": no hub look-up for a license at every checkpoint
    summary = TrainingSummary.from_trainer(trainer, tags=tags, **kwargs)
    if not given:
        summary.finetuned_from = source if is_hub_id else None
    return summary.to_model_card() + recipe_section(trainer)


def save_run_files(trainer, folder: str, **card_kwargs) -> None:
    """generation_config.json and README.md into a saved model folder (main process only)."""
    os.makedirs(folder, exist_ok=True)
    run_generation_config(trainer).save_pretrained(folder)
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as handle:
        handle.write(model_card(trainer, **card_kwargs))
    model = trainer.accelerator.unwrap_model(trainer.model)
    if base_model(model) is not model:  # PEFT adapters: PEFT's metadata on the card, as Trainer does
        model.create_or_update_model_card(folder)

