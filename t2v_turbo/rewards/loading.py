"""The training reward mixture from local checkpoint files, as `t2v-turbo train` names them.

HPSv2.1 and CLIP-H are OpenCLIP weights files; the video reward is one of InternVideo2-stage2,
ViCLIP or the toy world's video model, named "KIND:PATH" (InternVideo2 also needs the BERT
vocabulary: "internvideo2:PATH:VOCAB", else a vocab.txt beside the checkpoint). The toy world's
image model can stand in for the image rewards. Each reward gets the release's frame rule and
caption (SPEC 5): image models two random frames with the short caption, the video model its own
frame count strided over the clip with the dense caption; weights default to the release's
effective weights relative to the distillation loss (SPEC 3.7).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from t2v_turbo.rewards.base import RewardModel
from t2v_turbo.rewards.image_text import OpenCLIPReward, clip_spec, hpsv2_spec, video_spec
from t2v_turbo.rewards.internvideo2 import InternVideo2Reward
from t2v_turbo.rewards.mixture import (
    RELEASE_IMAGE_FRAMES,
    RELEASE_IMAGE_WEIGHT,
    RELEASE_VIDEO_WEIGHT,
    RewardEntry,
    RewardMixture,
    crops_at_random,
)
from t2v_turbo.rewards.toy import load_toy_reward
from t2v_turbo.rewards.viclip import ViCLIPReward
from turbo_kernels import PreprocessSpec

__all__ = ["VIDEO_KINDS", "VideoRewardSource", "build_reward_mixture", "parse_video_reward", "toy_spec"]

VIDEO_KINDS = ("internvideo2", "viclip", "toy")
# The release's reward checkpoints: OpenCLIP ViT-H-14 for HPSv2.1 and CLIP, and these video presets.
IMAGE_ARCHITECTURE = "ViT-H-14"
VIDEO_PRESETS = {"internvideo2": "stage2-1b", "viclip": "viclip-l"}
# The toy world's frame side (t2v_turbo.pretrain.WORLD), the size the toy rewards were trained at.
TOY_FRAME_SIZE = 32
VOCAB_NAME = "vocab.txt"


def toy_spec(size: int = TOY_FRAME_SIZE) -> PreprocessSpec:
    """The toy rewards' preprocessing: a bilinear squash to size x size, normalised to [-1, 1]."""
    return PreprocessSpec(size, "squash", interpolation="bilinear", antialias=False, mean=(0.5,) * 3, std=(0.5,) * 3)


@dataclass(frozen=True)
class VideoRewardSource:
    """A parsed video-reward argument: kind, checkpoint file (or toy directory), vocabulary."""

    kind: str
    path: Path
    vocab: Path | None = None


def parse_video_reward(text: str) -> VideoRewardSource:
    """Splits "internvideo2:PATH[:VOCAB]", "viclip:PATH" or "toy:DIR" into its parts. A PATH that
    exists whole is never split, so paths holding a colon still work."""
    if not isinstance(text, str):
        raise TypeError(f"video must be a string KIND:PATH, got {type(text).__name__}")
    kind, separator, rest = text.partition(":")
    if not separator or not rest:
        raise ValueError(f"video must look like KIND:PATH with KIND one of {VIDEO_KINDS}, got {text!r}")
    if kind not in VIDEO_KINDS:
        raise ValueError(f"video reward kind must be one of {VIDEO_KINDS}, got {kind!r} (from {text!r})")
    if kind == "internvideo2" and ":" in rest and not Path(rest).exists():
        path, _, vocab = rest.rpartition(":")
        return VideoRewardSource(kind, Path(path), Path(vocab))
    return VideoRewardSource(kind, Path(rest))


def _default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _require_file(path: str | os.PathLike, argument: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{argument}: no checkpoint file at {path}")
    return path


def _require_directory(path: str | os.PathLike, argument: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{argument}: no toy reward directory at {path}")
    return path


def _load_toy(directory: Path, kind: str, argument: str, placement: Mapping[str, Any]) -> RewardModel:
    model = load_toy_reward(_require_directory(directory, argument))
    if model.kind != kind:
        raise ValueError(f"{argument}: {directory} holds a toy {model.kind} reward; expected a toy {kind} reward")
    return model.to(**placement)


def _internvideo2_vocab(source: VideoRewardSource) -> Path:
    vocab = source.vocab if source.vocab is not None else source.path.parent
    if not (vocab.is_file() or (vocab / VOCAB_NAME).is_file()):
        raise FileNotFoundError(
            f"video: InternVideo2 needs its BERT vocabulary; no {VOCAB_NAME} at {vocab} "
            f"(give internvideo2:PATH:VOCAB with VOCAB a {VOCAB_NAME} or a directory holding one)"
        )
    return vocab


def _load_video(
    source: VideoRewardSource, preset: str | None, toy_size: int, placement: Mapping[str, Any]
) -> tuple[RewardModel, PreprocessSpec]:
    if source.kind == "toy":
        return _load_toy(source.path, "video", "video", placement), toy_spec(toy_size)
    path = _require_file(source.path, "video")
    preset = preset or VIDEO_PRESETS[source.kind]
    if source.kind == "internvideo2":
        model = InternVideo2Reward.from_checkpoint(path, preset, vocab_path=_internvideo2_vocab(source), **placement)
    else:
        model = ViCLIPReward.from_checkpoint(path, preset, **placement)
    return model, video_spec(model.config.image_size)


def _check_weight(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def build_reward_mixture(
    hps: str | os.PathLike | None = None,
    clip: str | os.PathLike | None = None,
    video: str | VideoRewardSource | None = None,
    toy_image: str | os.PathLike | None = None,
    image_weight: float = RELEASE_IMAGE_WEIGHT,
    video_weight: float = RELEASE_VIDEO_WEIGHT,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    image_architecture: str | Mapping[str, Any] = IMAGE_ARCHITECTURE,
    video_preset: str | None = None,
    toy_size: int = TOY_FRAME_SIZE,
    gradient_checkpointing: bool = False,
) -> RewardMixture | None:
    """The reward mixture of the given rewards, frozen, on `device` in `dtype` (default bf16 on
    CUDA, float32 elsewhere); None when no reward is given.

    hps, clip: OpenCLIP weights files (HPSv2.1, CLIP-H) of `image_architecture`. toy_image: a
    toy image reward directory (`t2v-turbo pretrain`). video: "internvideo2:PATH[:VOCAB]",
    "viclip:PATH" or "toy:DIR" (see parse_video_reward); `video_preset` overrides the model
    preset ("stage2-1b" / "viclip-l"). Every image reward is weighted image_weight, the video
    reward video_weight; InternVideo2 and ViCLIP crop at random each step, as the release does.
    Entries are named "hpsv2", "clip", "toy_image" and "video"."""
    image_weight = _check_weight(image_weight, "image_weight")
    video_weight = _check_weight(video_weight, "video_weight")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    device = torch.device(device)
    # Loaded straight into place, so a large tower is never held in float32 on the GPU.
    placement = {"device": device, "dtype": dtype or _default_dtype(device)}
    if isinstance(video, str):
        video = parse_video_reward(video)
    elif video is not None and not isinstance(video, VideoRewardSource):
        raise TypeError(f"video must be a KIND:PATH string or a VideoRewardSource, got {type(video).__name__}")

    def image_entry(name: str, model: RewardModel, spec: PreprocessSpec) -> RewardEntry:
        return RewardEntry(name, model, spec, "random", RELEASE_IMAGE_FRAMES, image_weight, "short")

    entries = []
    for argument, name, path, release_spec in (("hps", "hpsv2", hps, hpsv2_spec), ("clip", "clip", clip, clip_spec)):
        if path is not None:
            model = OpenCLIPReward.from_weights(image_architecture, _require_file(path, argument), **placement)
            entries.append(image_entry(name, model, release_spec(model.image_size)))
    if toy_image is not None:
        model = _load_toy(Path(toy_image), "image", "toy_image", placement)
        entries.append(image_entry("toy_image", model, toy_spec(toy_size)))
    if video is not None:
        model, spec = _load_video(video, video_preset, toy_size, placement)
        # The release's RandomCrop: a crop drawn every step (the toy reward's spec does not crop).
        entries.append(RewardEntry("video", model, spec, "strided", None, video_weight, "dense", crops_at_random(spec)))
    if not entries:
        return None
    return RewardMixture(entries, gradient_checkpointing=gradient_checkpointing)
