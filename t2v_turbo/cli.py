"""The `t2v-turbo` command: one subcommand a job.

Each subcommand is one `_add_<name>(subparsers)` function that imports its module only when the
parser is built, declares its arguments and sets `handler(args) -> exit status`, plus one entry
in SUBCOMMANDS. A command line naming a subcommand builds that one alone, so it does not pay for
importing the others' modules (the benchmarks pull in open_clip: seconds).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
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
    from t2v_turbo.models.vc2_unet import ORIGINAL_PREFIX

    def convert(args) -> int:
        from t2v_turbo.commands import error_text
        from t2v_turbo.files import uncreatable_reason

        if not args.output.endswith(checkpoint.SAFETENSORS_SUFFIX):
            parser.error(f"OUTPUT must be a {checkpoint.SAFETENSORS_SUFFIX} file, got {args.output}")
        problem = uncreatable_reason(args.output, directory=False)
        if problem:
            parser.error(f"OUTPUT: {problem}")
        try:
            state = checkpoint.load_state_dict_file(args.input)
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
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
        f"UNet state dict (under 'state_dict' if nested; keys under '{ORIGINAL_PREFIX}' with the "
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


SUBCOMMANDS = {
    "bench": _add_bench, "convert": _add_convert, "demo": _add_demo, "generate": _add_generate,
    "pretrain": _add_pretrain, "preprocess": _add_preprocess, "train": _add_train,
}


# Commands that run models on the CPU too and take --threads (demo and pretrain have their own).
THREADED_COMMANDS = ("preprocess", "train", "generate")


def _thread_count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (torch's default) or more, got {value}")
    return value


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser of every subcommand, or of `only`."""
    parser = argparse.ArgumentParser(prog="t2v-turbo", description="T2V-Turbo-v2 post-training with turbo_kernels.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, add in SUBCOMMANDS.items():
        if only in (None, name):
            add(subparsers)
            if name in THREADED_COMMANDS:
                subparsers.choices[name].add_argument(
                    "--threads", type=_thread_count, default=0,
                    help="torch CPU threads (0: torch's default, one a core; on a machine other jobs share, "
                    "fewer threads than cores can be many times faster)",
                )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    parser = build_parser(command if command in SUBCOMMANDS else None)
    args, extra = parser.parse_known_args(argv)
    # train's KEY=VALUE overrides may sit between its flags; argparse takes only their first run.
    if extra and args.command == "train" and all("=" in arg and not arg.startswith("-") for arg in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "threads", 0) and args.command in THREADED_COMMANDS:
        import torch

        torch.set_num_threads(args.threads)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
