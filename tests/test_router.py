"""Router load counting and the aux-loss-free bias update, against literal restatements (one process)."""

from __future__ import annotations

import pytest
import torch
from model_helpers import tiny_model
from trainer_helpers import demo_args

from dfactory_hf.parallel.expert import expert_parallel_plan
from dfactory_hf.trainer.router import RouterLoad, bias_update


def test_bias_update_matches_the_rule_element_by_element():
    bias = torch.tensor([0.5, -0.25, 0.0, 1.0])
    load = torch.tensor([10.0, 2.0, 6.0, 6.0])  # mean 6
    rate = 0.1
    expected = [b + rate * (1 if 6.0 > n else -1 if 6.0 < n else 0) for b, n in zip(bias.tolist(), load.tolist())]
    torch.testing.assert_close(bias_update(bias, load, rate), torch.tensor(expected))


def test_router_load_counts_every_route_of_training_forwards_only():
    model = tiny_model(seed=3)
    model.set_attn_implementation("sdpa")
    selections = {}

    def record(name):
        def hook(module, args, output):
            selections.setdefault(name, []).append(output[2].clone())
        return hook

    gates = [(name, m) for name, m in model.named_modules() if name.endswith("mlp.gate")]
    handles = [gate.register_forward_hook(record(name)) for name, gate in gates]
    router = RouterLoad(model, rate=0.05, reduce_sum=lambda t: t)
    ids = torch.randint(0, 128, (2, 12))
    with router.counting():
        model(input_ids=ids)
        model(input_ids=ids[:, :8])
    model(input_ids=ids)  # outside counting(): evaluation, recomputation
    for handle in handles:
        handle.remove()
    before = [gate.expert_bias.clone() for _, gate in gates]
    router.optimizer_step()

    assert router.labels == ["1", "2", "3"]  # layer 0 is dense in the tiny config
    for (name, gate), old in zip(gates, before):
        picks = torch.cat([s.reshape(-1) for s in selections[name][:2]]).tolist()  # the two counted forwards
        load = [picks.count(e) for e in range(gate.num_experts)]
        assert router.tokens_per_expert()[f"layer{name.split('.')[2]}"] == load
        mean = sum(load) / len(load)
        expected = [b + 0.05 * (1 if mean > n else -1 if mean < n else 0) for b, n in zip(old.tolist(), load)]
        torch.testing.assert_close(gate.expert_bias, torch.tensor(expected))
    logs = router.summary()
    assert logs["router_imbalance_max"] == max(logs[f"router_imbalance_layer{i}"] for i in (1, 2, 3)) >= 1.0
    assert router.summary() == {}  # the window resets after a log


def test_router_bias_rate_must_be_non_negative(tmp_path):
    with pytest.raises(ValueError, match=r"--router_bias_update_rate \(-0.1\) must be >= 0"):
        demo_args(tmp_path, router_bias_update_rate=-0.1)


def test_expert_plan_covers_every_moe_layer_and_a_planless_model_is_refused():
    model = tiny_model()
    plan = expert_parallel_plan(model)
    experts = sorted(name for name, style in plan.items() if style == "ep_dispatch_experts")
    assert experts == [f"model.layers.{i}.mlp.experts" for i in (1, 2, 3)]
    assert plan["model.layers.1.mlp.experts.gate_up_proj"] == "grouped_gemm"
    model.ep_plan = {}
    with pytest.raises(ValueError, match="needs a mixture-of-experts model with an expert-parallel plan"):
        expert_parallel_plan(model)
