"""LoRA through PEFT: adapters on modules and on the routed experts (`--lora_target_parameters`), trained, saved,
reloaded and merged with identical logits; adapter init from the seed alone; refusals that name the flag."""

from __future__ import annotations

import math

import pytest
import torch
from trainer_helpers import demo_args, demo_model, demo_trainer
from transformers import AutoModelForCausalLM

from dfactory_hf.trainer.lora import apply_lora, checkpoint_key, initial_adapter_value

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def _train_save_reload_merge(tmp_path, model=None, **lora):
    from peft import PeftModel

    trainer = demo_trainer(tmp_path, model=model, use_peft=True, lora_r=4, lora_alpha=8, max_steps=3,
                           learning_rate=1e-2, **lora)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert all(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if p.requires_grad)
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()

    ids = torch.randint(3, 100, (2, 12))
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(input_ids=ids).logits
        base = demo_model()
        assert (base(input_ids=ids).logits - expected).abs().max() > 1e-4, "the adapters changed nothing"
        reloaded = PeftModel.from_pretrained(demo_model(), str(tmp_path / "adapter")).eval()
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
        merged = reloaded.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
    merged.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
    return trainer, trainable


def test_lora_adapters_train_save_load_and_merge(tmp_path):
    _, trainable = _train_save_reload_merge(tmp_path)
    # The default targets: attention only, no routed-expert adapter.
    assert any("query_key_value" in n for n in trainable) and not any(".experts." in n for n in trainable)


@pytest.mark.parametrize("experts_implementation", ["eager", "grouped_mm"])
def test_lora_on_routed_experts_trains_saves_loads_and_merges(tmp_path, experts_implementation):
    model = demo_model()
    model.set_experts_implementation(experts_implementation)
    trainer, trainable = _train_save_reload_merge(tmp_path, model=model, lora_target_parameters=EXPERTS)
    assert trainer.args.lora_dropout == 0.0  # the default under target_parameters
    num_experts, r = trainer.model.config.num_experts, 4
    expert_adapters = {n: p for n, p in trainer.model.named_parameters() if "experts" in n and "lora_" in n}
    # Two adapters (gate_up_proj, down_proj) per MoE layer, each one rank-r factor pair per expert.
    assert len(expert_adapters) == 4 * 3
    assert all(r * num_experts in p.shape for p in expert_adapters.values())


def test_adapters_start_from_the_seed_alone(tmp_path):
    args = demo_args(tmp_path, use_peft=True, lora_r=4, lora_target_parameters=EXPERTS)
    torch.manual_seed(1)
    first = apply_lora(demo_model(), args)
    torch.manual_seed(2)  # a different global RNG state: the same adapters
    second = apply_lora(demo_model(), args)
    adapters = {n: p for n, p in first.named_parameters() if "lora_" in n}
    assert adapters
    for name, value in second.named_parameters():
        if name in adapters:
            torch.testing.assert_close(value, adapters[name], rtol=0, atol=0)
    for name, value in adapters.items():
        if ".lora_B." in name:
            assert not value.any(), name
        else:  # Kaiming-uniform as nn.Linear: within 1/sqrt(fan_in), spread over it
            bound = 1 / math.sqrt(value.shape[1])
            assert value.abs().max() <= bound and value.abs().max() > 0.9 * bound, name
    name, value = next((n, v) for n, v in adapters.items() if ".lora_A." in n and "experts" in n)
    restated = initial_adapter_value(name, value.shape, value.dtype, seed=args.seed)
    torch.testing.assert_close(value, restated, rtol=0, atol=0)
    other_seed = initial_adapter_value(name, value.shape, value.dtype, seed=args.seed + 1)
    assert not torch.equal(other_seed, value)


def test_checkpoint_key_drops_peft_wrappers():
    assert checkpoint_key("base_model.model.model.layers.1.attention.query_key_value.base_layer.weight") == \
        "model.layers.1.attention.query_key_value.weight"
    assert checkpoint_key("base_model.model.model.layers.1.mlp.experts.base_layer.base_layer.gate_up_proj") == \
        "model.layers.1.mlp.experts.gate_up_proj"
    assert checkpoint_key("model.norm.weight") == "model.norm.weight"


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(lora_target_parameters=EXPERTS), r"--lora_target_parameters \(experts.gate_up_proj experts.down_proj\) "
                                            r"adds LoRA adapters: add --use_peft true"),
    (dict(use_peft=True, lora_target_parameters=EXPERTS, lora_dropout=0.1),
     r"--lora_dropout \(0.1\) with --lora_target_parameters.*set --lora_dropout 0"),
    (dict(use_peft=True, lora_dropout=1.0), r"--lora_dropout \(1.0\) must be in \[0, 1\)"),
    (dict(use_peft=True, lora_target_parameters=EXPERTS, ep_size=2),
     r"--lora_target_parameters \(experts.gate_up_proj experts.down_proj\) with --ep_size \(2\).*use --ep_size 1"),
])
def test_lora_flag_refusals_name_the_flag(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        demo_args(tmp_path, **overrides)


def test_lora_targets_that_match_nothing_are_refused(tmp_path):
    args = demo_args(tmp_path, use_peft=True, lora_target_parameters=["experts.up_proj"])
    with pytest.raises(ValueError, match=r"--lora_target_parameters: 'experts.up_proj' matches no parameter.*"
                                         r"experts.down_proj.*experts.gate_up_proj"):
        apply_lora(demo_model(), args)
    args = demo_args(tmp_path, use_peft=True, lora_target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"--lora_target_modules \(\{'q_proj'\}\).*not found.*query_key_value"):
        apply_lora(demo_model(), args)


def test_lora_with_expert_parallel_passes_parsing(tmp_path):
    # LoRA on attention / dense / shared experts composes with ep (tests/distributed/test_expert_parallel.py);
    # in a one-process run ep 2 is refused by the sizes check, not by LoRA.
    with pytest.raises(ValueError, match=r"world size"):
        demo_args(tmp_path, use_peft=True, ep_size=2)
