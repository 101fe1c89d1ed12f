"""`dfactory-hf` command line.

    dfactory-hf train [--config recipe.yaml] [flags]   block-diffusion SFT (the demo without arguments)
    dfactory-hf convert --to {hub,merged} SRC DST     rewrite a LLaDA2-MoE checkpoint's expert layout
    dfactory-hf generate --model PATH --prompt "..."  block-diffusion generation, printing each committed block
"""

from __future__ import annotations

import argparse
import sys


def _convert(args: argparse.Namespace) -> int:
    from .models.llada2_moe import convert_checkpoint

    counts = convert_checkpoint(args.src, args.dst, to=args.to, max_shard_size_gb=args.max_shard_size_gb)
    print(
        f"wrote {args.dst} in the {args.to} layout: {counts['tensors_in']} tensors read, "
        f"{counts['expert_layers']} expert layers, {counts['shards_out']} shard(s)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfactory-hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    # Listed for --help; its arguments are the trainer's own (TrlParser), so main() hands them over unparsed.
    commands.add_parser("train", add_help=False, help="block-diffusion SFT: `dfactory-hf train --help` for the flags")

    convert = commands.add_parser("convert", help="rewrite a checkpoint's expert layout (no model is built)")
    convert.add_argument("--to", required=True, choices=["hub", "merged"],
                         help="hub: per-expert keys (what the hub ships); merged: dFactory's [E, ...] tensors")
    convert.add_argument("src", help="source checkpoint directory (safetensors)")
    convert.add_argument("dst", help="new, empty destination directory")
    convert.add_argument("--max_shard_size_gb", type=float, default=5.0, help="largest output shard, in GiB")
    convert.set_defaults(handler=_convert)

    try:
        from .generation.cli import add_generate_command
    except ImportError:
        pass
    else:
        add_generate_command(commands)
    return parser


def _train(argv: list[str]) -> int:
    from .recipes.sft import main as train_main

    try:
        train_main(argv)
    except ValueError as error:
        print(f"dfactory-hf train: error: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        return _train(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as error:
        print(f"dfactory-hf {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
