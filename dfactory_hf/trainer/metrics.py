"""Diffusion training metrics, summed on device between two logging events and reduced across ranks.

Logged (prefix `train_` is added by the caller only where Trainer expects it):
- `ce_loss`: unweighted cross-entropy per supervised token; `cap_loss`: CAP entropy term per supervised token
  (before `confidence_beta`); `masked_token_accuracy`; `mean_mask_rate` (mean t over documents);
- `model_tokens_per_second`: every token the model processed (B x 2L in block diffusion, padding included),
  `real_tokens_per_second`: document tokens, each counted once; `padding_fraction` of the rows.
- `tflops_per_device`: useful training FLOPs (flops.py: 2L positions, active experts, allowed attention pairs,
  supervised logits) per second and device; `mfu` against the device's bf16 peak when it is known (not on CPU);
- draft-and-edit training only (`streams=True`): `m2t_loss` / `t2t_loss` / `keep_loss`, the cross-entropy per
  masked / edited / kept supervised token, `edit_accuracy` (edited tokens put back right) and `keep_accuracy`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .forward import StepOutput

STREAMS = ("m2t", "t2t", "keep")  # noise kinds 1, 2, 3 (collators.py)
STREAM_METRICS = (*(f"{stream}_loss" for stream in STREAMS), "edit_accuracy", "keep_accuracy")
KEYS = ("supervised", "ce_sum", "cap_sum", "correct", "model_tokens", "row_tokens", "real_tokens",
        "mask_rate_sum", "documents", "flops",
        *(f"{stream}_{what}" for stream in STREAMS for what in ("ce_sum", "correct", "tokens")))


class MetricWindow:
    def __init__(self, *, streams: bool = False):
        self.streams = streams
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = dict.fromkeys(KEYS, 0.0)
        self.start = time.perf_counter()
        self.num_steps = 0

    def add(self, step: StepOutput) -> None:
        loss = step.loss
        values = {
            "supervised": loss.num_tokens,
            "ce_sum": loss.ce_sum.detach(),
            "cap_sum": loss.cap_sum.detach(),
            "correct": loss.num_correct,
            "model_tokens": step.num_model_tokens,
            "row_tokens": step.num_row_tokens,
            "real_tokens": step.num_real_tokens,
            "mask_rate_sum": step.mask_rate_sum.detach(),
            "documents": step.num_documents,
        }
        if loss.group_ce_sum is not None:
            for kind, stream in enumerate(STREAMS, start=1):
                values[f"{stream}_ce_sum"] = loss.group_ce_sum[kind]
                values[f"{stream}_correct"] = loss.group_correct[kind]
                values[f"{stream}_tokens"] = loss.group_tokens[kind]
        for key, value in values.items():
            self.sums[key] = self.sums[key] + value
        self.num_steps += 1

    def add_flops(self, flops: float) -> None:
        self.sums["flops"] = self.sums["flops"] + flops

    def summary(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
                device: torch.device | str = "cpu", *, num_devices: int = 1,
                peak_flops: float | None = None) -> dict[str, float]:
        """Derived metrics; `reduce_sum` sums a 1-D tensor over EVERY rank (all ranks must call it together): the
        sums are per-rank partials under sequence parallel, and per-replica counts come from sp rank 0 only.
        `num_devices` and `peak_flops` (FLOP/s of one device) turn the summed FLOPs into per-device rates."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        stacked = torch.stack([torch.as_tensor(self.sums[key], dtype=torch.float64, device=device) for key in KEYS])
        if reduce_sum is not None:
            stacked = reduce_sum(stacked)
        s = dict(zip(KEYS, stacked.tolist()))
        supervised = max(s["supervised"], 1.0)
        streams = {}
        if self.streams:
            for stream in STREAMS:
                streams[f"{stream}_loss"] = s[f"{stream}_ce_sum"] / max(s[f"{stream}_tokens"], 1.0)
            streams["edit_accuracy"] = s["t2t_correct"] / max(s["t2t_tokens"], 1.0)
            streams["keep_accuracy"] = s["keep_correct"] / max(s["keep_tokens"], 1.0)
        if s["flops"] > 0:
            per_device = s["flops"] / num_devices / elapsed
            streams["tflops_per_device"] = per_device / 1e12
            if peak_flops:
                streams["mfu"] = per_device / peak_flops
        return {**streams,
            "ce_loss": s["ce_sum"] / supervised,
            "cap_loss": s["cap_sum"] / supervised,
            "masked_token_accuracy": s["correct"] / supervised,
            "mean_mask_rate": s["mask_rate_sum"] / max(s["documents"], 1.0),
            "supervised_tokens": s["supervised"],
            "model_tokens_per_second": s["model_tokens"] / elapsed,
            "real_tokens_per_second": s["real_tokens"] / elapsed,
            "padding_fraction": 1.0 - s["real_tokens"] / max(s["row_tokens"], 1.0),
        }
