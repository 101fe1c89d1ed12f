"""Router load visibility and the aux-loss-free bias update (the `expert_bias` LLaDA2 checkpoints carry).

The trainer counts, for every MoE layer, how many (token, expert) routes each expert received in the training
forwards of one optimizer step (forward hooks on the gates: the selection `top_k_index`, global expert ids, before
any expert-parallel dispatch). At each optimizer step the counts are summed over every rank (each rank routes its
own tokens: its documents, or its sequence piece under sequence parallel) and then:

- added to the logging window: `router_imbalance_layer{i}` = max / mean tokens per expert of MoE layer i since
  the last log, and `router_imbalance_max` over layers (1.0 is perfectly balanced);
- with `router_bias_update_rate` r > 0, each gate's bias moves by `expert_bias += r * sign(mean_load - load)`
  (DeepSeek-V3's aux-loss-free balancing): under-loaded experts become more likely to be selected. The bias only
  steers selection (moe.py). Every rank applies the same all-reduced load, so replicas keep identical biases; the
  bias is a persistent buffer, saved and resumed with the model.

Counting is on only inside the trainer's training forward (`counting()`), so evaluation forwards and the
forward recomputed by activation checkpointing in backward are not counted twice.
"""

from __future__ import annotations

import contextlib
import re

import torch
from torch import nn
from transformers import TrainerCallback


def router_gates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(layer label, gate) of every MoE gate in layer order: modules with an `expert_bias` buffer and
    `num_experts`; the label is the decoder layer's number where the module path has one."""
    gates = []
    for name, module in model.named_modules():
        if isinstance(getattr(module, "expert_bias", None), torch.Tensor) and hasattr(module, "num_experts"):
            match = re.search(r"layers\.(\d+)\.", name)
            gates.append((match.group(1) if match else name, module))
    return gates


@torch.no_grad()
def bias_update(expert_bias: torch.Tensor, load: torch.Tensor, rate: float) -> torch.Tensor:
    """The new bias: `expert_bias + rate * sign(mean(load) - load)` (load: routes per expert over the step)."""
    load = load.to(torch.float64)
    return expert_bias + rate * torch.sign(load.mean() - load).to(expert_bias.dtype)


class RouterLoad:
    def __init__(self, model: nn.Module, *, rate: float, reduce_sum):
        labelled = router_gates(model)
        self.labels = [label for label, _ in labelled]
        self.gates = [gate for _, gate in labelled]
        self.rate = rate
        self.reduce_sum = reduce_sum  # sums a tensor over every rank (all ranks call it together)
        self._counting = False
        self.num_experts = self.gates[0].num_experts if self.gates else 0
        self.step_counts: torch.Tensor | None = None  # [moe layers, experts], on the routing device
        self.window = torch.zeros(len(self.gates), self.num_experts, dtype=torch.float64)
        self.total = torch.zeros_like(self.window)  # routes per expert over the whole run (this process's view)
        for index, gate in enumerate(self.gates):
            gate.register_forward_hook(self._hook(index))

    def _hook(self, index: int):
        def count(module, args, output):
            if not self._counting:
                return
            top_k_index = output[2]
            if self.step_counts is None:
                self.step_counts = torch.zeros(len(self.gates), self.num_experts, dtype=torch.float64,
                                               device=top_k_index.device)
            self.step_counts[index] += torch.bincount(top_k_index.reshape(-1), minlength=self.num_experts)
        return count

    @contextlib.contextmanager
    def counting(self):
        self._counting = bool(self.gates)
        try:
            yield
        finally:
            self._counting = False

    def optimizer_step(self) -> None:
        """Once per optimizer step, on every rank: reduce the step's load, log it, move the biases."""
        if not self.gates:
            return
        counts = self.step_counts if self.step_counts is not None else torch.zeros_like(self.window)
        load = self.reduce_sum(counts.clone())
        counts.zero_()
        self.window += load.cpu()
        self.total += load.cpu()
        if self.rate > 0:
            for gate, layer_load in zip(self.gates, load):
                gate.expert_bias.copy_(bias_update(gate.expert_bias, layer_load.to(gate.expert_bias.device),
                                                   self.rate))

    def tokens_per_expert(self) -> dict[str, list[int]]:
        """Routes per expert of each MoE layer over the run, summed over every rank (router_load.json)."""
        return {f"layer{label}": [int(v) for v in row] for label, row in zip(self.labels, self.total.tolist())}

    def summary(self) -> dict[str, float]:
        """Per-layer max / mean load since the last call (the logging window), then resets the window."""
        if not self.gates or self.window.sum() == 0:
            return {}
        imbalance = (self.window.max(dim=1).values / self.window.mean(dim=1).clamp(min=1e-12)).tolist()
        self.window.zero_()
        logs = {f"router_imbalance_layer{label}": round(value, 4) for label, value in zip(self.labels, imbalance)}
        logs["router_imbalance_max"] = round(max(imbalance), 4)
        return logs


class RouterStep(TrainerCallback):
    """After every optimizer step: the step's router load (all ranks) into the log window, and the bias update."""

    def __init__(self, router_load: RouterLoad):
        self.router_load = router_load

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.router_load.optimizer_step()
