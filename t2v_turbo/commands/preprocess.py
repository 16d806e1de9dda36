"""`t2v-turbo preprocess`: run the frozen teacher once per clip and write the teacher cache that
`t2v-turbo train` reads (SPEC 2 and 4). Rerunning the same command continues a killed run; run it
under `accelerate launch` to split the clips over several processes or GPUs.
"""

from __future__ import annotations

import argparse
import sys

from t2v_turbo.commands import non_negative_int, positive_int

DTYPES = ("bfloat16", "float16", "float32")


# Clip settings without a model directory to take them from (VideoCrafter2's).
CLIP_DEFAULTS = {"frames": 16, "fps": 8, "height": 320, "width": 512}


def clip_settings(args: argparse.Namespace) -> dict[str, int]:
    """frames, fps, height, width: the flags given, else what --model's pipeline.json records (the
    clips it was made for), else CLIP_DEFAULTS."""
    defaults = dict(CLIP_DEFAULTS)
    if args.model is not None:
        from pathlib import Path

        from t2v_turbo.pipeline import PIPELINE_CONFIG_NAME, read_pipeline_config

        if (Path(args.model) / PIPELINE_CONFIG_NAME).is_file():
            fps, recorded = read_pipeline_config(args.model)
            defaults = {"frames": recorded.num_frames, "fps": fps, "height": recorded.height, "width": recorded.width}
    return {name: default if getattr(args, name) is None else getattr(args, name) for name, default in defaults.items()}


def run_preprocess(args: argparse.Namespace) -> int:
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from t2v_turbo.preprocess import PreprocessConfig, is_grid_range, preprocess, run_totals
    from t2v_turbo.schedule import DDIM_GRID_STEPS

    for flag, (lo, hi) in (("--grid-range", args.grid_range), ("--motion-grid-range", args.motion_grid_range)):
        if not is_grid_range((lo, hi)):
            limits = f"0 <= LO < HI <= {DDIM_GRID_STEPS}"
            print(f"t2v-turbo preprocess: error: {flag} must be LO HI with {limits}, got {lo} {hi}", file=sys.stderr)
            return 2
    try:
        clip = clip_settings(args)
        config = PreprocessConfig(
            cache=args.cache, data=args.data, model=args.model, preset=args.preset, num_frames=clip["frames"],
            fps=clip["fps"], size=(clip["height"], clip["width"]), batch_size=args.batch_size, shard_size=args.shard_size,
            dtype=args.dtype, seed=args.seed, motion_grid_range=tuple(args.motion_grid_range),
            grid_range=tuple(args.grid_range), motion=not args.no_motion, kernels=args.kernels, compile=args.compile,
            cuda_graphs=args.cuda_graphs, limit=args.limit,
            num_workers=args.num_workers, video_backend=args.video_backend, cpu=args.cpu, progress=not args.no_progress,
        )
        result = preprocess(config)
    except (ValueError, FileNotFoundError) as error:
        print(f"t2v-turbo preprocess: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"t2v-turbo preprocess: interrupted; the clips finished before it (if any) are stored in {args.cache}: "
            "the same command goes on from there",
            file=sys.stderr,
        )
        return 130
    # Under `accelerate launch` each process holds only its own clips' counts: a process whose clips
    # were all unreadable has not failed a run whose other processes stored theirs.
    state = PartialState()
    run = run_totals(gather_object([result]))
    processes = f" by {state.num_processes} processes" if state.num_processes > 1 else ""
    if state.is_main_process:
        print(
            f"wrote {run.written} samples ({run.motion_clips} with motion priors) to {run.cache}{processes} in "
            f"{run.seconds:.1f} s ({run.clips_per_second:.3g} clips/s); {run.already_stored} were already "
            f"stored; {run.skipped} unreadable clips skipped ({run.skipped_total} in all)"
        )
    if run.written + run.already_stored == 0 and run.skipped_total:
        if state.is_main_process:
            # Said here, not at train's "the cache holds no samples", which would point elsewhere.
            print(
                f"t2v-turbo preprocess: error: every clip of {args.data} was unreadable: the cache holds none",
                file=sys.stderr,
            )
        return 1
    return 0


def add_preprocess_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "preprocess",
        help="run the teacher once per clip and write the teacher cache that `train` reads",
        description="The offline teacher pass: per clip the VAE latent, a grid index, z_t, the teacher's "
        "conditional and unconditional noise, the prompt embedding and, for motion clips, the motion score. "
        "Writes sharded safetensors with a manifest; rerun the same command to continue a killed run; use "
        "`accelerate launch` for several processes or GPUs.",
    )
    teacher = parser.add_mutually_exclusive_group(required=True)
    teacher.add_argument("--model", default=None, help="a T2V-Turbo model directory (T2VTurboPipeline.save_pretrained)")
    teacher.add_argument("--preset", choices=("tiny", "vc2"), default=None,
                         help="random weights of this architecture, seeded by --seed as `train` seeds its student")
    parser.add_argument("--data", default="synthetic", help="synthetic, a directory of videos or a .csv/.jsonl manifest")
    parser.add_argument("--cache", required=True, help="the cache directory to write (or continue)")
    parser.add_argument("--frames", type=positive_int, default=None, help="frames a clip (default: --model's, else 16)")
    parser.add_argument("--fps", type=positive_int, default=None,
                        help="frame rate of the clips and the teacher's fps conditioning (default: --model's, else 8)")
    parser.add_argument("--height", type=positive_int, default=None, help="frame height in pixels (default: --model's, else 320)")
    parser.add_argument("--width", type=positive_int, default=None, help="frame width in pixels (default: --model's, else 512)")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="clips a teacher batch")
    parser.add_argument("--shard-size", type=positive_int, default=64, help="samples a cache shard")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="dtype of the UNet and the VAE")
    parser.add_argument("--seed", type=int, default=0, help="seed of every per-clip draw (grid index, noise)")
    parser.add_argument("--no-motion", action="store_true", help="no motion priors: every clip is a plain clip")
    parser.add_argument("--motion-grid-range", type=int, nargs=2, default=(100, 200), metavar=("LO", "HI"),
                        help="grid indices [LO, HI) of motion clips")
    parser.add_argument("--grid-range", type=int, nargs=2, default=(0, 200), metavar=("LO", "HI"),
                        help="grid indices [LO, HI) of the other clips")
    parser.add_argument("--kernels", choices=("on", "off"), default="on", help="turbo_kernels ops (on) or plain PyTorch (off)")
    parser.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                        help="run the teacher's no-grad passes (the ε pass, the DDIM inversion) through torch.compile "
                        "(backend: inductor unless named)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay the teacher's no-grad passes from CUDA graphs, one a batch size (GPU only): the "
                        "DDIM inversion runs the same shapes for up to 200 steps")
    parser.add_argument("--limit", type=positive_int, default=None, metavar="N", help="only the first N clips of the data")
    parser.add_argument("--num-workers", type=non_negative_int, default=None,
                        help="data loader worker processes (default: 2 for video files, 0 for synthetic clips)")
    parser.add_argument("--video-backend", choices=("pyav", "decord"), default="pyav",
                        help="decoder of real videos (decord must be installed)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run_preprocess)
