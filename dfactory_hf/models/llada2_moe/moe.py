"""LLaDA2-MoE mixture-of-experts block: sigmoid router, fused routed experts, shared experts.

Routing (REFERENCE section 4): router logits in fp32, scores = sigmoid(logits); *selection* uses scores plus
the `expert_bias` buffer: experts are split into `n_group` groups, a group is scored by the sum of its two
best biased scores, the best `topk_group` groups are kept and the top `num_experts_per_tok` experts are
picked inside them. The combine weights are the *unbiased* scores of the picked experts, renormalised to sum
to 1 when `norm_topk_prob` (and top-k > 1), times `routed_scaling_factor`.

Routed experts are fused 3D tensors (`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`) behind transformers'
`experts_implementation` switch: "eager" is the plain per-expert loop below, "grouped_mm" / "batched_mm" are
transformers' batched kernels, and expert parallel replaces the forward with its all-to-all dispatch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations import use_experts_implementation

from .configuration_llada2_moe import LLaDA2MoeConfig


class LLaDA2MoeMLP(nn.Module):
    """Dense SwiGLU: the MLP of the first `first_k_dense_replace` layers and the shared experts."""

    def __init__(self, config: LLaDA2MoeConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=config.use_bias)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=config.use_bias)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=config.use_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LLaDA2MoeGate(nn.Module):
    """Group-limited sigmoid router. Hub keys: `mlp.gate.weight [E, H]`, buffer `mlp.gate.expert_bias [E]`."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        # Adjusted outside the gradient (aux-loss-free load balancing); only steers selection.
        self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden_states [T, H] -> (router_logits [T, E] fp32, top_k_weights [T, K] fp32, top_k_index [T, K])."""
        router_logits = F.linear(hidden_states.float(), self.weight.float())
        scores = torch.sigmoid(router_logits)
        top_k_index = self.select_experts(scores)
        top_k_weights = scores.gather(1, top_k_index)
        if self.norm_topk_prob and self.top_k > 1:
            top_k_weights = top_k_weights / (top_k_weights.sum(dim=-1, keepdim=True) + 1e-20)
        return router_logits, top_k_weights * self.routed_scaling_factor, top_k_index

    @torch.no_grad()
    def select_experts(self, scores: torch.Tensor) -> torch.Tensor:
        num_tokens = scores.shape[0]
        biased = scores + self.expert_bias.float()
        grouped = biased.view(num_tokens, self.n_group, self.num_experts // self.n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, n_group]
        kept_groups = group_scores.topk(self.topk_group, dim=-1).indices
        group_keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept_groups, True)
        expert_keep = group_keep.unsqueeze(-1).expand_as(grouped).reshape(num_tokens, self.num_experts)
        candidates = biased.masked_fill(~expert_keep, float("-inf"))
        return candidates.topk(self.top_k, dim=-1).indices


@use_experts_implementation
class LLaDA2MoeExperts(nn.Module):
    """Routed SwiGLU experts as fused 3D tensors; `forward` here is the "eager" per-expert loop."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """hidden_states [T, H], top_k_index / top_k_weights [T, K] -> [T, H]."""
        output = torch.zeros_like(hidden_states)
        for expert in top_k_index.unique().tolist():
            if expert >= self.num_experts:  # expert parallel marks experts held by other ranks with this sentinel
                continue
            token_idx, slot = torch.where(top_k_index == expert)
            gate, up = F.linear(hidden_states[token_idx], self.gate_up_proj[expert]).chunk(2, dim=-1)
            expert_out = F.linear(self.act_fn(gate) * up, self.down_proj[expert])
            expert_out = expert_out * top_k_weights[token_idx, slot, None]
            output.index_add_(0, token_idx, expert_out.to(output.dtype))
        return output


class LLaDA2MoeSparseMoeBlock(nn.Module):
    """Routed experts + shared experts. Hub keys under `mlp.`: `gate.*`, `experts.*`, `shared_experts.*`."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.gate = LLaDA2MoeGate(config)
        self.experts = LLaDA2MoeExperts(config)
        shared_size = config.shared_expert_intermediate_size
        self.shared_experts = LLaDA2MoeMLP(config, shared_size) if shared_size > 0 else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_shape = hidden_states.shape
        flat = hidden_states.reshape(-1, batch_shape[-1])
        _, top_k_weights, top_k_index = self.gate(flat)
        output = self.experts(flat, top_k_index, top_k_weights).view(batch_shape)
        if self.shared_experts is not None:
            output = output + self.shared_experts(hidden_states)
        return output
