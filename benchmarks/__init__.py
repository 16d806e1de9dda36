"""Benchmarks of turbo_kernels' ops: `t2v-turbo bench` or `python -m benchmarks`.

The harness (benchmarks.harness) is op-agnostic; each suite module yields the cases of one op
family, and a new family is one more entry in suites().
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from benchmarks import harness


def suites() -> tuple[tuple[harness.Suite, ...], tuple]:
    """(every suite, every summary). Imported here, not at the package's import, so that
    `python -m benchmarks.training` (or any suite) runs its module once, not a second copy of it."""
    from benchmarks import attention, models, preprocess, rewards, solver, spatial, temporal_block, training, video_decode

    return (
        (
            solver.cases,
            attention.cases,
            temporal_block.cases,
            temporal_block.geglu_cases,
            temporal_block.layer_norm_cases,
            temporal_block.group_norm_cases,
            temporal_block.strided_linear_cases,
            spatial.cases,
            preprocess.cases,
            models.cases,
            training.cases,
            rewards.cases,
            video_decode.cases,
        ),
        (attention.summary, spatial.summary, temporal_block.summary, models.summary, training.summary, rewards.summary, video_decode.summary),
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    harness.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return harness.run(args, *suites())


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=harness.DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
