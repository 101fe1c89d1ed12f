"""Peak memory of one training step at LLaDA2's real vocabulary (157,184 tokens): our step vs the public recipe's.

Run from the repository root (CPU is fine; about 5 minutes on one core, ~16 GiB of RAM at L = 4096)::

    python bench/memory_vocab.py                         # L = 1024, 2048, 4096
    python bench/memory_vocab.py --lengths 256 --quick   # a smoke run

The model: LLaDA2-shaped (fused QKV, q/k norms, partial RoPE, GQA, one dense layer then MoE layers with a group-
limited sigmoid router, shared experts), cut to `--layers` layers of hidden 512 so that the vocabulary dominates
as it does at scale (LLaDA2.0-mini: 2 x 157k x 2048 = 644M of its 16B parameters sit in the embedding and the LM
head, and the logits of one 8k-position row in fp32 are 5 GiB). One row of L tokens: documents of 64..512 tokens
(multiples of block 32) with 16-token prompts, packed; mask rate t ~ U[0.3, 0.8]; fp32.

- `recipe`: the public recipe's step: logits for all 2L positions of [x_t ; x_0] in fp32, cross-entropy on the
  x_t half, the dense additive float mask over 2L x 2L;
- `ours`: `diffusion_step` as the trainer runs it: logits only at the supervised x_t positions, fp32
  cross-entropy in chunks of `loss_chunk_size` rows recomputed in backward, the same dense float mask (sdpa);
- `fused`: `ours` with `--fused_head_loss`: the loss applies the LM head itself chunk by chunk, so the [N, V]
  logits and their gradient are never made (plain torch; Liger's and cut-cross-entropy's kernels are Triton,
  GPU only, and cannot run here).

Peak = the RSS high-water mark during forward + backward minus the RSS before it (the model, its gradients from
a warm-up step and the batch are already resident), so it is what the step itself allocates: activations,
logits, the mask. Each configuration runs in its own process (`--_worker`). Targets (issue: ours <= 0.4x the
recipe's at L = 4096). The fused/ours column is the head's own saving.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.launching import run_for_json  # noqa: E402
from dfactory_hf.data.collators import PackingCollator  # noqa: E402
from dfactory_hf.models.llada2_moe import LLaDA2MoeForCausalLM, shipped_config  # noqa: E402
from dfactory_hf.trainer.forward import DiffusionObjective, diffusion_step, model_inputs  # noqa: E402

VOCAB, BLOCK, MASK = 157_184, 32, 156_895
MODES = ("recipe", "ours", "fused")


def build_model(layers: int) -> LLaDA2MoeForCausalLM:
    config = shipped_config("tiny", vocab_size=VOCAB, hidden_size=512, intermediate_size=1024, num_hidden_layers=layers,
                            num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_experts=16,
                            num_experts_per_tok=4, n_group=4, topk_group=2, moe_intermediate_size=256,
                            num_shared_experts=1, first_k_dense_replace=1, pad_token_id=0, eos_token_id=1)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LLaDA2MoeForCausalLM(config).train()


def packed_row(seq_len: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seq_len)
    features, used = [], 0
    while used < seq_len:
        length = min(BLOCK * int(torch.randint(2, 17, (1,), generator=generator)), seq_len - used)
        ids = torch.randint(3, VOCAB - 300, (length,), generator=generator).tolist()
        features.append({"input_ids": ids, "prompt_length": min(16, length - 1), "sample_index": len(features)})
        used += length
    collator = PackingCollator(mask_token_id=MASK, pad_token_id=0, block_size=BLOCK, max_seq_len=seq_len)
    return collator(features)


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:  # the high-water mark back to the current RSS (Linux)
        handle.write("5")


def worker(args) -> None:
    model = build_model(args.layers)
    batch = packed_row(args.seq_len)
    objective = DiffusionObjective(block_size=BLOCK, loss_chunk_size=args.loss_chunk_size,
                                   fused_head_loss=args.mode == "fused")

    def step() -> None:
        if args.mode == "recipe":
            inputs = model_inputs(batch, objective, attn_implementation="sdpa", mask_dtype=torch.float32,
                                  selector=batch["labels"] != -100)
            inputs["logits_to_keep"] = 0
            logits = model(**inputs).logits[:, : batch["labels"].shape[1]].float()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
        else:
            loss = diffusion_step(model, batch, objective, attn_implementation="sdpa").loss.loss
        loss.backward()

    step()  # warm-up: gradients allocated, allocator settled
    before = rss_bytes()
    reset_peak()
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(args.out).write_text(json.dumps(dict(
        peak_bytes=peak - before, seconds=seconds, supervised=int((batch["labels"] != -100).sum()),
        params=sum(p.numel() for p in model.parameters()))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--loss_chunk_size", type=int, default=1024)
    parser.add_argument("--quick", action="store_true", help="one layer: a smoke run")
    parser.add_argument("--out_dir", default="outputs/bench-memory-vocab")
    parser.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--seq_len", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.layers = 1
    if args._worker:
        return worker(args)

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seq_len in args.lengths:
        result = {}
        for mode in MODES:
            path = out / f"{mode}-{seq_len}.json"
            result[mode] = run_for_json([sys.executable, __file__, "--_worker", "--mode", mode, "--seq_len",
                                         str(seq_len), "--layers", str(args.layers), "--loss_chunk_size",
                                         str(args.loss_chunk_size), "--out", str(path)], path)
        rows.append((seq_len, result))

    mib = 2**20
    params = rows[0][1]["ours"]["params"]
    print(f"\n`python bench/memory_vocab.py --lengths {' '.join(map(str, args.lengths))}"
          f"{' --quick' if args.quick else ''}`: torch {torch.__version__}, CPU, 1 thread, fp32, vocab {VOCAB:,}, "
          f"{args.layers} layers of hidden 512 ({params / 1e6:.0f}M parameters), block {BLOCK}, "
          f"loss_chunk_size {args.loss_chunk_size}\n")
    print("| L | model positions 2L | supervised | recipe peak MiB | ours peak MiB | fused peak MiB | ours / recipe "
          "| fused / recipe | fused / ours | recipe s | ours s | fused s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for seq_len, result in rows:
        recipe, ours, fused = (result[mode] for mode in MODES)
        print(f"| {seq_len} | {2 * seq_len} | {ours['supervised']} | {recipe['peak_bytes'] / mib:.0f} | "
              f"{ours['peak_bytes'] / mib:.0f} | {fused['peak_bytes'] / mib:.0f} | "
              f"{ours['peak_bytes'] / recipe['peak_bytes']:.2f} | {fused['peak_bytes'] / recipe['peak_bytes']:.2f} | "
              f"{fused['peak_bytes'] / ours['peak_bytes']:.2f} | {recipe['seconds']:.1f} | {ours['seconds']:.1f} | "
              f"{fused['seconds']:.1f} |")


if __name__ == "__main__":
    main()
