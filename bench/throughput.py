"""Training throughput: padded rows vs packed rows, dense sdpa mask vs flex BlockMask (block diffusion).

Run from the repository root::

    OMP_NUM_THREADS=1 python bench/throughput.py --threads 1          # CPU: tiny model, L = 512 and 1024
    OMP_NUM_THREADS=1 python bench/throughput.py --threads 1 --quick  # smoke run: L = 512, 2 timed steps
    python bench/throughput.py --device cuda                          # GPU: small model, bf16 autocast
    python bench/throughput.py --max_seq_lens 512 --steps 20 --warmup 3 --model small --profile

What it measures. Per `max_seq_len` L (block size 32, mask rate t ~ U[0.3, 0.8], `DiffusionObjective()`),
documents of the shipped generator (`--task mixed`: short arithmetic conversations and longer GSM8K-style word
problems, mean ~132 tokens after EOS block fill at L = 512; documents longer than L skipped) through
`diffusion_step`, the exact forward + loss that training runs:

- `recipe: padded+dense+all logits`: the public recipe's step, the baseline: one document per row padded to L
  (`PaddingCollator(pad_to_max_seq_len)`), `--batch_size` B rows per step, dense sdpa mask, logits for all 2L
  positions upcast to fp32, cross-entropy on the x_t half;
- `padded+dense`: the same rows through our loss (logits only at supervised x_t positions);
- `packed+dense`: documents packed into rows of L by the trainer's planner (`TokenBudgetBatchSampler(row_length=L)`,
  budget B x L, so B rows per micro-batch) and `PackingCollator`, dense sdpa mask (built per document);
- `packed+BlockMask`: the same packed batches, model set to `flex_attention`, the `BlockMask` built from the
  key intervals; transformers runs flex attention through `torch.compile`.

Measured (one run, real tokens/s over the recipe row; README quotes the table). One thread of this project's
2-core Xeon, tiny model, fp32, training steps: packing gives 4.1x at L = 512 and 6.4x at L = 1024 (padded rows
74% / 87% padding, packed rows 0.7% / 0.0%). Skipping the x_0 and unsupervised logits is within the noise
here (0.9-1.1x in two runs: the vocabulary is 128; with LLaDA2's 157k the recipe's fp32 logits for 2L
positions dominate its memory).
Forward-only, the BlockMask adds 1.1x (L = 512) and 2.3x (L = 1024) over the dense mask. H100 (an earlier
version of this script, without the recipe row; small model, bf16 autocast, training steps): 2.3x / 4.8x from
packing on `word` data; the BlockMask 5-10% slower than the dense mask there, as attention is under 10% of the
step. While every row still pays dense attention over 2L, packing cannot beat the ratio of real-token
fractions, (1 - packed padding) / (1 - padded padding), 3.8x at L = 512 on this data; the rest comes from
fewer, fuller steps (38 padded steps against 10 packed ones for the same documents: optimizer and per-step
overheads). More needs attention that skips masked tiles in the backward too (flex on
GPU).

Like for like: one epoch of the token-budget sampler is planned, `--warmup` + `--steps` micro-batches are drawn
from it at random (seeded, so their length mix is the epoch's), and the padded rows get exactly the documents
of the timed packed micro-batches, B per step (so they run more, cheaper steps); noise is seeded per document,
so every row sees the same x_t. "fwd+bwd" is a full training step: forward, loss, backward, AdamW step.
"fwd" is the forward and loss under `torch.no_grad()`. On CPU flex attention has no backward, so the BlockMask
row is timed forward-only and the dense rows are timed both ways; on a GPU every row is timed fwd+bwd.

Columns: tokens/s count supervised (masked x_t) positions and real (document, EOS fill included) tokens, each
document token once (the model sees 2L per row: x_t and x_0); padding = row padding / row tokens; peak memory =
high-water mark over the timed steps minus what the process held after model creation (CPU: RSS via
`ru_maxrss`, reset through /proc/self/clear_refs after model creation and after warmup; GPU:
`torch.cuda.max_memory_allocated`); speedup = real tokens/s over `padded+dense` of the same L and mode.
Every configuration runs in a fresh subprocess (`--_worker`), so peak memory and compiled code are its own.

Warmup: `--warmup` micro-batches, then one batch of every shape the timed steps will see that warmup missed.
Packed micro-batches vary in rows and row length, and compiled flex kernels and cuDNN attention plans are built
per shape: without this, the packed+dense row on an H100 ran at half speed (222 vs 115 ms/step at L = 512) and
the flex rows paid compilations inside the clock. The notes under the table give the warmup steps, seconds and
compiled graphs, and count compilations during the timed steps (0 expected). On CPU, inductor's flex template
fails to build its C++ for a dynamic batch size (torch 2.13), so there flex compiles one static graph per shape.

Caveats: batches are collated before the clock starts (collation runs in DataLoader workers in training); the
mask is built inside the timed step, as in training. Ten micro-batches are a sample of the epoch: rows of one run
share it, runs with another seed or step count do not. CPU timings on a shared machine are noisy: compare rows
of one run, not runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfactory_hf.data.collators import PackingCollator, PaddingCollator  # noqa: E402
from dfactory_hf.data.preprocessing import prepare_dataset  # noqa: E402
from dfactory_hf.data.keys import KeyedDataset  # noqa: E402
from dfactory_hf.data.sampler import TokenBudgetBatchSampler  # noqa: E402
from dfactory_hf.demo.arithmetic import make_arithmetic_dataset  # noqa: E402
from dfactory_hf.demo.tokenizer import load_demo_tokenizer  # noqa: E402
from dfactory_hf.models.llada2_moe import LLaDA2MoeForCausalLM, shipped_config  # noqa: E402
from dfactory_hf.trainer.forward import DiffusionObjective, diffusion_step, model_inputs  # noqa: E402

BLOCK_SIZE = 32
SAMPLER_BUFFER_SIZE = 512  # the trainer's default dynamic_batching_buffer_size
# row name -> (layout, attn_implementation)
CONFIGS = {
    "recipe: padded+dense+all logits": ("padded", "sdpa"),
    "padded+dense": ("padded", "sdpa"),
    "packed+dense": ("packed", "sdpa"),
    "packed+BlockMask": ("packed", "flex_attention"),
}
BASELINE = "recipe: padded+dense+all logits"
CPU_ROWS = [(BASELINE, "fwd+bwd"), ("padded+dense", "fwd+bwd"), ("packed+dense", "fwd+bwd"),
            (BASELINE, "fwd"), ("padded+dense", "fwd"), ("packed+dense", "fwd"), ("packed+BlockMask", "fwd")]
GPU_ROWS = [(BASELINE, "fwd+bwd"), ("padded+dense", "fwd+bwd"), ("packed+dense", "fwd+bwd"),
            ("packed+BlockMask", "fwd+bwd")]


# ---- data: the same documents for every configuration ------------------------------------------------------

def timed_documents(spec: dict, tokenizer) -> tuple[datasets.Dataset, list[list[int]], list[list[int]]]:
    """(documents, warmup micro-batches, timed micro-batches) as dataset indices, the same in every worker."""
    rows = make_arithmetic_dataset(spec["num_documents"], 0, seed=spec["seed"], task=spec["task"])["train"]
    documents, _ = prepare_dataset(rows, tokenizer, block_size=BLOCK_SIZE, max_seq_len=spec["max_seq_len"],
                                   mask_token_id=tokenizer.mask_token_id)
    sampler = TokenBudgetBatchSampler(
        lengths=documents["num_tokens"], max_tokens_per_micro_batch=spec["batch_size"] * spec["max_seq_len"],
        data_parallel_rank=0, data_parallel_size=1, seed=spec["seed"], buffer_size=SAMPLER_BUFFER_SIZE,
        row_length=spec["max_seq_len"])  # as the trainer plans packed rows
    plan = list(sampler)
    wanted = spec["warmup"] + spec["steps"]
    if len(plan) < wanted:
        raise ValueError(f"{spec['num_documents']} documents make only {len(plan)} micro-batches at "
                         f"max_seq_len {spec['max_seq_len']}; --warmup + --steps needs {wanted}: raise --num_documents")
    # The plan lists each buffer's micro-batches longest documents first; a random draw of micro-batches has the
    # epoch's mix of lengths (weighted by tokens, as the clock is).
    picked = random.Random(spec["seed"]).sample(plan, wanted)
    return documents, picked[:spec["warmup"]], picked[spec["warmup"]:]


def collate(spec: dict, tokenizer, documents, micro_batches: list[list[int]], layout: str) -> list[dict]:
    common = dict(mask_token_id=tokenizer.mask_token_id, pad_token_id=tokenizer.pad_token_id,
                  block_size=BLOCK_SIZE, seed=spec["seed"], max_seq_len=spec["max_seq_len"])
    if layout == "packed":
        collator = PackingCollator(**common)
        groups = micro_batches
    else:
        collator = PaddingCollator(**common, pad_to_max_seq_len=True)
        indices = [index for micro_batch in micro_batches for index in micro_batch]
        groups = [indices[start:start + spec["batch_size"]] for start in range(0, len(indices), spec["batch_size"])]
    keyed = KeyedDataset(documents)  # as the trainer fetches: each feature with its epoch and planned row
    return [collator(keyed.__getitems__(group)) for group in groups]


# ---- one configuration, in its own process -------------------------------------------------------------------

def reset_peak_rss() -> None:
    """Lower the RSS high-water mark (`ru_maxrss`) to the current RSS (Linux 4.0+)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:  # elsewhere the mark keeps the process's peak so far: the delta can only come out low
        pass


def memory_mark(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def reset_memory_mark(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def num_compiled_graphs() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
              if line.startswith("model name")]
    return models[0] if models else platform.processor()


def make_step(spec: dict, tokenizer, attn_implementation: str, device: torch.device):
    """(model, step(batch)): one training step (fwd+bwd, AdamW) or one forward + loss under no_grad (fwd)."""
    config = shipped_config(spec["model"], pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    config._attn_implementation = attn_implementation
    torch.manual_seed(spec["seed"])
    model = LLaDA2MoeForCausalLM(config).to(device).train()
    objective = DiffusionObjective(block_size=BLOCK_SIZE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4) if spec["mode"] == "fwd+bwd" else None
    # bf16 autocast on GPU (fp32 master weights, as Trainer's bf16=True); fp32 on CPU.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def recipe_loss(batch: dict) -> torch.Tensor:
        # The public recipe's step: logits for all 2L positions of [x_t ; x_0], upcast to fp32, cross-entropy
        # on the x_t half (a per-micro-batch mean).
        inputs = model_inputs(batch, objective, attn_implementation=attn_implementation, mask_dtype=torch.float32,
                              selector=batch["labels"] != -100)
        inputs["logits_to_keep"] = 0
        logits = model(**inputs).logits[:, : batch["labels"].shape[1]].float()
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())

    def our_loss(batch: dict) -> torch.Tensor:
        return diffusion_step(model, batch, objective, attn_implementation=attn_implementation).loss.loss

    forward = recipe_loss if spec["config"] == BASELINE else our_loss

    def step(batch: dict) -> None:
        if optimizer is None:
            with torch.no_grad(), autocast:
                forward(batch)
            return
        with autocast:
            loss = forward(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def with_every_shape(warmup_batches: list[dict], timed_batches: list[dict]) -> list[dict]:
    """The warmup batches plus one timed batch of each shape they lack."""
    seen = {tuple(batch["input_ids"].shape) for batch in warmup_batches}
    extra = []
    for batch in timed_batches:
        if tuple(batch["input_ids"].shape) not in seen:
            seen.add(tuple(batch["input_ids"].shape))
            extra.append(batch)
    return warmup_batches + extra


def measure(step, warmup_batches: list[dict], timed_batches: list[dict], device: torch.device) -> dict:
    synchronize(device)
    reset_memory_mark(device)
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else memory_mark(device)
    start = time.perf_counter()
    for batch in warmup_batches:
        step(batch)
    synchronize(device)
    warmup_seconds = time.perf_counter() - start
    reset_memory_mark(device)
    graphs_before = num_compiled_graphs()
    start = time.perf_counter()
    for batch in timed_batches:
        step(batch)
    synchronize(device)
    seconds = time.perf_counter() - start
    return dict(seconds=seconds, num_steps=len(timed_batches), warmup_seconds=warmup_seconds,
                num_warmup_steps=len(warmup_batches), peak_bytes=memory_mark(device) - baseline,
                compiled_graphs=graphs_before, recompiles=num_compiled_graphs() - graphs_before)


def run_worker(spec: dict) -> dict:
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    datasets.disable_progress_bars()
    device = torch.device(spec["device"])
    layout, attn_implementation = CONFIGS[spec["config"]]
    tokenizer = load_demo_tokenizer()
    documents, warmup_ids, timed_ids = timed_documents(spec, tokenizer)
    warmup_batches = collate(spec, tokenizer, documents, warmup_ids, layout)[:spec["warmup"]]
    timed_batches = collate(spec, tokenizer, documents, timed_ids, layout)
    supervised = DiffusionObjective(block_size=BLOCK_SIZE).supervised
    counts = dict(
        num_documents=sum(len(micro_batch) for micro_batch in timed_ids),
        num_rows=sum(batch["input_ids"].shape[0] for batch in timed_batches),
        num_row_tokens=sum(batch["input_ids"].numel() for batch in timed_batches),
        num_real_tokens=sum(int(batch["attention_mask"].sum()) for batch in timed_batches),
        num_supervised_tokens=sum(int(supervised(batch)[0].sum()) for batch in timed_batches),
    )
    warmup_batches = [{k: v.to(device) for k, v in batch.items()} for batch in warmup_batches]
    timed_batches = [{k: v.to(device) for k, v in batch.items()} for batch in timed_batches]
    model, step = make_step(spec, tokenizer, attn_implementation, device)

    # Compiled flex attention (transformers runs it through torch.compile) and cuDNN attention plans specialise
    # on shapes, and packed batches vary in rows and row length: warming up on every timed shape lets the clock
    # see the steady state of a long run. On CPU, inductor's flex template fails to build its C++ for a dynamic
    # batch size (torch 2.13: "'cur_kvSplitSize8' was not declared"), so there one static graph is compiled
    # per shape.
    warmup_batches = with_every_shape(warmup_batches, timed_batches)
    dynamo_settings = contextlib.nullcontext()
    if attn_implementation == "flex_attention" and device.type == "cpu":
        dynamo_settings = torch._dynamo.config.patch(automatic_dynamic_shapes=False, recompile_limit=256)
    with dynamo_settings:
        result = measure(step, warmup_batches, timed_batches, device)
        if spec["profile"]:
            profile_one_step(step, timed_batches[0], device, f"{spec['config']} {spec['mode']} L={spec['max_seq_len']}")
    return dict(spec, **counts, **result, torch_threads=torch.get_num_threads(), device_name=device_name(device),
                num_parameters=sum(p.numel() for p in model.parameters()))


def profile_one_step(step, batch: dict, device: torch.device, title: str) -> None:
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step(batch)
        synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n### profile of one step: {title}\n{prof.key_averages().table(sort_by=sort_by, row_limit=15)}",
          flush=True)


# ---- parent: one subprocess per configuration, one table ------------------------------------------------------

def machine_info(device: str, results: list[dict]) -> str:
    name = next((r["device_name"] for r in results if "error" not in r), "?")
    threads = sorted({r["torch_threads"] for r in results if "error" not in r})
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"device {device} ({name}), {os.cpu_count()} CPUs, torch threads {threads}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load average at the end {load}, "
            f"torch {torch.__version__}, python {platform.python_version()}")


def print_table(args, results: list[dict]) -> None:
    gpu = args.device.startswith("cuda")
    parameters = next((r["num_parameters"] for r in results if "error" not in r), 0)
    print(f"\nmodel `{args.model}` ({parameters / 1e6:.1f}M parameters, {'bf16 autocast' if gpu else 'fp32'}), "
          f"block diffusion, block_size {BLOCK_SIZE}, t ~ U[0.3, 0.8], padded batch B = {args.batch_size} rows, "
          f"packed token budget B x max_seq_len, {args.warmup} warmup + {args.steps} timed packed micro-batches per "
          f"row (the padded rows run the same documents, B per step). mode fwd+bwd: forward, loss, backward, AdamW "
          f"step; fwd: forward and loss under no_grad. peak mem: above what the process held after model creation "
          f"({'GPU allocated' if gpu else 'CPU RSS'}).\n")
    print("| max_seq_len | config | mode | docs | steps | rows | ms/step | supervised tok/s | real tok/s | padding "
          "| peak mem (MiB) | speedup (real tok/s) |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for result in results:
        row = f"| {result['max_seq_len']} | {result['config']} | {result['mode']} "
        if "error" in result:
            print(row + f"| failed: {result['error']} (its output is above) |||||||||")
            continue
        baseline = next((r for r in results if r["max_seq_len"] == result["max_seq_len"] and "error" not in r
                         and r["mode"] == result["mode"] and r["config"] == BASELINE), None)
        real_rate = result["num_real_tokens"] / result["seconds"]
        speedup = f"{real_rate * baseline['seconds'] / baseline['num_real_tokens']:.2f}x" if baseline else "n/a"
        padding = 1 - result["num_real_tokens"] / result["num_row_tokens"]
        print(row + f"| {result['num_documents']} | {result['num_steps']} | {result['num_rows']} "
              f"| {1e3 * result['seconds'] / result['num_steps']:.0f} "
              f"| {result['num_supervised_tokens'] / result['seconds']:.0f} | {real_rate:.0f} | {padding:.1%} "
              f"| {result['peak_bytes'] / 2**20:.0f} | {speedup} |")
    finished = [r for r in results if "error" not in r]
    print("\nuntimed warmup: " + "; ".join(
        f"{r['config']} {r['mode']} L={r['max_seq_len']}: {r['num_warmup_steps']} steps, {r['warmup_seconds']:.0f} s"
        + (f", {r['compiled_graphs']} compiled graphs" if r["compiled_graphs"] else "") for r in finished))
    recompiles = [f"{r['config']} {r['mode']} L={r['max_seq_len']}: {r['recompiles']}" for r in finished
                  if r["recompiles"]]
    print("compilations during the timed steps: " + ("; ".join(recompiles) if recompiles else "none"))


def run_configurations(args) -> list[dict]:
    """Every (max_seq_len, config, mode) in a fresh worker process; a failed worker becomes an error row."""
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for max_seq_len in args.max_seq_lens:
            for config, mode in GPU_ROWS if args.device.startswith("cuda") else CPU_ROWS:
                spec = dict(config=config, mode=mode, max_seq_len=max_seq_len, device=args.device, model=args.model,
                            task=args.task,
                            batch_size=args.batch_size, steps=args.steps, warmup=args.warmup, seed=args.seed,
                            num_documents=args.num_documents, threads=args.threads, profile=args.profile,
                            result_path=str(Path(scratch) / f"{len(results)}.json"))
                print(f"[throughput] {config} {mode} max_seq_len={max_seq_len} ...", file=sys.stderr, flush=True)
                worker = subprocess.run([sys.executable, __file__, "--_worker", json.dumps(spec)])
                if worker.returncode:
                    results.append(dict(spec, error=f"worker exit code {worker.returncode}"))
                    continue
                done = json.loads(Path(spec["result_path"]).read_text())
                results.append(done)
                print(f"[throughput]   {1e3 * done['seconds'] / done['num_steps']:.0f} ms/step, "
                      f"{done['num_real_tokens'] / done['seconds']:.0f} real tok/s", file=sys.stderr, flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=["tiny", "small"],
                        help="shipped config (default: small on GPU, tiny on CPU)")
    parser.add_argument("--max_seq_lens", type=int, nargs="+", help="default 512 1024 (--quick: 512)")
    parser.add_argument("--batch_size", type=int, help="padded rows per step B (default 8 on CPU, 16 on GPU, 4 quick)")
    parser.add_argument("--steps", type=int, help="timed packed micro-batches (default 10 CPU, 20 GPU, 2 quick)")
    parser.add_argument("--warmup", type=int, help="untimed micro-batches first (default 3 CPU, 5 GPU, 2 quick)")
    parser.add_argument("--num_documents", type=int, help="word problems generated (default 4000, 1000 quick)")
    parser.add_argument("--task", default="mixed", choices=["add2", "word", "mixed"],
                        help="shipped data generator task (default mixed: short arithmetic and long word problems)")
    parser.add_argument("--threads", type=int, help="torch CPU threads in every worker (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: small batches, few steps, L = 512")
    parser.add_argument("--profile", action="store_true", help="print a profile of one step per configuration")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        spec = json.loads(args._worker)
        Path(spec["result_path"]).write_text(json.dumps(run_worker(spec)))
        return

    gpu = args.device.startswith("cuda")
    defaults = dict(model="small" if gpu else "tiny", max_seq_lens=[512] if args.quick else [512, 1024],
                    batch_size=4 if args.quick else 16 if gpu else 8, steps=2 if args.quick else 20 if gpu else 10,
                    warmup=2 if args.quick else 5 if gpu else 3, num_documents=1000 if args.quick else 4000)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    command = shlex.join([sys.executable, *sys.argv])
    began = time.perf_counter()
    results = run_configurations(args)
    print(f"\ncommand: {command}\n{machine_info(args.device, results)}")
    print_table(args, results)
    print(f"\nwall time {time.perf_counter() - began:.0f} s")
    if any("error" in result for result in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
