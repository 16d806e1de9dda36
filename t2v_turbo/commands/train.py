"""`t2v-turbo train`: consistency distillation of the student from a teacher cache (SPEC 3 and 5).

The configuration is a YAML or TOML file (TrainConfig's fields), then `key=value` overrides (a
later one wins), then the named flags, which win over both. Run it under `accelerate launch` for
several processes.
Reward flags (--hps, --clip, --toy-image-reward, --video-reward) add the reward mixture on
VAE-decoded frames (--vae), weighted by the config's image_reward_weight and video_reward_weight.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from t2v_turbo.cache import MANIFEST_NAME
from t2v_turbo.commands import error_text, positive_int

if TYPE_CHECKING:
    from torch import nn

    from t2v_turbo.rewards import RewardMixture
    from t2v_turbo.train import TrainConfig

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
    "vae": "vae",
    "progress": "progress",
}
REWARD_FLAGS = ("hps", "clip", "toy_image_reward", "video_reward")
REWARD_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _has_manifest(cache: str) -> bool:
    directory = Path(cache)
    return directory.is_dir() and any(directory.glob("manifest*.json"))


# The random tiny teacher at the README's clip size: preprocess's default (16 frames of 320x512, 1024
# clips) would take hours on a CPU for a model that only tests the plumbing.
PRESET_CLIPS = {"tiny": ("--frames", "8", "--height", "32", "--width", "32", "--limit", "64")}


def _preprocess_hint(config: TrainConfig) -> str:
    """How to build the cache this run reads: the `t2v-turbo preprocess` command line, from the
    teacher the run trains from: the model directory that a MODEL_DIR/unet teacher lies in, else
    the random preset with the run's seed, as check_cache_teacher requires."""
    from t2v_turbo.pipeline import PIPELINE_CONFIG_NAME

    unknown = ""
    if config.teacher is None:
        teacher = ["--preset", config.preset, "--seed", str(config.seed), *PRESET_CLIPS.get(config.preset, ())]
    elif (Path(config.teacher).parent / PIPELINE_CONFIG_NAME).is_file():
        teacher = ["--model", str(Path(config.teacher).parent)]
    else:
        teacher = ["--model", "MODEL_DIR"]
        unknown = f" (MODEL_DIR: the model directory, with its VAE and text encoder, of the teacher {config.teacher})"
    command = ["t2v-turbo", "preprocess", *teacher, "--data", config.data or "synthetic", "--cache", config.cache or "DIR"]
    return f"build it first with `{shlex.join(command)}`{unknown}"


def _load_rewards(args: argparse.Namespace, config: TrainConfig) -> tuple[RewardMixture | None, nn.Module | None]:
    """(mixture, VAE) for the reward flags, or (None, None) when none is given (or, with
    video_reward_processes, none of this process's kind); the reward models are placed on this
    process's device (train() moves the VAE there). With video_reward_processes each process loads
    only the models it scores with: the video model on the last processes, the image models on the
    others."""
    if not any(getattr(args, flag) is not None for flag in REWARD_FLAGS):
        return None, None
    import torch
    from accelerate import PartialState

    from t2v_turbo.models.vae import load_vae
    from t2v_turbo.rewards.loading import build_reward_mixture
    from t2v_turbo.train import reward_role

    if config.vae is None:
        raise ValueError(
            "rewards score VAE-decoded frames: give --vae DIR (a VAE save_pretrained directory) or set vae in the config"
        )
    state = PartialState(cpu=config.cpu)
    sources = {"hps": args.hps, "clip": args.clip, "toy_image": args.toy_image_reward, "video": args.video_reward}
    split = config.video_reward_processes
    if split:
        if args.video_reward is None:
            raise ValueError("video_reward_processes splits off the video reward: give --video-reward")
        if reward_role(state.process_index, state.num_processes, split) == "video":
            sources = {**dict.fromkeys(sources), "video": args.video_reward}
        else:
            sources["video"] = None
    error = mixture = vae = None
    try:
        mixture = build_reward_mixture(
            **sources, image_weight=config.image_reward_weight, video_weight=config.video_reward_weight,
            dtype=None if args.reward_dtype == "auto" else getattr(torch, args.reward_dtype),
            device=state.device, gradient_checkpointing=config.gradient_checkpointing,
        )
        if mixture is not None:
            vae = load_vae(config.vae, gradient_checkpointing=config.gradient_checkpointing)
    except (ValueError, TypeError, KeyError, FileNotFoundError) as caught:
        error = caught
    if split and state.num_processes > 1:
        # Each process loads other files: one that fails stops them all, not only itself.
        from accelerate.utils import gather_object

        problems = [text for text in gather_object([None if error is None else error_text(error)]) if text]
        if problems:
            raise ValueError(problems[0])
    if error is not None:
        raise error
    return mixture, vae


def _describe(mixture: RewardMixture) -> str:
    entries = ", ".join(
        f"{entry.name} ({type(entry.model).__name__}) weight {entry.weight:.4g}" for entry in mixture.entries
    )
    model = mixture.models[0]
    parameter = next(model.parameters())
    return f"rewards: {entries}; {parameter.dtype} on {parameter.device}"


def _describe_split(args: argparse.Namespace, config: TrainConfig) -> None:
    """On the main process: which processes score which rewards (each loaded only its own)."""
    from accelerate import PartialState

    from t2v_turbo.train import video_reward_scale

    state = PartialState(cpu=config.cpu)
    if not state.is_main_process:
        return
    processes, video = state.num_processes, config.video_reward_processes
    if processes <= video:
        return  # the trainer reports it
    images = [flag for flag in ("hps", "clip", "toy_image_reward") if getattr(args, flag) is not None]
    print(
        f"rewards split over {processes} processes: the first {processes - video} compute L_CD and "
        f"{', '.join(images) or 'no image reward'} (weight {config.image_reward_weight:.4g}); the last {video} "
        f"only the video reward {args.video_reward} (weight {config.video_reward_weight:.4g}, scaled by "
        f"{video_reward_scale(processes, video):.4g} there)"
    )


def run_train(args: argparse.Namespace) -> int:
    from t2v_turbo.train import NonFiniteLossError, TrainConfig, parse_overrides, prepare_training

    try:
        values = parse_overrides(args.overrides)
        values.update({field: getattr(args, flag) for flag, field in FLAG_FIELDS.items() if getattr(args, flag) is not None})
        config = TrainConfig.load(args.config, values)
    except (ValueError, FileNotFoundError) as error:
        print(f"t2v-turbo train: error: {error}", file=sys.stderr)
        return 2
    if config.cache is None or not _has_manifest(config.cache):
        print(
            f"t2v-turbo train: error: no teacher cache at {config.cache or 'DIR'} (no {MANIFEST_NAME}); "
            f"{_preprocess_hint(config)}",
            file=sys.stderr,
        )
        return 2
    try:
        reward, vae = _load_rewards(args, config)
    except (ValueError, TypeError, KeyError, FileNotFoundError) as error:
        print(f"t2v-turbo train: error: {error_text(error)}", file=sys.stderr)
        return 2
    if config.video_reward_processes:
        _describe_split(args, config)
    else:
        print(_describe(reward) if reward is not None else "rewards: none (consistency distillation only)")
    # What a run's settings can get wrong: a --resume path, a teacher directory, a cache made by
    # another teacher or from other data, an accelerate config asking for FSDP1 or DeepSpeed.
    # Errors of the training loop itself keep their traceback.
    try:
        trainer = prepare_training(config, reward=reward, vae=vae)
    except (ValueError, KeyError, FileNotFoundError, NotImplementedError) as error:
        print(f"t2v-turbo train: error: {error_text(error)}", file=sys.stderr)
        return 2
    if config.resume is not None and trainer.accelerator.is_main_process:
        fresh = config.resume == "latest" and trainer.step == 0
        print(f"--resume latest: no checkpoint in {config.output_dir} yet, starting at step 0" if fresh
              else f"resuming at step {trainer.step}")
    try:
        result = trainer.run()
    except NonFiniteLossError as error:
        print(f"t2v-turbo train: stopped: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"t2v-turbo train: interrupted at step {trainer.step}; --resume latest continues from the last "
            f"checkpoint in {config.output_dir} (if any)",
            file=sys.stderr,
        )
        return 130
    if not result.losses:
        print(f"nothing to train: the resumed run is already at step {result.steps} (max_steps); student in "
              f"{result.student_dir}")
        return 0
    print(f"trained {result.steps} steps (last loss {result.losses[-1]:.5g}); student in {result.student_dir}, "
          f"metrics in {result.metrics_path}")
    return 0


def add_train_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="distil the T2V-Turbo-v2 student from a teacher cache (consistency distillation + rewards)",
        description="Consistency distillation of the student UNet from a teacher cache written by "
        "`t2v-turbo preprocess`. Settings come from --config (YAML/TOML, the fields of "
        "t2v_turbo.train.TrainConfig), then key=value overrides, then the flags below (which win). Reward flags add "
        "the reward mixture on VAE-decoded frames (needs --vae). "
        "Use `accelerate launch` for several processes or GPUs.",
    )
    parser.add_argument("--config", default=None, help="YAML or TOML file of TrainConfig fields")
    parser.add_argument("--preset", choices=("tiny", "vc2"), default=None, help="student architecture without --teacher")
    parser.add_argument(
        "--data", default=None,
        help="synthetic or a dataset path: what the cache must have been built from (checked against its manifest)",
    )
    parser.add_argument("--cache", default=None, help="teacher cache directory")
    parser.add_argument("--max-steps", type=positive_int, default=None, help="optimizer steps in all (a resumed run included)")
    parser.add_argument("--output-dir", default=None, help="where checkpoints, metrics.csv and the student go")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint directory")
    parser.add_argument("--seed", type=int, default=None, help="seed of the data order, w draws and dropout")
    parser.add_argument("--kernels", choices=("on", "off"), default=None, help="turbo_kernels ops (on) or plain PyTorch (off)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                        help="no progress bar (the config's progress=false)")
    parser.add_argument("--vae", default=None, help="VAE directory (save_pretrained) decoding frames for the rewards")
    parser.add_argument("--hps", default=None, metavar="PATH", help="HPSv2.1 weights (OpenCLIP ViT-H-14 file)")
    parser.add_argument("--clip", default=None, metavar="PATH", help="CLIP-H weights (OpenCLIP ViT-H-14 file)")
    parser.add_argument(
        "--video-reward", default=None, metavar="KIND:PATH",
        help="internvideo2:PATH[:VOCAB] (VOCAB: the BERT vocab.txt or its directory; default beside PATH), "
        "viclip:PATH or toy:DIR",
    )
    parser.add_argument("--toy-image-reward", default=None, metavar="DIR", help="the toy world's image reward directory")
    parser.add_argument(
        "--reward-dtype", choices=REWARD_DTYPES, default="auto",
        help="dtype of the reward models (auto: bfloat16 on CUDA, float32 on the CPU)",
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="any other TrainConfig field, e.g. lr=2e-5")
    parser.set_defaults(handler=run_train)
