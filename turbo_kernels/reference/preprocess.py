"""Plain PyTorch definitions of the reward models' image preprocessing (SPEC 5).

The release scores decoded frames with three preprocessing pipelines, all torchvision tensor
transforms: a bicubic resize with antialias (torchvision's default), then a centred zero pad
(HPSv2's ResizeMaxSize), a square squash (CLIP) or one crop shared by every frame (the video
rewards), then per-channel normalisation. Padding happens before normalisation, so a padded pixel
becomes -mean/std. torchvision's resize on float tensors is exactly
`F.interpolate(align_corners=False, antialias=...)`, which `release_pipeline` calls, so it is the
meaning of the op.

Resampling is linear and separable: one spec's output channel is
(A X B^T - mean) / std, where X is an input channel (H, W), A (size, H) resamples the rows and
B (size, W) the columns. Padding and cropping are folded into A and B: a crop keeps a window of
the resize matrix's rows, a pad adds zero rows around them (A X B^T is then 0 there, so the
padded value after normalisation is -mean/std as in the release). `axis_matrix` builds A and B by
resizing an identity with the same F.interpolate call, so they hold torch's exact weights
(antialiased bicubic is Keys' cubic with a = -0.5 and a support widened by the downscale factor;
without antialias torch uses a = -0.75), and `matrix_preprocess` / `matrix_preprocess_backward`
are the forward and its exact adjoint in that form.

Maths runs in float32 (float64 for float64 frames); outputs take the requested dtype.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

MODES = ("squash", "pad", "crop")
INTERPOLATIONS = ("bicubic", "bilinear")
INPUT_RANGES = ("unit", "signed")

# Normalisation statistics of the release's rewards: HPSv2.1 and CLIP use OpenAI CLIP's, the
# video rewards (ViCLIP, InternVideo2) ImageNet's.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _three_floats(values, name: str, positive: bool) -> tuple[float, float, float]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) != 3:
        raise ValueError(f"PreprocessSpec {name} must be 3 numbers (one a channel), got {values!r}")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in values):
        raise ValueError(f"PreprocessSpec {name} must hold finite numbers, got {values!r}")
    if positive and any(v <= 0 for v in values):
        raise ValueError(f"PreprocessSpec {name} must be positive, got {values!r}")
    return tuple(float(v) for v in values)


@dataclass(frozen=True)
class PreprocessSpec:
    """One reward model's preprocessing of (B, F, 3, H, W) frames into (B, F, 3, size, size).

    mode: "squash" resizes to size x size; "pad" resizes the longer side to size keeping the
    aspect ratio (the other side is Python-`round`ed, as HPSv2 does) and zero-pads centred (the odd
    pixel goes right/bottom) before normalising; "crop" resizes the shorter side to size the same
    way and crops size x size, centred (torchvision's center_crop) or at `crop_offset` = (top,
    left) in the resized image, one offset for every frame as the release's RandomCrop draws.
    interpolation: "bicubic" or "bilinear", antialiased when `antialias` (torchvision's default).
    mean, std: per-channel normalisation.

    The release skips the pad or crop when the long (pad) or short (crop) side already equals
    size, which leaves a non-square frame; here the resize is then the identity and the pad or
    crop still happens, so every output is size x size.
    """

    size: int
    mode: str
    interpolation: str = "bicubic"
    antialias: bool = True
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    crop_offset: Optional[tuple[int, int]] = None

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size <= 0:
            raise ValueError(f"PreprocessSpec size must be a positive int, got {self.size!r}")
        if self.mode not in MODES:
            raise ValueError(f"PreprocessSpec mode must be one of {MODES}, got {self.mode!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"PreprocessSpec interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if not isinstance(self.antialias, bool):
            raise TypeError(f"PreprocessSpec antialias must be a bool, got {type(self.antialias).__name__}")
        object.__setattr__(self, "mean", _three_floats(self.mean, "mean", positive=False))
        object.__setattr__(self, "std", _three_floats(self.std, "std", positive=True))
        if self.crop_offset is not None:
            if self.mode != "crop":
                raise ValueError(f"PreprocessSpec crop_offset is only for mode 'crop', got mode {self.mode!r}")
            offset = self.crop_offset
            if (
                not isinstance(offset, (tuple, list))
                or len(offset) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in offset)
            ):
                raise ValueError(f"PreprocessSpec crop_offset must be (top, left), two ints >= 0, got {offset!r}")
            object.__setattr__(self, "crop_offset", (int(offset[0]), int(offset[1])))


@dataclass(frozen=True)
class Geometry:
    """Where a spec takes an (H, W) frame: it is resized to `resized` (h, w), then output pixel
    (i, j) is resized pixel (i + shift[0], j + shift[1]); positions outside the resized image are
    padding. Crops have shifts >= 0 (the crop origin), pads <= 0 (minus the pad before)."""

    resized: tuple[int, int]
    shift: tuple[int, int]


def geometry(spec: PreprocessSpec, height: int, width: int) -> Geometry:
    """The resize size and the pad or crop of `spec` on (height, width) frames, computed as the
    release does (Python `round` of side * size / longer-or-shorter side, torchvision's centre)."""
    if spec.mode == "squash":
        return Geometry((spec.size, spec.size), (0, 0))
    reference_side = max(height, width) if spec.mode == "pad" else min(height, width)
    scale = spec.size / reference_side
    resized = (round(height * scale), round(width * scale)) if scale != 1 else (height, width)
    if min(resized) == 0:
        raise ValueError(
            f"a {height}x{width} frame resized to {spec.size} on its {'longer' if spec.mode == 'pad' else 'shorter'}"
            f" side leaves {resized[0]}x{resized[1]} pixels: a side of 0 (the frame is too thin for this size)"
        )
    if spec.mode == "pad":
        return Geometry(resized, (-((spec.size - resized[0]) // 2), -((spec.size - resized[1]) // 2)))
    if spec.crop_offset is None:
        top, left = (int(round((side - spec.size) / 2.0)) for side in resized)
    else:
        top, left = spec.crop_offset
        if top > resized[0] - spec.size or left > resized[1] - spec.size:
            raise ValueError(
                f"crop_offset {spec.crop_offset} does not fit a {spec.size}x{spec.size} crop in the "
                f"{resized[0]}x{resized[1]} resized frame (top <= {resized[0] - spec.size}, left <= {resized[1] - spec.size})"
            )
    return Geometry(resized, (top, left))


@functools.lru_cache(maxsize=64)
def _resize_weights(in_size: int, out_size: int, interpolation: str, antialias: bool) -> Tensor:
    """resize_matrix in float64, computed once (a random crop's every step reuses its resize); never
    modified in place."""
    identity = torch.eye(in_size, dtype=torch.float64)[None, None]
    resized = F.interpolate(
        identity, size=(out_size, in_size), mode=interpolation, align_corners=False, antialias=antialias
    )
    return resized[0, 0].contiguous()


def resize_matrix(in_size: int, out_size: int, interpolation: str, antialias: bool, dtype=torch.float64) -> Tensor:
    """(out_size, in_size): F.interpolate's weights along one axis, read off by resizing an
    in_size x in_size identity image along its rows only (its columns stay in_size -> in_size, the
    identity). A batch of in_size x 1 images would not do: on width-1 images torch's antialiased
    kernel computes other weights than on the images the release resizes."""
    return _resize_weights(in_size, out_size, interpolation, antialias).to(dtype, copy=True)


def axis_matrix(
    in_size: int, resized: int, out_size: int, shift: int, interpolation: str, antialias: bool, dtype=torch.float64
) -> Tensor:
    """(out_size, in_size): resize to `resized`, then output index k takes resized index k + shift
    (a zero row where that falls outside: padding)."""
    weights = _resize_weights(in_size, resized, interpolation, antialias)
    placed = torch.zeros(out_size, in_size, dtype=torch.float64)
    first, last = max(0, -shift), min(out_size, resized - shift)
    if first < last:
        placed[first:last] = weights[first + shift : last + shift]
    return placed.to(dtype)


def spec_matrices(spec: PreprocessSpec, height: int, width: int, dtype=torch.float64) -> tuple[Tensor, Tensor]:
    """(A, B) of `spec` on (height, width) frames: A (size, height), B (size, width)."""
    geo = geometry(spec, height, width)
    rows = axis_matrix(height, geo.resized[0], spec.size, geo.shift[0], spec.interpolation, spec.antialias, dtype)
    cols = axis_matrix(width, geo.resized[1], spec.size, geo.shift[1], spec.interpolation, spec.antialias, dtype)
    return rows, cols


def input_affine(input_range: str) -> tuple[float, float]:
    """(scale, shift) taking frames in `input_range` to [0, 1]: x * scale + shift (no clamping)."""
    if input_range not in INPUT_RANGES:
        raise ValueError(f"input_range must be one of {INPUT_RANGES}, got {input_range!r}")
    return (1.0, 0.0) if input_range == "unit" else (0.5, 0.5)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _channel_stats(values, like: Tensor) -> Tensor:
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).reshape(3, 1, 1)


def release_pipeline(frames: Tensor, spec: PreprocessSpec, input_range: str = "unit") -> Tensor:
    """(B, F, 3, H, W) -> (B, F, 3, size, size) with the release's own ops: F.interpolate (what
    torchvision's resize runs on float tensors), then F.pad with zeros or a crop, then (x - mean) / std.
    Differentiable through autograd; float64 frames stay float64, others run in float32."""
    batch, num_frames, channels, height, width = frames.shape
    scale, shift = input_affine(input_range)
    x = frames.reshape(batch * num_frames, channels, height, width).to(_compute_dtype(frames)) * scale + shift
    geo = geometry(spec, height, width)
    if geo.resized != (height, width):
        x = F.interpolate(x, size=geo.resized, mode=spec.interpolation, align_corners=False, antialias=spec.antialias)
    top, left = geo.shift
    if spec.mode == "pad":
        pad_h, pad_w = spec.size - geo.resized[0], spec.size - geo.resized[1]
        x = F.pad(x, [-left, pad_w + left, -top, pad_h + top], value=0.0)
    elif spec.mode == "crop":
        x = x[..., top : top + spec.size, left : left + spec.size]
    x = (x - _channel_stats(spec.mean, x)) / _channel_stats(spec.std, x)
    return x.reshape(batch, num_frames, channels, spec.size, spec.size)


def matrix_preprocess(
    frames: Tensor,
    sizes: list[int],
    rows: Tensor,
    cols: Tensor,
    mean: Tensor,
    std: Tensor,
    in_scale: float,
    in_shift: float,
    out_dtype: torch.dtype,
) -> Tensor:
    """Every spec's output from (B, F, 3, H, W) frames, concatenated flat in spec order.

    rows (sum(sizes), H) and cols (sum(sizes), W) stack the specs' A and B; mean and std are
    (S, 3). Spec s's block of the result is (B, F, 3, size_s, size_s), contiguous:
    ((A_s X' B_s^T) - mean_s) / std_s with X' = frames * in_scale + in_shift.
    """
    cdt = _compute_dtype(frames)
    x = frames.to(cdt) * in_scale + in_shift
    outputs = []
    for s, (a, b) in enumerate(zip(rows.to(cdt).split(sizes), cols.to(cdt).split(sizes))):
        resampled = a @ x @ b.t()
        normalised = (resampled - mean[s].to(cdt).reshape(3, 1, 1)) / std[s].to(cdt).reshape(3, 1, 1)
        outputs.append(normalised.reshape(-1))
    return torch.cat(outputs).to(out_dtype)


def matrix_preprocess_backward(
    grad: Tensor,
    frames_shape: list[int],
    frames_dtype: torch.dtype,
    sizes: list[int],
    rows: Tensor,
    cols: Tensor,
    std: Tensor,
    in_scale: float,
) -> Tensor:
    """The adjoint of matrix_preprocess: d frames = in_scale sum_s A_s^T (G_s / std_s) B_s, with
    G_s spec s's block of the flat `grad`. Returns (B, F, 3, H, W) in `frames_dtype`, contiguous."""
    cdt = torch.float64 if frames_dtype == torch.float64 else torch.float32
    batch, num_frames, channels, height, width = frames_shape
    grad_frames = torch.zeros(frames_shape, dtype=cdt, device=grad.device)
    blocks = grad.to(cdt).split([batch * num_frames * channels * n * n for n in sizes])
    for s, (block, a, b, n) in enumerate(zip(blocks, rows.to(cdt).split(sizes), cols.to(cdt).split(sizes), sizes)):
        g = block.reshape(batch, num_frames, channels, n, n) / std[s].to(cdt).reshape(3, 1, 1)
        grad_frames += a.t() @ g @ b
    return (grad_frames * in_scale).to(frames_dtype)
