"""Block-diffusion SFT of LLaDA2, the job behind `dfactory-hf train` and examples/sft_llada2.py.

    dfactory-hf train                                      # the CPU demo: shipped tiny model, generated data
    dfactory-hf train --config configs/sft/llada2_mini_bd_sft.yaml \\
        --model_name_or_path inclusionAI/LLaDA2.0-mini --dataset_path data/train.jsonl
    accelerate launch --config_file configs/accelerate/fsdp2.yaml -m dfactory_hf.cli train --config ...

Arguments: `ScriptArguments` below plus every `DiffusionTrainingArguments` / `TrainingArguments` field, as flags
or from `--config recipe.yaml` (flags win over the recipe). Without `--config`, the demo recipe (`tiny.yaml`
next to this file, the same as configs/sft/tiny.yaml) applies only to the shipped demo model (no
`--model_name_or_path`, `--model_config tiny`): it is tuned for a 1.9M-parameter model trained from scratch
(block size 4, learning rate 3e-3), and would wreck a real checkpoint. A real model without `--config` gets the
library's defaults (block size 32, TrainingArguments' learning rate 5e-5, ...) and a warning naming the public
recipe.
"""

from __future__ import annotations

import difflib
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import DatasetDict
from transformers import AutoTokenizer, HfArgumentParser
from trl import DatasetMixtureConfig, TrlParser

# The demo's data and tokenizer (kept together: the one place that names them).
from ..demo.arithmetic import TASKS, exact_match, make_arithmetic_dataset
from ..demo.tokenizer import DEMO_TOKENIZER_PATH
from ..data.sources import (check_eval_split_size, hold_out, hold_out_stream, load_mixture, load_source, load_stream,
                            stream_mixture)
from ..diffusion.masks import ATTN_IMPLEMENTATIONS
from ..logs import apply_log_level
from ..models.llada2_moe import SHIPPED_CONFIGS, LLaDA2MoeConfig, LLaDA2MoeForCausalLM, shipped_config
from ..parallel.loading import from_pretrained_on_rank0
from ..paths import check_pretrained_source, load_pretrained
from ..trainer import DiffusionTrainer, DiffusionTrainingArguments
from ..trainer.evaluation import generate_answers
from ..trainer.guards import StopAtExactMatch

logger = logging.getLogger(__name__)

DEMO_RECIPE = Path(__file__).resolve().parent / "tiny.yaml"
DEMO_MODEL_CONFIG = "tiny"


@dataclass
class ScriptArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Checkpoint to fine-tune. Default: the shipped config, from scratch."}
    )
    model_config: str = field(default=DEMO_MODEL_CONFIG,
                              metadata={"help": "Shipped config used without a checkpoint."})
    model_config_overrides: str | None = field(
        default=None, metadata={"help": 'JSON object of config fields to change, e.g. \'{"num_hidden_layers": 6}\'.'}
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Default: the checkpoint's tokenizer, else the shipped demo tokenizer."}
    )
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "sdpa (CPU and GPU), flex_attention (GPU) or eager."}
    )
    dataset_name: str | None = field(default=None, metadata={"help": "A dataset name for datasets.load_dataset."})
    dataset_config: str | None = field(default=None, metadata={"help": "Its configuration name."})
    dataset_path: str | None = field(
        default=None, metadata={"help": "A json / jsonl / parquet file, a folder of such files (shards), or a "
                                "folder saved by save_to_disk. Several weighted sources: a `datasets:` list in the "
                                "recipe (README, Data)."}
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(
        default="test", metadata={"help": "Held-out split; made from the train split when absent (--eval_split_size)."}
    )
    eval_split_size: float = field(
        default=0.01, metadata={"help": "Share of the training rows held out (seeded) when the data has no "
                                "--dataset_test_split: a fraction in [0, 1) or a number of rows; 0 disables."}
    )
    num_train_samples: int = field(
        default=7800, metadata={"help": "Generated conversations (embedded data; `add` has 8,100 distinct problems)."}
    )
    num_test_samples: int = field(default=200, metadata={"help": "Generated held-out conversations."})
    arithmetic_task: str = field(default="add", metadata={"help": "Embedded data task: add, add2, word or mixed."})
    final_generation_samples: int = field(
        default=100, metadata={"help": "Held-out problems answered by generation after training (0: none): the "
                               "last rows of the held-out split (evaluations during training answer the first)."}
    )
    # TRL's `datasets:` mixture of the recipe (set by parse_arguments; not a flag of its own).
    mixture: DatasetMixtureConfig | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        # Before any data or model work: every flag of this script with its rule and fix.
        if self.model_config not in SHIPPED_CONFIGS:
            raise ValueError(f"--model_config ({self.model_config!r}) must be one of {', '.join(SHIPPED_CONFIGS)}; "
                             "or pass --model_name_or_path.")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"--attn_implementation ({self.attn_implementation!r}) must be one of "
                             f"{', '.join(ATTN_IMPLEMENTATIONS)} (sdpa on CPU).")
        if self.arithmetic_task not in TASKS:
            raise ValueError(f"--arithmetic_task ({self.arithmetic_task!r}) must be one of {', '.join(TASKS)}.")
        for name, low in (("num_train_samples", 1), ("num_test_samples", 0), ("final_generation_samples", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"--{name} ({getattr(self, name)}) must be >= {low}.")
        check_eval_split_size(self.eval_split_size)
        self.config_overrides = parse_config_overrides(self.model_config_overrides)
        if self.config_overrides and self.model_name_or_path:
            raise ValueError(f"--model_config_overrides ({self.model_config_overrides}) changes the shipped config "
                             "built from scratch; with --model_name_or_path edit the checkpoint's config.json "
                             "instead, or drop one of the two flags.")
        if self.dataset_path and self.dataset_name:
            raise ValueError(f"--dataset_path ({self.dataset_path}) and --dataset_name ({self.dataset_name}) are both "
                             "set; pass one.")
        if self.model_name_or_path:
            check_pretrained_source("--model_name_or_path", self.model_name_or_path, "model")
        if self.tokenizer_name_or_path:
            check_pretrained_source("--tokenizer_name_or_path", self.tokenizer_name_or_path, "tokenizer")
        if self.dataset_path and not Path(self.dataset_path).exists():
            raise ValueError(f"--dataset_path ({self.dataset_path}) does not exist; pass a .json, .jsonl or .parquet "
                             "file, or a folder saved by Dataset.save_to_disk.")

    @property
    def base_model(self) -> str:
        """What the model card names as the start of the run."""
        if self.model_name_or_path:
            return self.model_name_or_path
        return f"trained from scratch: the shipped `{self.model_config}` config"

    @property
    def data_sources(self) -> list[str]:
        if self.mixture is not None and self.mixture.datasets:
            return [f"{c.path} (split {c.split}" + (f", fraction {c.fraction:g})" if c.fraction is not None else ")")
                    for c in self.mixture.datasets]
        if self.dataset_path:
            return [f"{self.dataset_path} (split {self.dataset_train_split})"]
        if self.dataset_name:
            config = f", config {self.dataset_config}" if self.dataset_config else ""
            return [f"{self.dataset_name} (split {self.dataset_train_split}{config})"]
        return [f"generated arithmetic conversations (dfactory_hf.demo.arithmetic, task {self.arithmetic_task}, "
                f"{self.num_train_samples} train / {self.num_test_samples} held-out)"]


def parse_config_overrides(text: str | None) -> dict:
    """`--model_config_overrides` -> a dict of known LLaDA2MoeConfig fields."""
    if not text:
        return {}
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--model_config_overrides ({text}) is not valid JSON ({error.msg} at column {error.colno}); "
                         'pass an object such as \'{"num_hidden_layers": 6}\' (double quotes, in single quotes for '
                         "the shell).") from None
    if not isinstance(overrides, dict):
        raise ValueError(f"--model_config_overrides ({text}) must be a JSON object of config fields, e.g. "
                         '\'{"num_hidden_layers": 6}\'.')
    known = [name for name in LLaDA2MoeConfig().to_dict() if not name.startswith("_")]
    for name in overrides:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"did you mean {' or '.join(close)}?" if close else "see configs/*.json for the fields"
            raise ValueError(f"--model_config_overrides: {name!r} is not a LLaDA2MoeConfig field (it would be "
                             f"ignored); {hint}")
    return overrides


def trains_demo_model(argv: list[str]) -> bool:
    """True when the command line builds the shipped demo model from scratch (the one the demo recipe is for)."""
    # This script's own flags only (spellings and abbreviations as the full parser takes them), nothing built.
    known, _ = HfArgumentParser(ScriptArguments, add_help=False).parse_known_args(argv)
    return not known.model_name_or_path and known.model_config == DEMO_MODEL_CONFIG


def parse_arguments(argv: list[str] | None = None) -> tuple[ScriptArguments, DiffusionTrainingArguments]:
    """`--config recipe.yaml` plus flags; without `--config` the demo recipe for the demo model only."""
    argv = list(sys.argv[1:] if argv is None else argv)
    has_config = any(a == "--config" or a.startswith("--config=") for a in argv)
    demo = not has_config and trains_demo_model(argv)
    if demo:
        argv = ["--config", str(DEMO_RECIPE), *argv]
    parser = TrlParser((ScriptArguments, DiffusionTrainingArguments, DatasetMixtureConfig))
    script, args, script.mixture = parser.parse_args_and_config(argv)
    apply_log_level(args)  # before loading, so its messages follow --log_level too
    if demo:
        logger.info("No --config: the demo recipe %s (the shipped tiny model from scratch).", DEMO_RECIPE)
    elif not has_config:
        logger.warning("No --config: %s trains with the library defaults (block_size %d, learning_rate %g, "
                       "max_seq_len %d); pass --config configs/sft/llada2_mini_bd_sft.yaml for the public LLaDA2 "
                       "recipe.", script.model_name_or_path or f"--model_config {script.model_config}",
                       args.block_size, args.learning_rate, args.max_seq_len)
    return script, args


def load_data(script: ScriptArguments, seed: int) -> DatasetDict:
    mixture = script.mixture
    mixed = mixture is not None and bool(mixture.datasets)
    if mixed and (script.dataset_path or script.dataset_name):
        raise ValueError(f"a `datasets:` mixture and --{'dataset_path' if script.dataset_path else 'dataset_name'} "
                         "are both set; list every source under `datasets:`, or drop the mixture.")
    if mixture is not None and mixture.streaming:
        return load_stream_data(script, seed)
    if mixed:
        data = load_mixture(mixture, seed=seed, split=script.dataset_train_split)
    elif script.dataset_path:
        data = load_source(script.dataset_path, flag="--dataset_path", split=script.dataset_train_split)
    elif script.dataset_name:
        data = load_source(script.dataset_name, flag="--dataset_name", split=script.dataset_train_split,
                           name=script.dataset_config)
    else:
        return make_arithmetic_dataset(script.num_train_samples, script.num_test_samples, seed=seed,
                                       task=script.arithmetic_task)
    if script.dataset_train_split not in data:
        raise ValueError(f"--dataset_train_split ({script.dataset_train_split}) is not a split of the data (splits: "
                         f"{', '.join(data)}); pass one of them.")
    # A TRL recipe's `test_split_size` is honoured as the held-out share (seeded here, unlike TRL's split).
    size = mixture.test_split_size if mixed and mixture.test_split_size is not None else script.eval_split_size
    return hold_out(data, size=size, train_split=script.dataset_train_split, test_split=script.dataset_test_split,
                    seed=seed)


def load_stream_data(script: ScriptArguments, seed: int) -> dict:
    """`streaming: true`: {train split: an IterableDataset, test split: its first --eval_split_size rows}."""
    mixture = script.mixture
    if mixture.datasets:
        stream = stream_mixture(mixture, seed=seed)
    elif script.dataset_path or script.dataset_name:
        flag = "--dataset_path" if script.dataset_path else "--dataset_name"
        stream = load_stream(script.dataset_path or script.dataset_name, flag=flag, split=script.dataset_train_split,
                             name=script.dataset_config)
    else:
        raise ValueError("--streaming true reads data from --dataset_path, --dataset_name or a `datasets:` list; the "
                         "generated demo data is map-style: drop --streaming, or name the data.")
    from_recipe = mixture.datasets and mixture.test_split_size is not None
    size = mixture.test_split_size if from_recipe else script.eval_split_size
    flag = "test_split_size" if from_recipe else "--eval_split_size"
    stream, held_out = hold_out_stream(stream, size=size, flag=flag)
    return {script.dataset_train_split: stream,
            **({script.dataset_test_split: held_out} if held_out is not None else {})}


def load_model_and_tokenizer(script: ScriptArguments, args: DiffusionTrainingArguments):
    tokenizer_path = script.tokenizer_name_or_path or script.model_name_or_path or DEMO_TOKENIZER_PATH
    tokenizer_flag = "--tokenizer_name_or_path" if script.tokenizer_name_or_path else "--model_name_or_path"
    tokenizer = load_pretrained(tokenizer_flag, tokenizer_path, AutoTokenizer.from_pretrained)
    if script.model_name_or_path:
        dtype = torch.bfloat16 if args.bf16 else "auto"
        # Rank 0 reads the checkpoint, the other ranks build on the meta device and get their FSDP2 shards by
        # broadcast, when the launch config sets fsdp_cpu_ram_efficient_loading (a plain from_pretrained otherwise).
        model = load_pretrained("--model_name_or_path", script.model_name_or_path, from_pretrained_on_rank0,
                                args=args, dtype=dtype, attn_implementation=script.attn_implementation)
    else:
        torch.manual_seed(args.seed)
        config = shipped_config(script.model_config, **{"vocab_size": max(len(tokenizer), 128),
                                "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
                                **script.config_overrides})
        config._attn_implementation = script.attn_implementation
        model = LLaDA2MoeForCausalLM(config)
    return model, tokenizer


def build_trainer(script: ScriptArguments, args: DiffusionTrainingArguments) -> DiffusionTrainer:
    """Data, model and tokenizer from the arguments, in a DiffusionTrainer whose checkpoints name them."""
    data = load_data(script, args.seed)
    model, tokenizer = load_model_and_tokenizer(script, args)
    return DiffusionTrainer(model=model, args=args, train_dataset=data[script.dataset_train_split],
                            eval_dataset=data.get(script.dataset_test_split), processing_class=tokenizer,
                            # The demo's "The answer is N." convention; another task passes its own scorer.
                            answer_scorer=exact_match,
                            base_model_name=script.base_model, data_sources=script.data_sources)


def results_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    lines = [f"| {'metric'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {name.ljust(width)} | {value} |" for name, value in rows]
    return "\n".join(lines)


def report(trainer: DiffusionTrainer, script: ScriptArguments, train_output, start_metrics: dict,
           end_metrics: dict) -> dict:
    """The results table (and generated answers to held-out problems), printed by the main process; returned."""
    args, tokenizer = trainer.args, trainer.processing_class
    results = {"train_loss": train_output.training_loss, **{f"start_{k}": v for k, v in start_metrics.items()},
               **end_metrics}
    rows = [("train loss (mean over run)", f"{train_output.training_loss:.4f}")]
    if end_metrics:
        def start_end(key: str, digits: int) -> str:
            start = f"{start_metrics[key]:.{digits}f}" if start_metrics else "(not run under FSDP2)"
            return f"{start} -> {end_metrics[key]:.{digits}f}"

        rows += [
            ("held-out loss (start -> end)", start_end("eval_loss", 4)),
            ("held-out masked-token accuracy (start -> end)", start_end("eval_masked_token_accuracy", 3)),
        ]
        if "eval_elbo_perplexity" in end_metrics:
            rows.append(("held-out ELBO perplexity bound", f"{end_metrics['eval_elbo_perplexity']:.3f}"))
    eval_dataset = trainer.eval_dataset
    if eval_dataset is not None and script.final_generation_samples > 0 and "answer" in eval_dataset.column_names:
        # The last held-out rows: evaluations during training (and --stop_at_exact_match) answer the first ones.
        first = max(len(eval_dataset) - script.final_generation_samples, 0)
        records = generate_answers(
            trainer.accelerator.unwrap_model(trainer.model), tokenizer, eval_dataset, score=trainer.answer_scorer,
            num_samples=script.final_generation_samples, gen_length=args.eval_gen_length,
            block_length=args.block_size, threshold=args.eval_gen_threshold, mask_token_id=trainer.mask_token_id,
            batch_size=args.per_device_eval_batch_size, indices=list(range(first, len(eval_dataset))),
        )
        accuracy = sum(r["correct"] for r in records) / max(len(records), 1)
        results["final_exact_match"] = accuracy
        seen = "" if first >= args.eval_generation_samples else ", some also scored during training"
        rows.append((f"held-out exact match ({len(records)} problems, generated){seen}", f"{accuracy:.1%}"))
        if trainer.is_world_process_zero():
            print("\nSamples (prompt -> generated answer):")
            for record in records[:5]:
                mark = "ok " if record["correct"] else "bad"
                print(f"  [{mark}] {record['prompt']!r} -> {record['completion']!r}")
    stop = next((c for c in trainer.callback_handler.callbacks if isinstance(c, StopAtExactMatch)), None)
    if stop is not None:
        results["stopped_at_step"] = stop.stopped_at[0] if stop.stopped_at else None
        rows.append(("stopped by --stop_at_exact_match", f"step {stop.stopped_at[0]} of {args.max_steps} (exact match "
                     f"{stop.stopped_at[1]:.0%} on {args.eval_generation_samples} problems)" if stop.stopped_at else
                     f"not reached in {args.max_steps} steps"))
    rows.append(("runtime (train)", f"{train_output.metrics['train_runtime']:.0f} s"))
    rows.append(("checkpoint", args.output_dir))
    if trainer.is_world_process_zero():
        print("\n" + results_table(rows))
    return results


def main(argv: list[str] | None = None) -> dict:
    """`dfactory-hf train`; examples/sft_llada2.py spells the same steps out."""
    script, args = parse_arguments(argv)
    trainer = build_trainer(script, args)
    # Under FSDP2 the model is sharded when training starts, so the "before" evaluation is skipped there.
    evaluates = trainer.eval_dataset is not None
    start_metrics = trainer.evaluate() if evaluates and not trainer.is_fsdp_enabled else {}
    train_output = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    end_metrics = trainer.evaluate() if evaluates else {}
    trainer.save_model(args.output_dir)  # weights, config, tokenizer, generation_config.json, model card
    trainer.save_state()  # trainer_state.json: the log history that `dfactory-hf plot OUTPUT_DIR` draws
    return report(trainer, script, train_output, start_metrics, end_metrics)
