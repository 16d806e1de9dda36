"""Video-text datasets on tiny mp4 files written here with PyAV, decoded by each backend (PyAV, and
decord where installed): frames are sampled at the requested fps (the encoded frames carry their index
as brightness), resized by cover-and-centre-crop, scaled to [-1, 1]; both backends pick the same frames
and agree on pixels; a too-short and a corrupt file are skipped and counted through DataLoaders with
and without worker processes; manifests without their required columns give clear errors;
build_dataset routes "synthetic", directories and manifest files."""

import csv
import importlib.util
import itertools
import json
import math
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from t2v_turbo.data.videos import (
    SyntheticVideoText,
    VideoTextDataset,
    build_dataset,
    collate_skipping,
    decode_clip,
    check_video_backend,
    read_manifest,
    _centre_crop,
)

av = pytest.importorskip("av")

SOURCE_FPS = 24
VALID_FRAMES = 30
SHORT_FRAMES = 6
# Frame i has brightness i * BRIGHTNESS_STEP right of its first BLACK_COLUMNS columns, which stay black so the
# centre crop's position shows. YUV round trips move a grey level by at most ~2.
BRIGHTNESS_STEP = 8
# decord 0.6 cannot copy out 48-pixel-wide frames (a row-alignment bug), so the test videos are 64 wide.
HEIGHT, WIDTH = 32, 64
BLACK_COLUMNS = 24
HAVE_DECORD = importlib.util.find_spec("decord") is not None


@pytest.fixture(params=["pyav", pytest.param("decord", marks=pytest.mark.skipif(
    not HAVE_DECORD, reason="decord is not installed (pip install decord)"))])
def backend(request):
    return request.param


def _write_video(path, num_frames, fps=SOURCE_FPS):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"qp": "0", "preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for index in range(num_frames):
            image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
            image[:, BLACK_COLUMNS:] = index * BRIGHTNESS_STEP
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def video_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    (root / "clips").mkdir()
    _write_video(root / "clips" / "valid.mp4", VALID_FRAMES)
    _write_video(root / "clips" / "short.mp4", SHORT_FRAMES)
    (root / "clips" / "corrupt.mp4").write_bytes(random.Random(0).randbytes(4096))
    rows = [
        {"path": "clips/valid.mp4", "caption": "a grey ramp brightening", "short_caption": "ramp",
         "use_motion": "true"},
        {"path": "clips/short.mp4", "caption": "too short", "short_caption": "", "use_motion": ""},
        {"path": "clips/corrupt.mp4", "caption": "random bytes", "short_caption": "", "use_motion": "0"},
        {"path": "clips/valid.mp4", "caption": "the same ramp again", "short_caption": "", "use_motion": "no"},
    ]
    with (root / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "caption", "short_caption", "use_motion"])
        writer.writeheader()
        writer.writerows(rows)
    with (root / "manifest.jsonl").open("w") as handle:
        for row in rows:
            handle.write(json.dumps({k: v for k, v in row.items() if v}) + "\n")
    return root


def _frame_indices(frames):
    """Source frame indices from an item's frames (3, F, H, W) in [-1, 1]."""
    brightness = (frames[:, :, :, -4:] + 1) * 127.5
    return [round(float(v) / BRIGHTNESS_STEP) for v in brightness.mean(dim=(0, 2, 3))]


@pytest.mark.parametrize("manifest", ["manifest.csv", "manifest.jsonl"])
def test_valid_item_shape_range_and_fields(video_root, manifest, backend):
    dataset = VideoTextDataset(
        video_root, manifest=video_root / manifest, num_frames=4, fps=8, size=(16, 16), video_backend=backend
    )
    item = dataset[0]
    assert item["frames"].shape == (3, 4, 16, 16) and item["frames"].dtype == torch.float32
    assert float(item["frames"].min()) >= -1.0 and float(item["frames"].max()) <= 1.0
    assert (item["caption"], item["short_caption"], item["use_motion"], item["path"]) == (
        "a grey ramp brightening", "ramp", True, "clips/valid.mp4")
    again = dataset[3]
    assert (again["short_caption"], again["use_motion"]) == ("the same ramp again", False)
    # Cover-and-crop: 32x64 scales to 16x32, the crop drops 8 columns a side, so the black part
    # (24 of 64 source columns = 12 scaled columns) leaves 4 black columns on the left.
    columns = item["frames"][:, -1].mean(dim=(0, 1))
    assert bool((columns[:4] == -1.0).all()) and bool((columns[4:] > -1.0).all())


@pytest.mark.parametrize("fps,step", [(8, 3), (12, 2), (24, 1)])
def test_frames_are_sampled_at_the_requested_fps(video_root, fps, step, backend):
    starts = set()
    for epoch in range(6):
        dataset = VideoTextDataset(video_root, num_frames=5, fps=fps, size=(8, 12), seed=1, video_backend=backend)
        dataset.set_epoch(epoch)
        indices = _frame_indices(dataset[0]["frames"])
        start = indices[0]
        assert indices == [start + step * k for k in range(5)], (fps, indices)
        assert 0 <= start <= VALID_FRAMES - 1 - 4 * step
        assert _frame_indices(dataset[0]["frames"]) == indices, "the same epoch must give the same clip"
        starts.add(start)
    assert len(starts) > 1, "the start should vary with the epoch"


@pytest.mark.parametrize("fps,offsets", [
    (10, [round(2.4 * k) for k in range(6)]),  # target k sits 2.4 k source frames after the start
    (16, [math.floor(1.5 * k) for k in range(6)]),  # odd k sit halfway between two frames: the earlier
])
def test_decode_clip_nearest_frame_for_non_integer_ratio(video_root, backend, fps, offsets):
    for seed in range(4):
        frames = decode_clip(video_root / "clips" / "valid.mp4", 6, fps, (8, 12), random.Random(seed), backend)
        indices = _frame_indices(frames.permute(3, 0, 1, 2).float() / 127.5 - 1)
        assert [i - indices[0] for i in indices] == offsets, (seed, indices)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_short_and_corrupt_files_are_skipped_and_counted(video_root, num_workers, backend):
    dataset = VideoTextDataset(video_root, num_frames=4, fps=8, size=(8, 8), video_backend=backend)
    loader = DataLoader(dataset, batch_size=2, num_workers=num_workers, collate_fn=collate_skipping)
    skipped, kept_paths = 0, []
    for batch in loader:
        skipped += batch["skipped"]
        kept_paths += batch["path"]
        if batch["frames"] is not None:
            assert batch["frames"].shape == (len(batch["path"]), 3, 4, 8, 8)
            assert batch["use_motion"].dtype == torch.bool
    assert skipped == 2
    assert kept_paths == ["clips/valid.mp4", "clips/valid.mp4"]
    if num_workers == 0:
        assert set(dataset.skipped) == {"clips/short.mp4", "clips/corrupt.mp4"}
        assert dataset.skipped["clips/short.mp4"].startswith("too short")
        assert dataset.skipped["clips/corrupt.mp4"].startswith("cannot decode")


def test_skip_is_logged(video_root, caplog, backend):
    dataset = VideoTextDataset(video_root, num_frames=4, fps=8, size=(8, 8), video_backend=backend)
    with caplog.at_level("WARNING", logger="t2v_turbo.data.videos"):
        assert dataset[1] is None
    assert "short.mp4" in caplog.text and "too short" in caplog.text


@pytest.mark.skipif(not HAVE_DECORD, reason="decord is not installed (pip install decord)")
@pytest.mark.parametrize("size", [(16, 16), (20, 30), (48, 64)])
def test_backends_pick_the_same_frames_and_agree_on_pixels(video_root, size):
    """Same rng, same frames; the colour conversions and scalings (swscale's area filter, torch's
    area/bilinear) agree within 2 grey levels on the flat region and 4 at the black edge (measured: 2
    and 3). (48, 64) enlarges the source."""
    path = video_root / "clips" / "valid.mp4"
    for seed, fps in itertools.product(range(4), (10, 16)):
        pyav = decode_clip(path, 5, fps, size, random.Random(seed), "pyav")
        decord = decode_clip(path, 5, fps, size, random.Random(seed), "decord")
        assert _frame_indices(pyav.permute(3, 0, 1, 2).float() / 127.5 - 1) == _frame_indices(
            decord.permute(3, 0, 1, 2).float() / 127.5 - 1
        ), (seed, fps)
        assert pyav.shape == decord.shape == (5, *size, 3) and decord.dtype == torch.uint8
        difference = (pyav.int() - decord.int()).abs()
        assert int(difference[:, :, -4:].max()) <= 2, "the flat bright region must agree"
        assert float(difference.float().mean()) < 1.5 and int(difference.max()) <= 4


def test_video_backend_names_are_checked(video_root, monkeypatch):
    with pytest.raises(ValueError, match="video_backend must be one of"):
        check_video_backend("auto")
    assert check_video_backend("pyav") == "pyav"
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "decord" else real_find_spec(name, *a))
    with pytest.raises(ValueError, match="needs the decord package"):
        VideoTextDataset(video_root, video_backend="decord")


def test_collate_of_only_skipped_items():
    batch = collate_skipping([None, None])
    assert batch["frames"] is None and batch["skipped"] == 2 and batch["caption"] == []


def test_missing_manifest_columns_raise_clear_errors(tmp_path):
    (tmp_path / "no_caption.csv").write_text("path,short_caption\na.mp4,x\n")
    with pytest.raises(ValueError, match=r"no_caption\.csv.*\['caption'\]"):
        VideoTextDataset(tmp_path, manifest=tmp_path / "no_caption.csv")
    (tmp_path / "no_path.jsonl").write_text('{"path": "a.mp4", "caption": "x"}\n{"caption": "y"}\n')
    with pytest.raises(ValueError, match=r"no_path\.jsonl:2.*\['path'\]"):
        VideoTextDataset(tmp_path, manifest=tmp_path / "no_path.jsonl")
    # A caption of spaces is no caption; a JSON list would have been stored as its repr.
    (tmp_path / "blank.csv").write_text("path,caption\na.mp4,   \n")
    with pytest.raises(ValueError, match=r"blank\.csv:2.*\['caption'\]"):
        VideoTextDataset(tmp_path, manifest=tmp_path / "blank.csv")
    (tmp_path / "list.jsonl").write_text('{"path": "a.mp4", "caption": ["a", "b"]}\n')
    with pytest.raises(ValueError, match=r"list\.jsonl:1: \['caption'\] must be text, got \['list'\]"):
        VideoTextDataset(tmp_path, manifest=tmp_path / "list.jsonl")
    (tmp_path / "bad_flag.jsonl").write_text('{"path": "a.mp4", "caption": "x", "use_motion": "maybe"}\n')
    with pytest.raises(ValueError, match="use_motion"):
        VideoTextDataset(tmp_path, manifest=tmp_path / "bad_flag.jsonl")
    with pytest.raises(ValueError, match="manifest"):
        VideoTextDataset(tmp_path)


def test_empty_and_non_utf8_manifests_say_so(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match=r"empty\.csv is empty: it needs a header row"):
        VideoTextDataset(tmp_path, manifest=tmp_path / "empty.csv")
    (tmp_path / "latin1.csv").write_bytes("path,caption\na.mp4,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.csv is not UTF-8 text"):
        VideoTextDataset(tmp_path, manifest=tmp_path / "latin1.csv")


def test_a_csv_manifest_with_a_byte_order_mark_reads_its_first_column(tmp_path):
    """As spreadsheet programs write them: the mark is not part of the first column's name."""
    (tmp_path / "bom.csv").write_text("\ufeffpath,caption\na.mp4,a cat\n", encoding="utf-8")
    dataset = VideoTextDataset(tmp_path, manifest=tmp_path / "bom.csv")
    assert len(dataset) == 1


def test_synthetic_source_and_build_dataset(video_root):
    synthetic = build_dataset("synthetic", num_frames=6, size=(24, 40), num_clips=3, seed=2)
    assert isinstance(synthetic, SyntheticVideoText) and len(synthetic) == 3
    item = synthetic[1]
    assert item["frames"].shape == (3, 6, 24, 40) and item["frames"].dtype == torch.float32
    assert float(item["frames"].min()) >= -1.0 and float(item["frames"].max()) <= 1.0
    assert set(item) == {"frames", "caption", "short_caption", "use_motion", "path"}
    assert item["path"] == "synthetic/train/1"
    batch = collate_skipping([synthetic[0], synthetic[2]])
    assert batch["frames"].shape == (2, 3, 6, 24, 40) and batch["skipped"] == 0
    from_dir = build_dataset(video_root, num_frames=4, size=(8, 8))
    from_file = build_dataset(str(video_root / "manifest.jsonl"), num_frames=4, size=(8, 8))
    assert isinstance(from_dir, VideoTextDataset) and isinstance(from_file, VideoTextDataset)
    assert len(from_dir) == len(from_file) == 4
    with pytest.raises(FileNotFoundError, match="manifest .*missing.csv does not exist"):
        build_dataset(video_root / "missing.csv")
    with pytest.raises(FileNotFoundError, match="data: .*missing.txt does not exist"):
        build_dataset(video_root / "missing.txt")
    (video_root / "notes.txt").write_text("not a manifest")
    with pytest.raises(ValueError, match="data spec"):
        build_dataset(video_root / "notes.txt")


def test_clip_span_uses_the_requested_fps_and_every_start_is_reachable(video_root):
    # valid.mp4: 30 frames at 24 fps. 20 frames at 24 fps span 19 source frames, so the start is one of
    # frames 0..10 (the clip is too short for 20 frames at any lower fps, e.g. the default 8).
    starts = set()
    for seed in range(40):
        frames = decode_clip(video_root / "clips" / "valid.mp4", 20, 24, (8, 12), random.Random(seed), "pyav")
        indices = _frame_indices(frames.permute(3, 0, 1, 2).float() / 127.5 - 1)
        assert indices == list(range(indices[0], indices[0] + 20)), (seed, indices)
        starts.add(indices[0])
    assert starts == set(range(11))


def test_centre_crop_takes_the_floor_centred_window_for_odd_margins():
    images = np.arange(2 * 5 * 7 * 3).reshape(2, 5, 7, 3)
    cropped = _centre_crop(images, 2, 2)
    # margins of 3 rows and 5 columns: 1 row above, 2 columns left (the extra one goes below / right).
    assert np.array_equal(cropped, images[:, 1:3, 2:4, :])
    assert np.array_equal(_centre_crop(images, 4, 6), images[:, 0:4, 0:6, :])


def test_use_motion_words_and_numbers_parse_strictly(tmp_path):
    values = ["false", "False", " FALSE ", "0", "no", "n", "f", 0, False, None,
              "true", "TRUE", "1", "yes", "Y", "t", 1, True, 1.0]
    expected = [False] * 10 + [True] * 9
    manifest = tmp_path / "flags.jsonl"
    manifest.write_text("".join(json.dumps({"path": f"{i}.mp4", "caption": "c", "use_motion": v}) + "\n"
                                for i, v in enumerate(values)))
    assert [row["use_motion"] for row in read_manifest(manifest)] == expected
    for bad in (2, -1, 0.5, "2", "maybe"):
        manifest.write_text(json.dumps({"path": "a.mp4", "caption": "c", "use_motion": bad}) + "\n")
        with pytest.raises(ValueError, match="use_motion"):
            read_manifest(manifest)
