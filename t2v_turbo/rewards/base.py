"""What the reward mixture asks of a reward model (SPEC 5).

A reward model embeds pixels and captions into one space and scores their cosine. It is frozen:
gradients flow only into the pixels. Image-text models (HPSv2.1, CLIP, the toy world's image
model) score single frames; video-text models (InternVideo2, ViCLIP, the toy world's video
model) score clips of `num_frames` frames. Preprocessing (resize, pad or crop, normalise) is not
the model's business: the mixture runs it for every model in one `reward_preprocess` call, so a
model receives pixels already at its input size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

KINDS = ("image", "video")


class RewardModel(nn.Module):
    """Base of every reward model. Subclasses set `kind` ("image" or "video"), `num_frames` (video
    models: frames a clip is scored on), `image_size` (the side S of the square frames embed_visual
    takes; None where any size will do) and implement `embed_visual` and `embed_text`, both
    returning L2-normalised rows."""

    kind: ClassVar[str]
    num_frames: int = 1
    image_size: int | None = None

    def embed_visual(self, pixels: Tensor) -> Tensor:
        """image: (N, 3, S, S) -> (N, D); video: (N, T, 3, S, S) -> (N, D)."""
        raise NotImplementedError

    def embed_text(self, captions: Sequence[str]) -> Tensor:
        """(len(captions), D), without gradients (text embeddings are cached and reused)."""
        raise NotImplementedError

    def score(self, pixels: Tensor, text_embeddings: Tensor) -> Tensor:
        """cosine(visual, text) per row: (N,)."""
        visual = self.embed_visual(pixels)
        return (visual * text_embeddings.to(visual.dtype)).sum(dim=-1)

    def freeze(self) -> RewardModel:
        """eval mode, no parameter gradients: the reward path differentiates only the pixels."""
        self.eval()
        self.requires_grad_(False)
        return self


class VisionTextConfig:
    """What the config dataclasses of the vision-text reward models share: building from a dict of
    field names, named presets (the subclass's `presets`, set where its module defines them), the
    patch grid, and the check that attention heads divide their widths."""

    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    image_size: int
    patch_size: int

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Any:
        """From this class's field names (e.g. `dataclasses.asdict` of a config); unknown names fail."""
        unknown = sorted(set(values) - {field.name for field in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
        return cls(**values)

    @classmethod
    def preset(cls, name: str) -> Any:
        """The release's model at full size, or the reference data's tiny one."""
        if name not in cls.presets:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(cls.presets)}")
        return cls.from_dict(cls.presets[name])

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    def _check_sizes(self, heads_of_widths: Sequence[tuple[int, int, str]]) -> None:
        """(width, heads, name of the heads field) triples; also that patches tile the image."""
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        for width, heads, name in heads_of_widths:
            if width % heads:
                raise ValueError(f"{name}={heads} does not divide the width {width}")


def l2_normalize(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
