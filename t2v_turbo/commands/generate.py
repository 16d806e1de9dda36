"""`t2v-turbo generate`: sample videos from prompts with a saved T2V-Turbo model directory.

The student's few-step consistency sampler by default, the teacher's 50-step DDIM with
classifier-free guidance with --teacher. Writes .mp4, .gif or a .png frame grid and prints where the
time went (text encoder, UNet, VAE, total).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

from t2v_turbo.commands import positive_int
from t2v_turbo.files import uncreatable_reason

DTYPES = ("float32", "float16", "bfloat16")


def output_paths(out: str, count: int) -> list[Path]:
    """`out` itself for one prompt; out with _0, _1, ... before the suffix for several."""
    path = Path(out)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{index}{path.suffix}") for index in range(count)]


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from t2v_turbo import video_io
    from t2v_turbo.commands import error_text
    from t2v_turbo.models import checkpoint
    from t2v_turbo.pipeline import TEACHER_STEPS, T2VTurboPipeline

    dtype, use_kernels = getattr(torch, args.dtype), not args.no_kernels
    try:
        if args.unet is None:
            pipeline = T2VTurboPipeline.from_pretrained(args.model, device=args.device, dtype=dtype, use_kernels=use_kernels)
        else:
            # Loaded on the CPU first, so only the UNet that samples reaches the device.
            parts = T2VTurboPipeline.from_pretrained(args.model, use_kernels=use_kernels)
            pipeline = T2VTurboPipeline(
                checkpoint.load_unet_dir(args.unet, use_kernels=use_kernels), parts.vae, parts.text_encoder,
                fps=parts.fps, defaults=parts.defaults, use_kernels=use_kernels,
            ).to(device=args.device, dtype=dtype)
    # A missing directory or file, missing or unexpected weights, or weights of other shapes.
    except (FileNotFoundError, KeyError, ValueError) as error:
        print(f"t2v-turbo generate: error: {error_text(error)}", file=sys.stderr)
        return 2
    if args.cuda_graphs:
        pipeline.enable_cuda_graphs()
    common = dict(
        num_frames=args.frames, height=args.height, width=args.width, seed=args.seed, progress=not args.no_progress
    )
    try:
        pipeline.frame_size(args.height, args.width)
    except ValueError as error:
        print(f"t2v-turbo generate: error: {error_text(error)}", file=sys.stderr)
        return 2
    def sample(prompts: list[str]):
        if args.teacher:
            steps = TEACHER_STEPS if args.steps is None else args.steps
            guidance = 7.5 if args.guidance is None else args.guidance
            return pipeline.sample_teacher(prompts, num_steps=steps, guidance_scale=guidance, **common)
        return pipeline.generate(
            prompts, num_steps=args.steps, guidance_scale=args.guidance, motion_strength=args.motion_strength, **common
        )

    # Batches of --batch-size prompts, each drawn from --seed: memory stays that of one batch, a
    # batch's clips are written before the next is sampled, and at the default of 1 a prompt's
    # clip depends on its prompt and the seed only, not on the prompts beside it.
    paths = output_paths(args.out, len(args.prompts))
    seconds: dict[str, float] = {}
    for start in range(0, len(args.prompts), args.batch_size):
        result = sample(args.prompts[start:start + args.batch_size])
        for clip, path in zip(result.frames, paths[start:start + args.batch_size]):
            video_io.write_video(clip, path, fps=pipeline.fps, layout="channels")
            print(f"wrote {path}")
        for name, value in result.timings.items():
            seconds[name] = seconds.get(name, 0.0) + value
    t = seconds
    print(f"time: UNet {t['unet_s']:.2f} s, VAE {t['vae_s']:.2f} s, text {t['text_s']:.2f} s, total {t['total_s']:.2f} s")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", nargs="+", metavar="PROMPT", help="one video a prompt")
    parser.add_argument("--model", required=True, help="model directory (as T2VTurboPipeline.save_pretrained writes)")
    parser.add_argument(
        "--unet", default=None, metavar="DIR",
        help="a UNet directory to sample with instead of the model's (e.g. the student/ that `t2v-turbo train` writes)",
    )
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="sampling steps (default: the model's, usually 4; 50 with --teacher)"
    )
    parser.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="guidance: the student's embedded w (default: the model's, 7.5), or the teacher's classic CFG scale (7.5)",
    )
    parser.add_argument(
        "--motion-strength", type=float, default=None, help="motion-guidance strength m (default: the model's, 0.05)"
    )
    parser.add_argument("--frames", type=positive_int, default=None, help="frames a video (default: the model's)")
    parser.add_argument("--height", type=positive_int, default=None, help="height in pixels (default: the model's)")
    parser.add_argument("--width", type=positive_int, default=None, help="width in pixels (default: the model's)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--batch-size", type=positive_int, default=1,
        help="prompts sampled together (default 1: memory of one clip, and each clip depends on its prompt and "
        "the seed only)",
    )
    parser.add_argument(
        "--out", default="clip.mp4", help="output .mp4, .gif or .png (frame grid); several prompts add _0, _1, ..."
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="UNet and VAE dtype (default float32)")
    parser.add_argument(
        "--teacher", action="store_true", help="the teacher's DDIM sampler with classifier-free guidance instead"
    )
    parser.add_argument("--no-kernels", action="store_true", help="plain PyTorch instead of turbo_kernels' ops")
    parser.add_argument(
        "--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
        help="replay the UNet from CUDA graphs from the second step on (default: on a GPU): the host stops issuing "
        "its kernels one by one; the first step warms up and the second captures, so the more steps and prompts "
        "the more it saves; the graphs hold about one UNet call's intermediates",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from t2v_turbo.video_io import VIDEO_SUFFIXES

    if Path(args.out).suffix.lower() not in VIDEO_SUFFIXES:
        parser.error(f"--out must end in one of {', '.join(VIDEO_SUFFIXES)}, got {args.out}")
    # Checked before sampling, which would otherwise end in the error: every file the prompts write.
    for path in output_paths(args.out, len(args.prompts)):
        problem = uncreatable_reason(path, directory=False)
        if problem:
            parser.error(f"--out: {problem}")
    if args.teacher and args.motion_strength is not None:
        parser.error("--motion-strength conditions the student; the teacher (--teacher) takes none")
    from t2v_turbo import schedule
    from t2v_turbo.pipeline import TEACHER_MAX_STEPS

    # The student samples on the 200-step grid; the teacher's DDIM on every other training step at most.
    most_steps = TEACHER_MAX_STEPS if args.teacher else schedule.DDIM_GRID_STEPS
    if args.steps is not None and args.steps > most_steps:
        parser.error(f"--steps must be at most {most_steps}{' with --teacher' if args.teacher else ''}, got {args.steps}")
    if not 0 <= args.seed < 2**64:
        parser.error(f"--seed must be an integer in [0, 2**64), got {args.seed}")
    for name in ("guidance", "motion_strength"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            parser.error(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this machine has no CUDA GPU")
    if args.cuda_graphs and device.type != "cuda":
        parser.error(f"--cuda-graphs needs a CUDA device, got --device {args.device}")
    if args.cuda_graphs is None:
        # On the H200 lease a 4-step clip took 349 ms replayed from graphs against 852 ms issued
        # eagerly through the kernels (578 ms through the reference, not timed through graphs):
        # eager batch-1 sampling is bound by the host, whichever ops it issues.
        args.cuda_graphs = device.type == "cuda"


def add_generate_command(subparsers) -> argparse.ArgumentParser:
    """Adds `generate` to a `t2v-turbo` subparsers object; its handler(args) returns the exit status."""
    parser = subparsers.add_parser(
        "generate",
        help="sample videos from prompts with a T2V-Turbo model directory",
        description="Sample one video a prompt with the student's few-step consistency sampler (or, with "
        "--teacher, the 50-step DDIM sampler with classifier-free guidance), write it as .mp4, .gif or a "
        ".png frame grid, and print the text encoder, UNet, VAE and total time.",
    )
    add_arguments(parser)

    def handler(args: argparse.Namespace) -> int:
        _validate(parser, args)
        return run_generate(args)

    parser.set_defaults(handler=handler)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`t2v-turbo generate ...` on its own: argv holds what follows `generate`."""
    from t2v_turbo.cli import main as cli_main

    return cli_main(["generate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
