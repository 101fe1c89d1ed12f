"""Draft-and-edit (LLaDA2.1) on the embedded demo: mask-only vs draft-and-edit training, decoded with and without
token-to-token editing at several unmasking thresholds.

Run from the repository root (two demo trainings of `configs/sft/tiny.yaml`, ~12 min each on one core, then the
decoding grid, ~1 min)::

    OMP_NUM_THREADS=1 python bench/editing.py --threads 1
    python bench/editing.py --quick          # 10 steps per training, 8 problems: checks the script runs

For each trained model (the demo recipe as `accelerate launch examples/sft_llada2.py` runs it, plus
`--edit_noise_rate` / `--edit_keep_weight` for the second) and each threshold, the held-out problems are decoded
greedily with the KV cache, without editing and with `edit_threshold`. Reported: exact match, and answer tokens
per model forward pass (every call counted: prefill, denoising passes, cache appends), the speed of decoding.
A lower threshold commits more drafts per pass ("speed mode"); editing repairs wrong drafts, and costs at most
`edit_steps` extra passes per block (none when the drafts are right: the check pass doubles as the cache append).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from sft_llada2 import load_data, main as train_demo  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from dfactory_hf.data.preprocessing import prepare_dataset  # noqa: E402
from dfactory_hf.demo.arithmetic import exact_match  # noqa: E402
from dfactory_hf.trainer.evaluation import generate_answers  # noqa: E402


def train(output_dir: Path, *, steps: int | None, extra: list[str], reuse: bool) -> float:
    if reuse and (output_dir / "config.json").exists():
        print(f"reusing {output_dir}")
        return float("nan")
    argv = ["--output_dir", str(output_dir), "--final_generation_samples", "0", *extra]
    if steps is not None:
        argv += ["--max_steps", str(steps), "--logging_steps", str(max(steps // 10, 1))]
    start = time.perf_counter()
    train_demo(argv)
    return time.perf_counter() - start


def held_out(tokenizer, num_problems: int):
    script = argparse.Namespace(dataset_path=None, dataset_name=None, num_train_samples=0, num_test_samples=200,
                                arithmetic_task="add", mixture=None)
    test = load_data(script, seed=1)["test"]  # the demo recipe's seed: the held-out split it trained beside
    documents, _ = prepare_dataset(test, tokenizer, block_size=4, max_seq_len=64, mask_token_id=tokenizer.mask_token_id,
                                   split="test")
    # The last rows: the demo recipe's evaluations during training (its stop rule) answer the first 50.
    return documents.select(range(max(len(documents) - num_problems, 0), len(documents)))


def decode(model, tokenizer, documents, *, threshold: float, edit_threshold: float | None, edit_steps: int):
    calls = [0]
    handle = model.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    try:
        records = generate_answers(model, tokenizer, documents, score=exact_match, num_samples=len(documents),
                                   gen_length=48, block_length=4, threshold=threshold,
                                   mask_token_id=tokenizer.mask_token_id,
                                   batch_size=1, edit_threshold=edit_threshold, edit_steps=edit_steps)
    finally:
        handle.remove()
    tokens = sum(r["num_tokens"] for r in records)
    return sum(r["correct"] for r in records) / len(records), tokens / calls[0], calls[0] / len(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/bench-editing")
    parser.add_argument("--edit_noise_rate", type=float, default=0.1)
    parser.add_argument("--edit_keep_weight", type=float, default=0.1)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.7, 0.5, 0.3])
    parser.add_argument("--edit_threshold", type=float, default=0.9)
    parser.add_argument("--edit_steps", type=int, default=4)
    parser.add_argument("--problems", type=int, default=100, help="held-out problems decoded per cell")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--reuse", action="store_true", help="keep models already trained in --output_dir")
    parser.add_argument("--quick", action="store_true", help="10 training steps, 8 problems, 2 thresholds: a smoke run")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps, problems = (10, 8) if args.quick else (None, args.problems)
    if args.quick:
        args.thresholds = args.thresholds[:2]
    out = Path(args.output_dir)
    edit_flags = ["--edit_noise_rate", str(args.edit_noise_rate), "--edit_keep_weight", str(args.edit_keep_weight)]
    trainings = {"mask-only": [], f"draft-and-edit (edit {args.edit_noise_rate:g}, keep {args.edit_keep_weight:g})":
                 edit_flags}
    times = {name: train(out / f"model-{i}", steps=steps, extra=flags, reuse=args.reuse)
             for i, (name, flags) in enumerate(trainings.items())}

    rows = []
    for i, name in enumerate(trainings):
        model = AutoModelForCausalLM.from_pretrained(out / f"model-{i}", dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(out / f"model-{i}")
        documents = held_out(tokenizer, problems)
        for threshold in args.thresholds:
            for edit in (None, args.edit_threshold):
                accuracy, per_pass, passes = decode(model, tokenizer, documents, threshold=threshold,
                                                    edit_threshold=edit, edit_steps=args.edit_steps)
                rows.append((name, threshold, edit, accuracy, per_pass, passes))

    print(f"\n`python bench/editing.py{' --quick' if args.quick else ''}`: torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {problems} held-out problems, greedy, KV cache, block 4, "
          f"edit_steps {args.edit_steps}; training s: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()) + "\n")
    print("| training | threshold | edit_threshold | exact match | tokens / forward | forwards / answer |")
    print("|---|---|---|---|---|---|")
    for name, threshold, edit, accuracy, per_pass, passes in rows:
        print(f"| {name} | {threshold:g} | {'-' if edit is None else f'{edit:g}'} | {accuracy:.1%} | "
              f"{per_pass:.2f} | {passes:.1f} |")


if __name__ == "__main__":
    main()
