"""The offline teacher pass (SPEC 2 and 4): `t2v-turbo preprocess` writes the teacher cache that
training reads, so training never runs the teacher.

Per clip i (in dataset order): a generator keyed on (seed, i) draws, in this order, the grid index
n ~ U[lo, hi) (the motion range for motion clips, else the plain range), the VAE's posterior noise
(z0 = vae.encode(frames, generator)) and the noise ε of z0's shape (float32, on the CPU). Then
t_hi = ddim_timesteps[n], z_t = α_{t_hi}·z0 + σ_{t_hi}·ε (the release's ᾱ table, as the motion
prior uses), the prompt embedding (through a PromptCache), and the teacher (no guidance or motion
embedding, fps conditioning `fps`) at (z_t, t_hi): ε_u with the context of "" for every clip and
ε_c with the prompt for the clips without a motion prior, in one batched forward. Motion clips of a
batch get `compute_motion_prior` together (DDIM inversion, temporal-attention energy, score =
dE/dz_t); its live pass gives their ε_c. The other clips store a zero score.

Because every draw is keyed on the clip, the cache does not depend on the batch size or on where a
run was interrupted. A killed run continues after the samples its complete shards hold
(`CacheWriter.resume_point`); clips that could not be decoded (the dataset returned None) are
counted, logged and listed in a per-process skip record, which maps the stored sample count back to
a position in the dataset. Under `accelerate launch`, clip i belongs to process i % num_processes
and every process writes its own shards and manifest.

Models run in `dtype` (a model cast: the release ran this pass in bf16, the motion score's backward
included); the text encoder keeps its own dtype. Kernels "off" forces turbo_kernels' PyTorch
references and the UNet's unfused temporal path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

import turbo_kernels
from t2v_turbo import schedule
from t2v_turbo.cache import MODELS_HANDED_IN_KEY, STORAGE_DTYPES, CacheWriter, manifest_name
from t2v_turbo.data.videos import VIDEO_BACKENDS, build_dataset
from t2v_turbo.models import OpenCLIPTextEncoder, PromptCache, VC2UNet, VideoVAE
from t2v_turbo.models.adapter import NoisePredictor, check_frame_size
from t2v_turbo.files import uncreatable_reason, write_atomically
from t2v_turbo.motion import compute_motion_prior, noised_latents
from t2v_turbo.pipeline import set_vae_kernels

logger = logging.getLogger(__name__)

PRESETS = ("tiny", "vc2")
# The VAE and text encoder that go with each UNet preset (random weights, like the UNet).
PRESET_VAE = {"tiny": "tiny", "vc2": "ldm"}
PRESET_TEXT_ENCODER = {"tiny": "tiny", "vc2": "vit-h-14"}
MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KERNEL_SWITCHES = ("on", "off")
# The fields that decide what the cache holds: a resumed run must agree with the stored ones.
CONTENT_FIELDS = (
    "data", "model", "preset", "num_frames", "fps", "size", "seed", "motion_grid_range", "grid_range",
    "motion", "dtype",
)
# Decoding a 16-frame clip takes tens of milliseconds, a teacher pass with the motion prior seconds:
# two processes keep the teacher fed.
VIDEO_DECODE_WORKERS = 2
SKIP_RECORD_KEY = "skipped_clip_indices"
# Distinguishes the per-clip streams of this pass from other seeded streams of the project.
CLIP_STREAM = 3


def is_grid_range(bounds: Sequence[int]) -> bool:
    """Whether `bounds` are grid indices [lo, hi) of the DDIM grid: ints, 0 <= lo < hi <= 200."""
    return (
        len(bounds) == 2 and all(isinstance(b, int) for b in bounds) and 0 <= bounds[0] < bounds[1] <= schedule.DDIM_GRID_STEPS
    )


@dataclass
class PreprocessConfig:
    """Everything a preprocessing run reads. Exactly one of `model` (a T2VTurboPipeline directory)
    and `preset` (random weights: "tiny" for tests and demos, "vc2" for benchmarks) names the teacher."""

    cache: str
    data: str = "synthetic"  # "synthetic", a directory of videos or a .csv/.jsonl manifest
    model: Optional[str] = None
    preset: Optional[str] = None
    num_frames: int = 16
    fps: int = schedule.DEFAULT_FPS  # sampling rate of the clips and the teacher's fps conditioning
    size: tuple[int, int] = (320, 512)  # (height, width) in pixels
    batch_size: int = 4
    shard_size: int = 64
    dtype: str = "bfloat16"  # the models' dtype (the release ran this pass in bf16)
    storage_dtype: str = "float16"
    seed: int = 0
    motion_grid_range: tuple[int, int] = (100, 200)  # [lo, hi) of n for motion clips
    grid_range: tuple[int, int] = (0, 200)  # [lo, hi) of n for the other clips
    motion: bool = True  # False: no motion priors; every clip is a plain clip
    kernels: str = "on"
    # A torch.compile backend ("inductor") for the teacher's no-grad passes (the ε pass and the DDIM
    # inversion, nearly all of the work with motion priors); None runs them eagerly.
    compile: Optional[str] = None
    # Replay the teacher's no-grad passes from CUDA graphs (t2v_turbo.cuda_graphs), one a batch size:
    # the inversion runs the same shapes for up to 200 steps. GPU only.
    cuda_graphs: bool = False
    limit: Optional[int] = None  # process only the first `limit` clips of the dataset
    # Data loader processes; None: VIDEO_DECODE_WORKERS for video files, which then decode while
    # the teacher runs, 0 for synthetic clips (drawn in a few milliseconds).
    num_workers: Optional[int] = None
    video_backend: str = "pyav"  # decoder of real videos: "pyav" or "decord"
    cpu: bool = False  # force the CPU even when a GPU is present
    progress: bool = True

    def __post_init__(self) -> None:
        self.size = tuple(self.size)
        self.motion_grid_range = tuple(self.motion_grid_range)
        self.grid_range = tuple(self.grid_range)
        self.validate()

    def validate(self) -> None:
        if not self.cache:
            raise ValueError("cache must name the cache directory to write")
        if (self.model is None) == (self.preset is None):
            raise ValueError(f"give exactly one of model (a pipeline directory) and preset, got model={self.model!r}, "
                             f"preset={self.preset!r}")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {self.preset!r}")
        choices = {"dtype": tuple(MODEL_DTYPES), "storage_dtype": tuple(STORAGE_DTYPES), "kernels": KERNEL_SWITCHES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("num_frames", "fps", "batch_size", "shard_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if len(self.size) != 2 or not all(isinstance(s, int) and s > 0 for s in self.size):
            raise ValueError(f"size must be a (height, width) pair of positive ints, got {self.size!r}")
        for name in ("motion_grid_range", "grid_range"):
            bounds = getattr(self, name)
            if not is_grid_range(bounds):
                raise ValueError(
                    f"{name} must be integers [lo, hi) with 0 <= lo < hi <= {schedule.DDIM_GRID_STEPS}, got {bounds!r}"
                )
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ValueError(f"limit must be a positive int or None, got {self.limit!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64) (torch's generators take no other), got {self.seed!r}")
        if self.compile is not None and self.compile not in torch.compiler.list_backends(exclude_tags=()):
            raise ValueError(
                f"compile must be None or a torch.compile backend ({', '.join(torch.compiler.list_backends())}), "
                f"got {self.compile!r}"
            )
        if self.video_backend not in VIDEO_BACKENDS:
            raise ValueError(f"video_backend must be one of {VIDEO_BACKENDS}, got {self.video_backend!r}")
        if self.num_workers is not None and (not isinstance(self.num_workers, int) or self.num_workers < 0):
            raise ValueError(f"num_workers must be an int >= 0 or None, got {self.num_workers!r}")

    def loader_workers(self) -> int:
        if self.num_workers is not None:
            return self.num_workers
        return 0 if self.data == "synthetic" else VIDEO_DECODE_WORKERS

    def content(self) -> dict[str, Any]:
        """The fields that decide the cache's values, stored in its manifest. The decoders' pixels differ by
        a few grey levels, so a cache of real videos is continued only with the decoder that began it:
        decord is recorded (PyAV, the default, is not, so caches from before the choice continue)."""
        content = {name: getattr(self, name) for name in CONTENT_FIELDS}
        if self.data != "synthetic" and self.video_backend != "pyav":
            content["video_backend"] = self.video_backend
        return content

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class PreprocessResult:
    """What one call did on this process."""

    cache: Path
    num_clips: int  # clips of the (limited) dataset that belong to this process
    already_stored: int  # samples this process's shards held before the call
    written: int  # samples this call added
    motion_clips: int  # of those, clips with a motion prior
    skipped: int  # clips this call skipped (the dataset gave None)
    skipped_total: int  # clips of this process skipped by this call and the runs it continued
    seconds: float

    @property
    def clips_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


# The PreprocessResult fields that count clips or samples: a run's are the sum of its processes'.
RESULT_COUNTS = ("num_clips", "already_stored", "written", "motion_clips", "skipped", "skipped_total")


def run_totals(results: Sequence[PreprocessResult]) -> PreprocessResult:
    """What a run did over all its processes, from every process's result (one each, as
    accelerate's gather_object collects them): the counts summed, the seconds of the slowest."""
    counts = {name: sum(getattr(result, name) for result in results) for name in RESULT_COUNTS}
    return PreprocessResult(results[0].cache, **counts, seconds=max(result.seconds for result in results))


def clip_generator(seed: int, clip_index: int) -> torch.Generator:
    """The CPU generator of one clip's draws (grid index, VAE posterior noise, ε), keyed on (seed, clip)."""
    state = np.random.SeedSequence([seed, CLIP_STREAM, clip_index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> 1))


def skip_record_name(process_index: int, num_processes: int) -> str:
    return "skipped-clips.json" if num_processes == 1 else f"skipped-clips-p{process_index}.json"


def load_models(config: PreprocessConfig, device: torch.device | str = "cpu") -> tuple[nn.Module, Any, Any]:
    """(unet, vae, text_encoder) of config.model, or of config.preset with random weights: the UNet
    drawn first under torch.manual_seed(config.seed), as `train` builds a preset student for the
    same seed, then the VAE and the text encoder. UNet and VAE in config.dtype, all on `device`."""
    from t2v_turbo.pipeline import T2VTurboPipeline

    dtype = MODEL_DTYPES[config.dtype]
    use_kernels = config.kernels == "on"
    if config.model is not None:
        pipeline = T2VTurboPipeline.from_pretrained(config.model, device=device, dtype=dtype, use_kernels=use_kernels)
        unet, vae, text_encoder = pipeline.unet, pipeline.vae, pipeline.text_encoder
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            unet = VC2UNet.preset(config.preset, use_kernels=use_kernels)
            vae = VideoVAE.preset(PRESET_VAE[config.preset])
            text_encoder = OpenCLIPTextEncoder(PRESET_TEXT_ENCODER[config.preset])
        unet.to(device=device, dtype=dtype)
        vae.to(device=device, dtype=dtype)
        text_encoder.to(device=device)
    unet.requires_grad_(False).eval()
    return unet, vae, text_encoder


def _place(module: Any, device: torch.device, dtype: Optional[torch.dtype] = None) -> None:
    # Stand-ins that are not modules (a text encoder with only `encode`) stay where they are.
    if isinstance(module, nn.Module):
        module.to(device=device, dtype=dtype)


class _IndexedClips(Dataset):
    """(clip index, item) pairs, so a batch knows which clips it holds and which were skipped."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Optional[dict]]:
        return index, self.dataset[index]


def _collate_indexed(pairs: list[tuple[int, Optional[dict]]]) -> dict[str, Any]:
    """Stacks the readable clips of a batch. Unlike `collate_skipping`, items need no "path" (the
    toy world's have none) and short_caption falls back to the caption."""
    kept = [(index, item) for index, item in pairs if item is not None]
    return {
        "frames": torch.stack([item["frames"] for _, item in kept]) if kept else None,
        "caption": [item["caption"] for _, item in kept],
        "short_caption": [item.get("short_caption") or item["caption"] for _, item in kept],
        "use_motion": [bool(item["use_motion"]) for _, item in kept],
        "clip_index": [index for index, _ in kept],
        "skipped_index": [index for index, item in pairs if item is None],
    }


def _aligned_batches(clips: Sequence[int], start: int, batch_size: int) -> list[list[int]]:
    """clips[start:] in batches whose boundaries sit at multiples of batch_size of the whole list,
    so a resumed run groups its clips as an uninterrupted run would (only the first batch may be short)."""
    batches = []
    position = start
    while position < len(clips):
        end = min((position // batch_size + 1) * batch_size, len(clips))
        batches.append(list(clips[position:end]))
        position = end
    return batches


def _resume_position(
    clips: Sequence[int], stored: int, skipped: set[int], cache: Path, limit: int | None = None,
    unlimited_clips: Sequence[int] = (),
) -> int:
    """The position in `clips` after the `stored`-th clip that was not skipped; limit: the run's
    --limit where it cut the dataset short, unlimited_clips: this process's clips without it."""
    count = 0
    for position, clip in enumerate(clips):
        if count == stored:
            return position
        if clip not in skipped:
            count += 1
    if count == stored:
        return len(clips)
    if limit is not None and sum(clip not in skipped for clip in unlimited_clips) >= stored:
        raise ValueError(
            f"cache {cache} holds {stored} samples of this process, more than the {count} readable clips that "
            f"--limit {limit} gives it: it was written with a larger limit (raise --limit or drop it to continue "
            "it, or use a new cache directory)"
        )
    raise ValueError(
        f"cache {cache} holds {stored} samples of this process, but the dataset gives it only {count} readable "
        "clips: it was written from other data (use a new cache directory)"
    )


def _check_process_layout(directory: Path, num_processes: int) -> None:
    expected = {manifest_name(rank, num_processes) for rank in range(num_processes)}
    found = {path.name for path in directory.glob("manifest*.json") if re.fullmatch(r"manifest(-p\d+)?\.json", path.name)}
    foreign = sorted(found - expected)
    if foreign:
        raise ValueError(
            f"cache {directory} holds {foreign}, written by a run with another number of processes; continue it "
            f"with that many processes or use a new directory (this run has {num_processes})"
        )


class _SkipRecord:
    """The clip indices this process skipped, kept in a JSON file beside the cache, rewritten
    atomically as soon as a skip is seen (before any later sample can reach a shard)."""

    def __init__(self, path: Path):
        self.path = path
        self.indices: set[int] = set()
        if path.exists():
            try:
                self.indices = set(json.loads(path.read_text())[SKIP_RECORD_KEY])
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"{path}: corrupt skip record ({error}); delete the cache and start again") from None

    def add(self, indices: Sequence[int]) -> None:
        new = set(indices) - self.indices
        if not new:
            return
        self.indices |= new
        text = json.dumps({SKIP_RECORD_KEY: sorted(self.indices)}) + "\n"
        write_atomically(self.path, lambda temporary: temporary.write_text(text))


@contextlib.contextmanager
def _teacher_mode(unet: nn.Module, use_kernels: bool) -> Iterator[None]:
    """Eval mode (no dropout) and the kernel switch for the block; the module's own settings after it."""
    was_training = unet.training
    had_kernels = getattr(unet, "use_kernels", None)
    unet.eval()
    if had_kernels is not None:
        unet.use_kernels = use_kernels
    backend = turbo_kernels.backend("reference") if not use_kernels else contextlib.nullcontext()
    try:
        with backend:
            yield
    finally:
        unet.train(was_training)
        if had_kernels is not None:
            unet.use_kernels = had_kernels


class TeacherPass:
    """The teacher's outputs for batches of clips: call it with frames (B, 3, F, H, W) in [-1, 1],
    captions, use_motion flags and clip indices; it returns what CacheWriter.add takes.
    unet: a VC2UNet or a diffusers UNet3DConditionModel, called through NoisePredictor; with
    config.compile, the no-grad passes call it through torch.compile. Their batch sizes vary (the
    ε pass holds the plain clips plus every clip, the inversion the clips still advancing), so the
    first few sizes each compile a graph before torch.compile falls back to dynamic shapes. With
    config.cuda_graphs they replay CUDA graphs, one a batch size (its first call warms up, its
    second captures)."""

    def __init__(self, unet: nn.Module, vae: Any, text_encoder: Any, config: PreprocessConfig, device: torch.device):
        self.unet = unet
        self.teacher = NoisePredictor(unet)
        check_frame_size(*config.size, vae.downsample, self.teacher.latent_multiple)
        self.no_grad_teacher = (
            NoisePredictor(torch.compile(unet, backend=config.compile)) if config.compile else self.teacher
        )
        if config.cuda_graphs:
            if self.no_grad_teacher is self.teacher:
                self.no_grad_teacher = NoisePredictor(unet)
            self.no_grad_teacher.enable_cuda_graphs()
        self.vae = vae
        self.prompts = PromptCache(text_encoder, device=device)
        self.config = config
        self.device = device
        self.dtype = MODEL_DTYPES[config.dtype]
        self.alphas_cumprod = schedule.release_alphas_cumprod(torch.float64, device)

    def _clip_latents(self, frames: Tensor, motion: bool, clip_index: int) -> tuple[int, Tensor, Tensor]:
        """(n, z0 (1, C, F, h, w) in the model dtype, ε (float32)) of one clip, from its own generator."""
        generator = clip_generator(self.config.seed, clip_index)
        low, high = self.config.motion_grid_range if motion else self.config.grid_range
        grid_index = int(torch.randint(low, high, (1,), generator=generator))
        vae_dtype = getattr(self.vae, "dtype", self.dtype)
        z0 = self.vae.encode(frames[None].to(self.device, vae_dtype), generator=generator).to(self.dtype)
        noise = torch.randn(z0.shape, generator=generator, dtype=torch.float32).to(self.device)
        return grid_index, z0, noise

    @torch.no_grad()
    def _encode(
        self, frames: Tensor, use_motion: Sequence[bool], clip_indices: Sequence[int]
    ) -> tuple[Tensor, Tensor, Tensor]:
        drawn = [self._clip_latents(clip, motion, index) for clip, motion, index in zip(frames, use_motion, clip_indices)]
        grid_index = torch.tensor([n for n, _, _ in drawn], dtype=torch.int64)
        z0 = torch.cat([z for _, z, _ in drawn])
        noise = torch.cat([e for _, _, e in drawn])
        return grid_index, z0, noise

    def __call__(
        self, frames: Tensor, captions: Sequence[str], use_motion: Sequence[bool], clip_indices: Sequence[int]
    ) -> dict[str, Any]:
        batch = frames.shape[0]
        if not len(captions) == len(use_motion) == len(clip_indices) == batch:
            raise ValueError(
                f"captions, use_motion and clip_indices must hold one entry per clip ({batch}), got "
                f"{len(captions)}, {len(use_motion)} and {len(clip_indices)}"
            )
        motion = torch.tensor([bool(m) and self.config.motion for m in use_motion], dtype=torch.bool)
        grid_index, z0, noise = self._encode(frames, motion.tolist(), clip_indices)
        t_hi = schedule.solver_timesteps(grid_index)[0].to(self.device, non_blocking=True)
        z_t = noised_latents(z0, noise, t_hi, self.alphas_cumprod)
        context = self.prompts.encode(list(captions))
        uncond = self.prompts.encode([""]).expand(batch, -1, -1)

        plain = (~motion).nonzero().squeeze(1).to(self.device, non_blocking=True)
        moving_on_host = motion.nonzero().squeeze(1)
        moving = moving_on_host.to(self.device, non_blocking=True)
        with torch.no_grad():
            # ε_c of the plain clips and ε_u of every clip in one forward of (plain + B) clips.
            eps = self.no_grad_teacher(
                torch.cat([z_t[plain], z_t]), torch.cat([t_hi[plain], t_hi]),
                torch.cat([context[plain], uncond]), self.config.fps,
            )
        eps_cond = torch.empty_like(z_t)
        eps_cond[plain] = eps[: plain.numel()].to(z_t.dtype)
        eps_uncond = eps[plain.numel():].to(z_t.dtype)
        score = torch.zeros_like(z_t)
        if moving.numel():
            prior = compute_motion_prior(
                self.unet, z0[moving], grid_index[moving_on_host], noise[moving], context[moving],
                alphas_cumprod=self.alphas_cumprod, fps=self.config.fps, teacher=self.teacher,
                inversion_teacher=self.no_grad_teacher,
            )
            eps_cond[moving] = prior["eps_cond"].to(z_t.dtype)
            score[moving] = prior["score"].to(z_t.dtype)
        return {
            "z_t": z_t, "eps_cond": eps_cond, "eps_uncond": eps_uncond, "score": score, "context": context,
            "grid_index": grid_index, "use_motion": motion,
        }


def _check_cuda_graphs_device(config: PreprocessConfig, device: torch.device) -> None:
    if config.cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs needs a CUDA device, and this run is on {device}")


def preprocess(
    config: PreprocessConfig,
    dataset: Optional[Dataset] = None,
    models: Optional[tuple[nn.Module, Any, Any]] = None,
    accelerator: Any = None,
) -> PreprocessResult:
    """Runs the teacher over this process's clips of `dataset` (default: build_dataset(config.data,
    ...)) that the cache does not hold yet, and writes them to config.cache.

    dataset: any map-style dataset of VideoTextDataset's items (None for an unreadable clip).
    models: (unet, vae, text_encoder) to use instead of loading them (moved to the device, the UNet
    and VAE cast to config.dtype, in place). accelerator: an accelerate.Accelerator (default: a new
    one), which says this process's index, the number of processes and the device."""
    config.validate()
    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=config.cpu)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    _check_cuda_graphs_device(config, device)
    cache_dir = Path(config.cache)
    problem = uncreatable_reason(cache_dir, directory=True)
    if problem:
        raise ValueError(f"cache: {problem}")
    _check_process_layout(cache_dir, world)

    if dataset is None:
        dataset = build_dataset(
            config.data, config.num_frames, config.fps, config.size, config.seed, video_backend=config.video_backend
        )
    total = len(dataset) if config.limit is None else min(config.limit, len(dataset))
    clips = list(range(rank, total, world))
    skip_record = _SkipRecord(cache_dir / skip_record_name(rank, world))
    already_stored = CacheWriter.resume_point(cache_dir, rank, world)
    limited = config.limit if config.limit is not None and config.limit < len(dataset) else None
    start = _resume_position(
        clips, already_stored, skip_record.indices, cache_dir, limited, range(rank, len(dataset), world)
    )

    if models is None:
        unet, vae, text_encoder = load_models(config, device)
    else:
        unet, vae, text_encoder = models
        dtype = MODEL_DTYPES[config.dtype]
        _place(unet, device, dtype)
        _place(vae, device, dtype)
        _place(text_encoder, device)
    set_vae_kernels(vae, config.kernels == "on")
    teacher = TeacherPass(unet, vae, text_encoder, config, device)
    # Made once the data, the models and the clip size are known to work: a refused run leaves nothing.
    cache_dir.mkdir(parents=True, exist_ok=True)

    loader = DataLoader(
        _IndexedClips(dataset), batch_sampler=_aligned_batches(clips, start, config.batch_size),
        collate_fn=_collate_indexed, num_workers=config.loader_workers(),
    )
    progress = tqdm(
        total=len(clips) - start, unit="clip", desc=f"preprocess (process {rank})" if world > 1 else "preprocess",
        disable=not (config.progress and accelerator.is_main_process),
    )
    written = motion_clips = skipped = 0
    started = time.perf_counter()
    content = config.content()
    if models is not None:
        content[MODELS_HANDED_IN_KEY] = True
    writer = CacheWriter(cache_dir, config.shard_size, STORAGE_DTYPES[config.storage_dtype], content, rank, world)
    try:
        with writer, _teacher_mode(unet, config.kernels == "on"):
            for batch in loader:
                if batch["skipped_index"]:
                    skip_record.add(batch["skipped_index"])
                    skipped += len(batch["skipped_index"])
                    logger.warning("skipping unreadable clips %s (%d skipped so far)", batch["skipped_index"], skipped)
                if batch["frames"] is not None:
                    samples = teacher(batch["frames"], batch["caption"], batch["use_motion"], batch["clip_index"])
                    samples["caption"], samples["short_caption"] = batch["caption"], batch["short_caption"]
                    writer.add(samples)
                    written += len(batch["clip_index"])
                    motion_clips += int(samples["use_motion"].sum())
                progress.update(len(batch["clip_index"]) + len(batch["skipped_index"]))
                progress.set_postfix(skipped=skipped, motion=motion_clips)
    finally:
        progress.close()
    seconds = time.perf_counter() - started
    accelerator.wait_for_everyone()
    result = PreprocessResult(
        cache_dir, len(clips), already_stored, written, motion_clips, skipped, len(skip_record.indices), seconds
    )
    logger.info(
        "preprocess: wrote %d samples (%d with motion priors) to %s in %.1f s (%.3g clips/s); %d already stored; "
        "%d clips skipped (%d in all)", written, motion_clips, cache_dir, seconds, result.clips_per_second,
        already_stored, skipped, result.skipped_total,
    )
    return result
