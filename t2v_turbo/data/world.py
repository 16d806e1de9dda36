"""A procedural video-text world where motion matters (the toy world of the embedded demo).

Clips are coloured shapes (circle, square, triangle) moving in a straight line on a flat background.
Every clip is determined by its seed: attributes (colour, shape, size, direction, speed, count,
background), placement, a dense caption, a short caption, and frames rendered with a one-pixel
anti-aliased edge (coverage from a signed distance), so the target is smooth for a diffusion model.

Motion is the point: the direction of travel is part of every caption and a single frame cannot show it.
`motion_fidelity` measures, without any learned model, whether a clip moves as its caption says;
`parse_caption` recovers the attributes from a caption so generated clips can be scored from their prompts.

Held-out prompts: a fixed set of (colour, shape, direction) triples never appears in the "train" split;
the "heldout" split draws only from those triples, so evaluation prompts are novel compositions of
attributes that are each seen in training.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.data import Dataset

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.15, 0.15),
    "green": (0.2, 0.85, 0.25),
    "blue": (0.2, 0.35, 1.0),
    "yellow": (0.95, 0.9, 0.15),
    "white": (0.95, 0.95, 0.95),
}
# Every background is at least 0.5 away (RGB Euclidean) from every object colour, so the
# foreground is always separable from the background by colour alone.
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.02, 0.02, 0.02),
    "dark blue": (0.05, 0.08, 0.35),
    "dark green": (0.05, 0.3, 0.1),
    "dark gray": (0.25, 0.25, 0.25),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
DIRECTIONS = ("left", "right", "up", "down", "static")
SPEEDS = ("slow", "fast")
SPLITS = ("train", "heldout")

# Unit displacement of each direction in image coordinates (x right, y down).
DIRECTION_VECTORS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "static": (0.0, 0.0),
}
OPPOSITE_DIRECTIONS = {"left": "right", "right": "left", "up": "down", "down": "up"}
# Object radius as a fraction of the frame's short side.
SIZE_RADIUS = {"small": 0.09, "large": 0.16}
# Distance travelled over the whole clip as a fraction of the frame's short side.
SPEED_TRAVEL = {"slow": 0.2, "fast": 0.45}
# The farthest any shape reaches from its centre, in radii (the triangle's apex).
SHAPE_REACH = 1.3
TRIANGLE_CIRCUMRADIUS = 1.3
# Half side of the square with the circle's area: sqrt(pi) / 2.
SQUARE_HALF_SIDE = math.sqrt(math.pi) / 2

_ADVERBS = {"slow": "slowly", "fast": "quickly"}


def is_heldout(colour: str, shape: str, direction: str) -> bool:
    """Whether a (colour, shape, direction) triple is reserved for the held-out split.

    The rule (c + s + d) mod 5 == 0 on the vocabulary indices reserves exactly one direction for each
    (colour, shape) pair, 15 of the 75 triples, while every colour, shape and direction, and every pair
    of them, still appears in training."""
    for name, value, vocabulary in (("colour", colour, COLOURS), ("shape", shape, SHAPES),
                                    ("direction", direction, DIRECTIONS)):
        if value not in vocabulary:
            raise ValueError(f"{name} must be one of {list(vocabulary)}, got {value!r}")
    return (list(COLOURS).index(colour) + SHAPES.index(shape) + DIRECTIONS.index(direction)) % 5 == 0


def split_triples(split: str) -> list[tuple[str, str, str]]:
    """The (colour, shape, direction) triples a split draws from, in vocabulary order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    want_heldout = split == "heldout"
    return [(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS if is_heldout(c, s, d) == want_heldout]


@dataclass
class WorldConfig:
    """How clips of the world are drawn and rendered.

    num_frames: frames per clip (>= 2). size: frame side in pixels, or (height, width).
    max_objects: 1 or 2 (clips hold 1..max_objects identical objects moving together).
    edge_width: width in pixels of the anti-aliased edge ramp."""

    num_frames: int = 8
    size: int | tuple[int, int] = 32
    max_objects: int = 2
    edge_width: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.num_frames, int) or self.num_frames < 2:
            raise ValueError(f"num_frames must be an int >= 2, got {self.num_frames!r}")
        if self.max_objects not in (1, 2):
            raise ValueError(f"max_objects must be 1 or 2, got {self.max_objects!r}")
        if not self.edge_width > 0:
            raise ValueError(f"edge_width must be > 0, got {self.edge_width!r}")
        short_side = min(self.frame_shape)
        reach = SHAPE_REACH * SIZE_RADIUS["large"] * short_side
        margin = self.border_margin(reach)
        fits_travel = 2 * margin + SPEED_TRAVEL["fast"] * short_side <= short_side
        fits_pair = self.max_objects == 1 or margin <= short_side / 2 - reach
        if not (fits_travel and fits_pair):
            raise ValueError(
                f"size {self.size!r} is too small for a large fast object (and a pair side by side) with "
                f"edge_width {self.edge_width}: use a short side of at least 24 pixels"
            )

    def border_margin(self, reach: float) -> float:
        """Least distance in pixels from an object's centre to the frame's edge that leaves the border
        pixels untouched: the shape's reach, plus the edge ramp, which at the triangle's 60-degree corners
        extends edge_width beyond the corner, plus half a pixel to the border pixels' centres."""
        return reach + self.edge_width + 0.5

    @property
    def frame_shape(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        if isinstance(self.size, int):
            return self.size, self.size
        if isinstance(self.size, Sequence) and len(self.size) == 2 and all(isinstance(s, int) for s in self.size):
            return int(self.size[0]), int(self.size[1])
        raise TypeError(f"size must be an int or a (height, width) pair of ints, got {self.size!r}")


@dataclass(frozen=True)
class Attributes:
    """What a caption says about a clip. Fields a caption leaves out (a short caption names no size,
    speed or background; a static clip has no speed) are None."""

    colour: str | None = None
    shape: str | None = None
    size: str | None = None
    direction: str | None = None
    speed: str | None = None
    count: int | None = None
    background: str | None = None


@dataclass
class Clip:
    """One rendered clip: frames (F, 3, H, W) in [0, 1], its captions, whether the caption describes
    motion a still frame cannot show, the ground-truth attributes and the objects' centre tracks
    (count, F, 2) as (x, y) in pixels (the centre is each shape's area centroid)."""

    frames: Tensor
    caption: str
    short_caption: str
    use_motion: bool
    attributes: Attributes
    track: Tensor = field(repr=False)


def dense_caption(attributes: Attributes) -> str:
    """e.g. "a small red circle moves right quickly on a dark blue background".

    The direction is one word of its own. A phrase such as "from left to right" holds the same
    tokens as its reverse, and a frozen sentence encoder gives the two nearly the same token
    embeddings (cross-attention, blind to order, cannot tell them apart) and pooled embeddings
    (cosine 0.999 with MiniLM); "moves right" and "moves left" differ in a token."""
    a = attributes
    plural = a.count == 2
    subject = f"{'two' if plural else 'a'} {a.size} {a.colour} {a.shape}{'s' if plural else ''}"
    if a.direction == "static":
        action = "stay still" if plural else "stays still"
    else:
        action = f"{'move' if plural else 'moves'} {a.direction} {_ADVERBS[a.speed]}"
    return f"{subject} {action} on a {a.background} background"


def short_caption(attributes: Attributes) -> str:
    """e.g. "red circle moving right", "two green squares standing still"."""
    a = attributes
    plural = a.count == 2
    subject = f"{'two ' if plural else ''}{a.colour} {a.shape}{'s' if plural else ''}"
    action = "standing still" if a.direction == "static" else f"moving {a.direction}"
    return f"{subject} {action}"


_SHAPE_PATTERN = re.compile(r"\b(" + "|".join(SHAPES) + r")s?\b")
_COLOUR_PATTERN = re.compile(r"\b(" + "|".join(COLOURS) + r")\b")


def parse_caption(caption: str) -> Attributes:
    """The attributes a dense or short caption of this world states (the inverse of `dense_caption`
    and `short_caption`). Raises ValueError when the caption names no colour, shape or direction."""
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}")
    text = " ".join(caption.lower().split())
    background = None
    background_match = re.search(r"\bon an? (.+?) background\b", text)
    if background_match:
        if background_match.group(1) not in BACKGROUNDS:
            raise ValueError(f"caption {caption!r} names an unknown background {background_match.group(1)!r}")
        background = background_match.group(1)
        text = text[: background_match.start()]
    colour_match = _COLOUR_PATTERN.search(text)
    shape_match = _SHAPE_PATTERN.search(text)
    direction = None
    if re.search(r"\b(stays?|standing) still\b", text):
        direction = "static"
    else:
        moving_match = re.search(r"\b(?:moves?|moving) (left|right|up|down)\b", text)
        if moving_match:
            direction = moving_match.group(1)
    if colour_match is None or shape_match is None or direction is None:
        raise ValueError(f"caption {caption!r} does not name a colour, a shape and a direction of this world")
    size_match = re.search(r"\b(" + "|".join(SIZES) + r")\b", text)
    speed = next((s for s, adverb in _ADVERBS.items() if re.search(rf"\b{adverb}\b", text)), None)
    return Attributes(
        colour=colour_match.group(1),
        shape=shape_match.group(1),
        size=size_match.group(1) if size_match else None,
        direction=direction,
        speed=speed,
        count=2 if re.search(r"\btwo\b", text) else 1,
        background=background,
    )


def clip_rng(seed: int, split: str, index: int) -> random.Random:
    """The generator of clip `index` of a split: string seeding is stable across processes and runs."""
    return random.Random(f"world:{seed}:{split}:{index}")


def sample_attributes(rng: random.Random, config: WorldConfig, split: str | None = None) -> Attributes:
    """Draws a clip's attributes; with a split, the (colour, shape, direction) triple is uniform over
    that split's triples, without one uniform over all triples."""
    triples = split_triples(split) if split is not None else [(c, s, d) for c in COLOURS for s in SHAPES
                                                               for d in DIRECTIONS]
    colour, shape, direction = rng.choice(triples)
    size = rng.choice(SIZES)
    speed = rng.choice(SPEEDS)
    count = rng.randint(1, config.max_objects)
    background = rng.choice(list(BACKGROUNDS))
    return Attributes(colour=colour, shape=shape, size=size, direction=direction,
                      speed=None if direction == "static" else speed, count=count, background=background)


def _place(rng: random.Random, attributes: Attributes, config: WorldConfig) -> Tensor:
    """Centre tracks (count, F, 2) as (x, y) pixels: straight lines that keep every object wholly in
    frame, two objects side by side across the direction of travel so they never overlap."""
    height, width = config.frame_shape
    short_side = min(height, width)
    reach = SHAPE_REACH * SIZE_RADIUS[attributes.size] * short_side
    travel = 0.0 if attributes.direction == "static" else SPEED_TRAVEL[attributes.speed] * short_side
    towards_lower = attributes.direction in ("left", "up")
    horizontal = attributes.direction in ("left", "right", "static")
    along_length, across_length = (width, height) if horizontal else (height, width)
    margin = config.border_margin(reach)
    if attributes.count == 1:
        across_ranges = [(margin, across_length - margin)]
    else:
        across_ranges = [(margin, across_length / 2 - reach), (across_length / 2 + reach, across_length - margin)]
    progress = torch.linspace(0.0, 1.0, config.num_frames, dtype=torch.float64)
    tracks = []
    for low, high in across_ranges:
        along_low = rng.uniform(margin, along_length - margin - travel)
        across = rng.uniform(low, high)
        # Travel towards decreasing coordinates starts at the far end of the same range.
        along = along_low + travel * (1.0 - progress if towards_lower else progress)
        across_t = torch.full_like(along, across)
        tracks.append(torch.stack([along, across_t], -1) if horizontal else torch.stack([across_t, along], -1))
    return torch.stack(tracks)


def _signed_distance(shape: str, radius: float, px: Tensor, py: Tensor) -> Tensor:
    """Signed distance in pixels (negative inside) from points relative to the shape's centre."""
    if shape == "circle":
        return torch.sqrt(px * px + py * py) - radius
    if shape == "square":
        return torch.maximum(px.abs(), py.abs()) - SQUARE_HALF_SIDE * radius
    # Equilateral triangle, apex up, centred on its centroid: the largest signed distance to its three
    # edge lines (outward normals at 90, 210 and 330 degrees in image coordinates), inradius R / 2.
    circumradius = TRIANGLE_CIRCUMRADIUS * radius
    distances = [math.cos(a) * px + math.sin(a) * py for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)]
    return torch.maximum(torch.maximum(distances[0], distances[1]), distances[2]) - circumradius / 2


def render(attributes: Attributes, track: Tensor, config: WorldConfig) -> Tensor:
    """Frames (F, 3, H, W) in [0, 1]: the background, then each object composited with coverage
    clamp(1/2 - distance / edge_width, 0, 1), a linear edge ramp one edge_width wide."""
    height, width = config.frame_shape
    radius = SIZE_RADIUS[attributes.size] * min(height, width)
    ys = torch.arange(height, dtype=torch.float64).add_(0.5).view(1, height, 1)
    xs = torch.arange(width, dtype=torch.float64).add_(0.5).view(1, 1, width)
    background = torch.tensor(BACKGROUNDS[attributes.background], dtype=torch.float64).view(1, 3, 1, 1)
    colour = torch.tensor(COLOURS[attributes.colour], dtype=torch.float64).view(1, 3, 1, 1)
    frames = background.expand(config.num_frames, 3, height, width).clone()
    for centres in track:
        px = xs - centres[:, 0].view(-1, 1, 1)
        py = ys - centres[:, 1].view(-1, 1, 1)
        distance = _signed_distance(attributes.shape, radius, px, py)
        coverage = (0.5 - distance / config.edge_width).clamp(0.0, 1.0).unsqueeze(1)
        frames = frames * (1.0 - coverage) + colour * coverage
    return frames.to(torch.float32)


def make_clip(seed: int | random.Random, config: WorldConfig | None = None, split: str | None = None) -> Clip:
    """The clip of a seed (an int or a random.Random): attributes, placement, captions and frames."""
    config = WorldConfig() if config is None else config
    if isinstance(seed, random.Random):
        rng = seed
    elif isinstance(seed, int) and not isinstance(seed, bool):
        rng = random.Random(seed)
    else:
        raise TypeError(f"seed must be an int or a random.Random, got {type(seed).__name__}")
    attributes = sample_attributes(rng, config, split)
    track = _place(rng, attributes, config)
    return Clip(
        frames=render(attributes, track, config),
        caption=dense_caption(attributes),
        short_caption=short_caption(attributes),
        use_motion=attributes.direction != "static",
        attributes=attributes,
        track=track.to(torch.float32),
    )


class WorldDataset(Dataset):
    """`size` clips of one split. Item i is the clip of clip_rng(seed, split, i) as
    dict(frames (3, F, H, W) in [-1, 1], caption, short_caption, use_motion)."""

    def __init__(self, split: str = "train", size: int = 1024, seed: int = 0, config: WorldConfig | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int (the number of clips), got {size!r}")
        self.split = split
        self.size = size
        self.seed = seed
        self.config = WorldConfig() if config is None else config

    def __len__(self) -> int:
        return self.size

    def clip(self, index: int) -> Clip:
        """The full clip (attributes and track included) behind item `index`."""
        if not 0 <= index < self.size:
            raise IndexError(f"index must lie in [0, {self.size}), got {index}")
        return make_clip(clip_rng(self.seed, self.split, index), self.config, self.split)

    def __getitem__(self, index: int) -> dict:
        clip = self.clip(index)
        return {
            "frames": clip.frames.permute(1, 0, 2, 3).mul(2.0).sub(1.0).contiguous(),
            "caption": clip.caption,
            "short_caption": clip.short_caption,
            "use_motion": clip.use_motion,
        }


def prompts(split: str, num: int, seed: int = 0, config: WorldConfig | None = None) -> list[str]:
    """The dense captions of the first `num` items of WorldDataset(split, num, seed, config), without
    rendering (evaluation prompts: split="heldout")."""
    config = WorldConfig() if config is None else config
    return [dense_caption(sample_attributes(clip_rng(seed, split, i), config, split)) for i in range(num)]


# motion_fidelity's constants: a pixel belongs to the foreground from FOREGROUND_LOW to FOREGROUND_HIGH
# RGB distance (soft in between); a displacement of MOTION_SCALE short sides counts as clearly moving.
FOREGROUND_LOW = 0.1
FOREGROUND_HIGH = 0.3
MOTION_SCALE = 0.05
MIN_FOREGROUND_MASS = 0.5


def _as_per_clip(value, batch: int, name: str) -> list:
    if isinstance(value, (str, type(None))) or (
        isinstance(value, Sequence) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)
    ):
        return [value] * batch
    if isinstance(value, Sequence) and len(value) == batch:
        return list(value)
    raise ValueError(f"{name} must be one value or a sequence of {batch} (one per clip), got {value!r}")


def _background_rgb(frames: Tensor, background) -> Tensor:
    """The background colour (3,) of one clip (3, F, H, W): given as a name or RGB, or estimated as the
    per-channel median of the border pixels over all frames."""
    if isinstance(background, str):
        if background not in BACKGROUNDS:
            raise ValueError(f"background_colour must be one of {list(BACKGROUNDS)} or RGB, got {background!r}")
        return torch.tensor(BACKGROUNDS[background], dtype=frames.dtype)
    if background is not None:
        return torch.tensor([float(v) for v in background], dtype=frames.dtype)
    border = torch.cat([frames[:, :, 0, :], frames[:, :, -1, :], frames[:, :, :, 0], frames[:, :, :, -1]], dim=-1)
    return border.reshape(3, -1).median(dim=1).values


def centroid_track(frames: Tensor, background: Tensor) -> tuple[Tensor, Tensor]:
    """Foreground centroid per frame of one clip (3, F, H, W) in units of the short side, (F, 2) as (x, y),
    and the foreground mass per frame (F,). Foreground weight per pixel:
    clamp((|pixel - background| - FOREGROUND_LOW) / (FOREGROUND_HIGH - FOREGROUND_LOW), 0, 1)."""
    _, _, height, width = frames.shape
    distance = (frames - background.view(3, 1, 1, 1)).norm(dim=0)
    weight = ((distance - FOREGROUND_LOW) / (FOREGROUND_HIGH - FOREGROUND_LOW)).clamp(0.0, 1.0)
    short_side = min(height, width)
    ys = (torch.arange(height, dtype=frames.dtype) + 0.5) / short_side
    xs = (torch.arange(width, dtype=frames.dtype) + 0.5) / short_side
    mass = weight.sum(dim=(1, 2))
    safe_mass = mass.clamp(min=torch.finfo(frames.dtype).tiny)
    cx = (weight.sum(dim=1) * xs).sum(dim=1) / safe_mass
    cy = (weight.sum(dim=2) * ys).sum(dim=1) / safe_mass
    return torch.stack([cx, cy], dim=-1), mass


def motion_fidelity(frames: Tensor, direction: str | Sequence[str], background_colour=None) -> float | Tensor:
    """Does the clip move as its caption says? A score in [0, 1] from the foreground's centroid track
    (no learned model).

    frames: (F, 3, H, W) (one clip, returns a float) or (B, 3, F, H, W) (returns a (B,) tensor), in [0, 1].
    direction: one of DIRECTIONS, or one per clip. background_colour: None (estimated: per-channel median
    of the border pixels over all frames), a name of BACKGROUNDS, an RGB triple, or one of those per clip.

    With c_f the foreground centroid of frame f (`centroid_track`, in short sides) over the frames whose
    foreground mass is at least MIN_FOREGROUND_MASS pixels, D = (F - 1) * (least-squares slope of c_f
    against f) is the displacement over the clip (D = 0 with fewer than two such frames), u the
    caption's unit direction and s = MOTION_SCALE:
        moving directions:  score = (1 + cos(D, u)) / 2 * (1 - exp(-|D| / s))   (cos = 0 when D = 0)
        "static":           score = exp(-|D| / s)
    So a clip moving as captioned scores near 1, one moving the opposite way or not at all near 0.
    """
    if not isinstance(frames, Tensor) or frames.dim() not in (4, 5):
        shape = getattr(frames, "shape", frames)
        raise ValueError(f"frames must be a (F, 3, H, W) or (B, 3, F, H, W) tensor, got {shape}")
    single = frames.dim() == 4
    clips = frames.permute(1, 0, 2, 3).unsqueeze(0) if single else frames
    if clips.shape[1] != 3:
        raise ValueError(f"frames must have 3 colour channels in the layout named, got shape {tuple(frames.shape)}")
    clips = clips.detach().to(dtype=torch.float64, device="cpu")
    batch, _, num_frames, _, _ = clips.shape
    directions = _as_per_clip(direction, batch, "direction")
    backgrounds = _as_per_clip(background_colour, batch, "background_colour")
    scores = []
    for clip, clip_direction, background in zip(clips, directions, backgrounds):
        if clip_direction not in DIRECTION_VECTORS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {clip_direction!r}")
        track, mass = centroid_track(clip, _background_rgb(clip, background))
        valid = mass >= MIN_FOREGROUND_MASS
        displacement = torch.zeros(2, dtype=torch.float64)
        if int(valid.sum()) >= 2:
            times = torch.arange(num_frames, dtype=torch.float64)[valid]
            points = track[valid]
            centred_times = times - times.mean()
            slope = (centred_times.unsqueeze(1) * (points - points.mean(dim=0))).sum(0) / centred_times.square().sum()
            displacement = slope * (num_frames - 1)
        magnitude = float(displacement.norm())
        if clip_direction == "static":
            scores.append(math.exp(-magnitude / MOTION_SCALE))
            continue
        unit = torch.tensor(DIRECTION_VECTORS[clip_direction], dtype=torch.float64)
        cosine = float(displacement @ unit) / magnitude if magnitude > 0 else 0.0
        scores.append((1.0 + cosine) / 2.0 * (1.0 - math.exp(-magnitude / MOTION_SCALE)))
    return scores[0] if single else torch.tensor(scores, dtype=torch.float32)


_DIRECTION_WORD = re.compile(r"\b(" + "|".join(OPPOSITE_DIRECTIONS) + r")\b")


def swap_direction(caption: str) -> str:
    """The caption with its direction word replaced by the opposite one ("moves right" -> "moves
    left"); a static caption comes back unchanged. Colour, shape, size and background names of this
    world contain no direction word, so only the direction changes."""
    return _DIRECTION_WORD.sub(lambda match: OPPOSITE_DIRECTIONS[match.group(1)], caption)


def moves_as_captioned(frames: Tensor, direction: str | Sequence[str], background_colour=None) -> Tensor:
    """Does each clip move the captioned way rather than the opposite one? frames (B, 3, F, H, W) in
    [0, 1]; direction and background_colour as in `motion_fidelity`. Returns (B,) float32: 1 where
    the motion fidelity under the captioned direction exceeds that under the opposite direction, 0
    where it does not, NaN for "static" captions (no opposite). A sampler that ignores the direction
    word scores about 0.5 over many clips."""
    if not isinstance(frames, Tensor) or frames.dim() != 5:
        raise ValueError(f"frames must be a (B, 3, F, H, W) tensor, got {getattr(frames, 'shape', frames)}")
    directions = _as_per_clip(direction, frames.shape[0], "direction")
    moving = [d != "static" for d in directions]
    opposites = [OPPOSITE_DIRECTIONS.get(d, d) for d in directions]
    captioned = motion_fidelity(frames, directions, background_colour)
    opposite = motion_fidelity(frames, opposites, background_colour)
    follows = (captioned > opposite).float()
    return torch.where(torch.tensor(moving), follows, torch.full_like(follows, float("nan")))
