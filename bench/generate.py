"""Block-diffusion generation: KV-cached decoding vs recomputing the whole prefix at every step.

Run from the repository root::

    python bench/generate.py                                   # small config, gen 256, batch 1 and 8
    python bench/generate.py --gen_length 64 --batch_sizes 1 --threads 1

The shipped `small` LLaDA2-MoE config (~120M parameters, vocab 32768), random init (seed fixed), fp32, on
whatever device `--device` names (CPU by default). Prompts are random ids of 32..64 tokens (seeded); block 32,
steps 32, threshold 0.95, temperature 0, no EOS (every row generates exactly `--gen_length` tokens, so both
modes do the same number of steps). Each batch size runs `generate(use_cache=True)` then
`generate(use_cache=False)`, times both (one warm-up generation of one block first) and asserts identical tokens.

Identical up to fp32 rounding: the cache computes the same function in a different order (blocks one at a time
instead of the whole prefix), so logits differ by ~1e-6 relative. With random weights every mask position of a
block predicts almost the same distribution, and over thousands of decisions two positions' confidences can
come within that noise of each other (seen: 3e-7 relative apart at batch 8). Such a near-tie can be decided
differently and the runs diverge from there. So when tokens differ, the benchmark finds the first step whose
decision differs and passes only if that decision was a near-tie (relative confidence margin or top-2 logit gap
below 1e-4) in either run; any other difference fails.

Random weights almost never reach probability 0.95, so nearly every token is committed by the fallback
schedule (one per step): 32 forward passes per block, the worst case for block diffusion and the case where
a cache matters most. Recomputing runs each step over the whole prefix (prompt + every committed block), the
cached path over the current block only, so the speedup grows with gen_length.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfactory_hf import generate  # noqa: E402
from dfactory_hf.models.llada2_moe import LLaDA2MoeForCausalLM, shipped_config  # noqa: E402


def random_prompts(batch: int, vocab: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(32, 65, (batch,), generator=generator).tolist()
    return [torch.randint(0, vocab - 2, (length,), generator=generator).tolist() for length in lengths]


def count_forward_calls(model: torch.nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    return calls


NEAR_TIE = 1e-4  # fp32 rounding moves logits by ~1e-6 relative between the two modes


class DecisionLog:
    """`on_step` observer: what each step committed and how far its decision was from flipping."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # committed, tokens, margin [B]

    def __call__(self, step) -> None:
        confidence, masked, committed = step.confidence.double(), step.still_masked, step.committed
        left = masked & ~committed
        inf = torch.tensor(float("inf"), dtype=torch.float64, device=confidence.device)
        weakest_committed = confidence.masked_fill(~committed, float("inf")).amin(dim=-1)
        strongest_left = confidence.masked_fill(~left, float("-inf")).amax(dim=-1)
        both_sides = committed.any(dim=-1) & left.any(dim=-1)
        rank_margin = torch.where(both_sides, (weakest_committed - strongest_left) / weakest_committed, inf)
        threshold_distance = (confidence - self.threshold).abs() / self.threshold
        threshold_margin = threshold_distance.masked_fill(~masked, float("inf")).amin(dim=-1)
        top2 = step.logits.topk(2, dim=-1).values.double()
        logit_margin = (top2[..., 0] - top2[..., 1]).masked_fill(~committed, float("inf")).amin(dim=-1)
        margin = torch.minimum(torch.minimum(rank_margin, threshold_margin), logit_margin)
        self.steps.append((committed.cpu(), step.tokens.masked_fill(~committed, -1).cpu(), margin.cpu()))


def explain_divergence(cached: DecisionLog, recomputed: DecisionLog) -> str:
    """Why two runs' tokens differ: the first differing decision must be an fp32 near-tie, else AssertionError."""
    for index, (a, b) in enumerate(zip(cached.steps, recomputed.steps)):
        rows = ((a[0] != b[0]) | (a[1] != b[1])).any(dim=-1)
        if rows.any():
            margin = torch.minimum(a[2], b[2])[rows].min().item()
            assert margin < NEAR_TIE, f"decision {index} differs with margin {margin:.1e}: not a rounding near-tie"
            return (f"decisions identical for {index} steps, then a near-tie (margin {margin:.1e} < {NEAR_TIE:.0e}) "
                    "was decided differently: fp32 rounding, not the cache")
    raise AssertionError("tokens differ although every recorded decision is identical")


@torch.no_grad()
def forward_seconds(model, batch: int, length: int, vocab: int, device: str, repeats: int = 5) -> float:
    """Median time of one forward of `batch` rows of `length` tokens (logits of one position per row)."""
    ids = torch.randint(0, vocab - 2, (batch, length), generator=torch.Generator().manual_seed(0)).to(device)
    times = []
    for _ in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        model(input_ids=ids, logits_to_keep=1)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[repeats // 2]


def cache_bound(model, batch: int, args, vocab: int) -> str:
    """What a cache can gain at most: a cached step runs one block, a recomputing step the prefix up to the block
    (on average the prompt, half the answer and the block); the ratio of their forward times bounds the speedup
    (weight reads dominate small forwards, so it is far below the ratio of token counts)."""
    recompute_length = 48 + args.gen_length // 2 + args.block_length  # prompts are 32-64 tokens
    cached = forward_seconds(model, batch, args.block_length, vocab, args.device)
    recompute = forward_seconds(model, batch, recompute_length, vocab, args.device)
    return (f"batch {batch}: a forward of {args.block_length} tokens takes {cached * 1e3:.0f} ms, of "
            f"{recompute_length} tokens (a mean recomputing step) {recompute * 1e3:.0f} ms: the cache can gain at "
            f"most {recompute / cached:.2f}x ({recompute_length / args.block_length:.1f}x fewer tokens)")


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small", help="shipped config name")
    parser.add_argument("--gen_length", type=int, default=256)
    parser.add_argument("--block_length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    config = shipped_config(args.config)
    model = LLaDA2MoeForCausalLM(config).to(args.device, torch.float32).eval()
    mask_token_id = config.vocab_size - 1
    calls = count_forward_calls(model)
    settings = dict(block_length=args.block_length, steps=args.steps, threshold=args.threshold,
                    eos_token_id=None, mask_token_id=mask_token_id)
    generate(model, random_prompts(1, config.vocab_size, args.seed), gen_length=args.block_length, **settings)

    print(f"config {args.config} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, fp32), "
          f"device {args.device}, {torch.get_num_threads()} CPU threads, gen_length {args.gen_length}, "
          f"block {args.block_length}, steps {args.steps}, threshold {args.threshold}, prompts 32-64 tokens\n")
    print("| batch | mode | tokens generated | seconds | tokens/s | speedup |")
    print("|---:|---|---:|---:|---:|---:|")
    forward_calls, notes = {}, []
    for batch in args.batch_sizes:
        prompts = random_prompts(batch, config.vocab_size, args.seed + batch)
        results, seconds, logs = {}, {}, {}
        for mode, use_cache in (("cached", True), ("recompute", False)):
            calls[0] = 0
            logs[mode] = DecisionLog(args.threshold)
            synchronize(args.device)
            start = time.perf_counter()
            results[mode] = generate(model, prompts, gen_length=args.gen_length, use_cache=use_cache,
                                     on_step=logs[mode], **settings)
            synchronize(args.device)
            seconds[mode] = time.perf_counter() - start
            forward_calls[(batch, mode)] = calls[0]
        if results["cached"] == results["recompute"]:
            notes.append(f"batch {batch}: cached and recomputed tokens identical")
        else:
            notes.append(f"batch {batch}: tokens differ; {explain_divergence(logs['cached'], logs['recompute'])}")
        for mode in ("recompute", "cached"):
            tokens = sum(len(row) for row in results[mode])
            speedup = seconds["recompute"] / seconds[mode]
            print(f"| {batch} | {mode} | {tokens} | {seconds[mode]:.1f} | {tokens / seconds[mode]:.1f} "
                  f"| {speedup:.2f}x |", flush=True)

    print("\n" + "\n".join(notes))
    for batch in args.batch_sizes:
        print(cache_bound(model, batch, args, config.vocab_size))
    print("Model forward calls (up to `steps` per block; a prompt that does not end on a block boundary adds a "
          "partial first block; cached adds one prefill and one call per finished block): "
          + ", ".join(f"batch {b} {m} {n}" for (b, m), n in forward_calls.items()))
    print("Random weights rarely pass the threshold, so most tokens are committed by the fallback schedule "
          "(one per step); a trained model commits several per step and needs fewer forward calls.")


if __name__ == "__main__":
    main()
