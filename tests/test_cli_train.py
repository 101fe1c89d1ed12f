"""`dfactory-hf train`, what a run writes besides the weights, and how it reports: the demo recipe only for the
demo model, generation_config.json and the model card, remote code of a hub checkpoint, tensorboard / wandb
through `--report_to`, `--log_level`, `--profile_steps`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from trainer_helpers import TOKENIZER, demo_data, demo_model, demo_trainer
from transformers import AutoModelForCausalLM, AutoTokenizer

from dfactory_hf import generate
from dfactory_hf.cli import main as cli_main
from dfactory_hf.recipes.sft import DEMO_RECIPE, parse_arguments, trains_demo_model

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--max_steps", "2", "--logging_steps", "1", "--num_train_samples", "32", "--num_test_samples", "4",
         "--final_generation_samples", "0", "--eval_mask_rates", "0.5", "--disable_tqdm", "true"]


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1", **extra}


def test_shipped_demo_recipe_is_configs_sft_tiny():
    # The package's copy (what an installed `dfactory-hf train` reads) and the README's configs/sft/tiny.yaml.
    assert DEMO_RECIPE.read_text() == (ROOT / "configs" / "sft" / "tiny.yaml").read_text(), \
        "copy configs/sft/tiny.yaml to dfactory_hf/recipes/tiny.yaml"


def test_demo_recipe_applies_to_the_demo_model_only(tmp_path):
    _, demo = parse_arguments(["--output_dir", str(tmp_path / "a")])
    assert demo.block_size == 4 and demo.learning_rate == 3e-3 and demo.max_steps == 3000  # configs/sft/tiny.yaml
    checkpoint = tmp_path / "real"
    demo_model().save_pretrained(checkpoint)
    TOKENIZER.save_pretrained(checkpoint)
    script, real = parse_arguments(["--model_name_or_path", str(checkpoint), "--output_dir", str(tmp_path / "b")])
    assert script.model_name_or_path == str(checkpoint)
    assert real.block_size == 32 and real.learning_rate == 5e-5 and real.max_steps == -1  # the library defaults
    _, other = parse_arguments(["--model_config", "small", "--output_dir", str(tmp_path / "c")])
    assert other.block_size == 32  # another shipped config from scratch: not the tiny demo's recipe either
    _, given = parse_arguments(["--config", str(ROOT / "configs" / "sft" / "llada2_mini_bd_sft.yaml"),
                                "--model_name_or_path", str(checkpoint), "--output_dir", str(tmp_path / "d"),
                                "--bf16", "false"])
    assert given.learning_rate == 1e-5  # an explicit recipe is used as given
    for spelling in (["--model-name-or-path", "x"], ["--model_name_or_path=x"], ["--model_name", "x"]):
        assert not trains_demo_model(spelling), spelling  # every spelling the parser itself takes
    assert trains_demo_model(["--model_config_overrides", '{"num_hidden_layers": 2}', "--max_steps", "2"])


def test_dfactory_hf_train_refuses_bad_input_with_one_line(tmp_path, capsys):
    assert cli_main(["train", "--output_dir", str(tmp_path / "o"), "--model_config", "huge"]) == 2
    assert capsys.readouterr().err.startswith("dfactory-hf train: error: --model_config ('huge') must be one of")
    assert not (tmp_path / "o").exists()


def test_dfactory_hf_train_runs_the_demo_and_logs_to_tensorboard(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "demo"
    status = cli_main(["train", "--output_dir", str(out), "--report_to", "tensorboard", *QUICK])
    assert status == 0
    assert "| held-out masked-token accuracy (start -> end)" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    # The demo recipe ran (block size 4) and the checkpoint says how to decode it.
    saved = json.loads((out / "generation_config.json").read_text())
    assert saved["block_length"] == 4 and saved["steps"] == 4 and saved["gen_length"] == 48
    assert saved["mask_token_id"] == TOKENIZER.mask_token_id and saved["eos_token_id"] == TOKENIZER.eos_token_id
    assert model.generation_config.block_length == 4  # attached at from_pretrained
    card = (out / "README.md").read_text()
    assert "trained from scratch: the shipped `tiny` config" in card
    assert "generated arithmetic conversations" in card and "`--block_size 4`" in card and "`--max_steps 2`" in card
    assert "block-diffusion" in card and "final training log (step 2)" in card
    # Tensorboard events hold the diffusion metrics of both steps.
    folders = {path.parent for path in (out / "runs").rglob("events.out.tfevents.*")}
    assert len(folders) == 1  # one run folder under output_dir (the final evaluation reopens a writer there)
    assert not (Path.cwd() / "runs").exists()  # transformers' writer opened before training goes to ./runs
    accumulator = EventAccumulator(str(folders.pop()))
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    for tag in ("train/ce_loss", "train/masked_token_accuracy", "train/model_tokens_per_second",
                "train/tflops_per_device", "eval/masked_token_accuracy", "eval/elbo_perplexity"):
        assert tag in tags, tags
    assert [event.step for event in accumulator.Scalars("train/ce_loss")] == [1, 2]
    assert "train/mfu" not in tags  # no known peak on a CPU


def test_wandb_offline_run_records_the_diffusion_metrics(tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "dfactory_hf.cli", "train", "--output_dir", str(out),
                          "--report_to", "wandb", *QUICK], capture_output=True, text=True, timeout=600,
                         env=_env(WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true"))
    assert run.returncode == 0, run.stderr[-3000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    # The run file (protobuf records, what `wandb sync` uploads) names the history keys; this wandb version
    # ships no reader for it, so the keys are looked for in its bytes.
    records = runs[0].read_bytes()
    for key in ("train/ce_loss", "train/masked_token_accuracy", "train/tflops_per_device", "eval/elbo_perplexity"):
        assert key.encode() in records, key


def test_real_model_by_hub_id_keeps_remote_code_and_gets_no_demo_recipe(tmp_path):
    """A hub id resolved in a local huggingface_hub cache (offline), its config naming remote code (auto_map)."""
    repo = "someorg/tiny-llada2"
    commit = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hub"
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
    demo_model().save_pretrained(snapshot)
    TOKENIZER.save_pretrained(snapshot)
    config = json.loads((snapshot / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
                          "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeForCausalLM"}
    (snapshot / "config.json").write_text(json.dumps(config))
    remote_code = {"configuration_llada2_moe.py": "# the hub's configuration file\n",
                   "modeling_llada2_moe.py": "# the hub's modeling file\n"}
    for name, text in remote_code.items():
        (snapshot / name).write_text(text)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(commit)

    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "dfactory_hf.cli", "train", "--model_name_or_path", repo,
                          "--output_dir", str(out), "--save_strategy", "steps", "--save_steps", "2",
                          "--report_to", "none", *QUICK], capture_output=True, text=True, timeout=600,
                         env=_env(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "No --config: someorg/tiny-llada2 trains with the library defaults (block_size 32" in run.stderr
    for folder in (out, out / "checkpoint-2"):
        for name, text in remote_code.items():
            assert (folder / name).read_text() == text, f"{folder / name} missing or changed"
        assert json.loads((folder / "config.json").read_text())["auto_map"] == config["auto_map"]
        saved = json.loads((folder / "generation_config.json").read_text())
        assert saved["block_length"] == 32  # the library default, not the demo recipe's 4
    card = (out / "README.md").read_text()
    assert "base_model: someorg/tiny-llada2" in card and "| base model | someorg/tiny-llada2 |" in card
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert args.learning_rate == 5e-5 and args.block_size == 32


def test_generate_reads_the_saved_decoding_defaults(tmp_path, capsys):
    trainer = demo_trainer(tmp_path, max_steps=2, eval_gen_length=8, eval_gen_threshold=0.8)
    trainer.train()
    trainer.save_model()
    folder = tmp_path / "out"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = model.generation_config
    assert (config.block_length, config.steps, config.threshold, config.gen_length) == (4, 4, 0.8, 8)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                           add_generation_prompt=True, tokenize=True, return_dict=False)
    defaults = generate(model, [prompt], eos_token_id=None)  # block, steps, threshold, length, mask from the file
    explicit = generate(model, [prompt], gen_length=8, block_length=4, steps=4, threshold=0.8, eos_token_id=None,
                        mask_token_id=tokenizer.mask_token_id)
    assert defaults == explicit and len(defaults[0]) == 8
    # The CLI too: 8 tokens in blocks of 4 are two blocks.
    assert cli_main(["generate", "--model", str(folder), "--prompt", "What is 2 + 3?"]) == 0
    printed = capsys.readouterr().out
    assert "block 1:" in printed and "block 2:" not in printed


def test_push_to_hub_folder_is_complete(tmp_path):
    """What Trainer.push_to_hub uploads (output_dir after save_model and create_model_card, checkpoints left out):
    no hub is reachable here, so the folder is checked instead of an upload."""
    trainer = demo_trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    trainer.train()
    trainer.save_model(_internal_call=True)  # what push_to_hub runs, then create_model_card(model_name=...)
    trainer.create_model_card(model_name="tiny-bd", language="en", license="apache-2.0")
    folder = tmp_path / "out"
    uploaded = {p.name for p in folder.iterdir() if not p.name.startswith(("_", "checkpoint-"))}
    for name in ("config.json", "model.safetensors", "generation_config.json", "README.md", "tokenizer.json",
                 "tokenizer_config.json"):
        assert name in uploaded, sorted(uploaded)
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "language:\n- en" in card and "license: apache-2.0" in card
    assert "# tiny-bd" in card and "## Block-diffusion recipe (dfactory_hf)" in card
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert reloaded.generation_config.block_length == 4
    assert (folder / "checkpoint-2" / "generation_config.json").exists()  # checkpoints carry it too


class _FolderHub:
    """The two hub calls Trainer.push_to_hub makes (create_repo, upload_folder), answered by a local folder: the
    network is the only part replaced, the trainer's own push path (save, card, ignore patterns) runs as is."""

    def __init__(self, root: Path):
        self.root = root

    def create_repo(self, repo_id, **kwargs):
        (self.root / repo_id).mkdir(parents=True, exist_ok=True)
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=(), **kwargs):
        import fnmatch
        import shutil

        for path in Path(folder_path).rglob("*"):
            relative = path.relative_to(folder_path)
            if path.is_file() and not any(fnmatch.fnmatch(part, pattern) for part in relative.parts
                                          for pattern in ignore_patterns):
                (self.root / repo_id / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, self.root / repo_id / relative)
        return f"file://{self.root / repo_id}"


def test_push_to_hub_from_the_trainer_to_a_local_folder(tmp_path, monkeypatch):
    import transformers.trainer

    hub = _FolderHub(tmp_path / "hub")
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    trainer = demo_trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, hub_model_id="me/tiny-bd")
    trainer.train()
    trainer.push_to_hub()
    pushed = tmp_path / "hub" / "me" / "tiny-bd"
    names = {p.name for p in pushed.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md", "tokenizer.json"} <= names
    assert not any(name.startswith("checkpoint-") for name in names)
    assert "## Block-diffusion recipe (dfactory_hf)" in (pushed / "README.md").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(pushed)
    trained = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, trained[name]), name
    assert reloaded.generation_config.block_length == 4


def test_profile_steps_writes_a_trace_of_those_steps(tmp_path):
    trainer = demo_trainer(tmp_path, max_steps=3, profile_steps="1-2")
    trainer.train()
    trace = tmp_path / "out" / "profile" / "trace_steps_1-2_rank0.json"
    events = json.loads(trace.read_text())["traceEvents"]
    names = {event.get("name") for event in events}
    assert {"optimizer_step_1", "optimizer_step_2"} <= names and "optimizer_step_0" not in names
    assert sum("aten::" in str(name) for name in names) > 10  # the steps' operators, not an empty trace


@pytest.mark.parametrize("value", ["3", "2-1", "a-b", "-1-2", "1-"])
def test_profile_steps_refuses_a_bad_range(tmp_path, value):
    from trainer_helpers import demo_args

    with pytest.raises(ValueError, match=r"--profile_steps .* must be 'a-b' with 0 <= a <= b"):
        demo_args(tmp_path, profile_steps=value)


def test_profile_steps_beyond_the_run_is_refused(tmp_path):
    from trainer_helpers import demo_args

    with pytest.raises(ValueError, match=r"--profile_steps \(2-4\) reaches past the last optimizer step \(3 with "
                                         r"--max_steps 4"):
        demo_args(tmp_path, max_steps=4, profile_steps="2-4")


def test_log_level_reaches_transformers_and_our_loggers(tmp_path):
    code = ("import sys; from dfactory_hf.recipes.sft import parse_arguments; "
            "import logging; parse_arguments(sys.argv[1:]); "
            "print('LEVELS', logging.getLogger('transformers').getEffectiveLevel(), "
            "logging.getLogger('dfactory_hf.recipes.sft').getEffectiveLevel())")
    levels = {}
    for level in ("info", "error"):
        checkpoint = tmp_path / "ckpt"
        if not checkpoint.exists():
            demo_model().save_pretrained(checkpoint)
            TOKENIZER.save_pretrained(checkpoint)
        run = subprocess.run([sys.executable, "-c", code, "--model_name_or_path", str(checkpoint), "--output_dir",
                              str(tmp_path / "o"), "--log_level", level], capture_output=True, text=True,
                             timeout=300, env=_env())
        assert run.returncode == 0, run.stderr[-2000:]
        # Only our marked line: libraries may print too (transformers' wandb probe does under WANDB_MODE=offline).
        marked = [line.split()[1:] for line in run.stdout.splitlines() if line.startswith("LEVELS ")]
        levels[level] = (marked[0] if len(marked) == 1 else marked, run.stderr)
    assert levels["info"][0] == ["20", "20"] and levels["error"][0] == ["40", "40"]
    assert "No --config" in levels["info"][1]  # our warning shows at info ...
    assert "No --config" not in levels["error"][1]  # ... and is silenced at error


def test_mfu_is_logged_against_a_known_peak_only():
    from dfactory_hf.trainer.flops import PEAK_BF16_TFLOPS
    from dfactory_hf.trainer.metrics import MetricWindow

    window = MetricWindow()
    window.add_flops(1e11)
    time.sleep(0.05)  # a window of >= 50 ms: at most 1 TFLOP/s per device
    known = window.summary(num_devices=2, peak_flops=PEAK_BF16_TFLOPS["H100"] * 1e12)
    unknown = window.summary(num_devices=2, peak_flops=None)  # CPU, or a device not in the table
    assert known["mfu"] == pytest.approx(known["tflops_per_device"] / PEAK_BF16_TFLOPS["H100"], rel=1e-6)
    assert 0 < known["mfu"] < 1 and "mfu" not in unknown and unknown["tflops_per_device"] > 0
