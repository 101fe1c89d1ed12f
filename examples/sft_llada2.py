"""Block-diffusion SFT of LLaDA2 with transformers.Trainer.

With no arguments it runs the embedded demo on a CPU in a few minutes: the shipped `tiny` LLaDA2-MoE config
trained from scratch with the shipped character tokenizer on generated arithmetic conversations, using the
recipe `configs/sft/tiny.yaml`; it ends with a results table, generated answers to held-out problems and a
checkpoint that `AutoModelForCausalLM.from_pretrained` reloads::

    accelerate launch examples/sft_llada2.py            # or: python examples/sft_llada2.py

Real runs (LLaDA2.0-mini on GPUs with FSDP2; the public recipe's values are in configs/sft/)::

    accelerate launch --config_file configs/accelerate/fsdp2.yaml examples/sft_llada2.py \\
        --config configs/sft/llada2_mini_bd_sft.yaml \\
        --model_name_or_path inclusionAI/LLaDA2.0-mini --dataset_path data/train.jsonl

Every `DiffusionTrainingArguments` / `TrainingArguments` field is a flag (`--block_size 32`,
`--packing true`, `--use_peft true --lora_r 16`), and `--config recipe.yaml` sets many at once; flags given on
the command line override the recipe. Method: REFERENCE.md sections 1-2 (in the design notes of the repo).
"""

from __future__ import annotations

import difflib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import DatasetDict, load_dataset
from transformers import AutoTokenizer
from trl import TrlParser

import dfactory_hf  # noqa: F401  (registers llada2_moe with the Auto classes)
from dfactory_hf import DiffusionTrainer, DiffusionTrainingArguments
from dfactory_hf.data.files import load_data_file
from dfactory_hf.demo.arithmetic import TASKS, exact_match, make_arithmetic_dataset
from dfactory_hf.demo.tokenizer import DEMO_TOKENIZER_PATH
from dfactory_hf.diffusion.masks import ATTN_IMPLEMENTATIONS
from dfactory_hf.models.llada2_moe import SHIPPED_CONFIGS, LLaDA2MoeConfig, LLaDA2MoeForCausalLM, shipped_config
from dfactory_hf.parallel.loading import from_pretrained_on_rank0
from dfactory_hf.paths import check_pretrained_source, load_pretrained
from dfactory_hf.trainer.evaluation import generate_answers

DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "sft" / "tiny.yaml"


@dataclass
class ScriptArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Checkpoint to fine-tune. Default: the shipped config, from scratch."}
    )
    model_config: str = field(default="tiny", metadata={"help": "Shipped config used without a checkpoint."})
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
        default=None, metadata={"help": "A json / jsonl / parquet file, or a directory saved by save_to_disk."}
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Held-out split (skipped if absent)."})
    num_train_samples: int = field(
        default=7800, metadata={"help": "Generated conversations (embedded data; `add` has 8,100 distinct problems)."}
    )
    num_test_samples: int = field(default=200, metadata={"help": "Generated held-out conversations."})
    arithmetic_task: str = field(default="add", metadata={"help": "Embedded data task: add, add2, word or mixed."})
    final_generation_samples: int = field(
        default=100, metadata={"help": "Held-out problems answered by generation after training (0: none)."}
    )

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


def load_data(script: ScriptArguments, seed: int) -> DatasetDict:
    if script.dataset_path:
        data = load_data_file(script.dataset_path, split=script.dataset_train_split)
    elif script.dataset_name:
        data = load_pretrained("--dataset_name", script.dataset_name, load_dataset, name=script.dataset_config)
    else:
        return make_arithmetic_dataset(script.num_train_samples, script.num_test_samples, seed=seed,
                                       task=script.arithmetic_task)
    if script.dataset_train_split not in data:
        raise ValueError(f"--dataset_train_split ({script.dataset_train_split}) is not a split of the data (splits: "
                         f"{', '.join(data)}); pass one of them.")
    return data


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


def results_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    lines = [f"| {'metric'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {name.ljust(width)} | {value} |" for name, value in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv:
        argv = ["--config", str(DEFAULT_RECIPE), *argv]
    parser = TrlParser((ScriptArguments, DiffusionTrainingArguments))
    script, args = parser.parse_args_and_config(argv)

    data = load_data(script, args.seed)
    model, tokenizer = load_model_and_tokenizer(script, args)
    eval_split = data.get(script.dataset_test_split)
    # Generated answers are scored by the demo's "The answer is N." convention; another task passes its own scorer.
    trainer = DiffusionTrainer(model=model, args=args, train_dataset=data[script.dataset_train_split],
                               eval_dataset=eval_split, processing_class=tokenizer, answer_scorer=exact_match)
    # Under FSDP2 the model is sharded when training starts, so the "before" evaluation is skipped there.
    evaluate_first = eval_split is not None and not trainer.is_fsdp_enabled
    start_metrics = trainer.evaluate() if evaluate_first else {}
    train_output = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    end_metrics = trainer.evaluate() if eval_split is not None else {}
    trainer.save_model(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)

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
    if eval_split is not None and script.final_generation_samples > 0 and "answer" in trainer.eval_dataset.column_names:
        records = generate_answers(
            trainer.accelerator.unwrap_model(trainer.model), tokenizer, trainer.eval_dataset, score=exact_match,
            num_samples=script.final_generation_samples, gen_length=args.eval_gen_length,
            block_length=args.block_size, threshold=args.eval_gen_threshold, mask_token_id=trainer.mask_token_id,
            batch_size=args.per_device_eval_batch_size,
        )
        accuracy = sum(r["correct"] for r in records) / max(len(records), 1)
        results["final_exact_match"] = accuracy
        rows.append((f"held-out exact match ({len(records)} problems, generated)", f"{accuracy:.1%}"))
        if trainer.is_world_process_zero():
            print("\nSamples (prompt -> generated answer):")
            for record in records[:5]:
                mark = "ok " if record["correct"] else "bad"
                print(f"  [{mark}] {record['prompt']!r} -> {record['completion']!r}")
    rows.append(("runtime (train)", f"{train_output.metrics['train_runtime']:.0f} s"))
    rows.append(("checkpoint", args.output_dir))
    if trainer.is_world_process_zero():
        print("\n" + results_table(rows))
    return results


if __name__ == "__main__":
    main()
