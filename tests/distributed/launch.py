"""Start tests/distributed/train_worker.py the way a user starts training: `accelerate launch --config_file ...`
(FSDP2), `torchrun` (DDP), or a plain `python` process (the one-process reference)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).parent / "train_worker.py"
CPU_FSDP2 = ROOT / "configs" / "accelerate" / "cpu_fsdp2.yaml"
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(launcher: str, ranks: int, *, config: Path = CPU_FSDP2, launch_flags: tuple = ()) -> list[str]:
    if launcher == "plain":
        return [sys.executable]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    accelerate = Path(sys.executable).parent / "accelerate"
    return [str(accelerate), "launch", "--config_file", str(config), "--num_processes", str(ranks),
            "--main_process_port", str(_free_port()), *launch_flags]


def run(script: Path, script_args: list[str], *, launcher: str, ranks: int = 1, expect_rc: int = 0,
        config: Path = CPU_FSDP2, launch_flags: tuple = ()) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    command = launch_command(launcher, ranks, config=config, launch_flags=launch_flags) + [str(script), *script_args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT)
    assert result.returncode == expect_rc, (
        f"{' '.join(command)}\nexit {result.returncode}, expected {expect_rc}\n"
        + result.stdout[-3000:] + result.stderr[-6000:])
    return result


def train(out: Path, *, launcher: str, ranks: int = 1, grad_accum: int, layout: str, expect_rc: int = 0,
          launch_flags: tuple = (), **options) -> dict | None:
    """Run the worker; `options` become its flags (`save_steps=2` -> `--save_steps 2`, True -> a bare flag)."""
    script_args = ["--out", str(out), "--grad_accum", str(grad_accum), "--layout", layout]
    for key, value in options.items():
        if value is True:
            script_args.append(f"--{key}")
        elif value not in (None, False):
            script_args += [f"--{key}", str(value)]
    run(WORKER, script_args, launcher=launcher, ranks=ranks, expect_rc=expect_rc, launch_flags=launch_flags)
    return torch.load(out) if expect_rc == 0 else None


def run_cache(root: Path, **defaults):
    """`get(name, **spec)`: the worker run called `name`, started on first use and shared by a module's tests
    (`defaults` fill what `spec` leaves out); each record gets its output folder as `dir`."""
    cache: dict[str, dict] = {}

    def get(name: str, **spec) -> dict:
        if name not in cache:
            cache[name] = train(root / f"{name}.pt", output_dir=root / name, **{**defaults, **spec})
            cache[name]["dir"] = root / name
        return cache[name]

    return get


def documents_per_step(run_record: dict, *, num_steps: int) -> list[list[int]]:
    """The sorted sample indices each optimizer step trained on, over all ranks; no document twice in a step."""
    per_rank = len(run_record["micro_batches"][0]) // num_steps
    steps = []
    for step in range(num_steps):
        ids = [i for rank in run_record["micro_batches"] for mb in rank[step * per_rank:(step + 1) * per_rank]
               for i in mb]
        assert len(ids) == len(set(ids)), f"step {step} trained a document twice"
        steps.append(sorted(ids))
    return steps


def assert_same_training(parallel: dict, single: dict, *, num_steps: int, atol: float = 1e-5,
                         initial: Path | None = None) -> None:
    """The same documents per step, supervised counts, logged losses and final parameters as one process, and a
    run that trained: every parameter moved from its initial value (demo_model(seed=0), or the `initial`
    checkpoint)."""
    from trainer_helpers import demo_model
    from transformers import AutoModelForCausalLM

    from dfactory_hf.trainer.lora import checkpoint_key

    assert documents_per_step(parallel, num_steps=num_steps) == documents_per_step(single, num_steps=num_steps)
    assert parallel["supervised"] == single["supervised"]
    torch.testing.assert_close(torch.tensor(parallel["losses"]), torch.tensor(single["losses"]), rtol=0, atol=atol)
    assert parallel["parameters"].keys() == single["parameters"].keys()
    for name, value in single["parameters"].items():
        torch.testing.assert_close(parallel["parameters"][name], value, rtol=0, atol=atol, msg=name)
    start = AutoModelForCausalLM.from_pretrained(initial) if initial else demo_model(seed=0)
    initial = dict(start.named_parameters())
    trainable = set(parallel["trainable"])
    for name, value in parallel["parameters"].items():
        key = checkpoint_key(name)  # LoRA: the base model's name of a wrapped parameter
        if key in initial:  # trained ones moved, frozen ones (LoRA's base model) did not
            assert torch.equal(value, initial[key]) != (name in trainable), f"{name}: trainable={name in trainable}"
        elif ".lora_B." in name:  # adapters start at B = 0
            assert value.any(), f"{name} did not change"
