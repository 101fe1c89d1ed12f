"""Expert parallel in the trainer, launched as a user launches it:

    accelerate launch --config_file configs/accelerate/cpu_fsdp2.yaml --num_processes N \\
        tests/distributed/train_worker.py --ep_size E ...

each compared with one plain process on the same documents per optimizer step (fp32 SGD: logged losses, supervised
counts and final parameters within 1e-5). Every run proves the layout engaged: each rank runs num_experts / ep
experts of every MoE layer, every parameter is a DTensor, FSDP2 is on. The bias update and the router load are
compared with one process too, and the biases must be identical on every rank.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from launch import assert_same_training, run_cache, train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 3
NUM_EXPERTS = 8  # the tiny model's


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs by name, started on first use and shared by the tests of this module."""
    return run_cache(tmp_path_factory.mktemp("ep"), max_steps=STEPS)


def assert_expert_parallel_engaged(run: dict, *, ranks: int, ep: int, experts_implementation: str) -> None:
    assert run["world_size"] == ranks and run["is_fsdp2"], run["distributed_type"]
    assert run["layout"]["ep_size"] == ep
    assert run["num_sharded"] == run["num_params"] > 0
    assert run["experts_implementation"] == experts_implementation
    for local in run["local_experts"]:  # every rank, every MoE layer: its share of the experts only
        assert local == [NUM_EXPERTS // ep] * 3, local


def assert_same_biases(parallel: dict, single: dict) -> None:
    for rank_biases in parallel["expert_bias"]:
        for mine, reference in zip(rank_biases, single["expert_bias"][0], strict=True):
            torch.testing.assert_close(mine, reference, rtol=0, atol=0)


def test_ep2_on_two_ranks_grouped_experts_trains_like_one_process(runs):
    parallel = runs("ep2", launcher="accelerate", ranks=2, grad_accum=2, layout="packed", ep_size=2,
                    experts_implementation="grouped_mm")
    assert_expert_parallel_engaged(parallel, ranks=2, ep=2, experts_implementation="grouped_mm")
    reference = runs("single-ga4", launcher="plain", grad_accum=4, layout="packed",
                     experts_implementation="grouped_mm")
    assert_same_training(parallel, reference, num_steps=STEPS, atol=1e-5)


def test_ep2_on_four_ranks_eager_experts_and_bias_update_train_like_one_process(runs):
    # ep 2 of 4 ranks: each expert on two ranks (efsdp 2), whose gradients FSDP2 reduces.
    spec = dict(layout="packed", experts_implementation="eager", router_bias_update_rate=0.01)
    parallel = runs("ep2-of-4", launcher="accelerate", ranks=4, grad_accum=2, ep_size=2, **spec)
    assert_expert_parallel_engaged(parallel, ranks=4, ep=2, experts_implementation="eager")
    reference = runs("single-ga8-bias", launcher="plain", grad_accum=8, **spec)
    assert_same_training(parallel, reference, num_steps=STEPS, atol=1e-5)
    assert parallel["router_logs"] == reference["router_logs"] and "router_imbalance_max" in parallel["router_logs"][0]
    assert parallel["tokens_per_expert"] == reference["tokens_per_expert"]
    assert_same_biases(parallel, reference)
    assert all(bias.abs().sum() > 0 for bias in parallel["expert_bias"][0]), "the bias update did not run"


def test_dp_shard2_sp2_ep2_on_four_ranks_trains_like_one_process(runs):
    parallel = runs("dp2-sp2-ep2", launcher="accelerate", ranks=4, grad_accum=2, layout="packed", ep_size=2,
                    sp_size=2, experts_implementation="grouped_mm")
    assert_expert_parallel_engaged(parallel, ranks=4, ep=2, experts_implementation="grouped_mm")
    assert parallel["layout"]["sp_size"] == 2 and parallel["layout"]["dp_size"] == 2
    assert parallel["attn_implementation"] == "ulysses_sdpa"
    reference = runs("single-ga4", launcher="plain", grad_accum=4, layout="packed",
                     experts_implementation="grouped_mm")
    assert_same_training(parallel, reference, num_steps=STEPS, atol=1e-5)


def test_ep2_with_hsdp_on_four_ranks_trains_like_one_process(runs):
    # dp_replicate 2 x dp_shard 2, ep 2: each replica splits the experts over its two ranks; the experts are
    # replicated across the replicas (HSDP over ("dp_replicate", "efsdp")).
    parallel = runs("ep2-hsdp", launcher="accelerate", ranks=4, grad_accum=2, layout="packed", ep_size=2,
                    dp_replicate_size=2, experts_implementation="eager", router_bias_update_rate=0.01)
    assert_expert_parallel_engaged(parallel, ranks=4, ep=2, experts_implementation="eager")
    assert parallel["shard_mesh"] == ("dp_replicate", "dp_shard_cp")
    reference = runs("single-ga8-bias", launcher="plain", grad_accum=8, layout="packed",
                     experts_implementation="eager", router_bias_update_rate=0.01)
    assert_same_training(parallel, reference, num_steps=STEPS, atol=1e-5)
    assert_same_biases(parallel, reference)


def test_a_rank_whose_experts_receive_no_token_trains_like_one_process(runs):
    # Every gate biased away from experts 4-7, which live on ep rank 1: that rank's experts get no token at all.
    spec = dict(layout="packed", starve_experts=True)
    parallel = runs("ep2-starved", launcher="accelerate", ranks=2, grad_accum=2, ep_size=2, **spec)
    reference = runs("single-ga4-starved", launcher="plain", grad_accum=4, **spec)
    for layer, routes in parallel["tokens_per_expert"].items():
        assert sum(routes[NUM_EXPERTS // 2:]) == 0 < sum(routes), (layer, routes)
    assert_same_training(parallel, reference, num_steps=STEPS, atol=1e-5)


def test_ep_checkpoints_resume_exactly_and_the_final_save_is_the_hub_layout(runs, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    import dfactory_hf  # noqa: F401  (registers llada2_moe with the Auto classes, as a user's script does)

    spec = dict(launcher="accelerate", ranks=2, grad_accum=2, layout="packed", ep_size=2, max_steps=4, save_steps=2,
                router_bias_update_rate=0.01)
    uninterrupted = runs("ep2-saved", save_model=tmp_path / "final", **spec)
    out = uninterrupted["dir"]
    shutil.rmtree(out / "out" / "checkpoint-4")
    resumed = train(tmp_path / "resumed.pt", output_dir=out, resume="last", **spec)
    assert resumed["losses"] == uninterrupted["losses"]
    for name, value in uninterrupted["parameters"].items():
        assert torch.equal(resumed["parameters"][name], value), name
    assert_same_biases(resumed, uninterrupted)

    with safe_open(tmp_path / "final" / "model.safetensors", "pt") as handle:
        keys = set(handle.keys())
    for expert in range(NUM_EXPERTS):  # the hub's per-expert keys, gathered from the ep shards
        assert f"model.layers.1.mlp.experts.{expert}.gate_proj.weight" in keys
    assert not any(key.endswith("experts.gate_up_proj") for key in keys)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final").state_dict()
    for name, value in uninterrupted["parameters"].items():
        assert torch.equal(reloaded[name], value), name
    for name, bias in zip([k for k in reloaded if k.endswith("expert_bias")], uninterrupted["expert_bias"][0]):
        assert torch.equal(reloaded[name], bias), name


@pytest.mark.parametrize("layout", ["hub", "merged"])
def test_loading_reads_only_each_ranks_experts_and_trains_like_one_process(runs, tmp_path, layout):
    # A checkpoint on disk (hub per-expert keys, or dFactory's merged keys); the FSDP2 config's rank-0 loading
    # becomes, under ep, every rank reading its own experts (and its shard of everything else).
    from model_helpers import to_hub_state_dict, to_merged_state_dict, write_checkpoint
    from trainer_helpers import demo_model

    model = demo_model(seed=0)
    convert = to_hub_state_dict if layout == "hub" else to_merged_state_dict
    path = write_checkpoint(tmp_path / layout, convert(model.state_dict()), model.config)
    parallel = train(tmp_path / "ep.pt", launcher="accelerate", ranks=2, grad_accum=2, layout="packed", ep_size=2,
                     max_steps=STEPS, model_path=path, output_dir=tmp_path / "run")
    assert all(parallel["loaded_on_meta"]), "every rank starts on meta under ep"
    expert_bytes = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if ".experts." in name)
    assert parallel["expert_bytes_read"] == [expert_bytes // 2] * 2, "a rank read experts it does not hold"
    reference = runs("single-ga4-from-checkpoint", launcher="plain", grad_accum=4, layout="packed", model_path=path)
    assert_same_training(parallel, reference, num_steps=STEPS, atol=1e-5, initial=path)


LORA_MODULES = "query_key_value,dense,gate_proj,up_proj,down_proj"  # attention, dense MLP, shared experts


def test_lora_with_ep2_loaded_per_rank_trains_like_one_process_and_saves_the_adapters(runs, tmp_path):
    # LoRA on attention, the dense MLP and the shared experts; the routed experts stay frozen and split over ep.
    # The model comes from a checkpoint on meta everywhere (every rank reads its own experts); the adapters start
    # from the seed alone, so they equal the one process's.
    from model_helpers import to_hub_state_dict, write_checkpoint
    from peft import PeftModel
    from trainer_helpers import demo_model

    model = demo_model(seed=0)
    path = write_checkpoint(tmp_path / "hub", to_hub_state_dict(model.state_dict()), model.config)
    parallel = train(tmp_path / "lora-ep.pt", launcher="accelerate", ranks=2, grad_accum=2, layout="packed",
                     ep_size=2, max_steps=STEPS, model_path=path, lora_target_modules=LORA_MODULES,
                     save_model=tmp_path / "adapter", output_dir=tmp_path / "run")
    assert_expert_parallel_engaged(parallel, ranks=2, ep=2, experts_implementation="grouped_mm")
    assert all(parallel["loaded_on_meta"])
    assert parallel["trainable"] and all(".lora_" in name for name in parallel["trainable"])
    assert not any(".experts." in name for name in parallel["trainable"])
    assert any("shared_experts" in name for name in parallel["trainable"])
    reference = runs("single-ga4-lora", launcher="plain", grad_accum=4, layout="packed",
                     lora_target_modules=LORA_MODULES)
    assert_same_training(parallel, reference, num_steps=STEPS, atol=1e-5)

    # The final save holds the adapters only (gathered from the shards), and reloads onto the base in one process.
    saved = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert "adapter_model.safetensors" in saved and "model.safetensors" not in saved, saved
    reloaded = dict(PeftModel.from_pretrained(demo_model(seed=0), str(tmp_path / "adapter")).named_parameters())
    for name in parallel["trainable"]:
        torch.testing.assert_close(reloaded[name], parallel["parameters"][name], rtol=0, atol=0, msg=name)


def test_lora_on_routed_experts_under_fsdp2_trains_like_one_process(runs):
    # `--lora_target_parameters`: PEFT's per-expert adapters on the fused expert tensors, FSDP2-sharded (ep 1).
    spec = dict(layout="packed", lora_target_modules="query_key_value",
                lora_target_parameters="experts.gate_up_proj,experts.down_proj")
    parallel = runs("fsdp2-lora-experts", launcher="accelerate", ranks=2, grad_accum=2, **spec)
    assert parallel["world_size"] == 2 and parallel["is_fsdp2"] and parallel["num_sharded"] == parallel["num_params"]
    expert_adapters = [name for name in parallel["trainable"] if ".experts." in name]
    assert len(expert_adapters) == 2 * 2 * 3, expert_adapters  # (A, B) x (gate_up, down) x 3 MoE layers
    reference = runs("single-ga4-lora-experts", launcher="plain", grad_accum=4, **spec)
    assert_same_training(parallel, reference, num_steps=STEPS, atol=1e-5)
