"""One DiffusionTrainer run, as a plain process or as one rank of a distributed launch (gloo, CPU): the
multi-process half of tests/distributed/. Trains the tiny model for a few steps and, on the main process, writes
what the comparison needs to `--out`: the final parameters (gathered from FSDP shards), the logged losses, the
micro-batches every rank trained on, and evidence that the layout engaged (DTensor parameters, mesh axes).

    accelerate launch --config_file configs/accelerate/cpu_fsdp2.yaml --num_processes 2 \\
        tests/distributed/train_worker.py --out run.pt --grad_accum 2 --layout packed
    torchrun --standalone --nproc_per_node 2 tests/distributed/train_worker.py ...   # DDP
    python tests/distributed/train_worker.py --out run.pt --grad_accum 4 --layout packed   # the same steps, one process
    ... --sp_size 2   # Ulysses: the sp ranks of a data replica split every row

`--kill_during_save_at K` ends every rank with exit code 17 in the middle of writing checkpoint K (after the
model and optimizer, before the RNG and trainer state), as a kill would; `--resume last` continues a run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer_helpers import TOKENIZER, demo_args, demo_data, demo_model  # noqa: E402

from dfactory_hf import DiffusionTrainer  # noqa: E402
from dfactory_hf.parallel.expert import local_expert_counts  # noqa: E402
from dfactory_hf.parallel.fsdp import sharded_parameter_count  # noqa: E402
from dfactory_hf.parallel.loading import from_pretrained_on_rank0  # noqa: E402

KILLED = 17


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--grad_accum", type=int, required=True)
    parser.add_argument("--layout", choices=["packed", "padded"], required=True)
    parser.add_argument("--optim", default="sgd")
    parser.add_argument("--max_steps", type=int, default=3)
    parser.add_argument("--output_dir", default=None, help="Trainer output_dir (checkpoints); default a scratch dir")
    parser.add_argument("--save_steps", type=int, default=0, help="0: no checkpoints")
    parser.add_argument("--resume", default=None, help="--resume_from_checkpoint value (a path or `last`)")
    parser.add_argument("--kill_during_save_at", type=int, default=0)
    parser.add_argument("--save_model", default=None, help="save_model() into this directory at the end")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--dp_replicate_size", type=int, default=1)
    parser.add_argument("--sp_size", type=int, default=1)
    parser.add_argument("--ep_size", type=int, default=1)
    parser.add_argument("--router_bias_update_rate", type=float, default=0.0)
    parser.add_argument("--starve_experts", action="store_true",
                        help="bias every gate away from the upper half of the experts (the last ep rank's: no tokens)")
    parser.add_argument("--experts_implementation", default=None, help="eager | grouped_mm (default: the model's)")
    parser.add_argument("--full_attention", action="store_true", help="MDLM mode (x_t alone) instead of blocks")
    parser.add_argument("--model_path", default=None, help="from_pretrained this checkpoint (default: demo_model)")
    parser.add_argument("--evaluate", action="store_true", help="evaluate() after training (loss, accuracy, ELBO)")
    parser.add_argument("--edit_noise_rate", type=float, default=0.0, help="draft-and-edit training")
    parser.add_argument("--edit_keep_weight", type=float, default=0.0)
    parser.add_argument("--fused_head_loss", action="store_true", help="the loss applies the LM head (chunked)")
    parser.add_argument("--shift_labels", action="store_true", help="next-token labels (same_token_labels=False)")
    parser.add_argument("--lora_target_modules", default=None,
                        help="comma-separated: train LoRA adapters on these modules (--use_peft)")
    parser.add_argument("--lora_target_parameters", default=None, help="comma-separated, with --lora_target_modules")
    return parser.parse_args()


def main() -> None:
    args = parse()
    distributed = dict(ddp_backend="gloo", ddp_timeout=60) if "WORLD_SIZE" in os.environ else {}
    layout = (dict(packing=True, max_seq_len=64, max_tokens_per_micro_batch=160) if args.layout == "packed"
              else dict(per_device_train_batch_size=3))
    saving = (dict(save_strategy="steps", save_steps=args.save_steps) if args.save_steps else {})
    output_dir = Path(args.output_dir or Path(args.out).with_suffix(".run"))
    learning_rate = 0.5 if args.optim == "sgd" else 3e-3
    lora = {}
    if args.lora_target_modules:
        lora = dict(use_peft=True, lora_r=4, lora_alpha=8, lora_target_modules=args.lora_target_modules.split(","),
                    lora_target_parameters=(args.lora_target_parameters or "").split(",") if
                    args.lora_target_parameters else [], lora_dropout=0.0)
    training_args = demo_args(
        output_dir, optim=args.optim, learning_rate=learning_rate, max_grad_norm=0.0, max_steps=args.max_steps,
        logging_steps=1, gradient_accumulation_steps=args.grad_accum, bf16=args.bf16,
        dp_replicate_size=args.dp_replicate_size, sp_size=args.sp_size, ep_size=args.ep_size,
        router_bias_update_rate=args.router_bias_update_rate, **lora,
        edit_noise_rate=args.edit_noise_rate, edit_keep_weight=args.edit_keep_weight,
        same_token_labels=not args.shift_labels, fused_head_loss=args.fused_head_loss, loss_chunk_size=16,
        block_diffusion_mode=not args.full_attention, eval_mask_rates=[0.3, 0.7] if args.evaluate else [],
        per_device_eval_batch_size=4, **saving, **distributed, **layout)
    if args.model_path:
        # As examples/sft_llada2.py: read on rank 0 only when the launch config asks for it.
        model = from_pretrained_on_rank0(args.model_path, training_args, dtype=torch.float32)
    else:
        model = demo_model(seed=0)
    if args.experts_implementation:
        model.set_experts_implementation(args.experts_implementation)
    if args.starve_experts:
        with torch.no_grad():
            for module in model.modules():
                if hasattr(module, "expert_bias"):
                    module.expert_bias[module.num_experts // 2:] = -1e4
    on_meta = any(p.is_meta for p in model.parameters())
    data = demo_data(num_train=64, task="add2")
    # 9 held-out documents: not a multiple of ranks x eval batch, so shares and batch counts differ by rank.
    trainer = DiffusionTrainer(model=model, args=training_args, train_dataset=data["train"],
                               eval_dataset=data["test"].select(range(9)), processing_class=TOKENIZER)
    seen = []
    collate = trainer.data_collator

    def recording_collator(features):
        seen.append(sorted(f["sample_index"] for f in features))
        return collate(features)

    trainer.data_collator = recording_collator
    # What the model really received per training micro-batch: (collated row length, model input length).
    lengths, compute_loss = [], trainer.compute_loss
    embedded = []
    trainer.model.get_input_embeddings().register_forward_hook(lambda m, i, o: embedded.append(i[0].shape[1]))

    def recording_compute_loss(model, inputs, *a, **kw):
        loss = compute_loss(model, inputs, *a, **kw)
        if model.training:
            lengths.append((inputs["input_ids"].shape[1], embedded[-1]))
        return loss

    trainer.compute_loss = recording_compute_loss
    head_widths = set()  # the LM head's output width per call: 0 when the loss applied the head (fused)
    trainer.model.get_output_embeddings().register_forward_hook(lambda m, i, out: head_widths.add(out.shape[-1]))
    if args.kill_during_save_at:
        save_rng = trainer._save_rng_state

        def killed_mid_save(checkpoint_dir):
            if trainer.state.global_step == args.kill_during_save_at:
                os._exit(KILLED)
            save_rng(checkpoint_dir)

        trainer._save_rng_state = killed_mid_save
    trainer.train(resume_from_checkpoint=args.resume)
    if args.save_model:
        trainer.save_model(args.save_model)
    metrics = trainer.evaluate() if args.evaluate else {}

    # Trainer fetches one micro-batch beyond the last step before it stops: keep the trained ones.
    seen = seen[: args.max_steps * args.grad_accum]
    state = trainer.parallel_state
    mine = dict(seen=seen, on_meta=on_meta, lengths=lengths, head_widths=sorted(head_widths), sp_rank=state.sp_rank, dp_rank=state.dp_rank,
                local_experts=local_expert_counts(trainer.model),
                expert_bytes_read=getattr(getattr(trainer, "_shard_reader", None), "expert_bytes_read", None),
                expert_bias=[gate.expert_bias.detach().cpu().clone() for gate in trainer.router_load.gates])
    everyone = [None] * trainer.args.world_size
    if trainer.args.world_size > 1:
        dist.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    num_sharded, num_params = sharded_parameter_count(trainer.model)
    first = next(trainer.model.parameters())
    local_numel = first.to_local().numel() if hasattr(first, "to_local") else first.numel()
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if trainer.is_world_process_zero():
        names = [name for name, _ in trainer.model.named_parameters()]
        torch.save(dict(
            world_size=trainer.args.world_size,
            is_fsdp2=trainer.accelerator.is_fsdp2,
            offload=type(getattr(plugin, "cpu_offload", None)).__name__,
            distributed_type=str(trainer.accelerator.distributed_type),
            one_mesh=trainer.accelerator.torch_device_mesh is trainer.parallel_state.mesh,
            shard_mesh=getattr(getattr(first, "device_mesh", None), "mesh_dim_names", None),
            num_sharded=num_sharded, num_params=num_params,
            first_local_numel=local_numel, first_numel=first.numel(),
            layout=trainer.parallel_state.describe(),
            parameters={name: full[name].detach().clone() for name in names},
            trainable=[name for name, p in trainer.model.named_parameters() if p.requires_grad],
            losses=[entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
            steps=[entry["step"] for entry in trainer.state.log_history if "loss" in entry],
            supervised=[entry["supervised_tokens"] for entry in trainer.state.log_history if "loss" in entry],
            # Per data replica (sp rank 0 of each): its ranks share the batch.
            micro_batches=[rank["seen"] for rank in everyone if rank["sp_rank"] == 0],
            loaded_on_meta=[rank["on_meta"] for rank in everyone],
            model_input_lengths=[rank["lengths"] for rank in everyone],
            head_widths=[rank["head_widths"] for rank in everyone],
            sp_ranks=[rank["sp_rank"] for rank in everyone],
            rank_batches=[(rank["dp_rank"], rank["sp_rank"], rank["seen"]) for rank in everyone],
            local_experts=[rank["local_experts"] for rank in everyone],
            expert_bytes_read=[rank["expert_bytes_read"] for rank in everyone],
            expert_bias=[rank["expert_bias"] for rank in everyone],
            tokens_per_expert=trainer.router_load.tokens_per_expert(),
            router_logs=[{k: v for k, v in entry.items() if k.startswith("router_")}
                         for entry in trainer.state.log_history if "loss" in entry],
            experts_implementation=trainer.accelerator.unwrap_model(trainer.model).config._experts_implementation,
            attn_implementation=trainer.accelerator.unwrap_model(trainer.model).config._attn_implementation,
            eval_metrics=metrics,
        ), args.out)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
