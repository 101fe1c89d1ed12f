"""`dfactory-hf generate`: chat with a block-diffusion checkpoint, printing each block as it is committed.

    dfactory-hf generate --model PATH --prompt "What is 17 + 25?"
    dfactory-hf generate --model PATH --prompt "first question" --prompt "second question" --temperature 0.7 --seed 0
    dfactory-hf generate --model PATH --prompt "What is 17 + 25?" --trace trace.png   # + a PNG of the commit order

Several `--prompt`s are decoded together as one batch (the same tokens as one at a time at temperature 0).
"""

from __future__ import annotations

import argparse
import sys

DTYPES = ("float32", "bfloat16", "float16", "auto")


def add_generate_command(subparsers) -> None:
    """Register `generate` on the `dfactory-hf` subcommand parsers."""
    command = subparsers.add_parser(
        "generate",
        help="block-diffusion generation, printing each committed block",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    command.add_argument("--model", required=True, help="checkpoint directory or hub id (llada2_moe)")
    command.add_argument("--tokenizer", help="tokenizer directory or hub id (default: --model)")
    command.add_argument("--prompt", action="append", required=True,
                         help="user message; repeat the flag to decode several prompts as one batch")
    command.add_argument("--system", help="optional system message put before every prompt")
    # Unset: the checkpoint's generation_config.json (what DiffusionTrainer saved), else REFERENCE 3's defaults.
    saved = " (default: the checkpoint's generation_config.json, else {})"
    command.add_argument("--gen_length", type=int, help="most tokens generated per prompt" + saved.format(256))
    command.add_argument("--block_length", type=int,
                         help="tokens per diffusion block, the training block size" + saved.format(32))
    command.add_argument("--steps", type=int, help="most denoising steps per block" + saved.format(32))
    command.add_argument("--threshold", type=float,
                         help="commit a position early once its token's probability exceeds this, in (0, 1]"
                              + saved.format(0.95))
    command.add_argument("--edit_threshold", type=float,
                         help="draft-and-edit decoding (LLaDA2.1): also rewrite a filled position of the current "
                              "block when the model's token differs with probability above this, in (0, 1]; "
                              "unset = no editing")
    command.add_argument("--edit_steps", type=int, default=8,
                         help="with --edit_threshold: the most edit-only passes per block once nothing is masked")
    command.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    command.add_argument("--top_k", type=int, help="sample only among the k most likely tokens")
    command.add_argument("--top_p", type=float, help="sample only within this much probability mass, in (0, 1]")
    command.add_argument("--seed", type=int, help="seed of the sampling generator (temperature > 0)")
    command.add_argument("--no_cache", action="store_true",
                         help="recompute every committed block at every step (the slow reference; same tokens)")
    command.add_argument("--eos_early_stop", action="store_true",
                         help="stop a prompt as soon as it commits EOS with no mask before it, not after its block")
    command.add_argument("--trace", metavar="PNG",
                         help="also write a PNG of the denoising step at which each answer position was committed "
                              "(and edited); needs matplotlib (pip install 'dfactory_hf[plot]')")
    command.add_argument("--dtype", choices=DTYPES, default="float32", help="weights' dtype ('auto': the checkpoint's)")
    command.set_defaults(handler=run_generate)


def build_prompt_ids(tokenizer, prompts: list[str], system: str | None) -> list[list[int]]:
    rows = []
    for prompt in prompts:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        rows.append(list(ids))
    return rows


def run_generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import dfactory_hf  # noqa: F401  (registers llada2_moe with the Auto classes)

    from ..paths import check_pretrained_source, load_pretrained
    from .sampler import generate

    check_pretrained_source("--model", args.model, "model")
    tokenizer_path, tokenizer_flag = (args.tokenizer, "--tokenizer") if args.tokenizer else (args.model, "--model")
    check_pretrained_source(tokenizer_flag, tokenizer_path, "tokenizer")
    tokenizer = load_pretrained(tokenizer_flag, tokenizer_path, AutoTokenizer.from_pretrained)
    if tokenizer.mask_token_id is None:
        raise ValueError(
            f"the tokenizer at {tokenizer_path} has no mask token, which block diffusion needs; "
            "pass --tokenizer with a diffusion tokenizer (one that sets mask_token)."
        )
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = load_pretrained("--model", args.model, AutoModelForCausalLM.from_pretrained, dtype=dtype)
    generator = torch.Generator(device=model.device).manual_seed(args.seed) if args.seed is not None else None

    prompt_ids = build_prompt_ids(tokenizer, args.prompt, args.system)
    trace = None
    if args.trace:
        from ..plots import CommitTrace, pyplot

        pyplot()  # refuse before decoding when matplotlib is missing
        trace = CommitTrace([len(ids) for ids in prompt_ids], args.block_length)
    streamed = [""] * len(prompt_ids)
    answers_so_far: list[list[int]] = [[] for _ in prompt_ids]

    def print_block(new_tokens: list[list[int]], block_index: int) -> None:
        for row, tokens in enumerate(new_tokens):
            if not tokens:
                continue
            answers_so_far[row].extend(tokens)
            # Decode the whole answer so far and print the new suffix: a block may split a multi-byte character.
            text = tokenizer.decode(answers_so_far[row], skip_special_tokens=True)
            new_text, streamed[row] = text[len(streamed[row]) :], text
            prefix = f"[{row}] " if len(prompt_ids) > 1 else ""
            print(f"{prefix}block {block_index}: {new_text!r}", flush=True)

    answers = generate(
        model,
        prompt_ids,
        gen_length=args.gen_length,
        block_length=args.block_length,
        steps=args.steps,
        threshold=args.threshold,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_token_id=tokenizer.eos_token_id,
        mask_token_id=tokenizer.mask_token_id,
        eos_early_stop=args.eos_early_stop,
        use_cache=not args.no_cache,
        generator=generator,
        on_block_committed=print_block,
        edit_threshold=args.edit_threshold,
        edit_steps=args.edit_steps,
        on_step=trace.record if trace is not None else None,
    )
    for row, (prompt, answer) in enumerate(zip(args.prompt, answers)):
        print(f"\n=== answer {row} ({len(answer)} tokens) to {prompt!r} ===")
        print(tokenizer.decode(answer, skip_special_tokens=True))
    if trace is not None:
        from ..plots import plot_commit_trace

        def readable(token: int) -> str:
            return "EOS" if token == tokenizer.eos_token_id else tokenizer.decode([token]).replace(" ", "\u2423")

        texts = [[readable(token) for token in answer] for answer in answers]
        print(f"\nwrote {plot_commit_trace(trace, answers, args.trace, labels=args.prompt, token_texts=texts)}")
    sys.stdout.flush()
    return 0
