"""One rank of a streaming run (DDP under torchrun, gloo): trains the tiny model on a jsonl stream whose rows do not
split evenly over the ranks, and writes what this rank trained on to `--out`.rank<N>.pt.

    torchrun --standalone --nproc_per_node 2 tests/distributed/stream_worker.py --data rows.jsonl --out run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import load_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer_helpers import TOKENIZER, demo_args, demo_model, record_collated  # noqa: E402

from dfactory_hf import DiffusionTrainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--max_steps", type=int, default=6)
    options = parser.parse_args()
    stream = load_dataset("json", data_files=options.data, split="train", streaming=True)
    args = demo_args(Path(options.out).parent / "trainer", packing=True, max_seq_len=64, max_tokens_per_micro_batch=128,
                     dynamic_batching_buffer_size=4, gradient_accumulation_steps=1, max_steps=options.max_steps,
                     logging_steps=1, optim="sgd", learning_rate=1e-2)
    trainer = DiffusionTrainer(model=demo_model(), args=args, train_dataset=stream, processing_class=TOKENIZER)
    seen = record_collated(trainer, lambda features: [(f["epoch"], f["sample_index"]) for f in features])
    trainer.train()
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save({"seen": seen, "global_step": trainer.state.global_step, "dp_size": trainer.parallel_state.dp_size,
                "parameters": {name: p.detach().clone() for name, p in trainer.model.named_parameters()}},
               f"{options.out}.rank{rank}.pt")


if __name__ == "__main__":
    main()
