"""Benchmark cases of clip decoding for `t2v-turbo preprocess` (t2v_turbo.data.videos.decode_clip):
16 frames at 8 fps from a random start, scaled to cover 320x512 and centre-cropped, with each video
backend (PyAV, decord). CPU work on the host whatever the device, one decoder thread each (the
DataLoader's worker processes give the parallelism).

The videos are H.264 files written once per run into a temporary directory: 360p with a keyframe
every 250 frames (typical of web video), 720p every 60 and 1080p every 30, with moving noise so the
encoder cannot skip blocks. Each call draws a new start, so calls seek to different keyframes.
`bytes` is the clip handed out (uint8 frames); `median_ms` is wall time.

    python -m benchmarks.video_decode [--warmup N --iters N]
"""

from __future__ import annotations

import functools
import itertools
import random
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from benchmarks import models
from benchmarks.harness import Case, Impl, SuiteOptions
from t2v_turbo.data.videos import VIDEO_BACKENDS, check_video_backend, decode_clip

OP = "video_decode"
CLIP_FRAMES, CLIP_FPS, CLIP_SIZE = 16, 8, (320, 512)
SOURCE_FPS = 30
# (label, width, height, keyframe interval, frames)
SOURCES = (("360p", 640, 360, 250, 300), ("720p", 1280, 720, 60, 300), ("1080p", 1920, 1080, 30, 120))
QUICK_SOURCES = (("tiny", 96, 64, 30, 60),)
QUICK_CLIP_FRAMES, QUICK_CLIP_SIZE = 4, (32, 48)


def _missing(backend: str) -> Optional[str]:
    try:
        check_video_backend(backend)
    except ValueError as error:
        return str(error)
    return None


@functools.cache
def _video_directory() -> Path:
    return Path(tempfile.mkdtemp(prefix="turbo-kernels-video-bench-"))


@functools.cache
def write_source(width: int, height: int, keyframe_interval: int, frames: int) -> Path:
    """An H.264 video of `frames` frames at SOURCE_FPS: one noise image scrolling sideways."""
    import av

    path = _video_directory() / f"{width}x{height}-g{keyframe_interval}-{frames}.mp4"
    noise = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(
            "libx264", rate=SOURCE_FPS, options={"crf": "23", "preset": "veryfast", "g": str(keyframe_interval)}
        )
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(frames):
            image = np.roll(noise, 4 * index, axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _decode_call(backend: str, num_frames: int, size: tuple[int, int]) -> Callable[[SimpleNamespace], torch.Tensor]:
    def call(x: SimpleNamespace) -> torch.Tensor:
        # Each backend draws the same sequence of starts: they share the one input set, and a
        # shared draw would give them different seeks to time.
        starts = x.starts.setdefault(backend, itertools.count(x.seed))
        return decode_clip(x.path, num_frames, CLIP_FPS, size, random.Random(next(starts)), backend)

    return call


def cases(options: SuiteOptions) -> Iterator[Case]:
    """One 16-frame clip from each source video, with each backend."""
    sources, num_frames, size = (
        (QUICK_SOURCES, QUICK_CLIP_FRAMES, QUICK_CLIP_SIZE) if options.quick else (SOURCES, CLIP_FRAMES, CLIP_SIZE)
    )
    writer_missing = _missing("pyav")
    for label, width, height, keyframe_interval, frames in sources:

        def make_inputs(width=width, height=height, keyframe_interval=keyframe_interval, frames=frames):
            return SimpleNamespace(
                path=write_source(width, height, keyframe_interval, frames), seed=options.seed, starts={}
            )

        yield Case(
            op=OP,
            case=f"{label}-g{keyframe_interval}-to-{num_frames}x{size[0]}x{size[1]}",
            pass_name="fwd",
            make_inputs=make_inputs,
            impls=tuple(
                Impl(backend, _decode_call(backend, num_frames, size), unavailable=writer_missing or _missing(backend))
                for backend in VIDEO_BACKENDS
            ),
            bytes_moved=num_frames * size[0] * size[1] * 3,
            dtype=torch.uint8,
            shape=(num_frames, *size, 3),
            rotate_inputs=False,
            host_only=True,
        )


def summary(result: dict) -> list[str]:
    """decord's time per clip against PyAV's, per source (PyAV is the default backend)."""
    rows = models.rows_by(result, OP)
    return [
        f"info  video decode {case}: decord {rows[(case, 'decord')]['median_ms'] / rows[(case, 'pyav')]['median_ms']:.2f}x "
        f"PyAV's time ({rows[(case, 'pyav')]['median_ms']:.0f} ms a clip)"
        for case in dict.fromkeys(case for case, _ in rows)
        if (case, "decord") in rows and (case, "pyav") in rows
    ]


def main(argv: Optional[Sequence[str]] = None) -> int:
    return models.run_suite(cases, summary, argv, "python -m benchmarks.video_decode")


if __name__ == "__main__":
    raise SystemExit(main())
