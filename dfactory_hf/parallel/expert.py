"""Expert parallel: routed experts sharded over the "ep" axis of the ParallelState mesh, tokens moved by
all-to-all; applied to an unmodified model from outside, before accelerate's FSDP2 wraps the rest.

Order (each step needs the one before):

1. transformers' expert-parallel styles from the model's own `base_model_ep_plan`, on our mesh
   (`apply_expert_parallelism`): `experts.gate_up_proj` / `experts.down_proj` become DTensors `Shard(0)` on "ep"
   (each rank keeps num_experts / ep experts, `num_experts` set to the local count), and each experts module's
   forward becomes transformers' `AllToAllEP` dispatch: per-expert counts exchanged, the (token, expert) pairs
   sent to their expert's rank with `all_to_all_single` and split sizes (gloo refuses the list form for unequal
   sizes), the local experts run by the model's own experts kernel (eager or grouped_mm) on local expert ids, the
   results sent back and combined with the routing weights on the sending rank. A rank whose experts receive no
   token still joins both exchanges and backward (AllToAllEP keeps an empty graph connected).
2. each experts module `fully_shard`-ed over the ranks that hold the same experts: "efsdp" (with HSDP,
   ("dp_replicate", "efsdp")). Its gradient divide factor is the world size, like every other gradient (the loss
   is a global token mean multiplied by the world size, state.py): the experts of one ep group see the tokens of
   that group only, and the efsdp reduction sums the groups. When efsdp > 1 FSDP2 needs
   `set_force_sum_reduction_for_comms` for a factor other than the group size (gloo has no PREMUL_SUM): sum,
   then divide locally; with efsdp = 1 (also under HSDP) it already divides locally, and forcing would divide
   twice.
3. accelerate's FSDP2 (the trainer) wraps the decoder layers and the root over "dp_shard_cp"; modules that are
   already FSDP modules (the experts) are left as they are, so there is one mesh with two groupings.

A size-1 "efsdp" (ep == dp_shard x sp) is a trap in torch 2.13: FSDP2 then divides the gradients twice unless the
reduction runs in fp32 or bf16 (`_fsdp_collectives.py`), so float64 / fp16 training there is refused.
"""

from __future__ import annotations

import torch
from torch import nn

EXPERTS_STYLE = "ep_dispatch_experts"


def _experts_modules(model: nn.Module, plan: dict[str, str]) -> list[tuple[str, nn.Module]]:
    modules = dict(model.named_modules())
    return [(name, modules[name]) for name, style in plan.items() if style == EXPERTS_STYLE]


def expert_parallel_plan(model: nn.Module) -> dict[str, str]:
    """The model's EP plan (`model.ep_plan`, from the config's `base_model_ep_plan`) with the layer numbers filled
    in, by transformers' own expansion."""
    plan = getattr(model, "ep_plan", None) or {}
    if EXPERTS_STYLE not in plan.values():
        raise ValueError(f"--ep_size > 1 needs a mixture-of-experts model with an expert-parallel plan; "
                         f"{type(model).__name__} has none (a dense model has no experts to split): use --ep_size 1.")
    return model._expand_parallel_plan(plan)


def check_expert_parallel(model: nn.Module, *, ep_size: int, efsdp_size: int, reduce_dtype: torch.dtype) -> None:
    """Refusals that need the model (the sizes were checked against the world size already)."""
    num_experts = getattr(model.config, "num_experts", None)
    if not num_experts:
        raise ValueError(f"--ep_size ({ep_size}) needs a mixture-of-experts model; {type(model).__name__} has no "
                         "routed experts: use --ep_size 1.")
    if efsdp_size == 1 and reduce_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(
            f"--ep_size ({ep_size}) equal to dp_shard_size x sp_size leaves each expert on one rank of its group, "
            f"where torch 2.13's FSDP2 divides {reduce_dtype} gradients twice; train in fp32 or bf16, or use an "
            "ep_size that leaves several ranks per expert (e.g. ep_size 2 on 4 ranks).")


def apply_expert_parallel(model: nn.Module, state, *, mp_policy=None, offload_policy=None) -> list[str]:
    """Shard the routed experts over `state`'s "ep" axis and FSDP-shard them over "efsdp"; returns the experts
    module names. The rest of the model is left to accelerate's FSDP2."""
    from torch.distributed.fsdp import fully_shard
    from transformers.distributed.expert_parallel import apply_expert_parallelism

    plan = expert_parallel_plan(model)
    # The all-to-all dispatch sends every rank's own tokens (sp ranks hold different positions): no token group.
    apply_expert_parallelism(model, state.submesh("ep"), state.submesh("ep_tp"), plan,
                             ep_implementation="all_to_all")
    experts = _experts_modules(model, plan)
    if not experts:  # e.g. every layer dense: nothing was split, and a run that says ep must not train without it
        raise ValueError(f"--ep_size ({state.ep_size}): {type(model).__name__} has no routed-experts module matching "
                         "its expert-parallel plan (are all its layers dense?); use --ep_size 1.")
    shard_mesh = state.expert_shard_mesh()
    kwargs = {key: value for key, value in (("mp_policy", mp_policy), ("offload_policy", offload_policy))
              if value is not None}
    for _, module in experts:
        fully_shard(module, mesh=shard_mesh, reshard_after_forward=True, **kwargs)
        module.set_gradient_divide_factor(float(state.gradient_average_size))
        if state.sizes.efsdp > 1:  # a size-1 shard group already divides (a forced sum would divide twice)
            module.set_force_sum_reduction_for_comms(True)
    return [name for name, _ in experts]


def local_expert_counts(model: nn.Module) -> list[int]:
    """Experts this rank runs in each MoE layer (the layout check: num_experts / ep under expert parallel)."""
    return [module.num_experts for module in model.modules()
            if hasattr(module, "gate_up_proj") and hasattr(module, "num_experts")]
