"""Mask construction: flex `BlockMask` from key intervals vs the dense bool (sdpa) mask.

Run from the repository root::

    python bench/masks.py                        # L = 1k .. 32k, dense built while < 4 GiB
    python bench/masks.py --lengths 1024 4096 --max-dense-gib 1 --repeats 5 --threads 1

Per L: batch 1, block_size 32, one packed row of documents of random whole-block lengths (seeded),
block diffusion, so Q = 2L. Times `build_attention_mask(..., "flex_attention")` (O(L) intervals,
tile classification, `BlockMask.from_kv_blocks`) and the `"sdpa"` dense bool mask, the same layout
through transformers' `sdpa_mask`; median of `--repeats` after one warm-up call. Bytes: BlockMask =
sum of the nbytes of its tile tensors plus the four `[1, Q]` interval tensors its mask_mod holds;
dense = Q^2 bools, computed always, built only when below `--max-dense-gib` (its construction
peaks at a few times that). "largest temporary" is the biggest tensor any op creates while
building the BlockMask: it must grow like Q, not Q^2.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfactory_hf.diffusion.masks import build_attention_mask  # noqa: E402

BLOCK_SIZE = 32


def packed_row(seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`[1, L]` position ids / attention mask: documents of 1..64 blocks, then row padding."""
    generator = torch.Generator().manual_seed(seed)
    position_ids = torch.zeros(1, seq_len, dtype=torch.long)
    start, real_len = 0, seq_len - BLOCK_SIZE * int(torch.randint(0, 4, (), generator=generator))
    while start < real_len:
        blocks = int(torch.randint(1, 65, (), generator=generator))
        length = min(blocks * BLOCK_SIZE, real_len - start)
        position_ids[0, start : start + length] = torch.arange(length)
        start += length
    attention_mask = (torch.arange(seq_len) < real_len).long()[None]
    return position_ids, attention_mask


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.nbytes = max(self.nbytes, t.numel() * t.element_size())
        return out


def block_mask_nbytes(block_mask) -> int:
    tensors = [t for t in block_mask.as_tuple(flatten=True) if isinstance(t, torch.Tensor)]
    # The mask_mod closure holds the four [B, Q] interval tensors.
    tensors += [cell.cell_contents for cell in block_mask.mask_mod.__closure__ or ()
                if isinstance(cell.cell_contents, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    raise AssertionError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--max-dense-gib", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, block_size {BLOCK_SIZE}, batch 1\n")
    print("| L | Q = 2L | docs | BlockMask build | BlockMask bytes | largest temporary "
          "| dense build | dense bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for seq_len in args.lengths:
        position_ids, attention_mask = packed_row(seq_len, seed=seq_len)
        num_docs = int(((position_ids == 0) & attention_mask.bool()).sum())
        build = lambda impl: build_attention_mask(  # noqa: E731
            position_ids, attention_mask, block_size=BLOCK_SIZE, block_diffusion=True, attn_implementation=impl
        )
        flex_ms = median_ms(lambda: build("flex_attention"), args.repeats)
        with LargestTensor() as probe:
            block_mask = build("flex_attention")
        q_len = 2 * seq_len
        dense_bytes = q_len * q_len
        if dense_bytes < args.max_dense_gib * 2**30:
            dense_ms = f"{median_ms(lambda: build('sdpa'), args.repeats):.1f} ms"
        else:
            dense_ms = f"skipped (would need {dense_bytes / 2**30:.1f} GiB)"
        print(
            f"| {seq_len} | {q_len} | {num_docs} | {flex_ms:.1f} ms | {human(block_mask_nbytes(block_mask))} "
            f"| {human(probe.nbytes)} | {dense_ms} | {human(dense_bytes)} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
