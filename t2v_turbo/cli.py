"""The `t2v-turbo` command: one subcommand a job.

Each subcommand is one `_add_<name>(subparsers)` function that imports its module only when the
parser is built, declares its arguments and sets `handler(args) -> exit status`, plus one entry
in SUBCOMMANDS.
"""

from __future__ import annotations

import argparse
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


SUBCOMMANDS = (_add_bench,)


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
