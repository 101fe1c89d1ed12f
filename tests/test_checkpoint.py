"""Checkpoint layouts: hub per-expert and dFactory merged load as they are; saving writes the hub layout."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from model_helpers import tiny_model, to_hub_state_dict, to_merged_state_dict, write_checkpoint
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from dfactory_hf.models.llada2_moe import LLaDA2MoeForCausalLM, convert_checkpoint

AUTO_MAP = {
    "AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
    "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM",
}


@pytest.fixture
def reference():
    model = tiny_model(seed=3, moe_intermediate_size=96)  # I != H, so transposed expert shapes are caught
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return model, ids, logits


def _load(path):
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    return model.eval(), info


def test_hub_layout_loads_without_missing_keys_and_round_trips_bit_exactly(tmp_path, reference):
    model, ids, logits = reference
    hub = to_hub_state_dict(model.state_dict())
    source = write_checkpoint(tmp_path / "hub", hub, model.config, auto_map=AUTO_MAP)
    (source / "modeling_llada2_moe.py").write_text("# the hub's remote code\n")
    (source / "configuration_llada2_moe.py").write_text("# the hub's remote config\n")

    loaded, info = _load(source)
    assert isinstance(loaded, LLaDA2MoeForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, logits, atol=0, rtol=0)

    loaded.save_pretrained(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert saved.keys() == hub.keys()
    for key in hub:
        assert torch.equal(saved[key], hub[key]), key
    # The hub's remote code can still read it: auto_map and modeling files kept, hub field names written.
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP and config["model_type"] == "llada2_moe"
    for field in ("num_experts", "n_group", "topk_group", "rope_theta", "torch_dtype", "first_k_dense_replace"):
        assert field in config, field
    assert (tmp_path / "saved" / "modeling_llada2_moe.py").read_text() == "# the hub's remote code\n"
    assert (tmp_path / "saved" / "configuration_llada2_moe.py").exists()


def test_merged_layout_gives_identical_logits_and_saves_as_hub(tmp_path, reference):
    model, ids, logits = reference
    source = write_checkpoint(tmp_path / "merged", to_merged_state_dict(model.state_dict()), model.config)
    loaded, info = _load(source)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, logits, atol=0, rtol=0)
    loaded.save_pretrained(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert saved.keys() == to_hub_state_dict(model.state_dict()).keys()
    # No auto_map in the source: nothing to copy.
    assert not list((tmp_path / "saved").glob("*.py"))


def test_unknown_hub_config_fields_survive_a_round_trip(tmp_path, reference):
    model, _, _ = reference
    source = write_checkpoint(tmp_path / "hub", to_hub_state_dict(model.state_dict()), model.config,
                              moe_router_enable_expert_bias=True, score_function="sigmoid")
    config = AutoConfig.from_pretrained(source)
    assert config.score_function == "sigmoid"
    config.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["moe_router_enable_expert_bias"] is True


def _hub_with(model, edit):
    tensors = to_hub_state_dict(model.state_dict())
    edit(tensors)
    return tensors


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"),
         r"missing expert tensor model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight \(expected shape \(96, 128\)\)"),
        (lambda t: t.__setitem__("model.layers.1.mlp.experts.0.down_proj.weight", torch.zeros(128, 95)),
         r"model\.layers\.1\.mlp\.experts\.0\.down_proj\.weight: expected shape \(128, 96\), found \(128, 95\)"),
        (lambda t: t.__setitem__("model.layers.1.mlp.experts.8.gate_proj.weight", torch.zeros(96, 128)),
         r"layer 1 holds 9 experts in the .* but config\.num_experts is 8"),
        (lambda t: t.__setitem__("model.layers.0.mlp.experts.0.gate_proj.weight", torch.zeros(96, 128)),
         r"unexpected expert tensor model\.layers\.0\.mlp\.experts\.0\.gate_proj\.weight: layer 0 is a dense layer"),
    ],
    ids=["missing", "misshaped", "extra-expert", "experts-in-dense-layer"],
)
def test_bad_expert_tensors_name_the_key_and_shapes(tmp_path, reference, edit, pattern):
    model, _, _ = reference
    source = write_checkpoint(tmp_path / "bad", _hub_with(model, edit), model.config)
    with pytest.raises(ValueError, match=pattern):
        AutoModelForCausalLM.from_pretrained(source)


def test_expert_count_disagreeing_with_config_in_merged_layout(tmp_path, reference):
    model, _, _ = reference
    tensors = to_merged_state_dict(model.state_dict())
    for key in [k for k in tensors if k.endswith(("experts.gate_proj", "experts.up_proj", "experts.down_proj"))]:
        tensors[key] = tensors[key][:7]
    source = write_checkpoint(tmp_path / "bad", tensors, model.config)
    with pytest.raises(ValueError, match=r"experts\.gate_proj: expected shape \(8, 96, 128\), found \(7, 96, 128\)"):
        AutoModelForCausalLM.from_pretrained(source)


def test_convert_cli_between_layouts(tmp_path, reference):
    model, ids, logits = reference
    hub = to_hub_state_dict(model.state_dict())
    source = write_checkpoint(tmp_path / "hub", hub, model.config)
    subprocess.run(
        [sys.executable, "-m", "dfactory_hf.cli", "convert", "--to", "merged", str(source), str(tmp_path / "m")],
        check=True, capture_output=True,
    )
    merged = load_file(tmp_path / "m" / "model.safetensors")
    assert merged.keys() == to_merged_state_dict(model.state_dict()).keys()
    assert (tmp_path / "m" / "config.json").exists()
    counts = convert_checkpoint(tmp_path / "m", tmp_path / "back", to="hub", max_shard_size_gb=0.001)
    assert counts["shards_out"] > 1  # sharded output with an index
    back, _ = _load(tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"DST .* exists and is not empty"):
        convert_checkpoint(tmp_path / "m", tmp_path / "back", to="hub")
    with pytest.raises(ValueError, match=r"--to \('fused'\) must be 'hub' or 'merged'"):
        convert_checkpoint(tmp_path / "m", tmp_path / "other", to="fused")
