"""Block-diffusion SFT of LLaDA2 with transformers.Trainer.

With no arguments it runs the embedded demo on a CPU in a few minutes: the shipped `tiny` LLaDA2-MoE config
trained from scratch with the shipped character tokenizer on generated arithmetic conversations, using the
recipe `configs/sft/tiny.yaml`; it ends with a results table, generated answers to held-out problems and a
checkpoint that `AutoModelForCausalLM.from_pretrained` reloads::

    accelerate launch examples/sft_llada2.py            # or: python examples/sft_llada2.py, or: dfactory-hf train

Real runs (LLaDA2.0-mini on GPUs with FSDP2; the public recipe's values are in configs/sft/)::

    accelerate launch --config_file configs/accelerate/fsdp2.yaml examples/sft_llada2.py \\
        --config configs/sft/llada2_mini_bd_sft.yaml \\
        --model_name_or_path inclusionAI/LLaDA2.0-mini --dataset_path data/train.jsonl

Every `DiffusionTrainingArguments` / `TrainingArguments` field is a flag (`--block_size 32`,
`--packing true`, `--use_peft true --lora_r 16`), and `--config recipe.yaml` sets many at once; flags given on
the command line override the recipe. Without `--config` the demo recipe applies to the demo model only: a
`--model_name_or_path` run gets the library defaults. `dfactory-hf train` is this script, installed with the
package (dfactory_hf/recipes/sft.py holds the pieces used below). Method: REFERENCE.md sections 1-2 (in the
design notes of the repo).
"""

from __future__ import annotations

from dfactory_hf.recipes.sft import (ScriptArguments, build_trainer, load_data,  # noqa: F401  (used by tests)
                                     load_model_and_tokenizer, parse_arguments, report)


def main(argv: list[str] | None = None) -> dict:
    script, args = parse_arguments(argv)  # --config recipe.yaml + flags; the demo recipe for the demo model
    trainer = build_trainer(script, args)  # data, model, tokenizer -> DiffusionTrainer
    # Under FSDP2 the model is sharded when training starts, so the "before" evaluation is skipped there.
    evaluates = trainer.eval_dataset is not None
    start_metrics = trainer.evaluate() if evaluates and not trainer.is_fsdp_enabled else {}
    train_output = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    end_metrics = trainer.evaluate() if evaluates else {}
    trainer.save_model(args.output_dir)  # weights, config, tokenizer, generation_config.json, model card
    trainer.save_state()  # trainer_state.json: the log history that `dfactory-hf plot OUTPUT_DIR` draws
    return report(trainer, script, train_output, start_metrics, end_metrics)


if __name__ == "__main__":
    main()
