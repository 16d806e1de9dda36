"""End-to-end benchmark of the reward pass (issue 5): HPSv2.1 + CLIP-H (two OpenCLIP ViT-H-14) and
the InternVideo2-stage2 video model at real sizes with random weights, scoring decoded 16-frame
320x512 clips, the release's frame selection (2 random frames for each image model, 4 strided
frames for the video model).

- `reward_mixture` rows: `sequential` is the release's path (each model, each clip, one after the
  other, its own preprocessing by the release's ops); `batched` is RewardMixture (one fused
  preprocessing, every clip in one call a model, HPS and CLIP stacked). Both score the same
  selected frames against cached text embeddings (the text towers run once a prompt, outside the
  loop), forward and forward+backward (gradients to the frames). `flops` counts the towers'
  matmul and attention FLOPs (torch.utils.flop_counter on the meta device), so rows carry TFLOP/s.
- `bf16_matmul`: one large square matmul, the measured matrix rate the summary divides by.
- `reward_mixture_growth` rows: forward+backward of mixtures of 1, 2 and 4 image models (the
  HPSv2.1 architecture and preprocessing, distinct random weights) plus the video model on 2 clips,
  with `working_mem_mb`, the memory a call holds beyond the models and inputs (on any device):
  `batched` (stacked, no checkpointing), `checkpointed` (gradient_checkpointing, models one after
  the other with per-block checkpoints, the default with checkpointing on) and
  `stacked+checkpointed` (the stacked forward checkpointed as a whole). Issue 5 asks that memory stay
  bounded as the mixture grows; `summary` calls it bounded when each added model costs the
  checkpointed pass under a quarter of what it costs the batched one.

Images a clip: 2 + 2 + 4 = 8; `summary` turns rows into images/s, the 2x target and % of the
matrix rate. Run alone: `python -m benchmarks.rewards --warmup 2 --iters 10`.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import models
from benchmarks.harness import Case, Impl, SuiteOptions

SEQUENTIAL = "sequential"
BATCHED = "batched"
# The batched mixture scoring through CUDA graphs of its towers (RewardMixture.enable_cuda_graphs):
# forward only, as graphs replay no autograd.
BATCHED_GRAPHS = "batched-graphs"
MATMUL_OP = "bf16_matmul"
MATMUL_SIZE = 8192
QUICK_MATMUL_SIZE = 64
OP = "reward_mixture"
GPU_CLIPS = (2, 4, 8, 16)
QUICK_CLIPS = (2,)
IMAGE_FRAMES = 2
CAPTION = "a stand-in caption"
GROWTH_OP = "reward_mixture_growth"
GROWTH_IMAGE_MODELS = (1, 2, 4)
GROWTH_CLIPS = 2
CHECKPOINTED = "checkpointed"
STACKED_CHECKPOINTED = "stacked+checkpointed"
# Growth a model of the checkpointed pass, as a share of the batched pass's, called bounded.
BOUNDED_SHARE = 0.25
GROWTH_IMPLS = {
    BATCHED: {"gradient_checkpointing": False},
    CHECKPOINTED: {"gradient_checkpointing": True},
    STACKED_CHECKPOINTED: {"gradient_checkpointing": True, "stack_same_architecture": True},
}


@dataclass(frozen=True)
class RewardScale:
    clip_architecture: Any  # an open_clip model name or config dict
    video_preset: str
    clip_frames: int
    height: int
    width: int

    @property
    def video(self) -> str:
        return f"{self.clip_frames}x{self.height}x{self.width}"


TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
FULL = RewardScale("ViT-H-14", "stage2-1b", 16, 320, 512)
TINY = RewardScale(TINY_CLIP, "tiny", 8, 40, 64)


def _import_error(import_names: Callable[[], Any]) -> Optional[str]:
    try:
        import_names()
    except ImportError as error:
        return f"{error.name or 'a module'} not available: {error}"
    return None


def _import_towers():
    from t2v_turbo.rewards.image_text import OpenCLIPReward  # noqa: F401
    from t2v_turbo.rewards.internvideo2 import InternVideo2Reward  # noqa: F401


def _import_mixture():
    from t2v_turbo.rewards.mixture import default_mixture  # noqa: F401


def towers_unavailable() -> Optional[str]:
    """Why the reward towers cannot be built (a module of t2v_turbo.rewards missing), or None."""
    return _import_error(_import_towers)


def mixture_unavailable() -> Optional[str]:
    return _import_error(_import_mixture)


def _video_reward_class():
    from t2v_turbo.rewards.internvideo2 import InternVideo2Reward

    class VideoRewardWithoutTokenizer(InternVideo2Reward):
        """InternVideo2 whose caption embeddings are seeded random unit rows, one per caption
        (seeded by the caption, so a caption embeds alike alone or in any batch, as a text tower
        would: the sequential path and the mixture's cache then score against the same rows):
        there is no tokenizer vocabulary offline, and text embeddings are computed once a prompt,
        outside the timing."""

        def embed_text(self, text: Sequence[str], attention_mask: Optional[Tensor] = None, normalize: bool = True) -> Tensor:
            rows = torch.stack([
                torch.randn(self.config.embed_dim, generator=torch.Generator().manual_seed(zlib.crc32(caption.encode())))
                for caption in text
            ])
            return (rows / rows.norm(dim=-1, keepdim=True)).to(self.text_proj.weight)

    return VideoRewardWithoutTokenizer


def tower_factories(scale: RewardScale) -> tuple[Callable[[], nn.Module], Callable[[], nn.Module]]:
    """Factories of one image model (OpenCLIPReward) and the video model (InternVideo2Reward)."""
    from t2v_turbo.rewards.image_text import OpenCLIPReward
    from t2v_turbo.rewards.internvideo2 import InternVideo2Config

    image = functools.partial(OpenCLIPReward, scale.clip_architecture)
    video = functools.partial(_video_reward_class(), InternVideo2Config.preset(scale.video_preset))
    return image, video


def build_mixture(scale: RewardScale, device: torch.device, dtype: torch.dtype, seed: int, gradient_checkpointing: bool = False):
    """The release's mixture (default_mixture: HPSv2.1, CLIP-H, InternVideo2) of random towers,
    the video crop centred: the sequential path crops as the entries' specs do, so both compute
    the same numbers."""
    from t2v_turbo.rewards import image_text
    from t2v_turbo.rewards.mixture import default_mixture

    image, video = tower_factories(scale)
    hps, clip = (models.build(image, device, dtype, seed + i).freeze() for i in range(2))
    video_model = models.build(video, device, dtype, seed + 2)
    image_size, video_size = hps.image_size, video_model.config.image_size
    return default_mixture(
        hps, clip, video_model, hps_spec=image_text.hpsv2_spec(image_size), clip_spec=image_text.clip_spec(image_size),
        video_spec=image_text.video_spec(video_size), video_random_crop=False, gradient_checkpointing=gradient_checkpointing,
    ).to(device=device, dtype=dtype)


# ---- FLOPs ---------------------------------------------------------------------------------------


def _counted_flops(model: nn.Module, pixels_shape: tuple[int, ...], with_grad: bool) -> int:
    pixels = torch.empty(pixels_shape, device="meta", requires_grad=with_grad)
    with FlopCounterMode(display=False) as counter:
        embedding = model.embed_visual(pixels)
        if with_grad:
            embedding.sum().backward()
    return counter.get_total_flops()


@functools.lru_cache(maxsize=None)
def tower_flops(tiny: bool, with_grad: bool) -> tuple[int, int]:
    """FLOPs of one image through an image tower and of one clip through the video tower
    (backward: to the pixels only, the towers are frozen), counted on the meta device."""
    scale = TINY if tiny else FULL
    image, video = tower_factories(scale)
    with torch.device("meta"):
        image_model, video_model = image().freeze(), video()
    size, video_config = image_model.image_size, video_model.config
    video_shape = (1, video_config.num_frames, 3, video_config.image_size, video_config.image_size)
    return (
        _counted_flops(image_model, (1, 3, size, size), with_grad),
        _counted_flops(video_model, video_shape, with_grad),
    )


def mixture_flops(tiny: bool, with_grad: bool, clips: int) -> int:
    """FLOPs of the mixture on `clips` clips: two image towers on IMAGE_FRAMES frames each, and
    the video tower once a clip."""
    image_flops, video_flops = tower_flops(tiny, with_grad)
    return clips * (2 * IMAGE_FRAMES * image_flops + video_flops)


def images_per_clip(video_frames: int) -> int:
    return 2 * IMAGE_FRAMES + video_frames


# ---- the two paths ---------------------------------------------------------------------------------


def _inputs(clips: int, scale: RewardScale, options: SuiteOptions, with_grad: bool) -> Callable[[], SimpleNamespace]:
    def make_inputs() -> SimpleNamespace:
        device = options.device
        mixture = build_mixture(scale, device, options.dtype, options.seed)
        generator = torch.Generator().manual_seed(options.seed)
        frame_indices = mixture.select_frames(scale.clip_frames, generator)
        frames = torch.rand(clips, 3, len(frame_indices), scale.height, scale.width, device=device, dtype=options.dtype)
        captions = [CAPTION] * clips
        # Text embeddings are cached per prompt: computed here, outside the timing, for both paths.
        text = [entry.model.embed_text(captions).to(device) for entry in mixture.entries]
        return SimpleNamespace(
            mixture=mixture, frames=frames.requires_grad_(with_grad), frame_indices=frame_indices,
            captions=captions, text=text, with_grad=with_grad,
        )

    return make_inputs


def sequential_rewards(x: SimpleNamespace) -> Tensor:
    """The release's path: for each model, for each clip, its preprocessing (the release's ops) and
    one model call; the same weighted total as the mixture."""
    from turbo_kernels.reference.preprocess import release_pipeline

    position = {frame: i for i, frame in enumerate(x.frame_indices)}
    total = x.frames.new_zeros((), dtype=torch.float32)
    for entry, text in zip(x.mixture.entries, x.text):
        selected = [position[f] for f in x.mixture.entry_frames[entry.name]]
        per_clip = []
        for clip in range(x.frames.shape[0]):
            clip_frames = x.frames[clip:clip + 1, :, selected].transpose(1, 2)
            pixels = release_pipeline(clip_frames, entry.spec).to(entry.model.dtype)
            if entry.model.kind == "image":
                scores = entry.model.score(pixels[0], text[clip:clip + 1].expand(len(selected), -1))
            else:
                scores = entry.model.score(pixels, text[clip:clip + 1])
            per_clip.append(scores.float().mean())
        total = total + entry.weight * torch.stack(per_clip).mean()
    return total


def batched_rewards(x: SimpleNamespace) -> Tensor:
    x.mixture.disable_cuda_graphs()
    total, _ = x.mixture(x.frames, x.frame_indices, x.captions)
    return total


def graphed_rewards(x: SimpleNamespace) -> Tensor:
    if not x.mixture.cuda_graphs:
        x.mixture.enable_cuda_graphs()
    total, _ = x.mixture(x.frames, x.frame_indices, x.captions)
    return total


def _timed(forward: Callable[[SimpleNamespace], Tensor]) -> Callable[[SimpleNamespace], Any]:
    def call(x: SimpleNamespace):
        if not x.with_grad:
            with torch.no_grad():
                return forward(x)
        return torch.autograd.grad(forward(x), x.frames)

    return call


def _growth_inputs(image_models: int, scale: RewardScale, options: SuiteOptions) -> Callable[[], SimpleNamespace]:
    """`image_models` image towers (HPSv2.1's architecture and preprocessing, distinct weights)
    and the video tower, shared by one mixture per implementation (GROWTH_IMPLS)."""

    def make_inputs() -> SimpleNamespace:
        from t2v_turbo.rewards import image_text
        from t2v_turbo.rewards.mixture import RELEASE_IMAGE_WEIGHT, RELEASE_VIDEO_WEIGHT, RewardEntry, RewardMixture

        device, dtype = options.device, options.dtype
        image, video = tower_factories(scale)
        towers = [models.build(image, device, dtype, options.seed + i).freeze() for i in range(image_models)]
        video_model = models.build(video, device, dtype, options.seed + image_models)
        entries = [
            RewardEntry(f"image{i}", tower, image_text.hpsv2_spec(tower.image_size), "random", IMAGE_FRAMES,
                        RELEASE_IMAGE_WEIGHT, "short")
            for i, tower in enumerate(towers)
        ] + [
            RewardEntry("video", video_model, image_text.video_spec(video_model.config.image_size), "strided", None,
                        RELEASE_VIDEO_WEIGHT, "dense"),
        ]
        mixtures = {name: RewardMixture(entries, **settings).to(device=device, dtype=dtype)
                    for name, settings in GROWTH_IMPLS.items()}
        # Each mixture scores its own last draw; all draw the same frames (one rule for all image
        # entries, one for the video).
        for mixture in mixtures.values():
            frame_indices = mixture.select_frames(scale.clip_frames, torch.Generator().manual_seed(options.seed))
        frames = torch.rand(GROWTH_CLIPS, 3, len(frame_indices), scale.height, scale.width, device=device, dtype=dtype)
        return SimpleNamespace(
            mixtures=mixtures, frames=frames.requires_grad_(), frame_indices=frame_indices,
            captions=[CAPTION] * GROWTH_CLIPS,
        )

    return make_inputs


def _growth_call(impl: str) -> Callable[[SimpleNamespace], Any]:
    def call(x: SimpleNamespace):
        # The mixtures share their towers: a stack another one built and holds would count in
        # this one's peak memory.
        for name, mixture in x.mixtures.items():
            if name != impl:
                mixture.free_stacked_weights()
        total, _ = x.mixtures[impl](x.frames, x.frame_indices, x.captions)
        return torch.autograd.grad(total, x.frames)

    return call


def _matmul_inputs(size: int, options: SuiteOptions) -> Callable[[], tuple[Tensor, Tensor]]:
    def make_inputs() -> tuple[Tensor, Tensor]:
        generator = torch.Generator(device=options.device).manual_seed(options.seed)
        return tuple(
            torch.randn(size, size, generator=generator, device=options.device, dtype=torch.bfloat16) for _ in range(2)
        )

    return make_inputs


def cases(options: SuiteOptions) -> Iterator[Case]:
    """The measured bf16 matrix rate, then the reward pass on 2..16 clips, sequential vs batched,
    forward and forward+backward."""
    size = QUICK_MATMUL_SIZE if options.quick else MATMUL_SIZE
    yield Case(
        op=MATMUL_OP, case=f"{size}x{size}x{size}", pass_name="fwd", make_inputs=_matmul_inputs(size, options),
        impls=(Impl("torch", lambda ab: ab[0] @ ab[1], unavailable=models.full_size_unavailable(options)),),
        bytes_moved=3 * size * size * 2, dtype=torch.bfloat16,
        shape=(size, size), flops=2 * size**3,
    )
    scale = TINY if options.quick else FULL
    size_reason = models.full_size_unavailable(options)
    towers_reason = towers_unavailable()
    mixture_reason = mixture_unavailable()
    video_frames = 4
    if towers_reason is None:
        from t2v_turbo.rewards.internvideo2 import InternVideo2Config

        video_frames = InternVideo2Config.preset(scale.video_preset).num_frames
    element_size = torch.empty((), dtype=options.dtype).element_size()
    for pass_name in ("fwd", "fwd+bwd"):
        with_grad = pass_name == "fwd+bwd"
        countable = towers_reason is None and mixture_reason is None
        for clips in options.batch_sizes or (QUICK_CLIPS if options.quick else GPU_CLIPS):
            frames = clips * images_per_clip(video_frames)  # images scored a call
            yield Case(
                op=OP,
                case=f"c{clips}-img{frames}-{scale.video}",
                pass_name=pass_name,
                make_inputs=_inputs(clips, scale, options, with_grad),
                impls=(
                    Impl(SEQUENTIAL, _timed(sequential_rewards), unavailable=size_reason or towers_reason or mixture_reason),
                    Impl(BATCHED, _timed(batched_rewards), unavailable=size_reason or towers_reason or mixture_reason),
                    Impl(
                        BATCHED_GRAPHS, _timed(graphed_rewards),
                        unavailable=size_reason or towers_reason or mixture_reason or (
                            "CUDA graphs replay the forward only" if with_grad
                            else "CUDA graphs need a GPU" if options.device.type != "cuda" else None
                        ),
                    ),
                ),
                # Each selected frame read once (the backward writes its gradient).
                bytes_moved=(2 if with_grad else 1) * frames * 3 * scale.height * scale.width * element_size,
                dtype=options.dtype,
                shape=(clips, 3, scale.clip_frames, scale.height, scale.width),
                flops=functools.partial(mixture_flops, options.quick, with_grad, clips) if countable else None,
                rotate_inputs=False,
            )
    unavailable = size_reason or towers_reason or mixture_reason
    for image_models in GROWTH_IMAGE_MODELS:
        frames = GROWTH_CLIPS * (image_models * IMAGE_FRAMES + video_frames)
        yield Case(
            op=GROWTH_OP,
            case=f"m{image_models}-c{GROWTH_CLIPS}-{scale.video}",
            pass_name="fwd+bwd",
            make_inputs=_growth_inputs(image_models, scale, options),
            impls=tuple(Impl(name, _growth_call(name), unavailable=unavailable) for name in GROWTH_IMPLS),
            bytes_moved=2 * frames * 3 * scale.height * scale.width * element_size,
            dtype=options.dtype,
            shape=(GROWTH_CLIPS, 3, scale.clip_frames, scale.height, scale.width),
            rotate_inputs=False,
            measure_working_memory=True,
        )


# ---- targets -------------------------------------------------------------------------------------


def summary(result: dict) -> list[str]:
    """images/s of both paths, the 2x target and memory target of issue 5, and % of the measured
    bf16 matrix rate the towers reach in the batched path."""
    matmul = [row["tflops"] for row in result["rows"] if row["op"] == MATMUL_OP]
    if not matmul and result.get("matmul_tflops") and result.get("settings", {}).get("dtype") == "bfloat16":
        matmul = [result["matmul_tflops"]]  # the run's own ceiling, where the bf16_matmul op did not run
    lines = []
    for pass_name in ("fwd", "fwd+bwd"):
        rows = {(r["case"], r["impl"]): r for r in result["rows"] if r["op"] == OP and r["pass"] == pass_name}
        for case in dict.fromkeys(c for c, _ in rows):
            images = int(case.split("-")[1].removeprefix("img"))
            label = f"{OP} {case} {pass_name}"
            lines.append(models.speedup_line(label, rows, case, BATCHED, SEQUENTIAL, 2.0))
            lines.append(models.memory_line(f"{label} peak memory", rows, case, BATCHED, SEQUENTIAL))
            graphs = rows.get((case, BATCHED_GRAPHS))
            if graphs is not None:
                # By latency from an idle GPU: the device time, behind the harness's spin kernel,
                # hides the host's issue time that graphs remove.
                ratios = ", ".join(
                    f"{models.wall_or_median(rows[(case, impl)]) / models.wall_or_median(graphs):.2f}x {impl}"
                    for impl in (SEQUENTIAL, BATCHED) if (case, impl) in rows
                )
                lines.append(f"info  {label}: {BATCHED_GRAPHS} (wall_ms) {ratios}")
            for impl in (SEQUENTIAL, BATCHED, BATCHED_GRAPHS):
                row = rows.get((case, impl))
                if row is None:
                    continue
                share = (
                    f"{100 * row['tflops'] / matmul[0]:.1f}% of the measured bf16 matrix rate"
                    if matmul and row["tflops"] is not None else "matrix rate not measured"
                )
                lines.append(f"info  {label} {impl}: {1e3 * images / row['median_ms']:.1f} images/s, {share}")
    return lines + growth_summary(result)


def growth_summary(result: dict) -> list[str]:
    """Working memory and time of each growth impl as image models join, and whether the
    checkpointed pass stays bounded (each added model costs under BOUNDED_SHARE of what it costs
    the batched pass)."""
    rows = {}
    for row in result["rows"]:
        if row["op"] == GROWTH_OP and row.get("working_mem_mb") is not None:
            rows[int(row["case"].split("-")[0].removeprefix("m")), row["impl"]] = row
    counts = sorted({count for count, _ in rows})
    lines = []
    per_model = {}
    for impl in GROWTH_IMPLS:
        measured = [count for count in counts if (count, impl) in rows]
        if not measured:
            continue
        shown = ", ".join(
            f"{count}: {rows[count, impl]['working_mem_mb']:.1f} MiB {rows[count, impl]['median_ms']:.1f} ms"
            for count in measured
        )
        if len(measured) > 1:
            first, last = measured[0], measured[-1]
            per_model[impl] = (rows[last, impl]["working_mem_mb"] - rows[first, impl]["working_mem_mb"]) / (last - first)
            shown += f"; {per_model[impl]:+.1f} MiB an added image model"
        lines.append(f"info  {GROWTH_OP} {impl} (image models: working memory, time): {shown}")
    label = f"{GROWTH_OP} memory bounded (checkpointed)"
    if CHECKPOINTED not in per_model or BATCHED not in per_model:
        lines.append(f"n/a   {label}: needs working_mem_mb of {CHECKPOINTED} and {BATCHED} at two mixture sizes")
    elif per_model[BATCHED] <= 0:
        lines.append(f"n/a   {label}: the batched pass did not grow ({per_model[BATCHED]:+.1f} MiB a model)")
    else:
        share = per_model[CHECKPOINTED] / per_model[BATCHED]
        verdict = "PASS" if share < BOUNDED_SHARE else "FAIL"
        lines.append(
            f"{verdict}  {label}: an added image model costs {per_model[CHECKPOINTED]:+.1f} MiB checkpointed vs "
            f"{per_model[BATCHED]:+.1f} MiB batched ({100 * share:.0f}%; target: under {100 * BOUNDED_SHARE:.0f}%)"
        )
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    return models.run_suite(cases, summary, argv, "python -m benchmarks.rewards")


if __name__ == "__main__":
    raise SystemExit(main())
