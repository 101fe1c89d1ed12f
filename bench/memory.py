"""Memory per rank under FSDP2: one plain process against 2 and 4 ranks, `small` config (111M parameters).

Run from the repository root (each row is a separate launch; the whole table takes a few minutes on 2 cores)::

    python bench/memory.py                  # rows: 1 process, 2 ranks, 2 ranks loading on every rank, 4 ranks
    python bench/memory.py --ranks 1 2      # a subset

Each row loads the same `small` checkpoint (written once, fp32) with `from_pretrained_on_rank0`, trains 2 AdamW
steps of tiny packed batches (so activations are negligible next to the model state) and reports per rank:

- `state MiB`: parameters + gradients + AdamW state this rank holds, counted from the tensors (local shards under
  FSDP2): the number that should fall to about 1/N;
- `peak RSS after load MiB`: the process's peak resident memory once the model is loaded and sharded; with rank-0
  loading (`fsdp_cpu_ram_efficient_loading: true`, the shipped configs) only rank 0 reads the checkpoint;
- `peak RSS MiB`: after training (includes the Python / torch runtime, ~400 MiB here, that does not shrink);
- `GPU max allocated MiB` when run on GPUs.

Launches use `configs/accelerate/cpu_fsdp2.yaml` (rank-0 loading on) and `--fsdp_cpu_ram_efficient_loading false`
for the every-rank row. RSS is a peak over the process's life: rank 0 of the rank-0 rows reads the whole
checkpoint, so its load peak stays near the one-process one; the other ranks' is what the option saves.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

from launching import ROOT, run_for_json  # noqa: E402  (bench/ is the script's folder)
CONFIG = ROOT / "configs" / "accelerate" / "cpu_fsdp2.yaml"
MiB = 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def state_bytes(model, optimizer) -> int:
    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    total = 0
    for p in model.parameters():
        total += local(p).numel() * local(p).element_size()
        if p.grad is not None:
            total += local(p.grad).numel() * local(p.grad).element_size()
    for state in optimizer.state.values():
        for value in state.values():
            if hasattr(value, "numel") and value.dim() > 0:
                total += local(value).numel() * local(value).element_size()
    return total


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from transformers import TrainerCallback

    sys.path.insert(0, str(ROOT / "tests"))
    from trainer_helpers import TOKENIZER, demo_args, demo_data

    from dfactory_hf import DiffusionTrainer
    from dfactory_hf.parallel.loading import from_pretrained_on_rank0

    distributed = dict(ddp_backend="gloo", ddp_timeout=120) if "WORLD_SIZE" in os.environ else {}
    training_args = demo_args(Path(args.scratch), optim="adamw_torch", max_steps=2, logging_steps=1, packing=True,
                              max_seq_len=64, max_tokens_per_micro_batch=128,
                              use_cpu=not torch.cuda.is_available(), **distributed)
    model = from_pretrained_on_rank0(args.checkpoint, training_args, dtype=torch.float32)
    data = demo_data(num_train=64, task="add2")
    trainer = DiffusionTrainer(model=model, args=training_args, train_dataset=data["train"],
                               processing_class=TOKENIZER)
    after_load = {}

    class Record(TrainerCallback):
        def on_train_begin(self, *_, **__):  # the model is loaded and sharded, no step has run
            after_load["rss"] = peak_rss_mib()

        def on_pre_optimizer_step(self, *_, **__):  # gradients present; AdamW state too from the second step
            after_load["state"] = max(after_load.get("state", 0), state_bytes(trainer.model, trainer.optimizer))

    trainer.add_callback(Record())
    trainer.train()
    row = dict(rank=trainer.args.process_index, after_load=after_load["rss"], peak=peak_rss_mib(),
               state=after_load["state"] / MiB,
               gpu=torch.cuda.max_memory_allocated() / MiB if torch.cuda.is_available() else None)
    rows = [None] * trainer.args.world_size
    if dist.is_initialized():
        dist.all_gather_object(rows, row)
    else:
        rows = [row]
    if trainer.is_world_process_zero():
        Path(args.out).write_text(json.dumps(rows))
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(ranks: int, *, every_rank: bool, checkpoint: Path, scratch: Path) -> list[dict]:
    out = scratch / f"rows-{ranks}-{every_rank}.json"
    script = [str(Path(__file__).resolve()), "--worker", "--checkpoint", str(checkpoint), "--out", str(out),
              "--scratch", str(scratch / f"run-{ranks}-{every_rank}")]
    if ranks == 1:
        command = [sys.executable, *script]
    else:
        command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(CONFIG),
                   "--num_processes", str(ranks)]
        if every_rank:
            command += ["--fsdp_cpu_ram_efficient_loading", "false"]
        command += script
    return run_for_json(command, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from trainer_helpers import TOKENIZER

    from dfactory_hf.models.llada2_moe import LLaDA2MoeForCausalLM, shipped_config

    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        checkpoint = scratch / "small"
        torch.manual_seed(0)
        config = shipped_config("small", vocab_size=max(len(TOKENIZER), 128), pad_token_id=TOKENIZER.pad_token_id,
                                eos_token_id=TOKENIZER.eos_token_id)
        config._attn_implementation = "sdpa"
        model = LLaDA2MoeForCausalLM(config)
        num_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(checkpoint)
        del model
        plan = [(n, False) for n in args.ranks]
        if 2 in args.ranks:
            plan.insert(plan.index((2, False)) + 1, (2, True))
        results = {(n, every): launch(n, every_rank=every, checkpoint=checkpoint, scratch=scratch)
                   for n, every in plan}

    base = max(r["state"] for r in results[plan[0]])
    print(f"\n`small` config, {num_params / 1e6:.0f}M parameters, fp32, AdamW; MiB per rank (max over ranks; "
          "rank 0 / others where they differ)\n")
    print("| layout | loading | state (params+grads+AdamW) | vs 1 process | peak RSS after load | peak RSS |")
    print("|---|---|---|---|---|---|")
    for (n, every), rows in results.items():
        layout = "1 process" if n == 1 else f"FSDP2, {n} ranks"
        loading = "plain" if n == 1 else ("every rank reads" if every else "rank 0 reads, broadcast")
        state = max(r["state"] for r in rows)

        def split(key):
            first, others = rows[0][key], [r[key] for r in rows[1:]]
            return f"{first:.0f}" if not others else f"{first:.0f} / {max(others):.0f}"

        print(f"| {layout} | {loading} | {state:.0f} | {state / base:.2f} | {split('after_load')} | "
              f"{split('peak')} |")
        if rows[0]["gpu"] is not None:
            print(f"|   GPU max allocated | | {max(r['gpu'] for r in rows):.0f} | | | |")


if __name__ == "__main__":
    main()
