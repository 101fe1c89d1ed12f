"""Build the Trainer of examples/sft_llada2.py from a recipe x launch-config pair, shard the model, and report
(no training): the half of test_launch_configs.py that runs under `accelerate launch`.

    accelerate launch --config_file configs/accelerate/fsdp2_offload.yaml --num_processes 2 --cpu \\
        tests/distributed/build_trainer.py --out report.json --config configs/sft/llada2_flash_bd_sft.yaml

Arguments after `--out` are the example's own (`--config`, overrides); the shipped tiny model stands in for the
hub checkpoint, which this machine cannot download.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))

import sft_llada2  # noqa: E402
from trl import TrlParser  # noqa: E402

from dfactory_hf import DiffusionTrainer, DiffusionTrainingArguments  # noqa: E402
from dfactory_hf.parallel.fsdp import sharded_parameter_count  # noqa: E402


def main() -> None:
    out = Path(sys.argv[sys.argv.index("--out") + 1])
    argv = [a for i, a in enumerate(sys.argv[1:]) if a != "--out" and sys.argv[i] != "--out"]
    script, args = TrlParser((sft_llada2.ScriptArguments, DiffusionTrainingArguments)).parse_args_and_config(argv)
    data = sft_llada2.load_data(script, args.seed)
    model, tokenizer = sft_llada2.load_model_and_tokenizer(script, args)
    trainer = DiffusionTrainer(model=model, args=args, train_dataset=data["train"], processing_class=tokenizer)
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    # What train() does before its first step: wrap/shard the model, create the optimizer and the scheduler.
    prepared, _ = trainer._prepare_for_training(max_steps=1, train_dataloader=None, resume_from_checkpoint=None)
    num_sharded, num_params = sharded_parameter_count(prepared)
    report = dict(
        world_size=trainer.args.world_size,
        distributed_type=str(trainer.accelerator.distributed_type),
        is_fsdp2=trainer.accelerator.is_fsdp2,
        num_sharded=num_sharded, num_params=num_params,
        fsdp_activation_checkpointing=bool(plugin and plugin.activation_checkpointing),
        checkpoint_wrapped=any("checkpoint_wrapped_module" in name for name, _ in prepared.named_modules()),
        hf_activation_checkpointing=bool(trainer.args.activation_checkpointing),
        offload=type(plugin.cpu_offload).__name__ if plugin else None,
        state_dict_type=str(plugin.state_dict_type) if plugin else None,
        mixed_precision=trainer.accelerator.mixed_precision,
        layout=trainer.parallel_state.describe(),
    )
    if trainer.is_world_process_zero():
        out.write_text(json.dumps(report))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
