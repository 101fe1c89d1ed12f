"""One DiffusionTrainer run, as a plain process or as one rank of `torchrun` (gloo, CPU): the multi-process half of
tests/test_distributed.py. Trains the tiny model for a few SGD steps and, on the main process, writes the final
parameters, the logged losses and the micro-batches every rank trained on to `--out`.

    torchrun --standalone --nproc_per_node 2 tests/distributed/train_worker.py --out run.pt --grad_accum 1
    python tests/distributed/train_worker.py --out run.pt --grad_accum 2      # the same global steps, one process
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer_helpers import demo_data, demo_model, demo_trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--grad_accum", type=int, required=True)
    parser.add_argument("--layout", choices=["packed", "padded"], required=True)
    args = parser.parse_args()

    # ddp_backend in a plain process makes accelerate look for a process group that torchrun did not create.
    distributed = dict(ddp_backend="gloo", ddp_timeout=60) if "WORLD_SIZE" in os.environ else {}
    layout = (dict(packing=True, max_seq_len=64, max_tokens_per_micro_batch=160) if args.layout == "packed"
              else dict(per_device_train_batch_size=3))
    with tempfile.TemporaryDirectory() as scratch:
        trainer = demo_trainer(
            Path(scratch), model=demo_model(seed=0), data=demo_data(num_train=64, task="add2"),
            optim="sgd", learning_rate=0.5, max_grad_norm=0.0, max_steps=3, logging_steps=1,
            gradient_accumulation_steps=args.grad_accum, **distributed, **layout)
        seen = []
        collate = trainer.data_collator

        def recording_collator(features):
            seen.append(sorted(f["sample_index"] for f in features))
            return collate(features)

        trainer.data_collator = recording_collator
        trainer.train()
        # Trainer fetches one micro-batch beyond the last step before it stops: keep the trained ones.
        seen = seen[: 3 * args.grad_accum]
        everyone = [None] * trainer.args.world_size
        if trainer.args.world_size > 1:
            dist.all_gather_object(everyone, seen)
        else:
            everyone = [seen]
        if trainer.is_world_process_zero():
            torch.save(dict(
                world_size=trainer.args.world_size,
                parameters={name: p.detach().clone() for name, p in trainer.model.named_parameters()},
                losses=[entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
                supervised=[entry["supervised_tokens"] for entry in trainer.state.log_history if "loss" in entry],
                micro_batches=everyone,
            ), args.out)


if __name__ == "__main__":
    main()
