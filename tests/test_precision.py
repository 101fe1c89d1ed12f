"""bf16: the routed experts compute in the autocast dtype (precision.py), as attention and the dense layers do;
with bf16 parameters (FSDP2's MixedPrecisionPolicy) they compute in bf16 as they are."""

from __future__ import annotations

import json

import pytest
import torch
from model_helpers import tiny_model
from torch.utils._python_dispatch import TorchDispatchMode
from trainer_helpers import demo_model, demo_trainer

from dfactory_hf.trainer.precision import AUTOCAST_GROUPED_MM, use_autocast_experts


class KernelDtypes(TorchDispatchMode):
    """The dtypes of the first two operands of every grouped_mm and mm the model runs."""

    def __init__(self):
        super().__init__()
        self.seen: dict[str, set] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in ("aten._grouped_mm", "aten.mm"):
            self.seen.setdefault(name, set()).add((args[0].dtype, args[1].dtype))
        return func(*args, **(kwargs or {}))


def _run(model, *, autocast: bool) -> KernelDtypes:
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    log = KernelDtypes()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), log:
        model(input_ids=ids).logits.float().sum().backward()
    return log


def test_under_autocast_the_experts_follow_it():
    model = tiny_model(seed=0)
    assert model.config._experts_implementation == "grouped_mm"
    # transformers' kernel alone: the experts fall back to the fp32 master weights while the rest runs in bf16.
    assert _run(model, autocast=True).seen["aten._grouped_mm"] == {(torch.float32, torch.float32)}
    assert use_autocast_experts(model) and model.config._experts_implementation == AUTOCAST_GROUPED_MM
    model.zero_grad()
    seen = _run(model, autocast=True).seen
    assert seen["aten._grouped_mm"] == {(torch.bfloat16, torch.bfloat16)}
    assert seen["aten.mm"] == {(torch.bfloat16, torch.bfloat16)}
    grad = model.model.layers[1].mlp.experts.gate_up_proj.grad
    assert grad is not None and grad.dtype == torch.float32 and grad.abs().sum() > 0  # fp32 master weights learn


def test_outside_autocast_and_with_bf16_parameters_nothing_is_cast():
    model = tiny_model(seed=0)
    use_autocast_experts(model)
    assert _run(model, autocast=False).seen["aten._grouped_mm"] == {(torch.float32, torch.float32)}
    bf16 = tiny_model(seed=0).to(torch.bfloat16)  # what FSDP2's MixedPrecisionPolicy(param_dtype=bf16) computes with
    use_autocast_experts(bf16)
    assert _run(bf16, autocast=True).seen["aten._grouped_mm"] == {(torch.bfloat16, torch.bfloat16)}


def test_autocast_experts_match_fp32_within_bf16_rounding():
    # One experts module on fixed routes (the whole model would also change routes in later layers).
    from transformers.integrations.moe import grouped_mm_experts_forward

    from dfactory_hf.trainer.precision import autocast_grouped_mm_experts_forward

    experts = tiny_model(seed=0).model.layers[1].mlp.experts
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(32, 128, generator=generator)
    routes, weights = torch.randint(0, 8, (32, 2), generator=generator), torch.rand(32, 2, generator=generator)
    with torch.no_grad():
        expected = grouped_mm_experts_forward(experts, hidden, routes, weights)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = autocast_grouped_mm_experts_forward(experts, hidden, routes, weights)
    assert got.dtype == torch.bfloat16
    assert (got.float() - expected).abs().max() < 2e-2 * expected.abs().max()  # bf16 has 8 mantissa bits


@pytest.mark.parametrize("bf16", [True, False])
def test_trainer_switches_the_experts_for_bf16_only_and_never_saves_the_switch(tmp_path, bf16):
    trainer = demo_trainer(tmp_path, model=demo_model(), bf16=bf16, max_steps=1)
    expected = AUTOCAST_GROUPED_MM if bf16 else "grouped_mm"
    assert trainer.model.config._experts_implementation == expected
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert AUTOCAST_GROUPED_MM not in json.dumps(saved)
