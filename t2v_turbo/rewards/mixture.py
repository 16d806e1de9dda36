"""The batched reward mixture of T2V-Turbo-v2 (SPEC 3.7 and 5).

The release scores the student's decoded one-step prediction model by model and clip by clip, on
separate ranks. `RewardMixture` makes that one differentiable pass:

1. `select_frames` draws, once a step, the frames every entry scores (image rewards: random frames
   of each clip; video rewards: `num_frames` frames strided over the clip from a random start, as
   the release does), so the caller VAE-decodes only their union;
2. `forward` runs every entry's preprocessing in one `reward_preprocess` call, feeds each model all
   its frames of all clips at once, and runs models of one architecture with the same parameter
   shapes (HPSv2.1 and CLIP-H) as one forward over stacked weights (`torch.func.vmap` over the
   model axis of `functional_call`), then scores each against its caption's cached text embedding.

Per clip, an entry's score is the mean over its frames; the total is sum(weight * mean over clips).
Scores pair clip b with caption b (the release tiles texts by `k mod N_txt`, which differs only with
several prompts a step). Reward models are frozen: gradients reach only the frames.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from t2v_turbo.cuda_graphs import GraphedCall
from t2v_turbo.rewards import image_text
from t2v_turbo.rewards.base import KINDS, RewardModel
from turbo_kernels import PreprocessSpec, reward_preprocess
from turbo_kernels.checks import reads_values
from turbo_kernels.reference.preprocess import geometry as preprocess_geometry

__all__ = [
    "RELEASE_IMAGE_WEIGHT",
    "RELEASE_VIDEO_WEIGHT",
    "RewardEntry",
    "RewardMixture",
    "crops_at_random",
    "default_mixture",
]

FRAME_RULES = ("random", "strided")
CAPTION_KINDS = ("short", "dense")
# The release's reward weights relative to L_CD, once DDP averages its 6 image-reward ranks with
# its 2 video-reward ranks (SPEC 3.7): 0.2 on HPS + CLIP, 0.5 * 2/6 on the video reward.
RELEASE_IMAGE_WEIGHT = 0.2
RELEASE_VIDEO_WEIGHT = 0.5 * 2 / 6
RELEASE_IMAGE_FRAMES = 2
# How far outside [0, 1] frames may stray (rounding) before the mixture calls them another range:
# the preprocessing's normalisation assumes [0, 1], and [-1, 1] frames would be scored silently.
FRAME_RANGE_SLACK = 1e-3


def _check_positive_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_floating_tensor(value: object, name: str) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")


@dataclass
class RewardEntry:
    """One reward in the mixture.

    spec: the model's preprocessing; its size must be the model's `image_size` where the model
    has one. frames: "random" (`num_frames` distinct random frames of the clip), "strided"
    (`num_frames` frames at stride clip_frames // num_frames from a random start below the stride)
    or a fixed list of frame indices. num_frames defaults to 2 for image models (SPEC 5) and to the
    model's own `num_frames` for video models, which must score exactly that many. caption:
    "short" (the image rewards' short_txt) or "dense" (the video reward's txt). random_crop (a spec
    of mode "crop" without crop_offset only): each forward crops at a (top, left) drawn from the
    step's generator, the same for every frame of every clip, as the release's RandomCrop on the
    whole stack; otherwise the spec's crop (centred)."""

    name: str
    model: RewardModel
    spec: PreprocessSpec
    frames: str | Sequence[int] = "random"
    num_frames: int | None = None
    weight: float = 1.0
    caption: str = "short"
    random_crop: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"RewardEntry name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.model, RewardModel):
            raise TypeError(f"RewardEntry {self.name!r}: model must be a RewardModel, got {type(self.model).__name__}")
        if self.model.kind not in KINDS:
            raise ValueError(f"RewardEntry {self.name!r}: model.kind must be one of {KINDS}, got {self.model.kind!r}")
        if not isinstance(self.spec, PreprocessSpec):
            raise TypeError(f"RewardEntry {self.name!r}: spec must be a PreprocessSpec, got {type(self.spec).__name__}")
        model_size = self.model.image_size
        if model_size is not None and self.spec.size != model_size:
            raise ValueError(
                f"RewardEntry {self.name!r}: spec size {self.spec.size} differs from the model's input size {model_size} "
                f"(the spec must preprocess frames to {model_size} x {model_size})"
            )
        if isinstance(self.frames, str):
            if self.frames not in FRAME_RULES:
                raise ValueError(f"RewardEntry {self.name!r}: frames must be one of {FRAME_RULES} or a list of ints, got {self.frames!r}")
        else:
            self.frames = self._fixed_frames(self.frames)
        self.num_frames = self._resolve_num_frames()
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight):
            raise ValueError(f"RewardEntry {self.name!r}: weight must be a finite number, got {self.weight!r}")
        self.weight = float(self.weight)
        if self.caption not in CAPTION_KINDS:
            raise ValueError(f"RewardEntry {self.name!r}: caption must be one of {CAPTION_KINDS}, got {self.caption!r}")
        if not isinstance(self.random_crop, bool):
            raise TypeError(f"RewardEntry {self.name!r}: random_crop must be a bool, got {self.random_crop!r}")
        if self.random_crop and not crops_at_random(self.spec):
            raise ValueError(
                f"RewardEntry {self.name!r}: random_crop needs a spec of mode 'crop' without crop_offset, got "
                f"mode {self.spec.mode!r}, crop_offset {self.spec.crop_offset}"
            )

    def _fixed_frames(self, frames) -> tuple[int, ...]:
        if not isinstance(frames, Sequence) or not frames:
            raise ValueError(f"RewardEntry {self.name!r}: frames must be a non-empty list of ints, got {frames!r}")
        if any(isinstance(f, bool) or not isinstance(f, int) or f < 0 for f in frames) or len(set(frames)) != len(frames):
            raise ValueError(f"RewardEntry {self.name!r}: frames must be distinct ints >= 0, got {list(frames)}")
        return tuple(frames)

    def _resolve_num_frames(self) -> int:
        if isinstance(self.frames, tuple):
            count = len(self.frames)
        elif self.num_frames is None:
            count = self.model.num_frames if self.model.kind == "video" else RELEASE_IMAGE_FRAMES
        else:
            count = self.num_frames
        if self.num_frames is not None and self.num_frames != count:
            raise ValueError(f"RewardEntry {self.name!r}: num_frames={self.num_frames} but frames lists {count} frames")
        _check_positive_int(count, f"RewardEntry {self.name!r} num_frames")
        if self.model.kind == "video" and count != self.model.num_frames:
            raise ValueError(
                f"RewardEntry {self.name!r}: the video model scores clips of {self.model.num_frames} frames, "
                f"got num_frames={count}"
            )
        return count

    @property
    def frame_rule(self) -> tuple:
        """Entries with equal rules share one draw a step (the release scores HPS and CLIP on the same frames)."""
        return (self.frames, self.num_frames)


@dataclass
class _Selection:
    clip_frames: int
    per_entry: list[tuple[int, ...]]
    union: list[int] = field(default_factory=list)
    # Random crops are drawn at forward, where the frames' size is known, from the step's generator.
    generator: torch.Generator | None = None


class _Scorer(nn.Module):
    """A reward model's score as its forward, so `functional_call` can swap in stacked weights."""

    def __init__(self, model: RewardModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: Tensor, text_embeddings: Tensor) -> Tensor:
        return self.model.score(pixels, text_embeddings)


def _has_block_checkpoints(model: RewardModel) -> bool:
    """Whether the model checkpoints block by block itself: a `gradient_checkpointing` switch that
    its tower honours (an OpenCLIPReward on a ModifiedResNet has the switch, not the blocks)."""
    return hasattr(model, "gradient_checkpointing") and getattr(model, "supports_block_checkpointing", True)


@contextmanager
def _block_checkpoints(models: Iterable[RewardModel], enabled: bool) -> Iterator[None]:
    """Sets the models' own per-block checkpoint switches (where they have one) for the call and
    restores them after."""
    switched = [model for model in models if _has_block_checkpoints(model)]
    before = [model.gradient_checkpointing for model in switched]
    try:
        for model in switched:
            model.gradient_checkpointing = enabled
        yield
    finally:
        for model, was in zip(switched, before):
            model.gradient_checkpointing = was


def crops_at_random(spec: PreprocessSpec) -> bool:
    """Whether a RewardEntry with `spec` can draw its crop each step: a crop with no fixed offset."""
    return spec.mode == "crop" and spec.crop_offset is None


def _random_crop(spec: PreprocessSpec, height: int, width: int, generator: torch.Generator | None) -> PreprocessSpec:
    """`spec` cropping at (top, left) drawn as torchvision's RandomCrop draws them on the resized
    frame: top = randint(0, h - size + 1), then left = randint(0, w - size + 1). No draw where the
    release makes none: a frame already resized to size x size, or one whose shorter side is
    already `size` (which the release passes on uncropped, and which keeps the spec's centred crop)."""
    resized = preprocess_geometry(spec, height, width).resized
    if min(height, width) == spec.size or resized == (spec.size, spec.size):
        return spec
    top, left = (int(torch.randint(0, side - spec.size + 1, (1,), generator=generator)) for side in resized)
    return replace(spec, crop_offset=(top, left))


def _frames_at(clips: Tensor, positions: list[int]) -> Tensor:
    """clips[:, positions] of (B, k, ...) clips: a view where the positions are consecutive (an
    entry that scores every decoded frame, as the image entries of 16-frame steps do), else a
    copy. The copies had the batched pass hold each such entry's frames twice (H200, 2 clips, bf16:
    a forward's peak 6405 MiB, above the sequential path's 6363)."""
    first = positions[0]
    if positions == list(range(first, first + len(positions))):
        return clips[:, first:first + len(positions)]
    return clips[:, positions]


def _stack_key(entry: RewardEntry) -> tuple:
    """Models run as one stacked forward only when the same code with either's weights is each of
    them: same class, config, kind, settings (plain attributes such as use_logit_scale: the stack
    scores every member through the first one's code) and parameter/buffer names, shapes and
    dtypes; same input size and frame count, so their pixels stack."""
    model = entry.model
    tensors = tuple(
        (name, tuple(t.shape), t.dtype, t.device) for name, t in [*model.named_parameters(), *model.named_buffers()]
    )
    settings = tuple(sorted((k, v) for k, v in vars(model).items() if isinstance(v, (bool, int, float, str))))
    return (
        type(model), repr(getattr(model, "config", None)), model.kind, settings, entry.spec.size, entry.num_frames,
        tensors,
    )


def _linear_on_rows(linear):
    """`linear` (F.linear) with its input flattened to rows first. Under vmap with stacked weights,
    F.linear on an input of three or more dimensions per model (nn.MultiheadAttention's
    in-projection of its (L, N, E) tokens) broadcasts the weight over the leading dimension and
    copies it once a token: with ViT-H towers the batched mixture ran 5x slower than the release's
    model-by-model path on an H100 (2026-11-26), and 16x slower on a CPU with three such layers.
    Rows make it one batched matrix product over the models."""

    def linear_on_rows(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if input.dim() <= 2:
            return linear(input, weight, bias)
        return linear(input.flatten(0, -2), weight, bias).unflatten(0, input.shape[:-1])

    return linear_on_rows


@contextmanager
def _vmappable_forward() -> Iterator[None]:
    """What the stacked forward needs from torch while it runs, as process-wide switches restored on
    exit (no other thread should run torch.nn code meanwhile): nn.MultiheadAttention's eval fast
    path (`_native_multi_head_attention`) has no vmap batching rule and no derivative, so it is
    off; F.linear runs on rows (`_linear_on_rows`; the attribute is replaced, since a torch function
    mode would not reach the calls inside F.multi_head_attention_forward). SDPA may choose only
    the flash and math backends (those of them the caller has not turned off; math if neither):
    the memory-efficient and cuDNN ones keep their backward's logsumexp only when q, k or v
    require grad, which vmap's batched tensors never report, so their backward failed ("LSE is
    not correctly aligned", float32 towers on the H200 lease). Float32 towers on a GPU take the
    math backend then (flash takes 16-bit inputs only), which holds each layer's attention
    probabilities for the backward unless checkpointing is on. functorch warns on every call that
    SDPA's CPU kernel runs per model in a loop (correct, only slower): silenced."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    sdpa_backends = [
        backend for backend, on in (
            (SDPBackend.FLASH_ATTENTION, torch.backends.cuda.flash_sdp_enabled()),
            (SDPBackend.MATH, torch.backends.cuda.math_sdp_enabled()),
        ) if on
    ] or [SDPBackend.MATH]
    linear = F.linear
    torch.backends.mha.set_fastpath_enabled(False)
    F.linear = _linear_on_rows(linear)
    try:
        with warnings.catch_warnings(), sdpa_kernel(sdpa_backends):
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented the batching rule")
            yield
    finally:
        F.linear = linear
        torch.backends.mha.set_fastpath_enabled(enabled)


class RewardMixture(nn.Module):
    """A weighted mixture of frozen reward models scored in one batched, differentiable pass.

    text_cache: keep each (model, caption) text embedding on the CPU and reuse it.
    stack_same_architecture: run entries whose models share architecture and parameter shapes as
    one vmapped forward over stacked weights (the members' parameters become views of the stack,
    so weights are not held twice) when gradients are being recorded; under no_grad the members
    run one after the other, which issues kernels faster. None (the default): stack unless
    gradient_checkpointing is on.
    gradient_checkpointing: recompute activations in the backward pass; per block for models with
    a `gradient_checkpointing` switch, else (and for stacked groups) per model call. Unstacked,
    each added model then costs its inputs and its blocks' inputs, not its activations, so the
    memory the pass holds stays near that of its largest model however many models join; a
    stacked group recomputes all its members at once and holds all their activations.
    Cast the mixture (`.to(torch.bfloat16)`) to run the models in bf16; preprocessing still
    computes in float32 and writes the models' dtype."""

    def __init__(
        self,
        entries: Sequence[RewardEntry],
        text_cache: bool = True,
        stack_same_architecture: bool | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(entries, RewardEntry) or not isinstance(entries, Sequence) or not entries:
            raise ValueError("entries must be a non-empty list of RewardEntry")
        for index, entry in enumerate(entries):
            if not isinstance(entry, RewardEntry):
                raise TypeError(f"entries[{index}] must be a RewardEntry, got {type(entry).__name__}")
        names = [entry.name for entry in entries]
        if len(set(names)) != len(names):
            raise ValueError(f"entries must have distinct names, got {names}")
        self.entries = list(entries)
        unique_models: list[RewardModel] = []
        for entry in self.entries:
            if not any(entry.model is model for model in unique_models):
                unique_models.append(entry.model)
        self.models = nn.ModuleList(model.freeze() for model in unique_models)
        self._model_index = [next(i for i, m in enumerate(unique_models) if m is e.model) for e in self.entries]
        # (spec, random_crop): one preprocessed tensor each, in this order.
        self._preprocessing = list(dict.fromkeys((entry.spec, entry.random_crop) for entry in self.entries))
        self.text_cache = bool(text_cache)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        if stack_same_architecture is None:
            stack_same_architecture = not self.gradient_checkpointing
        self.stack_same_architecture = bool(stack_same_architecture)
        self.groups = self._group_entries(self.stack_same_architecture)
        self._stacked: dict[tuple[int, ...], tuple[dict[str, Tensor], dict[str, Tensor]]] = {}
        self._text: dict[tuple[int, str], Tensor] = {}
        self._cache_hits = 0
        self._cache_misses = 0
        self._selection: _Selection | None = None
        # A t2v_turbo.cuda_graphs.GraphedCall of each model's score, while enable_cuda_graphs holds.
        self._graphs: dict[int, GraphedCall] | None = None

    def enable_cuda_graphs(self) -> RewardMixture:
        """Scores without autograd (evaluation, best-of-n selection) through CUDA graphs of each
        model's call from now on (t2v_turbo.cuda_graphs): the first call of a shape warms up, the
        second captures, later ones replay without the host issuing the towers' kernels one by
        one (the 2-clip forward was bound by that: H100, 118 ms for 2 clips, 131 ms for 8). Calls
        with gradients (training) or under CUDA autocast (cast the mixture instead) run as before.
        The graphs keep their memory until `disable_cuda_graphs`."""
        self._graphs = {}
        return self

    def disable_cuda_graphs(self) -> RewardMixture:
        self._graphs = None
        return self

    @property
    def cuda_graphs(self) -> bool:
        return self._graphs is not None

    def _group_entries(self, stack: bool) -> list[tuple[int, ...]]:
        """Entry indices, grouped: a group of several runs as one stacked forward."""
        groups: dict[tuple, list[int]] = {}
        for index, entry in enumerate(self.entries):
            model_ids = [id(self.entries[i].model) for i in groups.get(_stack_key(entry), [])]
            if stack and id(entry.model) not in model_ids:
                groups.setdefault(_stack_key(entry), []).append(index)
            else:
                groups[("alone", index)] = [index]
        return [tuple(group) for group in groups.values()]

    def subset(self, kinds: Sequence[str]) -> RewardMixture | None:
        """The entries whose model kind ("image", "video") is in `kinds`, as a mixture with this
        one's options and models (this mixture itself when that is all of them); None when none is."""
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"kinds must be among {KINDS}, got {sorted(unknown)}")
        entries = [entry for entry in self.entries if entry.model.kind in kinds]
        if len(entries) == len(self.entries):
            return self
        if not entries:
            return None
        return RewardMixture(
            entries, text_cache=self.text_cache, stack_same_architecture=self.stack_same_architecture,
            gradient_checkpointing=self.gradient_checkpointing,
        )

    def free_stacked_weights(self) -> None:
        """Drops this mixture's stacked copies of its groups' weights (rebuilt on next use).
        Mixtures that share models each stack them; the models' parameters are views of the
        latest stack, so an earlier mixture's stack is memory nothing else uses."""
        self._stacked.clear()

    def _apply(self, fn, recurse=True):
        # Moving or casting the models invalidates the stacked weights; they are rebuilt on use.
        self._stacked.clear()
        return super()._apply(fn, recurse)

    # ---- frame selection -------------------------------------------------------------------------

    def select_frames(self, num_frames: int, generator: torch.Generator | None = None) -> list[int]:
        """Draws this step's frames of a `num_frames`-frame clip for every entry (entries with the
        same rule share a draw; random draws use `generator`) and returns their sorted union, the
        frames to decode. `forward` then scores exactly these selections."""
        _check_positive_int(num_frames, "num_frames")
        draws: dict[tuple, tuple[int, ...]] = {}
        for entry in self.entries:
            if entry.frame_rule not in draws:
                draws[entry.frame_rule] = self._draw(entry, num_frames, generator)
        per_entry = [draws[entry.frame_rule] for entry in self.entries]
        union = sorted(set().union(*per_entry))
        self._selection = _Selection(num_frames, per_entry, union, generator)
        return list(union)

    @property
    def entry_frames(self) -> dict[str, tuple[int, ...]]:
        """The frames each entry scores this step (the last select_frames); empty before the first."""
        if self._selection is None:
            return {}
        return {entry.name: frames for entry, frames in zip(self.entries, self._selection.per_entry)}

    @staticmethod
    def _draw(entry: RewardEntry, clip_frames: int, generator: torch.Generator | None) -> tuple[int, ...]:
        count = entry.num_frames
        if isinstance(entry.frames, tuple):
            if max(entry.frames) >= clip_frames:
                raise ValueError(f"num_frames={clip_frames} is too short for entry {entry.name!r}'s frames {list(entry.frames)}")
            return entry.frames
        if count > clip_frames:
            raise ValueError(f"num_frames={clip_frames} is fewer than the {count} frames entry {entry.name!r} scores")
        if entry.frames == "random":
            return tuple(sorted(torch.randperm(clip_frames, generator=generator)[:count].tolist()))
        stride = clip_frames // count
        start = int(torch.randint(0, stride, (1,), generator=generator))
        return tuple(start + stride * i for i in range(count))

    # ---- text embeddings -------------------------------------------------------------------------

    def _text_embeddings(self, model_index: int, captions: Sequence[str], device: torch.device) -> Tensor:
        """(len(captions), D) for one model; computed for the missing captions only, in one call."""
        model = self.models[model_index]
        if not self.text_cache:
            self._cache_misses += len(captions)
            return model.embed_text(list(captions)).detach().to(device)
        missing = list(dict.fromkeys(c for c in captions if (model_index, c) not in self._text))
        self._cache_hits += len(captions) - len([c for c in captions if c in missing])
        self._cache_misses += len([c for c in captions if c in missing])
        if missing:
            embedded = model.embed_text(missing).detach().cpu()
            for caption, row in zip(missing, embedded):
                self._text[(model_index, caption)] = row
        # Kept on the host, read from the host: the copy waits for nothing queued on the device.
        return torch.stack([self._text[(model_index, c)] for c in captions]).to(device, non_blocking=True)

    def cache_info(self) -> dict[str, int]:
        """hits and misses (one a caption looked up) and the number of cached embeddings."""
        return {"hits": self._cache_hits, "misses": self._cache_misses, "size": len(self._text)}

    def clear_text_cache(self) -> None:
        self._text.clear()

    # ---- forward ---------------------------------------------------------------------------------

    def _check_inputs(self, frames, frame_indices, captions, short_captions) -> _Selection:
        _check_floating_tensor(frames, "frames")
        if frames.dim() != 5 or frames.shape[1] != 3:
            raise ValueError(f"frames must be (B, 3, k, H, W) decoded RGB frames, got shape {tuple(frames.shape)}")
        batch = frames.shape[0]
        if isinstance(frame_indices, Tensor):
            frame_indices = frame_indices.tolist()
        if not isinstance(frame_indices, Sequence) or any(isinstance(i, bool) or not isinstance(i, int) for i in frame_indices):
            raise TypeError(f"frame_indices must be a list of ints, got {frame_indices!r}")
        if len(frame_indices) != frames.shape[2]:
            raise ValueError(f"frame_indices lists {len(frame_indices)} frames but frames holds k={frames.shape[2]}")
        if any(b <= a for a, b in itertools.pairwise(frame_indices)):
            raise ValueError(f"frame_indices must be sorted and distinct, got {list(frame_indices)}")
        selection = self._selection
        if selection is None:
            raise RuntimeError("no frames selected: call select_frames(num_frames) for this step before forward")
        if frame_indices and (frame_indices[0] < 0 or frame_indices[-1] >= selection.clip_frames):
            raise ValueError(f"frame_indices {list(frame_indices)} out of range [0, {selection.clip_frames}) of the selected clip")
        missing = sorted(set(selection.union) - set(frame_indices))
        if missing:
            raise ValueError(f"frame_indices lacks the selected frames {missing} (select_frames chose {selection.union})")
        for name, texts in (("captions", captions), ("short_captions", short_captions)):
            if texts is None and name == "short_captions":
                continue
            if isinstance(texts, str) or not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
                raise TypeError(f"{name} must be a list of strings")
            if len(texts) != batch:
                raise ValueError(f"{name} holds {len(texts)} prompts for {batch} clips")
        if reads_values(frames) and frames.numel():
            low, high = torch.stack(torch.aminmax(frames.detach())).float().tolist()  # NaN propagates
            if not (math.isfinite(low) and math.isfinite(high)):
                raise ValueError("frames holds NaN or infinite values")
            if low < -FRAME_RANGE_SLACK or high > 1 + FRAME_RANGE_SLACK:
                raise ValueError(
                    f"frames must lie in [0, 1] (decoded frames as (x / 2 + 0.5).clamp(0, 1)), got values in "
                    f"[{low:.4g}, {high:.4g}]"
                )
        return selection

    def forward(
        self,
        frames: Tensor,
        frame_indices: Sequence[int],
        captions: Sequence[str],
        short_captions: Sequence[str] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """frames (B, 3, k, H, W) in [0, 1]: the clips' frames `frame_indices` (sorted, a superset
        of the last select_frames). captions / short_captions: one a clip (short_captions default to
        captions). Returns (sum of weight * mean over clips of each entry's score, a float32 scalar;
        {entry name: (B,) float32 per-clip scores}), differentiable with respect to `frames`."""
        selection = self._check_inputs(frames, frame_indices, captions, short_captions)
        frame_indices = [int(i) for i in frame_indices]
        batch = frames.shape[0]
        model_dtypes = {p.dtype for p in self.models.parameters()}
        out_dtype = model_dtypes.pop() if len(model_dtypes) == 1 else None
        specs = [
            _random_crop(spec, *frames.shape[-2:], selection.generator) if random_crop else spec
            for spec, random_crop in self._preprocessing
        ]
        preprocessed = reward_preprocess(frames.transpose(1, 2), specs, out_dtype=out_dtype)
        position = {frame: i for i, frame in enumerate(frame_indices)}

        def entry_inputs(index: int) -> tuple[Tensor, Tensor]:
            entry = self.entries[index]
            spec_index = self._preprocessing.index((entry.spec, entry.random_crop))
            pixels = _frames_at(preprocessed[spec_index], [position[f] for f in selection.per_entry[index]])
            texts = short_captions if entry.caption == "short" and short_captions is not None else captions
            text = self._text_embeddings(self._model_index[index], texts, frames.device)
            if entry.model.kind == "image":
                return pixels.reshape(-1, *pixels.shape[2:]), text.repeat_interleave(entry.num_frames, dim=0)
            return pixels, text

        row_scores: dict[int, Tensor] = {}
        # Set for this pass only, so a model shared by mixtures follows the mixture that runs it.
        with _block_checkpoints(self.models, self.gradient_checkpointing):
            for group in list(self.groups):
                inputs = [entry_inputs(index) for index in group]
                row_scores.update(zip(group, self._score_group(group, inputs)))

        scores: dict[str, Tensor] = {}
        total = frames.new_zeros((), dtype=torch.float32)
        for index, entry in enumerate(self.entries):
            per_clip = row_scores[index].float().reshape(batch, -1).mean(dim=1)
            scores[entry.name] = per_clip
            total = total + entry.weight * per_clip.mean()
        return total, scores

    def _score_group(self, group: tuple[int, ...], inputs: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
        # Without autograd, a stacked group runs its members one after the other: the forward of a
        # few clips is bound by issuing kernels (H100: 118 ms for 2 clips, 131 ms for 8), and vmap
        # issues each op at a higher host cost (one CPU core, 32-layer towers, 2 images each: one
        # stacked call of two models 44.5 ms, the two plain calls 28.5 ms). With autograd recording
        # both cost the same there (89 and 93 ms) and the stacked pass launches half the kernels.
        if len(group) > 1 and torch.is_grad_enabled():
            try:
                return list(self._stacked_scores(group, inputs).unbind(0))
            except RuntimeError as error:
                names = [self.entries[i].name for i in group]
                warnings.warn(
                    f"reward models {names} cannot run as one stacked forward ({error}); running them one "
                    "after the other from now on",
                    RuntimeWarning,
                    stacklevel=3,
                )
                position = self.groups.index(group)
                self.groups[position:position + 1] = [(i,) for i in group]
                self._stacked.pop(group, None)
        return [self._single_scores(self.entries[index].model, *inputs[k]) for k, index in enumerate(group)]

    def _single_scores(self, model: RewardModel, pixels: Tensor, text: Tensor) -> Tensor:
        if self.gradient_checkpointing and not _has_block_checkpoints(model) and torch.is_grad_enabled():
            return checkpoint(model.score, pixels, text, use_reentrant=False)
        if self._graphs is not None:
            # GraphedCall itself runs calls with gradients eagerly.
            graphed = self._graphs.get(id(model))
            if graphed is None:
                graphed = self._graphs[id(model)] = GraphedCall(model.score, [model])
            return graphed(pixels, text)
        return model.score(pixels, text)

    def _stacked_scores(self, group: tuple[int, ...], inputs: list[tuple[Tensor, Tensor]]) -> Tensor:
        params, buffers = self._stacked_state(group)
        scorer = _Scorer(self.entries[group[0]].model)
        pixels = torch.stack([p for p, _ in inputs])
        text = torch.stack([t for _, t in inputs])

        def one_model(model_params, model_buffers, model_pixels, model_text):
            return functional_call(scorer, (model_params, model_buffers), (model_pixels, model_text))

        template = self.entries[group[0]].model

        def all_models(*args):
            # Entered here, not around the checkpoint, so that its recomputation (in the backward
            # pass, after forward has restored the switches) runs the same way. Block-wise
            # checkpoints cannot run inside vmap: a stacked group checkpoints as a whole.
            with _vmappable_forward(), _block_checkpoints([template], False):
                return vmap(one_model)(*args)

        if self.gradient_checkpointing and torch.is_grad_enabled():
            # Block-wise checkpoints cannot run inside vmap: recompute the whole stacked call.
            return checkpoint(all_models, params, buffers, pixels, text, use_reentrant=False)
        return all_models(params, buffers, pixels, text)

    def _stacked_state(self, group: tuple[int, ...]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The group's parameters and buffers stacked on a leading model axis, keyed as `_Scorer`'s.
        Each member's parameters are then rebound to views of the stack, so the weights are held
        once; built on first use and after every move or cast."""
        if group not in self._stacked:
            models = [self.entries[index].model for index in group]
            member_params = [dict(m.named_parameters()) for m in models]
            member_buffers = [dict(m.named_buffers()) for m in models]
            params = {}
            with torch.no_grad():
                # One parameter at a time, rebound at once: each member's own copy is freed before
                # the next is stacked, so building the stack never holds the weights twice.
                for name in member_params[0]:
                    stacked = torch.stack([named[name] for named in member_params])
                    for position, named in enumerate(member_params):
                        named[name].data = stacked[position]
                    params[f"model.{name}"] = stacked
                buffers = {
                    f"model.{name}": torch.stack([named[name] for named in member_buffers])
                    for name in member_buffers[0]
                }
            self._stacked[group] = (params, buffers)
        return self._stacked[group]


def default_mixture(
    hps: RewardModel | None,
    clip: RewardModel | None,
    video: RewardModel | None,
    hps_spec: PreprocessSpec | None = None,
    clip_spec: PreprocessSpec | None = None,
    video_spec: PreprocessSpec | None = None,
    image_weight: float = RELEASE_IMAGE_WEIGHT,
    video_weight: float = RELEASE_VIDEO_WEIGHT,
    hps_weight: float = 1.0,
    clip_weight: float = 1.0,
    image_frames: int = RELEASE_IMAGE_FRAMES,
    video_random_crop: bool = True,
    **mixture_options,
) -> RewardMixture:
    """The release's reward objective as one mixture: HPSv2.1 and CLIP on `image_frames` random
    frames with the short caption, weighted image_weight * (hps_weight, clip_weight); the video
    model on its own frame count strided over the clip with the dense caption, weighted
    video_weight (defaults: the release-equivalent effective weights, SPEC 3.7), its crop drawn
    at random each step as the release's RandomCrop draws it (video_random_crop, where the video
    spec crops; False: centred). Specs default to the release's pipelines at 224 px; any model may
    be None to leave it out."""
    entries = []
    if hps is not None:
        entries.append(RewardEntry("hpsv2", hps, hps_spec or image_text.hpsv2_spec(), "random", image_frames,
                                   image_weight * hps_weight, "short"))
    if clip is not None:
        entries.append(RewardEntry("clip", clip, clip_spec or image_text.clip_spec(), "random", image_frames,
                                   image_weight * clip_weight, "short"))
    if video is not None:
        video_spec = video_spec or image_text.video_spec()
        random_crop = video_random_crop and crops_at_random(video_spec)
        entries.append(RewardEntry("video", video, video_spec, "strided", None, video_weight, "dense", random_crop))
    if not entries:
        raise ValueError("default_mixture needs at least one of hps, clip, video")
    return RewardMixture(entries, **mixture_options)
