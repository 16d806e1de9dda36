"""Text-to-video sampling: the student's multistep consistency sampler (SPEC 6) and the teacher's
classic DDIM sampler with classifier-free guidance, over a UNet, a VAE and a text encoder.

Latents are kept in float32 between steps (the solver maths is float32); the UNet runs in its own
dtype. Every random draw (the initial latents, the noise between steps) comes from one generator,
so a seed makes a run reproducible; a seed draws on the CPU, so it gives the same video on any device.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import turbo_kernels
from t2v_turbo import schedule
from t2v_turbo.files import read_json_file, write_atomically
from t2v_turbo.models import checkpoint
from t2v_turbo.models.adapter import NoisePredictor, check_frame_size
from t2v_turbo.models.vc2_unet import VC2UNet

PIPELINE_CONFIG_NAME = "pipeline.json"
UNET_DIR, VAE_DIR, TEXT_ENCODER_DIR = "unet", "vae", "text_encoder"
TEACHER_STEPS = 50
# VideoCrafter's DDIM adds this offset to its evenly spaced timesteps (1, 21, ..., 981 for 50 steps).
DDIM_STEP_OFFSET = 1
# The teacher's most DDIM steps: with the offset, a stride of 1 (1000 steps) would start at t = 1000,
# past the schedule's last timestep, 999 (VideoCrafter's sampler fails there too).
TEACHER_MAX_STEPS = schedule.NUM_TRAIN_TIMESTEPS // 2


@dataclass
class GenerationDefaults:
    """What `generate` uses for an argument left as None; saved in pipeline.json."""

    num_steps: int = 4
    guidance_scale: float = 7.5
    motion_strength: float = 0.05
    motion_fraction: float = 0.5
    num_frames: int = 16
    height: int = 320
    width: int = 512


@dataclass
class SampleOutput:
    """frames: (B, 3, F, H, W) float in [0, 1]; latents: the final (scaled) latents that were decoded,
    (B, C, F, H/ds, W/ds) float32; timings: seconds spent in unet_s, vae_s, text_s and total_s."""

    frames: Tensor
    latents: Tensor
    timings: dict[str, float] = field(default_factory=dict)


def teacher_timesteps(num_steps: int) -> list[int]:
    """The teacher's DDIM timesteps, high to low: evenly spaced "leading" steps with offset 1, as
    VideoCrafter's DDIM sampler: k * (1000 // N) + 1, so 981, 961, ..., 1 for N = 50. (VideoCrafter
    builds range(0, 1000, 1000 // N), which holds one step too many when N does not divide 1000;
    this always gives N.) At most TEACHER_MAX_STEPS."""
    stride = schedule.NUM_TRAIN_TIMESTEPS // schedule.check_step_count(num_steps, TEACHER_MAX_STEPS)
    return [k * stride + DDIM_STEP_OFFSET for k in reversed(range(num_steps))]


def ddim_step(
    sample: Tensor, eps: Tensor, abar_t: float, abar_prev: float, eta: float = 0.0, noise: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One DDIM step from abar_t to abar_prev: returns (x0, previous sample).

    x0 = (x - sigma_t eps) / alpha_t; with s = eta sqrt((1 - abar_prev)/(1 - abar_t)) sqrt(1 - abar_t/abar_prev),
    x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - s^2) eps + s noise."""
    x0 = (sample - (1 - abar_t) ** 0.5 * eps) / abar_t**0.5
    spread = eta * ((1 - abar_prev) / (1 - abar_t)) ** 0.5 * (1 - abar_t / abar_prev) ** 0.5
    previous = abar_prev**0.5 * x0 + max(1 - abar_prev - spread**2, 0.0) ** 0.5 * eps
    if spread > 0:
        if noise is None:
            raise ValueError("noise is required when eta > 0")
        previous = previous + spread * noise
    return x0, previous


def _module_dtype(module: Any, default: torch.dtype = torch.float32) -> torch.dtype:
    parameters = module.parameters() if isinstance(module, nn.Module) else iter(())
    first = next(parameters, None)
    return default if first is None else first.dtype


def _move(module: Any, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
    if isinstance(module, nn.Module):
        module.to(device=device, dtype=dtype)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Stopwatch:
    """Accumulates wall time per name; synchronizes the device so GPU work is charged where it ran."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        _synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            _synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def _prompt_list(prompts: str | Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(prompt, str) for prompt in prompts):
        raise TypeError("prompts must be a string or a non-empty sequence of strings")
    return prompts


def set_vae_kernels(vae: Any, use_kernels: bool) -> None:
    """Sets a VideoVAE's `use_kernels` (fused GroupNorm + SiLU); a PixelSpace or a stand-in has
    nothing to switch."""
    # Imported here: importing this module does not import diffusers.
    from t2v_turbo.models.vae import VideoVAE

    if isinstance(vae, VideoVAE):
        vae.use_kernels = use_kernels


class T2VTurboPipeline:
    """unet (a VC2UNet or a diffusers UNet3DConditionModel), vae (encode/decode of scaled latents,
    with latent_channels and downsample), text_encoder (encode(prompts) -> (B, L, D)).

    use_kernels: the VC2UNet's temporal attention and the consistency step run through
    turbo_kernels' dispatch (kernels where the device has them); a diffusers UNet gets
    `turbo_kernels.patch`, and a VideoVAE its fused GroupNorm + SiLU. Off, everything is plain
    PyTorch.
    """

    def __init__(
        self,
        unet: nn.Module,
        vae: Any,
        text_encoder: Any,
        fps: int = schedule.DEFAULT_FPS,
        defaults: GenerationDefaults | None = None,
        use_kernels: bool = True,
    ):
        self.unet = unet
        self.noise_predictor = NoisePredictor(unet)
        self.latent_multiple = self.noise_predictor.latent_multiple
        self.vae = vae
        self.text_encoder = text_encoder
        self.fps = int(fps)
        self.defaults = defaults or GenerationDefaults()
        self.use_kernels = use_kernels
        if self.noise_predictor.in_channels != vae.latent_channels:
            raise ValueError(
                f"the UNet takes {self.noise_predictor.in_channels} channels but the VAE makes "
                f"{vae.latent_channels}-channel latents"
            )
        # Stand-in encoders (anything with `encode`) need not say their width.
        text_width = getattr(text_encoder, "context_dim", None)
        if text_width is not None and text_width != self.noise_predictor.context_dim:
            raise ValueError(
                f"the UNet attends to a {self.noise_predictor.context_dim}-wide context but the text encoder makes "
                f"{text_width}-wide embeddings (a UNet of another model: pass the model directory it was trained from)"
            )

    def frame_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """(height, width) in pixels: those given, else the model's defaults. A ValueError where
        they are not positive multiples of the VAE's downsample factor times the UNet's."""
        height = self.defaults.height if height is None else height
        width = self.defaults.width if width is None else width
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_frame_size(height, width, self.vae.downsample, self.latent_multiple)
        return height, width

    @property
    def use_kernels(self) -> bool:
        return self._use_kernels

    @use_kernels.setter
    def use_kernels(self, value: bool) -> None:
        self._use_kernels = bool(value)
        self._reset_cuda_graphs()
        if isinstance(self.unet, VC2UNet):
            self.unet.use_kernels = self._use_kernels
        elif self._use_kernels:
            turbo_kernels.patch(self.unet)
        else:
            turbo_kernels.unpatch(self.unet)
        set_vae_kernels(self.vae, self._use_kernels)

    @property
    def device(self) -> torch.device:
        return self.noise_predictor.device

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> T2VTurboPipeline:
        """Moves all three models to `device`; converts the UNet and the VAE to `dtype` (the text
        encoder stays in its own dtype: its output is cast where the UNet takes it)."""
        _move(self.unet, device, dtype)
        _move(self.vae, device, dtype)
        _move(self.text_encoder, device)
        return self

    def compile(self, **options: Any) -> T2VTurboPipeline:
        """Samples through `torch.compile(unet, **options)` (dynamic=False unless given) from now on.
        Each new batch size, frame count or resolution compiles once and later calls reuse it, so
        it pays off in a long-lived process, not for one clip. Set `use_kernels` first: with kernels
        on, inductor fuses the norms and layout copies around turbo_kernels' ops (the
        kernels-compile variant of `benchmarks.models`)."""
        self.noise_predictor.model = torch.compile(self.unet, **{"dynamic": False, **options})
        self._reset_cuda_graphs()
        return self

    def enable_cuda_graphs(self) -> T2VTurboPipeline:
        """Samples on a GPU through CUDA graphs of the UNet call from now on
        (t2v_turbo.cuda_graphs): the first step of a new shape runs eagerly as the warm-up, the
        second captures and replays, and every later step, in this run and the next ones, replays
        without the host issuing the UNet's thousands of kernels one by one (calls under CUDA
        autocast run eagerly: sample in the pipeline's dtype instead). The graphs' memory pool
        stays allocated until `disable_cuda_graphs`. With `compile()` (either order) the
        graphs record the compiled UNet's kernels."""
        self.noise_predictor.enable_cuda_graphs()
        return self

    def disable_cuda_graphs(self) -> T2VTurboPipeline:
        """Back to eager UNet calls; frees the graphs and their memory."""
        self.noise_predictor.graphs = None
        return self

    @property
    def cuda_graphs(self) -> bool:
        return self.noise_predictor.graphs is not None

    def _reset_cuda_graphs(self) -> None:
        # A change of code path (kernels on or off, a compiled UNet) makes the recorded kernels stale.
        if self.noise_predictor.graphs is not None:
            self.noise_predictor.graphs.reset()

    # ---- sampling ----------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        prompts: str | Sequence[str],
        num_steps: int | None = None,
        guidance_scale: float | None = None,
        motion_strength: float | None = None,
        motion_fraction: float | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        progress: bool = True,
        decode_chunk_size: int = 8,
    ) -> SampleOutput:
        """Multistep consistency sampling (SPEC 6), one UNet call a step.

        guidance_scale is the student's guidance embedding w (LCM convention, equal to a classic
        CFG scale of w + 1); motion_strength m is fed as the motion embedding on the steps with
        t >= 1000 (1 - motion_fraction) and 0 on the others, when the model has motion conditioning.
        Arguments left as None take `self.defaults`. `dtype` converts the UNet and VAE first (as `to`).
        """
        d = self.defaults
        num_steps = d.num_steps if num_steps is None else num_steps
        guidance_scale = d.guidance_scale if guidance_scale is None else guidance_scale
        motion_strength = d.motion_strength if motion_strength is None else motion_strength
        motion_fraction = d.motion_fraction if motion_fraction is None else motion_fraction
        if not 0.0 <= motion_fraction <= 1.0:
            raise ValueError(f"motion_fraction must lie in [0, 1], got {motion_fraction}")
        timesteps = schedule.sampler_timesteps(num_steps)
        motion_threshold = schedule.NUM_TRAIN_TIMESTEPS * (1.0 - motion_fraction)
        predictor = self.noise_predictor

        with self._session(prompts, num_frames, height, width, seed, generator, dtype, decode_chunk_size) as run:
            guidance = guidance_scale if predictor.accepts_guidance else None
            for index in tqdm(range(num_steps), desc="consistency sampling", disable=not progress):
                t = timesteps[index]
                is_last = index == num_steps - 1
                motion = None
                if predictor.accepts_motion:
                    motion = motion_strength if t >= motion_threshold else 0.0
                with run.clock("unet_s"):
                    eps = predictor(run.latents, t, run.context, self.fps, guidance=guidance, motion=motion)
                # The last step keeps only `denoised`: no noise is drawn for it.
                noise = torch.zeros_like(run.latents) if is_last else run.randn()
                t_prev = 0 if is_last else timesteps[index + 1]
                # The UNet's eps is a permuted view; the step's kernels take one memory layout.
                eps = eps.to(run.latents.dtype).contiguous()
                with self._solver_backend():
                    denoised, run.latents = turbo_kernels.consistency_sampler_step(
                        run.latents, eps, t, t_prev, run.alphas_cumprod, noise=noise
                    )
            return run.finish(denoised)

    @torch.no_grad()
    def sample_teacher(
        self,
        prompts: str | Sequence[str],
        num_steps: int = TEACHER_STEPS,
        guidance_scale: float = 7.5,
        eta: float = 0.0,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        progress: bool = True,
        decode_chunk_size: int = 8,
    ) -> SampleOutput:
        """The teacher's DDIM sampler with classifier-free guidance: eps = eps_u + s (eps_c - eps_u)
        with the classic scale s, the unconditional context the encoding of "", both in one batched
        UNet pass of 2B a step, no guidance or motion embedding (the teacher path).

        Timesteps: `teacher_timesteps` (VideoCrafter's 981, 961, ..., 1 for 50 steps), each step to
        the next one's abar. The last step returns its x0 prediction (abar_prev = 1); VideoCrafter
        instead steps to abar_0 = 0.99915 and decodes that sample, which keeps sigma_0 ~ 0.03 of the
        predicted noise in the latent. Returning x0 makes the result comparable with the consistency
        sampler's final `denoised`."""
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        timesteps = teacher_timesteps(num_steps)
        predictor = self.noise_predictor
        with self._session(
            prompts, num_frames, height, width, seed, generator, dtype, decode_chunk_size, with_uncond=True
        ) as run:
            abar = run.alphas_cumprod.double()
            context = torch.cat([run.uncond_context, run.context])
            for index in tqdm(range(num_steps), desc="teacher DDIM", disable=not progress):
                t = timesteps[index]
                is_last = index == num_steps - 1
                abar_prev = 1.0 if is_last else float(abar[timesteps[index + 1]])
                with run.clock("unet_s"):
                    eps_both = predictor(torch.cat([run.latents, run.latents]), t, context, self.fps)
                eps_uncond, eps_cond = eps_both.float().chunk(2)
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
                noise = run.randn() if eta > 0 and not is_last else None
                x0, run.latents = ddim_step(run.latents, eps, float(abar[t]), abar_prev, eta, noise)
            return run.finish(x0)

    def _solver_backend(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if self.use_kernels else turbo_kernels.backend("reference")

    @contextlib.contextmanager
    def _session(
        self,
        prompts: str | Sequence[str],
        num_frames: int | None,
        height: int | None,
        width: int | None,
        seed: int | None,
        generator: torch.Generator | None,
        dtype: torch.dtype | None,
        decode_chunk_size: int,
        with_uncond: bool = False,
    ) -> Iterator[_SamplingRun]:
        """Encodes the prompts, draws the initial latents and puts the UNet in eval mode for the block."""
        if dtype is not None:
            self.to(dtype=dtype)
        unet_was_training = self.unet.training
        self.unet.eval()
        try:
            yield _SamplingRun(
                self, _prompt_list(prompts), num_frames, height, width, seed, generator, decode_chunk_size, with_uncond
            )
        finally:
            self.unet.train(unet_was_training)

    # ---- saving and loading ------------------------------------------------------------------

    def save_pretrained(self, model_dir: str | os.PathLike) -> None:
        """Writes unet/ (a VC2UNet or a diffusers UNet3DConditionModel: checkpoint.save_unet_dir),
        vae/, text_encoder/ and pipeline.json."""
        from t2v_turbo.models.adapter import is_diffusers_unet3d
        from t2v_turbo.models.text_encoder import save_text_encoder

        if not (isinstance(self.unet, VC2UNet) or is_diffusers_unet3d(self.unet)):
            raise TypeError(f"save_pretrained saves a VC2UNet or a diffusers UNet3DConditionModel, not a {type(self.unet).__name__}")
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.save_unet_dir(self.unet, model_dir / UNET_DIR)
        self.vae.save_pretrained(model_dir / VAE_DIR)
        save_text_encoder(self.text_encoder, model_dir / TEXT_ENCODER_DIR)
        config = {"fps": self.fps, **asdict(self.defaults)}
        text = json.dumps(config, indent=2) + "\n"
        write_atomically(model_dir / PIPELINE_CONFIG_NAME, lambda temporary: temporary.write_text(text))

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | os.PathLike,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        use_kernels: bool = True,
    ) -> T2VTurboPipeline:
        """Loads what save_pretrained wrote; the UNet and VAE in `dtype`, all on `device`."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            what = "is a file, not a directory" if model_dir.exists() else "does not exist"
            raise FileNotFoundError(f"model directory {model_dir} {what}")
        parts = {
            UNET_DIR: model_dir / UNET_DIR,
            VAE_DIR: model_dir / VAE_DIR,
            TEXT_ENCODER_DIR: model_dir / TEXT_ENCODER_DIR,
            PIPELINE_CONFIG_NAME: model_dir / PIPELINE_CONFIG_NAME,
        }
        missing = [name for name, path in parts.items() if not path.exists()]
        if missing:
            raise FileNotFoundError(
                f"{model_dir} is not a T2V-Turbo model directory: missing {', '.join(missing)} "
                f"(expected {UNET_DIR}/, {VAE_DIR}/, {TEXT_ENCODER_DIR}/ and {PIPELINE_CONFIG_NAME}, "
                "as T2VTurboPipeline.save_pretrained writes)"
            )
        from t2v_turbo.models.text_encoder import load_text_encoder
        from t2v_turbo.models.vae import load_vae

        fps, defaults = read_pipeline_config(model_dir)
        unet = checkpoint.load_unet_dir(parts[UNET_DIR], use_kernels=use_kernels)
        pipeline = cls(
            unet,
            load_vae(parts[VAE_DIR]),
            load_text_encoder(parts[TEXT_ENCODER_DIR]),
            fps=fps,
            defaults=defaults,
            use_kernels=use_kernels,
        )
        return pipeline.to(device=device, dtype=dtype)


def read_pipeline_config(model_dir: str | os.PathLike) -> tuple[int, GenerationDefaults]:
    """(fps, generation defaults) a model directory's pipeline.json records, without loading its
    models: the clip size and frame rate it was made for."""
    config = read_json_file(Path(model_dir) / PIPELINE_CONFIG_NAME)
    known = {f.name for f in fields(GenerationDefaults)}
    defaults = GenerationDefaults(**{key: value for key, value in config.items() if key in known})
    return int(config.get("fps", schedule.DEFAULT_FPS)), defaults


class _SamplingRun:
    """The state one sampling call shares between its steps: context, latents, generator, clock."""

    def __init__(
        self,
        pipeline: T2VTurboPipeline,
        prompts: list[str],
        num_frames: int | None,
        height: int | None,
        width: int | None,
        seed: int | None,
        generator: torch.Generator | None,
        decode_chunk_size: int,
        with_uncond: bool,
    ):
        if seed is not None and generator is not None:
            raise ValueError("give seed or generator, not both")
        num_frames = pipeline.defaults.num_frames if num_frames is None else num_frames
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
        height, width = pipeline.frame_size(height, width)
        self.pipeline = pipeline
        self.decode_chunk_size = decode_chunk_size
        self.device = pipeline.device
        self.generator = torch.Generator("cpu").manual_seed(seed) if seed is not None else generator
        self.clock = _Stopwatch(self.device)
        self.started = time.perf_counter()
        self.alphas_cumprod = schedule.alphas_cumprod(device=self.device)
        vae = pipeline.vae
        self.shape = (len(prompts), vae.latent_channels, num_frames, height // vae.downsample, width // vae.downsample)
        self.uncond_context = None
        with self.clock("text_s"):
            # The empty prompt is encoded in the same call so both contexts share one token length.
            encoded = pipeline.text_encoder.encode([""] + prompts if with_uncond else prompts).to(self.device)
        if with_uncond:
            self.uncond_context = encoded[:1].expand(len(prompts), *encoded.shape[1:])
            encoded = encoded[1:]
        self.context = encoded
        self.latents = self.randn()

    def randn(self) -> Tensor:
        """A float32 standard normal draw of the latent shape, from the run's generator."""
        draw_device = self.generator.device if self.generator is not None else self.device
        noise = torch.randn(self.shape, generator=self.generator, device=draw_device, dtype=torch.float32)
        return noise.to(self.device)

    def finish(self, latents: Tensor) -> SampleOutput:
        """Decodes the final latents and closes the clock."""
        vae = self.pipeline.vae
        with self.clock("vae_s"):
            decoded = vae.decode(latents.to(_module_dtype(vae)), decode_chunk_size=self.decode_chunk_size)
            frames = (decoded.float() / 2 + 0.5).clamp(0, 1)
        _synchronize(self.device)
        timings = {name: self.clock.seconds.get(name, 0.0) for name in ("unet_s", "vae_s", "text_s")}
        timings["total_s"] = time.perf_counter() - self.started
        return SampleOutput(frames=frames, latents=latents.float(), timings=timings)
