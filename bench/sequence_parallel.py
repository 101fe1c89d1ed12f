"""Ulysses sequence parallel: per-rank activation memory and step time, sp = 1 (one plain process) vs 2 and 4.

Run from the repository root (each configuration is its own launch; ~2-4 minutes on 2 cores)::

    python bench/sequence_parallel.py                         # sp 1, 2, 4 at L = 512, 1024, 2048
    python bench/sequence_parallel.py --sp 1 2 --lengths 1024

Each configuration runs the training step's forward and backward (`diffusion_step`, exactly what the trainer
runs: block diffusion, 2L model positions per row, the dense sdpa mask built for the whole row, logits only at
supervised x_t positions) on one packed row of L tokens (documents of 256, half the response masked) of a
LLaDA2-shaped model (hidden 256, 8 query heads, 2 KV heads: sp 4 repeats each KV head on two ranks, 4 layers,
8 experts top-2). Parameters are replicated (no FSDP) so the table isolates what sequence parallel changes.
Per rank, max over ranks:

- `activations MiB`: the tensors autograd saves for backward during the forward (unique storages, parameters
  excluded): the activation memory that sequence parallel divides;
- `peak step MiB`: the rise of the process's peak RSS over the step (forward + backward) above what it held
  before; it includes transients and the full-length mask, which every rank holds (dense: 2L x 2L bytes; the
  flex BlockMask used on GPU is O(L));
- `step s`: median wall time of 3 steps after one warm-up, every rank one thread. CPU timings say little about
  GPU all-to-all; 4 ranks on a 2-core machine are oversubscribed, so their time is not meaningful there.

The last line gives the longest row (among those measured) whose per-rank activations fit `--budget_mib`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from launching import run_for_json  # noqa: E402  (bench/ is the script's folder)
MiB = 2**20
DOC = 256


def worker(args) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(Path(__file__).parent))
    from throughput import memory_mark, reset_memory_mark

    from dfactory_hf.models.llada2_moe import LLaDA2MoeForCausalLM, shipped_config
    from dfactory_hf.parallel.sequence import SequenceShard
    from dfactory_hf.parallel.ulysses import apply_sequence_parallel
    from dfactory_hf.trainer.forward import DiffusionObjective, diffusion_step

    torch.set_num_threads(1)
    shard = None
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
        shard = SequenceShard(group=dist.group.WORLD, size=dist.get_world_size(), rank=dist.get_rank(),
                              num_segments=2)
    torch.manual_seed(0)
    config = shipped_config("tiny", hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                            pad_token_id=0, eos_token_id=1)
    config._attn_implementation = "sdpa"
    model = LLaDA2MoeForCausalLM(config).train()
    if shard is not None:
        apply_sequence_parallel(model, shard.size)
    objective = DiffusionObjective(block_size=32, block_diffusion=True, shift_labels=False)

    length = args.length
    positions = (torch.arange(length) % DOC).view(1, length)
    x_0 = torch.randint(2, config.vocab_size, (1, length))
    masked = (torch.rand(1, length) < 0.5) & (positions >= DOC // 4)  # the first quarter of a document is prompt
    batch = dict(input_ids=x_0, noisy_input_ids=torch.where(masked, 1, x_0),
                 labels=torch.where(masked, x_0, -100), position_ids=positions,
                 attention_mask=torch.ones_like(x_0), mask_rate=torch.full((1, length), 0.5))
    num_items = int(masked.sum())
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def step() -> int:
        saved: dict[int, int] = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in parameters:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = diffusion_step(model, batch, objective, attn_implementation="sdpa", num_items=num_items,
                                 sequence_shard=shard)
        out.loss.loss.backward()
        model.zero_grad(set_to_none=True)
        return sum(saved.values())

    step()  # warm-up
    times, activations, peaks = [], [], []
    for _ in range(3):
        reset_memory_mark(torch.device("cpu"))
        before = memory_mark(torch.device("cpu"))
        if shard is not None:
            dist.barrier()
        start = time.perf_counter()
        activations.append(step())
        times.append(time.perf_counter() - start)
        peaks.append(memory_mark(torch.device("cpu")) - before)
    row = dict(activations=max(activations) / MiB, peak=max(peaks) / MiB, time=statistics.median(times))
    rows = [row]
    if shard is not None:
        rows = [None] * shard.size
        dist.all_gather_object(rows, row)
    if shard is None or shard.rank == 0:
        Path(args.out).write_text(json.dumps(rows))
    if shard is not None:
        dist.destroy_process_group()


def launch(sp: int, length: int, scratch: Path) -> list[dict]:
    out = scratch / f"sp{sp}-L{length}.json"
    script = [str(Path(__file__).resolve()), "--worker", "--length", str(length), "--out", str(out)]
    command = [sys.executable, *script] if sp == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={sp}", *script]
    # A fixed mmap threshold makes glibc return every freed tensor of >= 128 KiB to the OS at once, so the RSS
    # high-water mark follows live tensors instead of what the allocator keeps from the warm-up step.
    return run_for_json(command, out, MALLOC_MMAP_THRESHOLD_="131072")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--budget_mib", type=int, default=256, help="per-rank activation budget for the last line")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if any(length % (max(args.sp) * 32) or length % DOC for length in args.lengths):
        raise SystemExit(f"--lengths must be multiples of {DOC} and of max(sp) x 32")

    with tempfile.TemporaryDirectory() as tmp:
        results = {(sp, length): launch(sp, length, Path(tmp)) for length in args.lengths for sp in args.sp}

    print(f"\nOne packed row of L tokens (2L model positions), block 32, fp32, forward + backward; per rank, max over "
          f"ranks; `python bench/sequence_parallel.py --sp {' '.join(map(str, args.sp))} --lengths "
          f"{' '.join(map(str, args.lengths))}`\n")
    print("| L | sp | activations MiB | vs sp 1 | peak step MiB | vs sp 1 | step s |")
    print("|---|---|---|---|---|---|---|")
    for length in args.lengths:
        base = results.get((1, length))
        for sp in args.sp:
            rows = results[(sp, length)]
            act, peak = max(r["activations"] for r in rows), max(r["peak"] for r in rows)
            ratio_act = f"{act / max(r['activations'] for r in base):.2f}" if base else "-"
            ratio_peak = f"{peak / max(r['peak'] for r in base):.2f}" if base else "-"
            step_time = max(r["time"] for r in rows)
            print(f"| {length} | {sp} | {act:.0f} | {ratio_act} | {peak:.0f} | {ratio_peak} | {step_time:.2f} |")
    fits = {sp: max((length for length in args.lengths
                     if max(r["activations"] for r in results[(sp, length)]) <= args.budget_mib), default=None)
            for sp in args.sp}
    print(f"\nLongest measured row whose per-rank activations fit {args.budget_mib} MiB: "
          + ", ".join(f"sp {sp}: L = {fits[sp]}" for sp in args.sp))

if __name__ == "__main__":
    main()
