"""The `t2v-turbo` command: one subcommand a job.

Each subcommand is one `_add_<name>(subparsers)` function that imports its module only when the
parser is built, declares its arguments and sets `handler(args) -> exit status`, plus one entry
in SUBCOMMANDS.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _add_bench(subparsers) -> None:
    import benchmarks

    parser = subparsers.add_parser(
        "bench",
        help="time every op against the PyTorch reference and a measured copy-bandwidth ceiling",
        description="Time every op for each usable backend beside torch eager and torch.compile of the "
        "reference; print a table and write a JSON record and a PNG plot under benchmarks/results/.",
    )
    benchmarks.add_arguments(parser)
    parser.set_defaults(handler=benchmarks.run)


def _add_convert(subparsers) -> None:
    from t2v_turbo.models import checkpoint

    def convert(args) -> int:
        from t2v_turbo.commands import error_text

        if not args.output.endswith(checkpoint.SAFETENSORS_SUFFIX):
            parser.error(f"OUTPUT must be a {checkpoint.SAFETENSORS_SUFFIX} file, got {args.output}")
        try:
            state = checkpoint.load_state_dict_file(args.input)
            checkpoint.save_state_dict_file(state, args.output)
        except (FileNotFoundError, ValueError, TypeError) as error:
            print(f"t2v-turbo convert: error: {error_text(error)}", file=sys.stderr)
            return 2
        params = sum(t.numel() for t in state.values())
        print(f"wrote {args.output}: {len(state)} tensors, {params:,} parameters")
        return 0

    parser = subparsers.add_parser(
        "convert",
        help="copy a checkpoint's UNet state dict into a .safetensors file",
        description="Load a .pt/.ckpt/.bin checkpoint with weights_only=True (or a .safetensors file), take its "
        f"UNet state dict (under 'state_dict' if nested; keys under '{checkpoint.ORIGINAL_PREFIX}' with the "
        "prefix stripped, if any carry it) and write it to OUTPUT atomically.",
    )
    parser.add_argument("input", help="checkpoint to read (.pt, .ckpt, .bin or .safetensors)")
    parser.add_argument("output", help="the .safetensors file to write")
    parser.set_defaults(handler=convert)


def _add_demo(subparsers) -> None:
    from t2v_turbo.demo import add_demo_command

    add_demo_command(subparsers)


def _add_preprocess(subparsers) -> None:
    from t2v_turbo.commands.preprocess import add_preprocess_command

    add_preprocess_command(subparsers)


def _add_generate(subparsers) -> None:
    from t2v_turbo.commands.generate import add_generate_command

    add_generate_command(subparsers)


def _add_train(subparsers) -> None:
    from t2v_turbo.commands.train import add_train_command

    add_train_command(subparsers)


def _add_pretrain(subparsers) -> None:
    from t2v_turbo.pretrain import add_pretrain_command

    add_pretrain_command(subparsers)


SUBCOMMANDS = (_add_bench, _add_convert, _add_demo, _add_generate, _add_pretrain, _add_preprocess, _add_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t2v-turbo", description="T2V-Turbo-v2 post-training with turbo_kernels.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
