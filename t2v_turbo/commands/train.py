"""`t2v-turbo train`: consistency distillation of the student from a teacher cache (SPEC 3 and 5).

The configuration is a YAML or TOML file (TrainConfig's fields), then the named flags, then
`key=value` overrides, later ones winning. Run it under `accelerate launch` for several processes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from t2v_turbo.cache import MANIFEST_NAME

# Named flags and the TrainConfig field each one sets.
FLAG_FIELDS = {
    "preset": "preset",
    "data": "data",
    "cache": "cache",
    "max_steps": "max_steps",
    "output_dir": "output_dir",
    "resume": "resume",
    "seed": "seed",
    "kernels": "kernels",
}


def _has_manifest(cache: str) -> bool:
    directory = Path(cache)
    return directory.is_dir() and any(directory.glob("manifest*.json"))


def run_train(args: argparse.Namespace) -> int:
    from t2v_turbo.train import NonFiniteLossError, TrainConfig, parse_overrides, train

    try:
        values = parse_overrides(args.overrides)
        values.update({field: getattr(args, flag) for flag, field in FLAG_FIELDS.items() if getattr(args, flag) is not None})
        config = TrainConfig.load(args.config, values)
    except (ValueError, FileNotFoundError) as error:
        print(f"t2v-turbo train: error: {error}", file=sys.stderr)
        return 2
    if config.cache is None or not _has_manifest(config.cache):
        where = config.cache or "DIR"
        print(
            f"t2v-turbo train: error: no teacher cache at {where} (no {MANIFEST_NAME}); build it first with "
            f"`t2v-turbo preprocess --data {config.data} --cache {where}`",
            file=sys.stderr,
        )
        return 2
    try:
        result = train(config)
    except NonFiniteLossError as error:
        print(f"t2v-turbo train: stopped: {error}", file=sys.stderr)
        return 1
    last = result.losses[-1] if result.losses else float("nan")
    print(f"trained {result.steps} steps (last loss {last:.5g}); student in {result.student_dir}, metrics in {result.metrics_path}")
    return 0


def add_train_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="distil the T2V-Turbo-v2 student from a teacher cache (consistency distillation + rewards)",
        description="Consistency distillation of the student UNet from a teacher cache written by "
        "`t2v-turbo preprocess`. Settings come from --config (YAML/TOML, the fields of "
        "t2v_turbo.train.TrainConfig), then the flags below, then key=value overrides. "
        "Use `accelerate launch` for several processes or GPUs.",
    )
    parser.add_argument("--config", default=None, help="YAML or TOML file of TrainConfig fields")
    parser.add_argument("--preset", choices=("tiny", "vc2"), default=None, help="student architecture without --teacher")
    parser.add_argument("--data", default=None, help="synthetic or a dataset path (read by `t2v-turbo preprocess`)")
    parser.add_argument("--cache", default=None, help="teacher cache directory")
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps in all (a resumed run included)")
    parser.add_argument("--output-dir", default=None, help="where checkpoints, metrics.csv and the student go")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint directory")
    parser.add_argument("--seed", type=int, default=None, help="seed of the data order, w draws and dropout")
    parser.add_argument("--kernels", choices=("on", "off"), default=None, help="turbo_kernels ops (on) or plain PyTorch (off)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="any other TrainConfig field, e.g. lr=2e-5")
    parser.set_defaults(handler=run_train)
