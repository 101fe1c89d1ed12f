"""Ulysses attention against plain attention, one rank of an sp group (every rank of the launch), float64.

    accelerate launch --config_file configs/accelerate/cpu_fsdp2.yaml --num_processes 2 \\
        tests/distributed/ulysses_worker.py --out ulysses.json

For each case (model heads / KV heads, backend, block-diffusion or full-attention mask over packed rows with
row padding), the same tiny LLaDA2 model runs (a) plainly on the whole rows in this process and (b) under
Ulysses on this rank's slice with the full-length mask. Writes, per case, the largest difference of this rank's
logits and of the parameter gradients (summed over the sp ranks) against (a) (the router's
relative to its largest gradient: it computes in float32), the local model input length,
and the layout facts the test asserts (the attention implementation in use, KV repeats).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_helpers import tiny_model  # noqa: E402

from dfactory_hf.diffusion.masks import build_attention_mask  # noqa: E402
from dfactory_hf.parallel.sequence import SequenceShard  # noqa: E402
from dfactory_hf.parallel.ulysses import apply_sequence_parallel, kv_repeats  # noqa: E402

BLOCK = 4


def packed_rows(seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row 0: documents of 8 and 4 tokens then row padding; row 1: one document filling the row."""
    positions = torch.zeros(2, seq_len, dtype=torch.long)
    real = torch.zeros(2, seq_len, dtype=torch.long)
    positions[0, :8], positions[0, 8:12] = torch.arange(8), torch.arange(4)
    real[0, :12] = 1
    positions[1], real[1] = torch.arange(seq_len), 1
    return positions, real


def run_case(*, heads: int, kv_heads: int, backend: str, block_diffusion: bool, shard: SequenceShard,
             seq_len: int = 16) -> dict:
    torch.manual_seed(0)
    positions, real = packed_rows(seq_len)
    x_t = torch.randint(0, 128, (2, seq_len))
    x_0 = torch.randint(0, 128, (2, seq_len))
    segments = (x_t, x_0) if block_diffusion else (x_t,)
    full_ids = torch.cat(segments, 1)
    full_pos = torch.cat([positions] * len(segments), 1)
    # flex has no backward and no float64 on CPU: forward only, in float32.
    train = backend != "flex_attention"
    dtype = torch.float64 if train else torch.float32
    model = tiny_model(seed=1, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       experts_implementation="eager").to(dtype)
    model.train(train)
    model.set_attn_implementation("sdpa" if backend == "flex_attention" else backend)
    plain_mask = build_attention_mask(positions, real, block_size=BLOCK, block_diffusion=block_diffusion,
                                      attn_implementation=model.config._attn_implementation, dtype=dtype)
    weights = torch.randn(2, full_ids.shape[1], 128, dtype=dtype)

    with torch.set_grad_enabled(train):
        logits = model(input_ids=full_ids, position_ids=full_pos, attention_mask=plain_mask).logits
    if train:
        (logits * weights).sum().backward()
    reference_logits = shard.local(*logits.detach().chunk(len(segments), dim=1))
    reference_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    model.set_attn_implementation(backend)
    apply_sequence_parallel(model, shard.size)
    mask = build_attention_mask(positions, real, block_size=BLOCK, block_diffusion=block_diffusion,
                                attn_implementation=backend, dtype=dtype)
    local_ids = shard.local(*segments)
    local_pos = shard.local(*[positions] * len(segments))
    seen = []
    hook = model.model.word_embeddings.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    with torch.set_grad_enabled(train):
        local_logits = model(input_ids=local_ids, position_ids=local_pos, attention_mask=mask,
                             sequence_shard=shard).logits
    hook.remove()
    grad_diff = router_grad_diff = 0.0
    if train:
        (local_logits * shard.local(*weights.chunk(len(segments), dim=1))).sum().backward()
        for name, param in model.named_parameters():
            grad = param.grad.clone()
            dist.all_reduce(grad, group=shard.group)
            diff = (grad - reference_grads[name]).abs().max().item()
            if name.endswith("mlp.gate.weight"):  # the router computes in float32 whatever the model dtype
                router_grad_diff = max(router_grad_diff, diff / reference_grads[name].abs().max().item())
            else:
                grad_diff = max(grad_diff, diff)
    return dict(
        heads=heads, kv_heads=kv_heads, backend=backend, block_diffusion=block_diffusion, dtype=str(dtype),
        attn_implementation=model.config._attn_implementation,
        kv_repeats=kv_repeats(heads, kv_heads, shard.size),
        local_input=seen[0], full_length=full_ids.shape[1],
        logits_diff=(local_logits.detach() - reference_logits).abs().max().item(),
        grad_diff=grad_diff, router_grad_diff=router_grad_diff, trained=train, num_grads=len(reference_grads),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    world = dist.get_world_size()
    cases = []
    for heads, kv_heads in ((4, 2), (4, 1), (8, 2)):
        for backend in ("sdpa", "eager", "flex_attention"):
            for block_diffusion in (True, False):
                if backend == "flex_attention" and (heads, kv_heads) != (4, 2):
                    continue
                shard = SequenceShard(group=dist.group.WORLD, size=world, rank=dist.get_rank(),
                                      num_segments=2 if block_diffusion else 1)
                cases.append(run_case(heads=heads, kv_heads=kv_heads, backend=backend,
                                      block_diffusion=block_diffusion, shard=shard))
    everyone = [None] * world
    dist.all_gather_object(everyone, cases)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(dict(world_size=world, ranks=everyone)))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
