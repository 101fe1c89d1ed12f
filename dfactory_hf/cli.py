"""`dfactory-hf` command line.

    dfactory-hf train [--config recipe.yaml] [flags]   block-diffusion SFT (the demo without arguments)
    dfactory-hf convert --to {hub,merged} SRC DST     rewrite a LLaDA2-MoE checkpoint's expert layout
    dfactory-hf generate --model PATH --prompt "..."  block-diffusion generation, printing each committed block
    dfactory-hf plot OUTPUT_DIR [--out FILE]          PNG of a run's loss, masked-token accuracy and eval curves
    dfactory-hf show-mask --lengths 12 8 --block_size 4   PNG of the block-diffusion mask of a packed row

The pictures need matplotlib: pip install 'dfactory_hf[plot]'.
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


def _plot(args: argparse.Namespace) -> int:
    from .plots import plot_training_curves

    out = args.out or f"{args.output_dir.rstrip('/')}/training_curves.png"
    print(f"wrote {plot_training_curves(args.output_dir, out)}")
    return 0


def _show_mask(args: argparse.Namespace) -> int:
    from .plots import plot_attention_mask

    out = plot_attention_mask(args.lengths, block_size=args.block_size, out=args.out, row_length=args.row_length,
                              block_diffusion=not args.full_attention)
    print(f"wrote {out}")
    return 0


def add_picture_commands(commands) -> None:
    plot = commands.add_parser("plot", help="PNG of a run's training and eval curves (from trainer_state.json)")
    plot.add_argument("output_dir", metavar="OUTPUT_DIR",
                      help="a run's --output_dir or one of its checkpoint-N folders (the latest checkpoint's "
                           "trainer_state.json when the run folder has none)")
    plot.add_argument("--out", help="PNG to write (default: OUTPUT_DIR/training_curves.png)")
    plot.set_defaults(handler=_plot)

    show_mask = commands.add_parser("show-mask", help="PNG of the block-diffusion attention mask of a packed row")
    show_mask.add_argument("--lengths", type=int, nargs="+", required=True,
                           help="the lengths of the documents packed into the row (multiples of --block_size)")
    show_mask.add_argument("--block_size", type=int, required=True, help="diffusion block size, in tokens")
    show_mask.add_argument("--row_length", type=int, help="row length with padding after the documents "
                                                          "(default: the sum of --lengths)")
    show_mask.add_argument("--full_attention", action="store_true",
                           help="draw the full-attention (MDLM) mask over x_t instead of block diffusion")
    show_mask.add_argument("--out", default="attention_mask.png", help="PNG to write")
    show_mask.set_defaults(handler=_show_mask)


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
    add_picture_commands(commands)

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
    except ImportError as error:
        if not hasattr(error, "extra"):  # a real import bug, not an optional dependency left out (plots.py)
            raise
        print(f"dfactory-hf {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
