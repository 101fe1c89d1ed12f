"""Every recipe x launch-config pair that the README or a config header documents builds its Trainer and shards
the model (no training), launched as documented with `accelerate launch --config_file ...`. The GPU configs run
here on 2 CPU processes (`--use_cpu true` for the recipe, the tiny model for the hub checkpoint), which is
enough to catch a pair that fails at start (e.g. activation checkpointing asked for twice)."""

from __future__ import annotations

import json

import pytest
from launch import ROOT, run

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

BUILD = ROOT / "tests" / "distributed" / "build_trainer.py"
ACCELERATE, SFT = ROOT / "configs" / "accelerate", ROOT / "configs" / "sft"
CPU_OVERRIDES = ["--use_cpu", "true", "--attn_implementation", "sdpa", "--num_train_samples", "64",
                 "--num_test_samples", "8"]
# (launch config, recipe or None for the embedded demo, extra launch flags)
PAIRS = [
    ("cpu_fsdp2.yaml", None, ()),
    ("fsdp2.yaml", "llada2_mini_bd_sft.yaml", ()),
    ("fsdp2_offload.yaml", "llada2_flash_bd_sft.yaml", ()),
    ("multi_node.yaml", "llada2_flash_bd_sft.yaml",
     ("--num_machines", "1", "--machine_rank", "0", "--main_process_ip", "127.0.0.1")),
    # The clash this issue fixed: checkpointing asked for by the recipe and by the launch config at once.
    ("fsdp2_offload.yaml", "llada2_flash_bd_sft.yaml", ("--fsdp_activation_checkpointing", "true")),
]


@pytest.mark.parametrize("config,recipe,flags", PAIRS, ids=lambda v: v if isinstance(v, str) else None)
def test_documented_pair_builds_and_shards(tmp_path, config, recipe, flags):
    recipe_args = ["--config", str(SFT / recipe)] if recipe else []
    report_path = tmp_path / "report.json"
    run(BUILD, ["--out", str(report_path), *recipe_args, "--output_dir", str(tmp_path / "out"), *CPU_OVERRIDES],
        launcher="accelerate", ranks=2, config=ACCELERATE / config, launch_flags=flags)
    report = json.loads(report_path.read_text())
    assert report["world_size"] == 2 and report["is_fsdp2"], report
    assert report["num_sharded"] == report["num_params"] > 0
    assert report["layout"]["dp_shard_size"] == 2
    if recipe:  # the recipes ask for activation checkpointing: one switch, applied as FSDP's wrapper
        assert report["fsdp_activation_checkpointing"] and report["checkpoint_wrapped"]
        assert not report["hf_activation_checkpointing"]
        assert report["mixed_precision"] == "bf16"
    if config == "fsdp2_offload.yaml":
        assert report["offload"] == "CPUOffloadPolicy"
