"""GPU check of the paths a CPU cannot run: flex-attention training with the BlockMask, under bf16.

    python bench/gpu_check.py            # on a CUDA machine; about two minutes on one H100

1. The same packed batch through sdpa (dense mask) and flex_attention (BlockMask built from document and block
   indices): loss and gradients in fp32 must agree (flex backward exists on GPU only).
2. `DiffusionTrainer` with packing, flex_attention and bf16 on the `small` config: loss must fall.
3. Generation on GPU: cached and recomputing decoding give the same tokens.
Prints a table of what it measured; exits non-zero if a check fails.
"""

from __future__ import annotations

import sys
import tempfile
import time

import torch

import dfactory_hf
from dfactory_hf import DiffusionTrainer, DiffusionTrainingArguments
from dfactory_hf.data.collators import PackingCollator
from dfactory_hf.data.preprocessing import prepare_dataset
from dfactory_hf.demo.arithmetic import make_arithmetic_dataset
from dfactory_hf.demo.tokenizer import load_demo_tokenizer
from dfactory_hf.models.llada2_moe import LLaDA2MoeForCausalLM, shipped_config
from dfactory_hf.trainer.forward import DiffusionObjective, diffusion_step


def check_flex_matches_sdpa(tokenizer, rows) -> tuple[float, float]:
    torch.manual_seed(0)
    model = LLaDA2MoeForCausalLM(shipped_config("tiny")).cuda()
    collator = PackingCollator(mask_token_id=tokenizer.mask_token_id, pad_token_id=tokenizer.pad_token_id,
                               block_size=32, max_seq_len=1024)
    batch = {k: v.cuda() for k, v in collator([rows[i] for i in range(12)]).items()}
    objective = DiffusionObjective(block_size=32)
    results = {}
    for attn in ("sdpa", "flex_attention"):
        model.set_attn_implementation(attn)
        model.zero_grad()
        step = diffusion_step(model, batch, objective, attn_implementation=attn)
        step.loss.loss.backward()
        results[attn] = (step.loss.loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()]))
    loss_diff = abs(results["sdpa"][0] - results["flex_attention"][0])
    grad_diff = (results["sdpa"][1] - results["flex_attention"][1]).abs().max().item()
    return loss_diff, grad_diff


def check_training(tokenizer, data) -> list[float]:
    torch.manual_seed(0)
    config = shipped_config("small", pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    config._attn_implementation = "flex_attention"
    model = LLaDA2MoeForCausalLM(config)
    args = DiffusionTrainingArguments(
        output_dir=tempfile.mkdtemp(), max_steps=40, learning_rate=1e-3, bf16=True, packing=True,
        max_seq_len=1024, max_tokens_per_micro_batch=8192, block_size=32, logging_steps=10, save_strategy="no",
        report_to="none", disable_tqdm=True, eval_mask_rates=[],
    )
    trainer = DiffusionTrainer(model=model, args=args, train_dataset=data["train"], processing_class=tokenizer)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def check_generation(tokenizer, data) -> bool:
    torch.manual_seed(0)
    model = LLaDA2MoeForCausalLM(shipped_config("tiny", initializer_range=0.1)).cuda()
    prompts = [tokenizer(m[0]["content"])["input_ids"] for m in data["test"]["messages"][:3]]
    common = dict(gen_length=64, block_length=8, steps=8, threshold=0.3, eos_token_id=None,
                  mask_token_id=tokenizer.mask_token_id)
    return dfactory_hf.generate(model, prompts, use_cache=True, **common) == dfactory_hf.generate(
        model, prompts, use_cache=False, **common)


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    tokenizer = load_demo_tokenizer()
    data = make_arithmetic_dataset(4000, 16, seed=0, task="mixed")
    rows, _ = prepare_dataset(data["train"].select(range(64)), tokenizer, block_size=32, max_seq_len=1024,
                              mask_token_id=tokenizer.mask_token_id)
    start = time.perf_counter()
    loss_diff, grad_diff = check_flex_matches_sdpa(tokenizer, rows)
    losses = check_training(tokenizer, data)
    same_tokens = check_generation(tokenizer, data)
    checks = [
        ("flex vs sdpa loss (fp32)", f"{loss_diff:.2e}", loss_diff < 1e-4),
        ("flex vs sdpa max grad diff (fp32)", f"{grad_diff:.2e}", grad_diff < 1e-3),
        ("training losses (bf16, flex, packed)", " ".join(f"{x:.3f}" for x in losses), losses[-1] < losses[0]),
        ("cached == recomputing tokens", str(same_tokens), same_tokens),
    ]
    print(f"\n{torch.cuda.get_device_name()} | torch {torch.__version__} | {time.perf_counter() - start:.0f} s")
    print("| check | value | ok |\n|---|---|---|")
    for name, value, ok in checks:
        print(f"| {name} | {value} | {'yes' if ok else 'NO'} |")
    return 0 if all(ok for _, _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
