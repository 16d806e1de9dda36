"""Video-text datasets for preprocessing and training (SPEC 2): real videos listed in a manifest, and a
synthetic source built on the toy world so every command runs without a download. Videos are decoded
with PyAV, or with decord where installed when `video_backend="decord"`.

Items are dicts: frames (3, F, H, W) float32 in [-1, 1], caption, short_caption (the caption when the
manifest gives none), use_motion (bool), path. A video that cannot be decoded or is too short for the
requested frames makes `__getitem__` return None; `collate_skipping` drops those items and reports how
many it dropped in the batch's "skipped" field, which the training loop sums and logs (a count that
survives DataLoader worker processes, unlike state kept on the dataset).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import math
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from t2v_turbo.data.world import WorldConfig, WorldDataset
from t2v_turbo.schedule import DEFAULT_FPS

logger = logging.getLogger(__name__)

MANIFEST_NAMES = ("manifest.csv", "manifest.jsonl")
REQUIRED_COLUMNS = ("path", "caption")
_TRUE_WORDS = {"1", "true", "yes", "y", "t"}
_FALSE_WORDS = {"0", "false", "no", "n", "f", ""}
# PyAV is the default: decord's path took 1.2-2.2x as long (benchmarks.video_decode, 360p-1080p H.264).
VIDEO_BACKENDS = ("pyav", "decord")
_BACKEND_PACKAGES = {"pyav": "av", "decord": "decord"}


def _parse_flag(value: object, where: str) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    word = str(value).strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise ValueError(f"{where}: use_motion must be a boolean (true/false, 1/0, yes/no), got {value!r}")


def _raw_rows(manifest: Path) -> list[tuple[str, dict]]:
    """(where, row) of every row of a CSV or JSONL manifest, `where` its file:line."""
    suffix = manifest.suffix.lower()
    if suffix == ".csv":
        # utf-8-sig: spreadsheet programs start their CSV files with a byte-order mark.
        with manifest.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None:
                raise ValueError(f"manifest {manifest} is empty: it needs a header row with {list(REQUIRED_COLUMNS)}")
            missing = [c for c in REQUIRED_COLUMNS if c not in reader.fieldnames]
            if missing:
                raise ValueError(f"manifest {manifest} lacks the column(s) {missing}; it has {reader.fieldnames}")
            return [(f"{manifest}:{n}", row) for n, row in enumerate(reader, start=2)]
    if suffix == ".jsonl":
        raw_rows = []
        with manifest.open(encoding="utf-8") as handle:
            for n, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"manifest {manifest}:{n} is not valid JSON: {error}") from error
                if not isinstance(row, dict):
                    raise ValueError(f"manifest {manifest}:{n} must be a JSON object, got {type(row).__name__}")
                raw_rows.append((f"{manifest}:{n}", row))
        return raw_rows
    raise ValueError(f"manifest must be a .csv or .jsonl file, got {manifest}")


def read_manifest(manifest: str | Path) -> list[dict]:
    """Rows of a CSV (header row) or JSONL (one object a line) manifest as dicts with path, caption,
    short_caption (falls back to caption) and use_motion (default False). Raises ValueError naming the
    file and the missing column when a row lacks path or caption."""
    manifest = Path(manifest)
    try:
        raw_rows = _raw_rows(manifest)
    except UnicodeDecodeError as error:
        raise ValueError(f"manifest {manifest} is not UTF-8 text: {error}") from None
    rows = []
    for where, row in raw_rows:
        missing = [c for c in REQUIRED_COLUMNS if not str(row.get(c) or "").strip()]
        if missing:
            raise ValueError(
                f"{where}: the row lacks a value for {missing} (required columns: {list(REQUIRED_COLUMNS)})"
            )
        not_text = [c for c in ("path", "caption", "short_caption") if c in row and not isinstance(row[c], (str, type(None)))]
        if not_text:
            # A JSON list or number would be stored as its Python repr.
            raise ValueError(f"{where}: {not_text} must be text, got {[type(row[c]).__name__ for c in not_text]}")
        caption = str(row["caption"])
        rows.append({
            "path": str(row["path"]),
            "caption": caption,
            "short_caption": str(row.get("short_caption") or caption),
            "use_motion": _parse_flag(row.get("use_motion"), where),
        })
    if not rows:
        raise ValueError(f"manifest {manifest} lists no videos")
    return rows


class VideoDecodeError(Exception):
    """A video that cannot give the requested frames (corrupt, unreadable or too short)."""


def check_video_backend(backend: str) -> str:
    """The backend name, once it is known and its package is installed (ValueError otherwise)."""
    if backend not in VIDEO_BACKENDS:
        raise ValueError(f"video_backend must be one of {VIDEO_BACKENDS}, got {backend!r}")
    package = _BACKEND_PACKAGES[backend]
    if importlib.util.find_spec(package) is None:
        raise ValueError(f"video_backend {backend!r} needs the {package} package, which is not installed")
    return backend


def _draw_targets(last_time: float, rate: float, num_frames: int, fps: float, rng: random.Random) -> list[float]:
    """The clip's frame times in seconds: a start uniform over the source frames that leave room for
    (num_frames - 1) / fps seconds before last_time (the last frame's time), then steps of 1 / fps."""
    span = (num_frames - 1) / fps
    # A tolerance of a hundredth of a source frame absorbs rounding in the stated duration.
    slack = 0.01 / rate
    if last_time + slack < span:
        raise VideoDecodeError(
            f"too short: {last_time + 1 / rate:.3f} s, {num_frames} frames at {fps} fps need {span + 1 / rate:.3f} s"
        )
    last_start_index = math.floor((last_time - span + slack) * rate)
    start = rng.randint(0, last_start_index) / rate
    return [start + k / fps for k in range(num_frames)]


def _nearest(times: Sequence[float], targets: Sequence[float], rate: float) -> list[int]:
    """For each target, the index of the nearest time, the earliest of those within a thousandth of a
    source frame of the nearest (so float rounding of the timestamps never decides a tie)."""
    times = np.asarray(times, dtype=np.float64)
    chosen = []
    for target in targets:
        distance = np.abs(times - target)
        chosen.append(int(np.flatnonzero(distance <= distance.min() + 1e-3 / rate)[0]))
    return chosen


def _frame_time(frame, stream) -> float:
    """Seconds from the stream's start; frames without timestamps cannot be placed after a seek."""
    if frame.pts is None:
        raise VideoDecodeError("a frame carries no timestamp")
    return float((frame.pts - (stream.start_time or 0)) * stream.time_base)


def _cover_size(height: int, width: int, source_height: int, source_width: int) -> tuple[int, int]:
    """The size that covers height x width keeping the source's aspect ratio."""
    scale = max(height / source_height, width / source_width)
    return max(height, round(source_height * scale)), max(width, round(source_width * scale))


def _centre_crop(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """The centred height x width window of (..., H, W, 3) images."""
    top = (images.shape[-3] - height) // 2
    left = (images.shape[-2] - width) // 2
    return images[..., top : top + height, left : left + width, :]


def _resize_and_crop(frame, height: int, width: int) -> np.ndarray:
    """A PyAV frame scaled (swscale, area averaging) to cover height x width, then centre-cropped: (H, W, 3) uint8."""
    scaled_height, scaled_width = _cover_size(height, width, frame.height, frame.width)
    image = frame.reformat(width=scaled_width, height=scaled_height, format="rgb24", interpolation="AREA").to_ndarray()
    return _centre_crop(image, height, width)


def _resize_and_crop_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """An (H, W, 3) uint8 image scaled to cover height x width (area averaging when shrinking, bilinear
    when growing, as swscale's AREA does), then centre-cropped."""
    scaled_height, scaled_width = _cover_size(height, width, image.shape[0], image.shape[1])
    if (scaled_height, scaled_width) != image.shape[:2]:
        shrinking = scaled_height <= image.shape[0] and scaled_width <= image.shape[1]
        resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
        image = np.asarray(Image.fromarray(image).resize((scaled_width, scaled_height), resample))
    return _centre_crop(image, height, width)


def _decode_with_pyav(path: Path, num_frames: int, fps: float, size: tuple[int, int], rng: random.Random) -> Tensor:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoDecodeError("no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            if not rate:
                raise VideoDecodeError("the video stream states no frame rate")
            rate = float(rate)
            if stream.frames:
                last_time = (stream.frames - 1) / rate
            elif stream.duration is not None:
                last_time = float(stream.duration * stream.time_base) - 1 / rate
            elif container.duration is not None:
                last_time = container.duration / av.time_base - 1 / rate
            else:
                raise VideoDecodeError("the container states no duration")
            targets = _draw_targets(last_time, rate, num_frames, fps, rng)
            start = targets[0]
            if start > 0:
                seek_pts = int(start / stream.time_base) + (stream.start_time or 0)
                container.seek(seek_pts, backward=True, any_frame=False, stream=stream)
            half_frame = 0.5 / rate
            decoded: list[tuple[float, object]] = []
            for frame in container.decode(stream):
                time = _frame_time(frame, stream)
                if time < start - half_frame:
                    continue
                decoded.append((time, frame))
                if time >= targets[-1] + half_frame:
                    break
            if not decoded or decoded[-1][0] < targets[-1] - half_frame:
                reached = decoded[-1][0] if decoded else start
                raise VideoDecodeError(
                    f"decoding ended at {reached:.3f} s, before the clip's last frame at {targets[-1]:.3f} s"
                )
            chosen = _nearest([time for time, _ in decoded], targets, rate)
            height, width = size
            return torch.from_numpy(np.stack([_resize_and_crop(decoded[i][1], height, width) for i in chosen]))
    except av.error.FFmpegError as error:
        raise VideoDecodeError(f"cannot decode: {error}") from error
    except OSError as error:
        raise VideoDecodeError(f"cannot read: {error}") from error


def _decode_with_decord(path: Path, num_frames: int, fps: float, size: tuple[int, int], rng: random.Random) -> Tensor:
    import decord

    if not path.is_file():
        raise VideoDecodeError(f"cannot read: no file {path}")
    try:
        # One thread: DataLoader workers give the parallelism.
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        count = len(reader)
        rate = float(reader.get_avg_fps())
        if count == 0 or not rate > 0:
            raise VideoDecodeError("the video stream states no frames or no frame rate")
        times = reader.get_frame_timestamp(range(count))[:, 0].astype(np.float64)
        times -= times[0]
        targets = _draw_targets((count - 1) / rate, rate, num_frames, fps, rng)
        if times[-1] < targets[-1] - 0.5 / rate:
            raise VideoDecodeError(
                f"the frames end at {times[-1]:.3f} s, before the clip's last frame at {targets[-1]:.3f} s"
            )
        frames = reader.get_batch(_nearest(times, targets, rate)).asnumpy()
    except (decord.DECORDError, RuntimeError) as error:
        raise VideoDecodeError(f"cannot decode: {error}") from error
    height, width = size
    # Frame by frame: a whole clip at full resolution in float would be hundreds of MB a worker.
    return torch.from_numpy(np.stack([_resize_and_crop_image(frame, height, width) for frame in frames]))


def decode_clip(
    path: str | Path,
    num_frames: int,
    fps: float,
    size: tuple[int, int],
    rng: random.Random,
    backend: str = "pyav",
) -> Tensor:
    """num_frames frames at `fps` from a random start (drawn from rng) of one video, as uint8 (F, H, W, 3),
    scaled to cover `size` keeping the aspect ratio and centre-cropped.

    The start is a source frame, uniform over those that leave room for the clip; frame k is the decoded
    frame nearest to start + k / fps (the earlier on a tie). Both backends (VIDEO_BACKENDS) pick the
    same frames and agree on pixels within a few grey levels (colour conversion, scaling); decord
    cannot read some files PyAV reads (e.g. 48 pixels wide), which it reports as undecodable. Raises
    VideoDecodeError with the reason when the file cannot be decoded or is shorter than
    (num_frames - 1) / fps seconds."""
    decode = _decode_with_decord if check_video_backend(backend) == "decord" else _decode_with_pyav
    return decode(Path(path), num_frames, fps, size, rng)


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    if not (isinstance(size, Sequence) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
        raise ValueError(f"size must be a (height, width) pair of positive ints, got {size!r}")
    return int(size[0]), int(size[1])


def default_manifest(root: str | Path) -> Path | None:
    """The manifest a directory of videos is read through when none is named: the first of
    MANIFEST_NAMES it holds, or None."""
    return next((Path(root) / name for name in MANIFEST_NAMES if (Path(root) / name).is_file()), None)


class VideoTextDataset(Dataset):
    """Videos under `root` listed in a manifest (CSV or JSONL: path relative to root, caption, optional
    short_caption and use_motion; default root/manifest.csv or root/manifest.jsonl).

    Item i: num_frames frames at fps from a random start drawn from (seed, epoch, i), so an epoch is
    reproducible (call set_epoch before iterating), scaled to cover `size` keeping the aspect ratio and
    centre-cropped, decoded by `video_backend` ("pyav" or "decord", checked here so a missing package is
    reported at once). Returns None for a video that cannot give
    its frames; the reason is logged as a warning and kept in `skipped` (per process: DataLoader workers
    keep their own, see collate_skipping)."""

    def __init__(
        self,
        root: str | Path,
        manifest: str | Path | None = None,
        num_frames: int = 16,
        fps: float = DEFAULT_FPS,
        size: tuple[int, int] = (320, 512),
        seed: int = 0,
        video_backend: str = "pyav",
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"root must be a directory of videos, got {root}")
        if manifest is None:
            manifest = default_manifest(self.root)
            if manifest is None:
                raise ValueError(
                    f"{root} holds none of {list(MANIFEST_NAMES)}: give the manifest file itself (the data path on "
                    "the command line, manifest= in Python)"
                )
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
        if not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps!r}")
        self.manifest = Path(manifest)
        self.rows = read_manifest(self.manifest)
        self.num_frames = num_frames
        self.fps = fps
        self.size = _check_size(size)
        self.seed = seed
        self.video_backend = check_video_backend(video_backend)
        self.epoch = 0
        self.skipped: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        """Draws the next iteration's start times from this epoch (workers copy it when they start)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict | None:
        row = self.rows[index]
        path = self.root / row["path"]
        rng = random.Random(f"videos:{self.seed}:{self.epoch}:{index}")
        try:
            frames = decode_clip(path, self.num_frames, self.fps, self.size, rng, self.video_backend)
        except VideoDecodeError as error:
            self.skipped[row["path"]] = str(error)
            logger.warning("skipping video %s: %s", path, error)
            return None
        return {
            "frames": frames.permute(3, 0, 1, 2).to(torch.float32).div_(127.5).sub_(1.0),
            "caption": row["caption"],
            "short_caption": row["short_caption"],
            "use_motion": row["use_motion"],
            "path": row["path"],
        }


class SyntheticVideoText(Dataset):
    """The toy world (t2v_turbo.data.world) as a video-text source with VideoTextDataset's item format,
    rendered at any size and frame count; `path` is "synthetic/<split>/<index>"."""

    def __init__(
        self,
        num_clips: int = 1024,
        num_frames: int = 16,
        size: tuple[int, int] = (320, 512),
        seed: int = 0,
        split: str = "train",
        max_objects: int = 2,
    ):
        config = WorldConfig(num_frames=num_frames, size=_check_size(size), max_objects=max_objects)
        self.world = WorldDataset(split=split, size=num_clips, seed=seed, config=config)

    def __len__(self) -> int:
        return len(self.world)

    def __getitem__(self, index: int) -> dict:
        item = self.world[index]
        item["path"] = f"synthetic/{self.world.split}/{index}"
        return item


def collate_skipping(batch: list[dict | None]) -> dict:
    """Stacks the items that are not None; "skipped" counts the dropped ones (sum it over batches and
    log it). frames is None when every item was dropped."""
    kept = [item for item in batch if item is not None]
    return {
        "frames": torch.stack([item["frames"] for item in kept]) if kept else None,
        "caption": [item["caption"] for item in kept],
        "short_caption": [item["short_caption"] for item in kept],
        "use_motion": torch.tensor([item["use_motion"] for item in kept], dtype=torch.bool),
        "path": [item["path"] for item in kept],
        "skipped": len(batch) - len(kept),
    }


def build_dataset(
    spec: str | Path,
    num_frames: int = 16,
    fps: float = DEFAULT_FPS,
    size: tuple[int, int] = (320, 512),
    seed: int = 0,
    num_clips: int = 1024,
    video_backend: str = "pyav",
) -> Dataset:
    """"synthetic" -> SyntheticVideoText(num_clips, ...); a directory -> VideoTextDataset over it (with its
    manifest.csv / manifest.jsonl); a .csv / .jsonl file -> VideoTextDataset with paths relative to the
    file's directory. num_clips applies to the synthetic source only, fps and video_backend to real videos
    only."""
    if str(spec) == "synthetic":
        return SyntheticVideoText(num_clips=num_clips, num_frames=num_frames, size=size, seed=seed)
    path = Path(spec)
    if path.is_dir():
        return VideoTextDataset(path, num_frames=num_frames, fps=fps, size=size, seed=seed, video_backend=video_backend)
    if path.suffix.lower() in (".csv", ".jsonl"):
        if not path.is_file():
            raise FileNotFoundError(f"manifest {path} does not exist")
        return VideoTextDataset(
            path.parent, manifest=path, num_frames=num_frames, fps=fps, size=size, seed=seed, video_backend=video_backend
        )
    expected = "'synthetic', a directory of videos with its manifest.csv / manifest.jsonl, or such a manifest file"
    if not path.exists():
        raise FileNotFoundError(f"data: {path} does not exist (expected {expected})")
    raise ValueError(f"data spec must be {expected}, got {spec!r}")
