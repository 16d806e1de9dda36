"""What the reward mixture asks of a reward model (SPEC 5).

A reward model embeds pixels and captions into one space and scores their cosine. It is frozen:
gradients flow only into the pixels. Image-text models (HPSv2.1, CLIP, the toy world's image
model) score single frames; video-text models (InternVideo2, ViCLIP, the toy world's video
model) score clips of `num_frames` frames. Preprocessing (resize, pad or crop, normalise) is not
the model's business: the mixture runs it for every model in one `reward_preprocess` call, so a
model receives pixels already at its input size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

KINDS = ("image", "video")


class RewardModel(nn.Module):
    """Base of every reward model. Subclasses set `kind` ("image" or "video"), `num_frames` (video
    models: frames a clip is scored on) and implement `embed_visual` and `embed_text`, both
    returning L2-normalised rows."""

    kind: ClassVar[str]
    num_frames: int = 1

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


def l2_normalize(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
