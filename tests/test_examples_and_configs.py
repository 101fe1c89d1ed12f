"""The main job as users run it, the recipes, and the launch configs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import TrlParser

from dfactory_hf import DiffusionTrainingArguments

ROOT = Path(__file__).resolve().parents[1]


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ~30 s on 2 cores: a real training run of the example
def test_embedded_demo_trains_evaluates_generates_and_saves(tmp_path, capsys):
    demo = _load_example("sft_llada2")
    out = tmp_path / "demo"
    results = demo.main([
        "--output_dir", str(out), "--max_steps", "50", "--logging_steps", "25",
        "--num_train_samples", "800", "--num_test_samples", "32", "--final_generation_samples", "4",
        "--eval_mask_rates", "0.5", "--disable_tqdm", "true",
    ])
    printed = capsys.readouterr().out
    assert "| held-out masked-token accuracy (start -> end)" in printed
    assert "held-out exact match (4 problems, generated)" in printed
    assert results["eval_masked_token_accuracy"] > results["start_eval_masked_token_accuracy"] + 0.1
    assert results["eval_loss"] < results["start_eval_loss"]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "LLaDA2MoeForCausalLM" and tokenizer.mask_token_id is not None
    assert (out / "data_report.json").exists()


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs" / "sft").glob("*.yaml")), ids=lambda p: p.name)
def test_recipes_parse_with_cli_overrides(recipe):
    demo = _load_example("sft_llada2")
    parser = TrlParser((demo.ScriptArguments, DiffusionTrainingArguments))
    script, args = parser.parse_args_and_config(
        ["--config", str(recipe), "--output_dir", "/tmp/unused", "--block_size", "16", "--max_seq_len", "256",
         "--use_cpu", "true", "--bf16", "false"]
    )
    assert args.block_size == 16 and args.max_seq_len == 256  # the command line wins over the recipe
    values = yaml.safe_load(recipe.read_text())
    assert args.learning_rate == values["learning_rate"]
    assert args.noise_range_low == values["noise_range_low"] and args.noise_range_high == values["noise_range_high"]
    if recipe.name.startswith("llada2_"):
        # The public recipe's values.
        assert args.learning_rate == 1e-5 and args.weight_decay == 0.1 and args.max_grad_norm == 1.0
        assert values["block_size"] == 32 and values["bf16"] is True and args.same_token_labels
        assert args.lr_scheduler_type == "cosine" and values["warmup_steps"] == 0.03


@pytest.mark.parametrize("config", sorted((ROOT / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load_and_say_when_to_use_them(config):
    from accelerate.commands.config.config_args import load_config_from_file

    text = config.read_text()
    assert text.startswith("# "), "each launch config opens with a comment saying when to use it"
    loaded = load_config_from_file(str(config))
    assert loaded.num_processes >= 1
    if loaded.distributed_type == "FSDP":
        assert loaded.fsdp_config["fsdp_version"] == 2
        assert loaded.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "LLaDA2MoeDecoderLayer"


def test_drop_in_example_uses_plain_training_arguments():
    source = (ROOT / "examples" / "drop_in_trainer.py").read_text()
    assert "from dfactory_hf import DiffusionTrainer as Trainer" in source
    assert "TrainingArguments(" in source and "DiffusionTrainingArguments" not in source.split('"""', 2)[2]


def test_readme_documents_every_argument():
    from dfactory_hf.trainer.config import arguments_markdown_table

    readme = (ROOT / "README.md").read_text()
    assert arguments_markdown_table() in readme, "regenerate the README table: python -m dfactory_hf.trainer"


@pytest.mark.slow
def test_editing_benchmark_runs_in_its_quick_configuration(tmp_path):
    import os
    import subprocess

    result = subprocess.run([sys.executable, str(ROOT / "bench" / "editing.py"), "--quick", "--threads", "1",
                             "--output_dir", str(tmp_path)], capture_output=True, text=True, timeout=600,
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| mask-only") or
            line.startswith("| draft-and-edit")]
    assert len(rows) == 2 * 2 * 2, result.stdout[-2000:]  # trainings x thresholds x (no edit, edit)


@pytest.mark.slow
@pytest.mark.parametrize("command", [["gpu_throughput.py", "--tiny"], ["memory_vocab.py", "--quick", "--lengths", "128"]],
                         ids=["gpu_throughput", "memory_vocab"])
def test_benchmark_runs_in_its_smoke_configuration(tmp_path, command):
    import os
    import subprocess

    extra = ["--out_dir", str(tmp_path)] if command[0] == "memory_vocab.py" else []
    result = subprocess.run([sys.executable, str(ROOT / "bench" / command[0]), *command[1:], *extra],
                            capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(table) >= 2, result.stdout[-2000:]


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_check_passes(tmp_path):
    """bench/gpu_check.py: flex attention against sdpa (loss and gradients), bf16 flex training, cached decoding on
    the GPU; it exits non-zero when a check fails."""
    import os
    import subprocess

    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py")], capture_output=True, text=True,
                            timeout=1200, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| cached == recomputing tokens | True | yes |" in result.stdout, result.stdout[-3000:]


def test_multi_process_tests_are_in_the_distributed_and_slow_tiers():
    import os
    import re
    import subprocess

    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                             "-m", "not (distributed and slow)", "tests/distributed"], capture_output=True, text=True,
                            timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    last = result.stdout.strip().splitlines()[-1]
    deselected = re.fullmatch(r"no tests collected \((\d+) deselected\) in .*", last)
    assert deselected and int(deselected.group(1)) > 0, last  # every one of them marked both
