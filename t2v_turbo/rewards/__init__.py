"""Reward models and the batched reward mixture of T2V-Turbo-v2 (SPEC 5)."""

from t2v_turbo.rewards.base import RewardModel
from t2v_turbo.rewards.image_text import CLIP_MEAN, CLIP_STD, OpenCLIPReward, clip_spec, hpsv2_spec, video_spec
from t2v_turbo.rewards.internvideo2 import InternVideo2Reward
from t2v_turbo.rewards.mixture import (
    RELEASE_IMAGE_WEIGHT,
    RELEASE_VIDEO_WEIGHT,
    RewardEntry,
    RewardMixture,
    default_mixture,
)
from t2v_turbo.rewards.viclip import ViCLIPReward

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "RELEASE_IMAGE_WEIGHT",
    "RELEASE_VIDEO_WEIGHT",
    "InternVideo2Reward",
    "OpenCLIPReward",
    "RewardEntry",
    "RewardMixture",
    "RewardModel",
    "ViCLIPReward",
    "clip_spec",
    "default_mixture",
    "hpsv2_spec",
    "video_spec",
]
