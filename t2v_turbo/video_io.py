"""Writing and reading sampled videos: .mp4 (PyAV), animated .gif and a .png frame grid (Pillow).

Frames come as (F, 3, H, W) or a batch (B, F, 3, H, W), float in [0, 1] or uint8. A batch is laid
out side by side in a video or GIF and one row a clip in a PNG grid. Every file is written
atomically: to a temporary file in the same directory, then os.replace.
Pillow stores identical consecutive GIF frames once with their durations added, so a GIF of a
still clip can hold fewer frames than it shows.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from t2v_turbo.files import publish, sibling_temporary

VIDEO_SUFFIXES = (".mp4", ".gif", ".png")
# libx264 where PyAV's FFmpeg has it; mpeg4 is in every FFmpeg build.
MP4_CODECS = ("libx264", "mpeg4")
LABEL_HEIGHT = 14
BACKGROUND = (255, 255, 255)


def to_uint8_frames(frames: Tensor) -> Tensor:
    """(..., 3, H, W) float in [0, 1] or uint8 -> (..., H, W, 3) uint8 on the CPU."""
    if not isinstance(frames, Tensor):
        raise TypeError(f"frames must be a tensor, got {type(frames).__name__}")
    if frames.dim() < 3 or frames.shape[-3] != 3:
        raise ValueError(f"frames must be (..., 3, H, W), got shape {tuple(frames.shape)}")
    frames = frames.detach().cpu()
    if frames.dtype != torch.uint8:
        if not frames.is_floating_point():
            raise TypeError(f"frames must be float in [0, 1] or uint8, got dtype {frames.dtype}")
        frames = (frames.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return frames.movedim(-3, -1).contiguous()


FRAME_LAYOUTS = ("frames", "channels")


def _clips(frames: Tensor, layout: str) -> Tensor:
    """(F, 3, H, W) or (B, F, 3, H, W) ("frames"), (3, F, H, W) or (B, 3, F, H, W) ("channels",
    as the pipeline returns them) -> (B, F, H, W, 3) uint8."""
    if layout not in FRAME_LAYOUTS:
        raise ValueError(f"layout must be one of {FRAME_LAYOUTS}, got {layout!r}")
    if not isinstance(frames, Tensor):
        raise TypeError(f"frames must be a tensor, got {type(frames).__name__}")
    if frames.dim() == 4:
        frames = frames.unsqueeze(0)
    expected = "(F, 3, H, W) or (B, F, 3, H, W)" if layout == "frames" else "(3, F, H, W) or (B, 3, F, H, W)"
    channel_dim = 2 if layout == "frames" else 1
    if frames.dim() != 5 or frames.shape[channel_dim] != 3:
        hint = "; the pipeline's (B, 3, F, H, W) frames take layout='channels'" if layout == "frames" else ""
        raise ValueError(f"frames must be {expected} with layout={layout!r}, got shape {tuple(frames.shape)}{hint}")
    return to_uint8_frames(frames if layout == "frames" else frames.transpose(1, 2))


def _side_by_side(clips: Tensor) -> np.ndarray:
    """(B, F, H, W, 3) -> (F, H, B·W, 3)."""
    return clips.permute(1, 2, 0, 3, 4).flatten(2, 3).numpy()


@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path with path's suffix in path's directory, moved onto path when the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = sibling_temporary(path, path.suffix)
    try:
        yield temporary
        publish(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _pad_to_even(video: np.ndarray) -> np.ndarray:
    """yuv420p needs even sizes: repeat the last row / column where odd."""
    _, height, width, _ = video.shape
    return np.pad(video, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")


def _write_mp4(video: np.ndarray, path: Path, fps: int) -> None:
    import av  # imported where used: sampling and the GIF and PNG writers run without PyAV

    video = _pad_to_even(video)
    codec = next(name for name in MP4_CODECS if name in av.codecs_available)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height = video.shape[2], video.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18"}
        for image in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")))
        container.mux(stream.encode(None))


def _write_gif(images: Sequence[Image.Image], path: Path, fps: int) -> None:
    first, *rest = images
    first.save(path, format="GIF", save_all=True, append_images=rest, duration=round(1000 / fps), loop=0)


def _grid(clips: Tensor) -> Image.Image:
    """(B, F, H, W, 3) -> one image: a row a clip, a column a frame."""
    batch, num_frames, height, width, _ = clips.shape
    grid = clips.permute(0, 2, 1, 3, 4).reshape(batch * height, num_frames * width, 3)
    return Image.fromarray(grid.numpy())


def write_video(frames: Tensor, path: str | os.PathLike, fps: int = 8, layout: str = "frames") -> Path:
    """Writes frames (float in [0, 1] or uint8) by the path's suffix: .mp4 (H.264 or MPEG-4 part 2,
    yuv420p, odd sizes padded to even), .gif (looping) or .png (a grid: a row a clip, a column a
    frame); several clips side by side. layout "frames": (F, 3, H, W) or (B, F, 3, H, W);
    "channels": (3, F, H, W) or (B, 3, F, H, W), as T2VTurboPipeline returns them. Returns the path."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"path must end in one of {VIDEO_SUFFIXES}, got {path}")
    if not isinstance(fps, int) or fps < 1:
        raise ValueError(f"fps must be a positive int, got {fps!r}")
    clips = _clips(frames, layout)
    with _atomic_path(path) as temporary:
        if suffix == ".mp4":
            _write_mp4(_side_by_side(clips), temporary, fps)
        elif suffix == ".gif":
            _write_gif([Image.fromarray(image) for image in _side_by_side(clips)], temporary, fps)
        else:
            _grid(clips).save(temporary, format="PNG")
    return path


def read_video(path: str | os.PathLike) -> Tensor:
    """Every frame of a video file (anything FFmpeg reads, GIF included) as uint8 (F, H, W, 3)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no video file at {path}")
    import av

    with av.open(str(path)) as container:
        images = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    if not images:
        raise ValueError(f"{path} holds no video frames")
    return torch.from_numpy(np.stack(images))


def write_gif_grid(
    clips: Sequence[Tensor], path: str | os.PathLike, labels: Sequence[str] | None = None, fps: int = 8
) -> Path:
    """Several clips, each (F, 3, H, W), side by side in one looping GIF, with an optional label
    above each. Shorter clips hold their last frame; shorter images are padded with white."""
    if not clips:
        raise ValueError("clips must hold at least one clip")
    if labels is not None and len(labels) != len(clips):
        raise ValueError(f"labels must hold one label a clip ({len(clips)}), got {len(labels)}")
    path = Path(path)
    if path.suffix.lower() != ".gif":
        raise ValueError(f"path must end in .gif, got {path}")
    if not isinstance(fps, int) or fps < 1:
        raise ValueError(f"fps must be a positive int, got {fps!r}")
    videos = [to_uint8_frames(clip) for clip in clips]
    for index, video in enumerate(videos):
        if video.dim() != 4:
            raise ValueError(f"clips[{index}] must be (F, 3, H, W), got shape {tuple(clips[index].shape)}")
    num_frames = max(video.shape[0] for video in videos)
    label_height = LABEL_HEIGHT if labels is not None else 0
    height = label_height + max(video.shape[1] for video in videos)
    width = sum(video.shape[2] for video in videos)

    images = []
    for frame_index in range(num_frames):
        canvas = Image.new("RGB", (width, height), BACKGROUND)
        draw = ImageDraw.Draw(canvas)
        left = 0
        for clip_index, video in enumerate(videos):
            image = video[min(frame_index, video.shape[0] - 1)].numpy()
            canvas.paste(Image.fromarray(image), (left, label_height))
            if labels is not None:
                draw.text((left + 2, 1), labels[clip_index], fill=(0, 0, 0))
            left += video.shape[2]
        images.append(canvas)
    with _atomic_path(path) as temporary:
        _write_gif(images, temporary, fps)
    return path
