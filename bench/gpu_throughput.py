"""Training throughput and MFU at LLaDA2.0-mini's layer shapes on one GPU, and the KV-cached sampler's tokens/s.

    python bench/gpu_throughput.py                      # one CUDA GPU (H100/H200: ~5 minutes)
    python bench/gpu_throughput.py --layers 8 --seq_len 4096 --steps 10
    python bench/gpu_throughput.py --tiny               # CPU smoke run of the same code (sdpa only, no compile)

The model: LLaDA2.0-mini's layers (hidden 2048, 16 heads, 4 KV heads, head_dim 128, 256 routed experts top-8 in
8 groups (top-4 groups), 1 shared expert, moe_intermediate 512, vocab 157,184), depth cut to `--layers` (one dense
layer, the rest MoE) so one GPU holds the fp32 master weights, gradients and AdamW state. Data: packed rows of
`--seq_len` L tokens (2L = 8192 model positions at L = 4096) of documents of 256..2048 tokens, block 32, mask rate
t ~ U[0.3, 0.8]. The real training step: `diffusion_step` (forward, chunked loss), backward, AdamW (fused on
GPU), bf16 autocast with fp32 master weights and the routed experts in bf16 (trainer/precision.py).

Rows (one process, the same batches):
- `sdpa + dense mask`: the dense 2L x 2L mask, the baseline;
- `flex + BlockMask`: flex attention skipping masked tiles (GPU only: no flex backward on CPU);
- `flex + BlockMask + compile`: the same with each decoder layer `torch.compile`d;
- `... + fused head loss`: the same with `--fused_head_loss` (the loss applies the LM head chunk by chunk and
  recomputes it in backward: no [N, V] logits; plain torch), its peak memory and speed against the row above.
  On CPU (`--tiny`) the fused row follows the sdpa one.

Columns: real tokens/s (document tokens, each once), achieved TFLOPS = the exact useful FLOPs of the step
(trainer/flops.py: 2L positions, active experts only, allowed attention pairs, supervised logits; the same count
the trainer logs) / step time, MFU against the device's bf16 dense peak (flops.py's table), peak memory.
Then the KV-cached sampler (`generate`, greedy, block 32, 32 steps, threshold 0.95) at batch 1 and 32:
generated tokens/s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dfactory_hf import generate  # noqa: E402
from dfactory_hf.data.collators import PackingCollator  # noqa: E402
from dfactory_hf.models.llada2_moe import LLaDA2MoeForCausalLM, shipped_config  # noqa: E402
from dfactory_hf.trainer.flops import batch_training_flops, peak_bf16_flops  # noqa: E402
from dfactory_hf.trainer.forward import DiffusionObjective, diffusion_step  # noqa: E402
from dfactory_hf.trainer.precision import use_autocast_experts  # noqa: E402

BLOCK, MASK = 32, 156_895
MINI = dict(vocab_size=157_184, hidden_size=2048, intermediate_size=5120, num_attention_heads=16,
            num_key_value_heads=4, head_dim=128, num_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4,
            moe_intermediate_size=512, num_shared_experts=1, first_k_dense_replace=1)
TINY = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, num_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, moe_intermediate_size=64,
            num_shared_experts=1, first_k_dense_replace=1)


def build_model(shape: dict, layers: int, attn: str, device: torch.device) -> LLaDA2MoeForCausalLM:
    config = shipped_config("tiny", **shape, num_hidden_layers=layers, pad_token_id=0, eos_token_id=1)
    config._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        model = LLaDA2MoeForCausalLM(config)
    use_autocast_experts(model)
    return model.train()


def batches(seq_len: int, rows: int, count: int, vocab: int, *, min_doc: int, max_doc: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    collator = PackingCollator(mask_token_id=min(MASK, vocab - 1), pad_token_id=0, block_size=BLOCK,
                               max_seq_len=seq_len)
    out = []
    for index in range(count):
        features = []
        for _ in range(rows):
            used = 0
            while used < seq_len:
                length = min(BLOCK * int(torch.randint(min_doc // BLOCK, max_doc // BLOCK + 1, (1,),
                                                       generator=generator)), seq_len - used)
                ids = torch.randint(3, vocab - 2, (length,), generator=generator).tolist()
                features.append({"input_ids": ids, "prompt_length": min(64, length // 4),
                                 "sample_index": index * 1000 + len(features)})
                used += length
        out.append(collator(features))
    return out


def time_training(model, data: list[dict], *, attn: str, device: torch.device, warmup: int, compiled: bool,
                  fused: bool):
    if compiled:
        for layer in model.model.layers:
            layer.compile()
    objective = DiffusionObjective(block_size=BLOCK, fused_head_loss=fused)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    data = [{k: v.to(device) for k, v in batch.items()} for batch in data]

    def step(batch) -> None:
        with autocast:
            loss = diffusion_step(model, batch, objective, attn_implementation=attn,
                                  mask_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).loss.loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for batch in data[:warmup]:
        step(batch)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    start = time.perf_counter()
    for batch in data[warmup:]:
        step(batch)
    sync()
    seconds = time.perf_counter() - start
    timed = data[warmup:]
    flops = sum(batch_training_flops(model.config, b, block_size=BLOCK, block_diffusion=True,
                                     num_logits=int((b["labels"] != -100).sum())) for b in timed)
    tokens = sum(int(b["attention_mask"].sum()) for b in timed)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return dict(tokens_per_s=tokens / seconds, flops_per_s=flops / seconds, step_s=seconds / len(timed), peak=peak)


def time_generation(model, batch_size: int, *, gen_length: int, vocab: int, device: torch.device) -> float:
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, vocab - 2, (64,), generator=generator).tolist() for _ in range(batch_size)]
    settings = dict(gen_length=gen_length, block_length=BLOCK, steps=BLOCK, threshold=0.95, eos_token_id=None,
                    mask_token_id=min(MASK, vocab - 1))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        generate(model, prompts[:1], **{**settings, "gen_length": BLOCK})  # warm-up
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        outputs = generate(model, prompts, **settings)
        sync()
    return sum(len(o) for o in outputs) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=1, help="packed rows per step")
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--gen_length", type=int, default=256)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (sdpa only): checks the script runs")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    shape = TINY if args.tiny else MINI
    if args.tiny:
        args.layers, args.seq_len, args.steps, args.warmup, args.gen_length = 2, 256, 2, 1, 64
    min_doc, max_doc = (256, 2048) if not args.tiny else (64, 128)
    data = batches(args.seq_len, args.rows, args.warmup + args.steps, shape["vocab_size"], min_doc=min_doc,
                   max_doc=max_doc)
    peak = peak_bf16_flops(device)
    variants = [("sdpa + dense mask", "sdpa", False, False)]
    if device.type == "cuda":
        variants += [("flex + BlockMask", "flex_attention", False, False),
                     ("flex + BlockMask + compile", "flex_attention", True, False),
                     ("flex + BlockMask + compile + fused head loss", "flex_attention", True, True)]
    else:
        variants += [("sdpa + dense mask + fused head loss", "sdpa", False, True)]
    results = []
    for name, attn, compiled, fused in variants:
        model = build_model(shape, args.layers, attn, device)
        results.append((name, time_training(model, data, attn=attn, device=device, warmup=args.warmup,
                                            compiled=compiled, fused=fused)))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    model = build_model(shape, args.layers, "sdpa", device).eval()
    decoding = {batch: time_generation(model, batch, gen_length=args.gen_length, vocab=shape["vocab_size"],
                                       device=device) for batch in (1, 32 if not args.tiny else 4)}

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n`python bench/gpu_throughput.py{' --tiny' if args.tiny else ''}`: {device_name}, torch {torch.__version__}; "
          f"{args.layers} layers of {'LLaDA2.0-mini' if not args.tiny else 'tiny'} shape, L {args.seq_len} "
          f"(2L = {2 * args.seq_len} positions) x {args.rows} row(s), block {BLOCK}, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}, {args.steps} timed steps\n")
    baseline = results[0][1]["tokens_per_s"]
    print("| attention | real tokens/s | vs dense | step s | achieved TFLOPS | MFU | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results:
        mfu = f"{r['flops_per_s'] / peak:.1%}" if peak else "n/a"
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / baseline:.2f}x | {r['step_s']:.3f} | "
              f"{r['flops_per_s'] / 1e12:.3g} | {mfu} | {r['peak'] / 2**30:.1f} |")
    print("\n| sampler (KV cache, greedy, threshold 0.95) | generated tokens/s |\n|---|---|")
    for batch, rate in decoding.items():
        print(f"| batch {batch}, {args.gen_length} new tokens | {rate:.1f} |")


if __name__ == "__main__":
    main()
