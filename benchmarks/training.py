"""End-to-end benchmarks of T2V-Turbo-v2 training (issue 6) at the release's sizes, random weights.

- `distillation_step` (batch 1..3): one consistency-distillation step as `t2v-turbo train` runs
  it, through `t2v_turbo.train.distillation_loss` on random cache tensors (student forward with
  grad, consistency_output, guided_solver_step with the motion score, the no-grad target forward,
  pseudo-Huber loss), then backward and an AdamW step: fp32 master weights under bf16 autocast
  (the run's dtype), per-block gradient checkpointing as the release trains. Four variants as in
  benchmarks.models. Its `flops` (step_flops) are the student's forward and backward and the
  target's forward; checkpointing's recomputation, about one more forward, is left out.
- `motion_prior` (clips a call): `t2v_turbo.motion.compute_motion_prior` (DDIM inversion to each
  clip's t_hi, then the motion score) on a batch of clips at once vs one clip at a time, with
  reference ops and with kernels, and batched with kernels and the inversion through
  torch.compile (`preprocess --compile`). The teacher is frozen, as preprocess holds it. clips/s
  in the summary, at the case's inversion lengths: grid indices drawn from GPU_MOTION_GRID_RANGE,
  10 to 19, not preprocess's 100 to 199 for motion clips (a call there takes
  hundreds of UNet forwards, minutes a variant); batched and one-clip-at-a-time calls both spend
  nearly all their time in those forwards, so their ratio carries over. Its `flops`
  (motion_prior_flops) are the case's teacher passes and attention energies, counted on the meta
  device: at full size a clip at grid index n costs as much as n + 4.04 no-grad forwards of 12.6 TFLOP
  (the score's forward with gradients and its backward included).
- `whole_recipe` (batch 3, full fine-tune): distillation + HPSv2.1 + CLIP-H + InternVideo2 rewards on
  the VAE-decoded one-step prediction, backward and optimizer step, in one process: one row per
  set of memory savings, to read off what it takes to fit one 80 GB GPU (peak_mem_mb; a setup that
  runs out of memory is a skipped row whose reason says so). The student and the VAE run with
  kernels, as `train` does by default (the VAE's GroupNorm + SiLU fused, which keeps one
  activation fewer a pair for the backward). Its rows count no FLOPs: they are there for the
  memory.

Calls take seconds: `python -m benchmarks.training --warmup 1 --iters 3` (prints issue 6's targets).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from benchmarks import harness, models, rewards
from benchmarks.harness import Case, Impl, SuiteOptions
from benchmarks.models import Variant
from t2v_turbo import schedule
from t2v_turbo.train import StepOutput, TrainConfig, distillation_loss

STEP_OP = "distillation_step"
MOTION_OP = "motion_prior"
RECIPE_OP = "whole_recipe"
GPU_STEP_BATCH_SIZES = (1, 2, 3)
# Two clips: the motion score's backward through the full UNet keeps about 27 GiB of activations
# a clip in bf16 with the teacher frozen, so four clips do not fit 80 GB.
GPU_MOTION_CLIPS = (2,)
QUICK_MOTION_CLIPS = (2,)
# [lo, hi) grid indices of the motion cases; --quick inverts only a few grid steps (the tiny UNet
# on a CPU).
GPU_MOTION_GRID_RANGE = (10, 20)
QUICK_MOTION_GRID_RANGE = (0, 4)
RECIPE_BATCH = 3
GPU_MEMORY_MB = 80 * 1000**3 / 2**20
W_RANGE = (5.0, 15.0)


def _autocast(options: SuiteOptions) -> contextlib.AbstractContextManager:
    """bf16/fp16 mixed precision over fp32 master weights; fp32 runs without autocast."""
    if options.dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(options.device.type, dtype=options.dtype)


def _cache_batch(
    batch: int, scale: models.Scale, options: SuiteOptions, grid_range: tuple[int, int]
) -> dict[str, Tensor]:
    """What the teacher cache hands a training step: z_t, eps_cond, eps_uncond, score, context,
    grid indices drawn from [lo, hi) = grid_range, w and the motion strength (on the noisier half
    of the grid)."""
    device = options.device
    generator = torch.Generator(device=device).manual_seed(options.seed)
    cpu_generator = torch.Generator().manual_seed(options.seed)

    def latent() -> Tensor:
        return torch.randn(scale.latent_shape(batch), generator=generator, device=device, dtype=options.dtype)

    grid_index = _grid_indices(batch, options, grid_range, cpu_generator)
    return {
        "z_t": latent(), "eps_cond": latent(), "eps_uncond": latent(), "score": latent(),
        "context": models.random_context(batch, scale, device, options.dtype, options.seed),
        "grid_index": grid_index,  # on the host, as the trainer keeps it
        "w": torch.empty(batch).uniform_(*W_RANGE, generator=cpu_generator).to(device),
        "m": torch.where(grid_index >= schedule.DDIM_GRID_STEPS // 2, models.MOTION_STRENGTH, 0.0).to(device),
    }


def _grid_indices(
    batch: int, options: SuiteOptions, grid_range: tuple[int, int], generator: torch.Generator | None = None
) -> Tensor:
    """The case's grid indices: the first draw of the seeded host generator (_cache_batch's)."""
    generator = torch.Generator().manual_seed(options.seed) if generator is None else generator
    return torch.randint(*grid_range, (batch,), generator=generator)


def _student(scale: models.Scale, options: SuiteOptions, checkpointing: bool):
    student = models.build(models.unet_factory(scale), options.device, torch.float32, options.seed).train()
    if checkpointing:
        student.enable_gradient_checkpointing()
    return student


# ---- the distillation step --------------------------------------------------------------------------


def _step_inputs(batch: int, scale: models.Scale, options: SuiteOptions) -> Callable[[], SimpleNamespace]:
    def make_inputs() -> SimpleNamespace:
        student = _student(scale, options, checkpointing=True)
        return SimpleNamespace(
            student=student,
            optimizer=torch.optim.AdamW(student.parameters(), lr=1e-5),
            batch=_cache_batch(batch, scale, options, (0, schedule.DDIM_GRID_STEPS)),
            alphas_cumprod=schedule.alphas_cumprod(device=options.device),
            config=TrainConfig(preset=scale.unet_preset),
            cache={},
        )

    return make_inputs


def distillation_output(x: SimpleNamespace, model: torch.nn.Module, options: SuiteOptions) -> StepOutput:
    """The trainer's L_CD on the cached batch, the model its own target (no EMA, as the release)."""
    with _autocast(options):
        return distillation_loss(model, model, x.batch, x.batch["w"], x.batch["m"], x.alphas_cumprod, x.config)


def _step_call(variant: Variant, options: SuiteOptions) -> Callable[[SimpleNamespace], Tensor]:
    def call(x: SimpleNamespace) -> Tensor:
        models.set_kernels(x.student, variant.use_kernels)
        model = models.compiled_module(x.cache, x.student) if variant.compiled else x.student
        x.optimizer.zero_grad(set_to_none=True)
        with models.ops_backend(variant.use_kernels):
            loss = distillation_output(x, model, options).loss_cd
            loss.backward()
        x.optimizer.step()
        return loss.detach()

    return call


def step_flops(scale: models.Scale, batch: int) -> int:
    """The arithmetic a distillation step needs: the student's forward and backward, and the no-grad
    forward of its target (the solver ops, loss and optimizer are elementwise)."""
    return models.unet_flops(scale, batch, training=True) + models.unet_flops(scale, batch)


# ---- the motion prior --------------------------------------------------------------------------------


def motion_prior_flops(scale: models.Scale, grid_index: Sequence[int]) -> int:
    """compute_motion_prior's arithmetic for clips with these grid indices, batched or not (the
    inversion evaluates only the clips still advancing): a clip at grid index n costs n more
    no-grad teacher forwards than one at 0, whose whole prior (one inversion step, the reference
    forward, the live forward, the attention energies and the backward to z_t) is counted."""
    forward, prior_at_zero = _motion_pass_flops(scale)
    return sum(n * forward + prior_at_zero for n in grid_index)


@functools.lru_cache(maxsize=None)
def _motion_pass_flops(scale: models.Scale) -> tuple[int, int]:
    """(one clip's no-grad teacher forward, one clip's compute_motion_prior at grid index 0),
    counted on the meta device on the plain PyTorch path as models.counted_unet_flops counts."""
    from t2v_turbo.models import VC2UNet
    from t2v_turbo.motion import compute_motion_prior, teacher_path

    with torch.device("meta"):
        unet = VC2UNet.preset(scale.unet_preset, use_kernels=False).eval().requires_grad_(False)
        latents = torch.empty(scale.latent_shape(1))
        context = torch.empty(1, models.TEXT_TOKENS, scale.context_dim)
        timestep = torch.full((1,), 999)
    # Outside the meta device's scope: the inversion keeps its bookkeeping (grid indices, the
    # timestep table) on the host.
    forward, prior = harness.total_flop_counter(), harness.total_flop_counter()
    with forward, torch.no_grad():
        teacher_path(unet)(latents, timestep, context, models.FPS)
    with prior:
        compute_motion_prior(unet, latents, torch.zeros(1, dtype=torch.int64), latents, context, fps=models.FPS)
    return forward.get_total_flops(), prior.get_total_flops()


def _motion_unavailable() -> Optional[str]:
    try:
        from t2v_turbo.motion import compute_motion_prior  # noqa: F401
    except ImportError as error:
        return f"t2v_turbo.motion not available: {error}"
    return None


def _motion_grid_range(options: SuiteOptions) -> tuple[int, int]:
    return QUICK_MOTION_GRID_RANGE if options.quick else GPU_MOTION_GRID_RANGE


def _motion_inputs(clips: int, scale: models.Scale, options: SuiteOptions) -> Callable[[], SimpleNamespace]:
    def make_inputs() -> SimpleNamespace:
        teacher = models.build(models.unet_factory(scale), options.device, options.dtype, options.seed)
        teacher.eval().requires_grad_(False)
        cached = _cache_batch(clips, scale, options, _motion_grid_range(options))
        return SimpleNamespace(
            teacher=teacher, z0=cached["eps_cond"], noise=cached["eps_uncond"], context=cached["context"],
            grid_index=cached["grid_index"], compiled_teacher=None, graphed_teacher=None,
        )

    return make_inputs


def _motion_call(
    batched: bool, use_kernels: bool, compiled: bool, graphs: bool = False
) -> Callable[[SimpleNamespace], list[Tensor]]:
    def call(x: SimpleNamespace) -> list[Tensor]:
        from t2v_turbo.models.adapter import NoisePredictor
        from t2v_turbo.motion import compute_motion_prior

        models.set_kernels(x.teacher, use_kernels)
        inversion_teacher = None
        if compiled:
            # As `t2v-turbo preprocess --compile` does: the inversion's batch shrinks as clips reach
            # their t_hi, so dynamic shapes after the second size.
            if x.compiled_teacher is None:
                x.compiled_teacher = NoisePredictor(torch.compile(x.teacher))
            inversion_teacher = x.compiled_teacher
        if graphs:
            # As `t2v-turbo preprocess --cuda-graphs` does: a graph a batch size.
            if x.graphed_teacher is None:
                x.graphed_teacher = NoisePredictor(x.teacher).enable_cuda_graphs()
            inversion_teacher = x.graphed_teacher
        else:
            # The graphs' memory pool would count in the next variant's peak (and crowd it).
            x.graphed_teacher = None
        groups = [slice(None)] if batched else [slice(i, i + 1) for i in range(x.z0.shape[0])]
        with models.ops_backend(use_kernels):
            return [
                compute_motion_prior(
                    x.teacher, x.z0[g], x.grid_index[g], x.noise[g], x.context[g], inversion_teacher=inversion_teacher
                )["score"]
                for g in groups
            ]

    return call


# (name, batched, kernels, compiled inversion, inversion from CUDA graphs)
MOTION_IMPLS = (
    ("per-clip-reference", False, False, False, False),
    ("batched-reference", True, False, False, False),
    ("per-clip-kernels", False, True, False, False),
    ("batched-kernels", True, True, False, False),
    ("batched-kernels-compile", True, True, True, False),
    ("batched-kernels-graphs", True, True, False, True),
)


# ---- the whole recipe ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecipeSetup:
    """One set of memory savings for the whole recipe."""

    name: str
    checkpointing: bool  # UNet blocks, VAE decode and reward towers recompute in the backward
    decode_selected: bool  # decode only the frames the rewards score, not all 16
    adam_8bit: bool  # bitsandbytes AdamW8bit optimizer states


RECIPE_SETUPS = (
    RecipeSetup("no-savings", False, False, False),
    RecipeSetup("checkpointing", True, False, False),
    RecipeSetup("checkpointing+selected-frames", True, True, False),
    RecipeSetup("checkpointing+selected-frames+8bit-adam", True, True, True),
)


def _bitsandbytes_unavailable(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return "bitsandbytes AdamW8bit needs a GPU"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        return f"bitsandbytes not available: {error}"
    return None


def _recipe_inputs(batch: int, scale: models.Scale, reward_scale: rewards.RewardScale, options: SuiteOptions):
    def make_inputs() -> SimpleNamespace:
        vae = models.build(models.vae_factory(scale), options.device, options.dtype, options.seed)
        vae.use_kernels = True
        return SimpleNamespace(
            vae=vae, setup=None, student=None, optimizer=None, mixture=None,
            batch=_cache_batch(batch, scale, options, (0, schedule.DDIM_GRID_STEPS)),
            alphas_cumprod=schedule.alphas_cumprod(device=options.device),
            config=TrainConfig(preset=scale.unet_preset),
        )

    return make_inputs


def _prepare_recipe(x: SimpleNamespace, setup: RecipeSetup, scale, reward_scale, options: SuiteOptions) -> None:
    """Each setup gets its own student, optimizer and mixture (the previous setup's are freed first)."""
    if x.setup == setup:
        return
    x.student = x.optimizer = x.mixture = None
    if options.device.type == "cuda":
        torch.cuda.empty_cache()
    x.student = _student(scale, options, setup.checkpointing)
    if setup.adam_8bit:
        import bitsandbytes

        x.optimizer = bitsandbytes.optim.AdamW8bit(x.student.parameters(), lr=1e-5)
    else:
        x.optimizer = torch.optim.AdamW(x.student.parameters(), lr=1e-5)
    x.vae.gradient_checkpointing = setup.checkpointing
    x.mixture = rewards.build_mixture(reward_scale, options.device, options.dtype, options.seed, setup.checkpointing)
    x.setup = setup


def _recipe_call(setup: RecipeSetup, scale, reward_scale, options: SuiteOptions) -> Callable[[SimpleNamespace], Tensor]:
    def call(x: SimpleNamespace) -> Tensor:
        _prepare_recipe(x, setup, scale, reward_scale, options)
        x.optimizer.zero_grad(set_to_none=True)
        out = distillation_output(x, x.student, options)
        frame_indices = x.mixture.select_frames(scale.frames, torch.Generator().manual_seed(options.seed))
        with _autocast(options):
            if setup.decode_selected:
                decoded = x.vae.decode(out.f_theta, frame_indices=frame_indices)
            else:
                decoded = x.vae.decode(out.f_theta)[:, :, frame_indices]
            frames = (decoded.float() / 2 + 0.5).clamp(0, 1)
            reward, _ = x.mixture(frames, frame_indices, ["a stand-in caption"] * frames.shape[0])
        loss = out.loss_cd - reward
        loss.backward()
        x.optimizer.step()
        return loss.detach()

    return call


# ---- cases -------------------------------------------------------------------------------------------


def cases(options: SuiteOptions) -> Iterator[Case]:
    """The distillation step at batch 1..3 in four variants, the motion prior batched vs per clip,
    and the whole recipe's memory under each set of savings."""
    scale = models.scale_of(options)
    reward_scale = rewards.TINY if options.quick else rewards.FULL
    size_reason = models.full_size_unavailable(options)
    kernels_reason = models.kernels_unavailable(options.device)
    unet_params = models.parameter_count(models.unet_factory(scale))
    for batch in options.batch_sizes or ((1,) if options.quick else GPU_STEP_BATCH_SIZES):
        yield Case(
            op=STEP_OP,
            case=f"b{batch}-{scale.video}",
            pass_name="fwd+bwd",
            make_inputs=_step_inputs(batch, scale, options),
            impls=models.variant_impls(options, lambda v: _step_call(v, options)),
            # fp32 master weights read by the forward, the backward's recomputation and the
            # optimizer; gradients and two moments read and written once.
            bytes_moved=unet_params * 4 * (3 + 6),
            dtype=options.dtype,
            shape=scale.latent_shape(batch),
            flops=functools.partial(step_flops, scale, batch),
            rotate_inputs=False,
        )
    motion_reason = _motion_unavailable()
    for clips in QUICK_MOTION_CLIPS if options.quick else GPU_MOTION_CLIPS:
        yield Case(
            op=MOTION_OP,
            case="c{}-g{}-{}-{}".format(clips, *_motion_grid_range(options), scale.video),
            pass_name="fwd+bwd",
            make_inputs=_motion_inputs(clips, scale, options),
            impls=tuple(
                Impl(
                    name, _motion_call(batched, use_kernels, compiled, graphs), compiles=compiled,
                    unavailable=size_reason or motion_reason or (kernels_reason if use_kernels else None),
                )
                for name, batched, use_kernels, compiled, graphs in MOTION_IMPLS
            ),
            bytes_moved=unet_params * torch.empty((), dtype=options.dtype).element_size(),
            dtype=options.dtype,
            shape=scale.latent_shape(clips),
            flops=functools.partial(
                motion_prior_flops, scale, _grid_indices(clips, options, _motion_grid_range(options)).tolist()
            ),
            rotate_inputs=False,
        )
    batch = 1 if options.quick else RECIPE_BATCH
    rewards_reason = rewards.towers_unavailable() or rewards.mixture_unavailable()
    yield Case(
        op=RECIPE_OP,
        case=f"b{batch}-full-finetune-{scale.video}",
        pass_name="fwd+bwd",
        make_inputs=_recipe_inputs(batch, scale, reward_scale, options),
        impls=tuple(
            Impl(
                setup.name, _recipe_call(setup, scale, reward_scale, options),
                unavailable=size_reason or rewards_reason
                or (_bitsandbytes_unavailable(options.device) if setup.adam_8bit else None),
            )
            for setup in RECIPE_SETUPS
        ),
        bytes_moved=unet_params * 4 * (3 + 6),
        dtype=options.dtype,
        shape=scale.latent_shape(batch),
        rotate_inputs=False,
    )


# ---- targets -----------------------------------------------------------------------------------------


def summary(result: dict) -> list[str]:
    """Issue 6's targets: the step (kernels + compile vs both references, memory), motion
    preprocessing (batched kernels >= 3x the release's one clip at a time), and whether each
    setup of the whole recipe fits one 80 GB GPU."""
    lines = []
    step_cases = dict.fromkeys(row["case"] for row in result["rows"] if row["op"] == STEP_OP)
    for case in step_cases:
        lines += models.variant_targets(result, STEP_OP, case, f"training step ({case})")
    motion = models.rows_by(result, MOTION_OP)
    for case in dict.fromkeys(c for c, _ in motion):
        clips = int(case.split("-")[0].removeprefix("c"))
        lines.append(models.speedup_line(f"motion prior ({case})", motion, case, "batched-kernels", "per-clip-reference", 3.0))
        # Whether `preprocess --compile` helps: the compiled inversion against the eager one.
        lines.append(models.speedup_line(
            f"motion prior ({case}) compiled inversion", motion, case, "batched-kernels-compile", "batched-kernels", 1.0
        ))
        # Whether `preprocess --cuda-graphs` helps: the inversion replayed against the eager one,
        # by latency from an idle GPU (the device time hides the host's issue time graphs remove).
        if (case, "batched-kernels-graphs") in motion and (case, "batched-kernels") in motion:
            eager, graphed = (models.wall_or_median(motion[(case, impl)]) for impl in ("batched-kernels", "batched-kernels-graphs"))
            lines.append(f"info  motion prior ({case}) inversion from CUDA graphs (wall_ms): {eager / graphed:.2f}x batched-kernels")
        for (row_case, impl), row in motion.items():
            if row_case == case:
                lines.append(f"info  motion prior ({case}) {impl}: {1e3 * clips / row['median_ms']:.3f} clips/s")
    recipe, recipe_skipped = models.rows_by(result, RECIPE_OP), models.skip_reasons(result, RECIPE_OP)
    for setup in RECIPE_SETUPS:
        for (case, impl), row in recipe.items():
            if impl == setup.name:
                peak = row.get("peak_mem_mb")
                if peak is None:
                    lines.append(f"n/a   whole recipe {setup.name}: ran, peak memory not recorded (needs peak_mem_mb)")
                else:
                    verdict = "FITS" if peak <= GPU_MEMORY_MB else "OVER"
                    lines.append(f"{verdict}  whole recipe {setup.name}: peak {peak / 1024:.1f} GiB of 80 GB")
        for (case, impl), reason in recipe_skipped.items():
            if impl == setup.name:
                lines.append(f"n/a   whole recipe {setup.name}: {reason}")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    return models.run_suite(cases, summary, argv, "python -m benchmarks.training")


if __name__ == "__main__":
    raise SystemExit(main())
