"""The toy world: clips are deterministic by seed, rendered motion follows the caption (measured from a
hard foreground mask against the true background), motion_fidelity separates real clips from reversed
or frozen ones and follows its documented formula, the held-out triples never reach the train split,
and parse_caption inverts the captions."""

import math
import random
from dataclasses import replace

import pytest
import torch

from t2v_turbo.data.world import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    MOTION_SCALE,
    SHAPES,
    SPEED_TRAVEL,
    Attributes,
    WorldConfig,
    WorldDataset,
    dense_caption,
    is_heldout,
    make_clip,
    motion_fidelity,
    moves_as_captioned,
    parse_caption,
    prompts,
    sample_attributes,
    short_caption,
    split_triples,
)

CONFIGS = [WorldConfig(), WorldConfig(num_frames=12, size=(24, 40), max_objects=1)]
# Centroid of the coverage unmixed from the frames vs the exact shape centre: the symmetric edge ramp
# keeps circles and squares exact; the triangle's corners shift it by a fraction of a pixel.
CENTROID_TOL_PX = 0.15


def _clips_by_direction(config, per_direction=3):
    found = {d: [] for d in DIRECTIONS}
    seed = 0
    while any(len(v) < per_direction for v in found.values()):
        clip = make_clip(seed, config)
        if len(found[clip.attributes.direction]) < per_direction:
            found[clip.attributes.direction].append(clip)
        seed += 1
    return found


@pytest.fixture(scope="module", params=range(len(CONFIGS)), ids=["32x32x8", "24x40x12"])
def clips(request):
    config = CONFIGS[request.param]
    return config, _clips_by_direction(config)


def _mask_centroids(clip):
    """Per-frame centroid (x, y) in pixels of the object coverage, unmixed from the true colours:
    frame = background + coverage * (colour - background) along the channel where they differ most."""
    background = torch.tensor(BACKGROUNDS[clip.attributes.background])
    colour = torch.tensor(COLOURS[clip.attributes.colour])
    channel = int((colour - background).abs().argmax())
    mask = (clip.frames[:, channel] - background[channel]) / (colour[channel] - background[channel])
    _, height, width = mask.shape
    ys = torch.arange(height).float() + 0.5
    xs = torch.arange(width).float() + 0.5
    mass = mask.sum(dim=(1, 2))
    assert bool((mass > 0).all()), "an object vanished from a frame"
    cx = (mask.sum(dim=1) * xs).sum(dim=1) / mass
    cy = (mask.sum(dim=2) * ys).sum(dim=1) / mass
    return torch.stack([cx, cy], dim=-1)


def test_same_seed_same_clip_different_seed_different_clip():
    first, again, other = make_clip(11), make_clip(11), make_clip(12)
    assert torch.equal(first.frames, again.frames)
    assert first.caption == again.caption and torch.equal(first.track, again.track)
    assert not torch.equal(first.frames, other.frames)
    dataset = WorldDataset("train", size=4, seed=3)
    assert torch.equal(dataset[2]["frames"], WorldDataset("train", size=4, seed=3)[2]["frames"])
    assert not torch.equal(dataset[2]["frames"], WorldDataset("train", size=4, seed=4)[2]["frames"])
    assert make_clip(random.Random(5)).caption == make_clip(5).caption


def test_frames_shape_range_and_soft_edges(clips):
    config, by_direction = clips
    height, width = config.frame_shape
    for clip in by_direction["right"] + by_direction["static"]:
        assert clip.frames.shape == (config.num_frames, 3, height, width)
        assert clip.frames.dtype == torch.float32
        assert float(clip.frames.min()) >= 0.0 and float(clip.frames.max()) <= 1.0
        background = torch.tensor(BACKGROUNDS[clip.attributes.background])
        colour = torch.tensor(COLOURS[clip.attributes.colour])
        # Anti-aliasing: some pixels are strict mixtures of background and object colour.
        mix = (clip.frames - background.view(1, 3, 1, 1)) / (colour - background).view(1, 3, 1, 1)
        channel = int((colour - background).abs().argmax())
        partial = ((mix[:, channel] > 0.05) & (mix[:, channel] < 0.95)).sum()
        assert int(partial) >= config.num_frames * 4
        assert torch.allclose(clip.frames[:, :, 0, 0], background.expand(config.num_frames, 3), atol=1e-6)


def test_rendered_motion_follows_the_caption(clips):
    config, by_direction = clips
    short_side = min(config.frame_shape)
    axes = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1)}
    for direction, found in by_direction.items():
        for clip in found:
            centroids = _mask_centroids(clip)
            assert clip.use_motion == (direction != "static")
            assert parse_caption(clip.caption).direction == direction
            # The mask follows the ground-truth track (mean over objects of identical size).
            assert torch.allclose(centroids, clip.track.mean(dim=0), atol=CENTROID_TOL_PX), clip.caption
            displacement = centroids[-1] - centroids[0]
            if direction == "static":
                assert float(displacement.abs().max()) < 1e-4, clip.caption
                continue
            axis, sign = axes[direction]
            travel = SPEED_TRAVEL[clip.attributes.speed] * short_side
            assert float(displacement[axis]) * sign == pytest.approx(travel, abs=2 * CENTROID_TOL_PX), clip.caption
            assert abs(float(displacement[1 - axis])) < 2 * CENTROID_TOL_PX, clip.caption
            steps = (centroids[1:] - centroids[:-1])[:, axis] * sign
            assert bool((steps > 0).all()), f"not monotone: {clip.caption}"


def test_objects_stay_in_frame(clips):
    config, by_direction = clips
    for found in by_direction.values():
        for clip in found:
            background = torch.tensor(BACKGROUNDS[clip.attributes.background]).view(1, 3, 1)
            border = torch.cat([clip.frames[:, :, 0, :], clip.frames[:, :, -1, :],
                                clip.frames[:, :, :, 0], clip.frames[:, :, :, -1]], dim=-1)
            assert torch.allclose(border, background.expand_as(border), atol=1e-6), clip.caption


def test_motion_fidelity_scores_real_high_reversed_and_frozen_low(clips):
    _, by_direction = clips
    for direction, found in by_direction.items():
        for clip in found:
            real = motion_fidelity(clip.frames, direction)
            frozen = clip.frames[:1].expand_as(clip.frames)
            assert real > 0.9, (clip.caption, real)
            assert motion_fidelity(frozen, direction) == (pytest.approx(1.0) if direction == "static" else 0.0)
            if direction == "static":
                continue
            assert motion_fidelity(clip.frames.flip(0), direction) < 0.05, clip.caption
            assert motion_fidelity(clip.frames, "static") < 0.05, clip.caption
            # The caption's background colour gives the same estimate as the border median.
            named = motion_fidelity(clip.frames, direction, clip.attributes.background)
            assert named == pytest.approx(real, abs=1e-3)


def test_moves_as_captioned_tells_real_from_time_reversed_clips(clips):
    _, by_direction = clips
    found = [clip for direction, group in by_direction.items() for clip in group]
    batch = torch.stack([clip.frames.permute(1, 0, 2, 3) for clip in found])
    directions = [clip.attributes.direction for clip in found]
    moving = torch.tensor([d != "static" for d in directions])
    assert bool(moving.any()) and not bool(moving.all())
    forward = moves_as_captioned(batch, directions)
    backward = moves_as_captioned(batch.flip(2), directions)
    assert bool(forward.isnan().eq(~moving).all()) and bool(backward.isnan().eq(~moving).all())
    assert bool((forward[moving] == 1).all()) and bool((backward[moving] == 0).all())
    with pytest.raises(ValueError, match="frames"):
        moves_as_captioned(found[0].frames, directions[0])


def test_motion_fidelity_batch_matches_single_clips():
    found = [make_clip(s) for s in range(4)]
    batch = torch.stack([c.frames.permute(1, 0, 2, 3) for c in found])
    directions = [c.attributes.direction for c in found]
    reversed_directions = ["left", "right", "down", "up"]
    scores = motion_fidelity(batch, reversed_directions)
    assert scores.shape == (4,)
    expected = [motion_fidelity(c.frames, d) for c, d in zip(found, reversed_directions)]
    assert torch.allclose(scores, torch.tensor(expected, dtype=torch.float32))
    assert torch.allclose(motion_fidelity(batch, directions),
                          torch.tensor([motion_fidelity(c.frames, c.attributes.direction) for c in found]))


def test_motion_fidelity_follows_its_formula():
    # A 4x4 white block on black moving one pixel a frame right and half a pixel a frame down.
    frames = torch.zeros(8, 3, 32, 32)
    for f in range(8):
        top = 10 + f // 2
        frames[f, :, top : top + 4, 4 + f : 8 + f] = 1.0
    # Centroid x grows by 1 px a frame; y follows f // 2, whose least-squares slope over f = 0..7 is
    # sum((f - 3.5) * (f // 2 - 1.5)) / sum((f - 3.5)^2) = 20 / 42.
    displacement = torch.tensor([7.0, 7.0 * 20 / 42], dtype=torch.float64) / 32
    magnitude = float(displacement.norm())
    cosine = float(displacement[0]) / magnitude
    expected_right = (1 + cosine) / 2 * (1 - math.exp(-magnitude / MOTION_SCALE))
    expected_up = (1 - float(displacement[1]) / magnitude) / 2 * (1 - math.exp(-magnitude / MOTION_SCALE))
    assert motion_fidelity(frames, "right") == pytest.approx(expected_right, rel=1e-9)
    assert motion_fidelity(frames, "up") == pytest.approx(expected_up, rel=1e-9)
    assert motion_fidelity(frames, "static") == pytest.approx(math.exp(-magnitude / MOTION_SCALE), rel=1e-9)
    assert motion_fidelity(torch.zeros(8, 3, 32, 32), "right") == 0.0


def test_heldout_triples_never_in_train():
    heldout = set(split_triples("heldout"))
    train = set(split_triples("train"))
    assert len(heldout) == 15 and len(train) == 60 and not heldout & train
    # Every colour, shape and direction, and every pair of them, is seen in training.
    for i, j in ((0, 1), (0, 2), (1, 2)):
        all_pairs = {(t[i], t[j]) for t in heldout | train}
        assert {(t[i], t[j]) for t in train} == all_pairs
    for split, allowed in (("train", train), ("heldout", heldout)):
        for caption in prompts(split, 400, seed=1):
            a = parse_caption(caption)
            assert (a.colour, a.shape, a.direction) in allowed, (split, caption)
            assert is_heldout(a.colour, a.shape, a.direction) == (split == "heldout")
    dataset = WorldDataset("heldout", size=5, seed=1)
    assert [dataset[i]["caption"] for i in range(5)] == prompts("heldout", 5, seed=1)
    assert len({parse_caption(c).direction for c in prompts("heldout", 200)}) == len(DIRECTIONS)


def test_world_dataset_item_layout():
    item = WorldDataset("train", size=2, seed=0)[1]
    clip = WorldDataset("train", size=2, seed=0).clip(1)
    assert item["frames"].shape == (3, 8, 32, 32)
    assert torch.allclose(item["frames"], clip.frames.permute(1, 0, 2, 3) * 2 - 1)
    assert float(item["frames"].min()) >= -1.0 and float(item["frames"].max()) <= 1.0
    assert (item["caption"], item["short_caption"], item["use_motion"]) == (
        clip.caption, clip.short_caption, clip.use_motion)


def test_parse_caption_round_trips():
    config = WorldConfig()
    rng = random.Random(0)
    seen_counts = set()
    for _ in range(300):
        truth = sample_attributes(rng, config)
        assert parse_caption(dense_caption(truth)) == truth
        assert parse_caption(short_caption(truth)) == Attributes(colour=truth.colour, shape=truth.shape,
                                                                 direction=truth.direction, count=truth.count)
        seen_counts.add(truth.count)
    clip = make_clip(3)
    assert (clip.caption, clip.short_caption) == (dense_caption(clip.attributes), short_caption(clip.attributes))
    assert seen_counts == {1, 2}
    assert parse_caption("a large white triangle moves down slowly on a dark green background") == (
        Attributes("white", "triangle", "large", "down", "slow", 1, "dark green"))
    assert parse_caption("two blue squares moving left") == Attributes("blue", "square", None, "left", None, 2, None)
    with pytest.raises(ValueError, match="caption"):
        parse_caption("a cat sits on a mat")


def test_dense_captions_of_different_directions_differ_in_words_not_only_in_order():
    """Cross-attention over a frozen encoder's tokens is blind to word order, so two directions must
    not be the same words rearranged ("from left to right" / "from right to left")."""
    rng = random.Random(4)
    for _ in range(20):
        truth = sample_attributes(rng, WorldConfig())
        words = {direction: sorted(dense_caption(replace(truth, direction=direction, speed="slow")).split())
                 for direction in DIRECTIONS}
        assert len({" ".join(w) for w in words.values()}) == len(DIRECTIONS)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="num_frames"):
        WorldConfig(num_frames=1)
    with pytest.raises(ValueError, match="too small"):
        WorldConfig(size=20)
    with pytest.raises(ValueError, match="max_objects"):
        WorldConfig(max_objects=3)
    with pytest.raises(TypeError, match="seed"):
        make_clip("seven")
    with pytest.raises(ValueError, match="split"):
        WorldDataset("test")
    with pytest.raises(ValueError, match="direction"):
        motion_fidelity(make_clip(0).frames, "sideways")
    with pytest.raises(ValueError, match="frames"):
        motion_fidelity(torch.zeros(3, 32, 32), "left")
    with pytest.raises(ValueError, match="colour"):
        is_heldout("purple", SHAPES[0], DIRECTIONS[0])
