"""Expert parallel against FSDP alone: what each rank holds and gathers, and the step time, on CPU ranks.

Run from the repository root (each row is its own `accelerate launch`; ~2 minutes on 2 cores)::

    python bench/expert_parallel.py                   # 2 ranks: ep 1 (FSDP2 only) and ep 2
    python bench/expert_parallel.py --ranks 4 --ep 1 2 4

Each row trains 6 SGD steps of the real `DiffusionTrainer` (packed rows, block diffusion) on a LLaDA2-shaped model
whose experts dominate (hidden 256, 16 routed experts top-2 of width 512, 4 layers; 22M parameters) and reports,
per rank (max over ranks):

- `params MiB`: parameter bytes the rank holds between steps (local shards): 1/N of the model either way;
- `experts gathered MiB`: expert weights materialised on the rank for one MoE layer's forward (measured in a
  forward pre-hook on the experts, after FSDP's all-gather): all experts under FSDP alone, num_experts / ep under
  expert parallel, which is what expert parallel saves in memory and all-gather traffic;
- `peak RSS MiB` of the process, and `step s`: median time of steps 3-6.

CPU timings say little about GPU all-to-all (gloo, one thread per rank; 4 ranks on a 2-core machine are
oversubscribed): read the memory columns, not the time, here.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from launching import ROOT, run_for_json  # noqa: E402  (bench/ is the script's folder)
CONFIG = ROOT / "configs" / "accelerate" / "cpu_fsdp2.yaml"
MiB = 2**20


def local_bytes(tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from transformers import TrainerCallback

    sys.path.insert(0, str(ROOT / "tests"))
    from trainer_helpers import TOKENIZER, demo_args, demo_data

    from dfactory_hf import DiffusionTrainer
    from dfactory_hf.models.llada2_moe import LLaDA2MoeForCausalLM, shipped_config

    torch.manual_seed(0)
    config = shipped_config("tiny", hidden_size=256, num_experts=16, n_group=4, topk_group=2,
                            moe_intermediate_size=512, pad_token_id=TOKENIZER.pad_token_id,
                            eos_token_id=TOKENIZER.eos_token_id)
    config._attn_implementation = "sdpa"
    model = LLaDA2MoeForCausalLM(config)
    training_args = demo_args(Path(args.scratch), optim="sgd", learning_rate=0.1, max_steps=6, logging_steps=6,
                              packing=True, max_seq_len=64, max_tokens_per_micro_batch=256, ep_size=args.ep[0],
                              ddp_backend="gloo", ddp_timeout=120)
    data = demo_data(num_train=128, task="add2")
    trainer = DiffusionTrainer(model=model, args=training_args, train_dataset=data["train"],
                               processing_class=TOKENIZER)
    gathered, times = [], []

    def measure(module, _args):
        gathered.append(local_bytes(module.gate_up_proj) + local_bytes(module.down_proj))

    for name, module in model.named_modules():
        if name.endswith("layers.1.mlp.experts"):
            module.register_forward_pre_hook(measure)

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.start)

    trainer.add_callback(Clock())
    trainer.train()
    row = dict(rank=dist.get_rank(), params=sum(local_bytes(p) for p in trainer.model.parameters()) / MiB,
               gathered=max(gathered) / MiB, rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               step=statistics.median(times[2:]), total=sum(p.numel() for p in model.parameters()))
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def launch(ranks: int, ep: int, scratch: Path) -> list[dict]:
    out = scratch / f"rows-{ranks}-{ep}.json"
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(CONFIG),
               "--num_processes", str(ranks), "--fsdp_cpu_ram_efficient_loading", "false",
               str(Path(__file__).resolve()), "--worker", "--ep", str(ep),
               "--out", str(out), "--scratch", str(scratch / f"run-{ranks}-{ep}")]
    return run_for_json(command, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--ep", type=int, nargs="+", default=None, help="default: 1 2")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    eps = args.ep or [1, 2]
    with tempfile.TemporaryDirectory() as tmp:
        results = {ep: launch(args.ranks, ep, Path(tmp)) for ep in eps}
    total = results[eps[0]][0]["total"]
    print(f"\n{args.ranks} CPU ranks (gloo), {total / 1e6:.0f}M parameters, fp32, SGD; per rank, max over ranks; "
          f"`python bench/expert_parallel.py --ranks {args.ranks} --ep {' '.join(map(str, eps))}`\n")
    print("| layout | params MiB | experts gathered per MoE layer MiB | vs FSDP alone | peak RSS MiB | step s |")
    print("|---|---|---|---|---|---|")
    base = max(r["gathered"] for r in results[eps[0]])
    for ep, rows in results.items():
        gathered = max(r["gathered"] for r in rows)
        layout = "FSDP2 alone" if ep == 1 else f"FSDP2 + ep {ep}"
        print(f"| {layout} | {max(r['params'] for r in rows):.1f} | {gathered:.1f} | {gathered / base:.2f} | "
              f"{max(r['rss'] for r in rows):.0f} | {max(r['step'] for r in rows):.3f} |")


if __name__ == "__main__":
    main()
