"""End-to-end benchmarks of VideoCrafter2 sampling (issue 4), and the pieces the other end-to-end
suites (benchmarks.training, benchmarks.rewards) share.

The full `vc2` VC2UNet (1.41 B parameters) with random weights, built directly on the device
(timing only), in the run's dtype, on 16-frame 320x512 clips (latents 4x16x40x64):

- `unet_forward`: one forward of the student (guidance and motion embeddings) at batch 1 and 4;
- `generate`: 4-step and 16-step consistency sampling of one clip with T2VTurboPipeline, VAE
  decode included (the `ldm` VideoVAE). The text encoder is a stand-in returning random (B, 77,
  1024) contexts: the real OpenCLIP ViT-H text tower runs once a prompt, before the sampling loop,
  so its cost is not in these numbers. The kernel variants decode with the VAE's GroupNorm + SiLU
  fused (since 2026-11-28; earlier runs decoded unfused in every variant);
- `vae_decode`: the `ldm` VideoVAE decoding one clip's latents (what generation ends with), in
  the eager variants: `kernels` fuses the autoencoder's GroupNorm + SiLU pairs (VideoVAE's
  `use_kernels`), `-nhwc` makes its convolutions channels-last. Expected on an H100 (written before
  any GPU run): kernels 1.1-1.2x reference-eager (three passes over each normalised activation
  instead of five, and RowwiseMoments' slow statistics gone), and more channels-last, where torch's
  GroupNorm copies each channels-last activation to NCHW and back and group_norm_silu reads it in
  place.

Each row is one variant (`impl`): reference-eager (use_kernels off, solver ops on the reference
backend), reference-compile (the same under torch.compile), kernels (use_kernels on, ops on the
best backend) and kernels-compile; and two experiments. reference-eager-graphs
and kernels-graphs replay the UNet call from CUDA graphs (t2v_turbo.cuda_graphs: the first call of
a shape is the eager warm-up, the second captures), which tells how much of the eager time is
the host issuing kernels; kernels-compile-graphs replays the compiled UNet (within the compile
budget). reference-eager-nhwc and kernels-nhwc are the
eager variants with every convolution's weight channels-last (NHWC), so cuDNN's convolutions
return channels-last activations instead of transposing to and from NCHW around each call (a
profile of 4-step generation put 59 of 519 ms in those transposes, H100); whether torch's
GroupNorm then copies its input back to NCHW is what the rows tell. kernels-nhwc measures the
kernels as they are on such a model: group_norm_silu (the ResBlocks' and temporal convolutions'
GroupNorm + SiLU) and the fused temporal layers (their statistics included) read and write
channels-last, the latter on their cuBLAS projection route. `bytes` is the weight bytes one call must read (the traffic
floor of batch-1 sampling); `flops` the arithmetic of one call (the UNet forwards and the VAE
decode, counted by torch's FlopCounterMode on the meta device, the plain PyTorch path: matrix
products, convolutions and attention), so each row's roofline share is against the run's matrix
rate. Peak memory per row needs the harness's `peak_mem_mb` field.

End-to-end calls take seconds: run them with few iterations, e.g.
`python -m benchmarks.models --warmup 1 --iters 5`, which also prints the targets of issue 4
(`summary`). Without a GPU only `--quick` runs, on the tiny configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

import turbo_kernels as tk
from benchmarks import harness
from benchmarks.harness import COMPILED, EAGER, Case, Impl, SuiteOptions
from t2v_turbo.cuda_graphs import GraphedCall
from t2v_turbo.models import VC2UNet, VideoVAE, guidance_embedding, motion_embedding
from t2v_turbo.pipeline import T2VTurboPipeline
from turbo_kernels import dispatch

UNET_OP = "unet_forward"
GENERATE_OP = "generate"
VAE_OP = "vae_decode"
KERNELS = "kernels"
KERNELS_COMPILED = "kernels-compile"
EAGER_NHWC = "reference-eager-nhwc"
KERNELS_NHWC = "kernels-nhwc"
EAGER_GRAPHS = "reference-eager-graphs"
KERNELS_GRAPHS = "kernels-graphs"
KERNELS_COMPILED_GRAPHS = "kernels-compile-graphs"
GPU_ONLY = "full-size end-to-end cases need a GPU (--quick runs the tiny configuration on the CPU)"
MIB = harness.MIB

FPS = 8
GUIDANCE_SCALE = 7.5
MOTION_STRENGTH = 0.05
TEXT_TOKENS = 77


@dataclass(frozen=True)
class Scale:
    """The model sizes of a run: the release's, or the tiny test configuration (--quick)."""

    unet_preset: str
    vae_preset: str
    frames: int
    height: int
    width: int
    context_dim: int
    downsample: int  # the VAE's spatial factor between frames and latents

    @property
    def video(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, 4, self.frames, self.height // self.downsample, self.width // self.downsample)


FULL = Scale("vc2", "ldm", 16, 320, 512, 1024, 8)
TINY = Scale("tiny", "tiny", 4, 16, 16, 32, 2)
UNET_BATCH_SIZES = (1, 4)
GENERATE_STEPS = (4, 16)
GENERATE_BATCH = 1
QUICK_GENERATE_STEPS = (2,)


def scale_of(options: SuiteOptions) -> Scale:
    return TINY if options.quick else FULL


def full_size_unavailable(options: SuiteOptions) -> Optional[str]:
    """Why this run cannot time the suite's sizes here (full size on a CPU), or None."""
    return None if options.quick or options.device.type == "cuda" else GPU_ONLY


def kernels_unavailable(device: torch.device) -> Optional[str]:
    # The Triton interpreter (TRITON_INTERPRET=1) is a testing tool, never worth timing.
    return "no GPU" if device.type != "cuda" else dispatch.machine_unavailable_reason("triton", device)


# ---- the four variants ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str
    use_kernels: bool
    compiled: bool
    channels_last: bool = False
    cuda_graphs: bool = False


VARIANTS = (
    Variant(EAGER, use_kernels=False, compiled=False),
    Variant(COMPILED, use_kernels=False, compiled=True),
    Variant(KERNELS, use_kernels=True, compiled=False),
    Variant(KERNELS_COMPILED, use_kernels=True, compiled=True),
)
NHWC_VARIANTS = (
    Variant(EAGER_NHWC, use_kernels=False, compiled=False, channels_last=True),
    Variant(KERNELS_NHWC, use_kernels=True, compiled=False, channels_last=True),
)
GRAPH_VARIANTS = (
    Variant(EAGER_GRAPHS, use_kernels=False, compiled=False, cuda_graphs=True),
    Variant(KERNELS_GRAPHS, use_kernels=True, compiled=False, cuda_graphs=True),
    Variant(KERNELS_COMPILED_GRAPHS, use_kernels=True, compiled=True, cuda_graphs=True),
)
# Each experiment's variants, paired with the variant they change, and the time the summary's
# info lines compare: device time for a change of kernels; for CUDA graphs, which change what the
# host does, a call's latency from an idle GPU (wall_ms; median_ms where a row lacks it), since the
# device time is taken behind a spin kernel that hides the host's issue time.
EXPERIMENTS = {
    "channels-last": ("median_ms", ((EAGER_NHWC, EAGER), (KERNELS_NHWC, KERNELS))),
    "CUDA graphs": (
        "wall_ms", ((EAGER_GRAPHS, EAGER), (KERNELS_GRAPHS, KERNELS), (KERNELS_COMPILED_GRAPHS, KERNELS_COMPILED))
    ),
}


def variant_impls(
    options: SuiteOptions, call: Callable[[Variant], Callable[[Any], Any]], variants: Sequence[Variant] = VARIANTS
) -> tuple[Impl, ...]:
    """One Impl a variant; kernel variants are unavailable without a GPU, every variant is at full
    size on a CPU."""
    size_reason = full_size_unavailable(options)
    graphs_reason = "CUDA graphs need a GPU" if options.device.type != "cuda" else None
    return tuple(
        Impl(
            variant.name,
            call(variant),
            compiles=variant.compiled,
            unavailable=size_reason
            or (kernels_unavailable(options.device) if variant.use_kernels else None)
            or (graphs_reason if variant.cuda_graphs else None),
        )
        for variant in variants
    )


def ops_backend(use_kernels: bool) -> contextlib.AbstractContextManager:
    """The turbo_kernels backend of a variant's solver and loss ops (forward and backward)."""
    return contextlib.nullcontext() if use_kernels else tk.backend("reference")


def set_kernels(model: nn.Module, use_kernels: bool) -> None:
    """A VC2UNet's or VideoVAE's `use_kernels`, set only when the value changes (the setters walk
    every module)."""
    if model.use_kernels != use_kernels:
        model.use_kernels = use_kernels


def set_conv_memory_format(cache: dict, modules: Sequence[nn.Module], channels_last: bool) -> None:
    """Every Conv2d / Conv3d weight of `modules` channels-last (NHWC / NDHWC) or contiguous, when
    that changes (`cache` remembers the current one). Convolutions return their activations in
    their weight's format; values are the same either way."""
    if cache.get("channels_last", False) == channels_last:
        return
    formats = {2: torch.channels_last, 3: torch.channels_last_3d} if channels_last else {}
    with torch.no_grad():
        for module in modules:
            for conv in module.modules():
                if isinstance(conv, (nn.Conv2d, nn.Conv3d)):
                    dims = 2 if isinstance(conv, nn.Conv2d) else 3
                    conv.weight.data = conv.weight.data.contiguous(memory_format=formats.get(dims, torch.contiguous_format))
    cache["channels_last"] = channels_last


def graphed_unet(cache: dict, variant: Variant, fn: Callable, unet: nn.Module) -> Optional[GraphedCall]:
    """The GraphedCall of `fn` for a graph variant, None for the others. One variant's graphs at a
    time: the next variant's call drops them, so their memory pool does not count in its peak."""
    if not variant.cuda_graphs:
        cache.pop("graphs", None)
        return None
    if cache.get("graphs_variant") != variant.name:
        cache["graphs"], cache["graphs_variant"] = GraphedCall(fn, [unet]), variant.name
    return cache["graphs"]


def compiled_module(cache: dict, module: nn.Module) -> nn.Module:
    """One torch.compile wrapper of `module` an input set (the harness resets dynamo's caches
    before each compiled variant, so each starts from a clean compile)."""
    if "compiled" not in cache:
        cache["compiled"] = torch.compile(module, dynamic=False)
    return cache["compiled"]


# ---- building models ------------------------------------------------------------------------------


def build(factory: Callable[[], nn.Module], device: torch.device, dtype: Optional[torch.dtype], seed: int) -> nn.Module:
    """factory()'s module with its default random initialisation run on `device` (no CPU init and
    copy of a billion parameters), then cast to `dtype` (None: kept)."""
    if device.type == "cuda":
        # The previous case's compiled graphs may still hold its models.
        torch.compiler.reset()
        torch.cuda.empty_cache()
    torch.manual_seed(seed)
    with torch.device(device):
        module = factory()
    return module if dtype is None else module.to(dtype)


@functools.lru_cache(maxsize=None)
def parameter_count(factory: Callable[[], nn.Module]) -> int:
    """Parameters of factory()'s module, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        return sum(p.numel() for p in factory().parameters())


def unet_flops(scale: Scale, batch: int, training: bool = False) -> int:
    """FLOPs of one conditioned UNet forward (guidance and motion embeddings, as timed) at `batch`;
    `training`: the forward, then the backward to every parameter (no recomputation: what the
    step's arithmetic needs, not what checkpointing adds). Every FLOP is a sample's, so one
    sample's count (counted_unet_flops, seconds at full size) times the batch."""
    return batch * counted_unet_flops(scale, 1, training)


@functools.lru_cache(maxsize=None)
def counted_unet_flops(scale: Scale, batch: int, training: bool = False) -> int:
    """unet_flops counted at `batch` on the meta device on the plain PyTorch path (the kernels'
    custom ops are opaque to the counter; their arithmetic is the same). Attention's backward
    counts as the math path computes it, four products (FlashAttention-class kernels recompute
    the scores, a fifth, which benchmarks.spatial's FLOPs include)."""
    with torch.device("meta"):
        unet = VC2UNet.preset(scale.unet_preset, use_kernels=False).train(training)
        args = (
            torch.empty(scale.latent_shape(batch)),
            torch.full((batch,), 999),
            torch.empty(batch, TEXT_TOKENS, scale.context_dim),
            FPS,
            guidance_embedding(torch.full((batch,), GUIDANCE_SCALE)),
            motion_embedding(torch.full((batch,), MOTION_STRENGTH)),
        )
        with torch.set_grad_enabled(training), FlopCounterMode(display=False) as counter:
            out = unet(*args)
            if training:
                out.backward(torch.empty_like(out))
    return counter.get_total_flops()


@functools.lru_cache(maxsize=None)
def vae_decode_flops(scale: Scale, batch: int) -> int:
    """FLOPs of decoding `batch` clips of latents to frames: one clip's, counted as
    counted_unet_flops does, times the batch."""
    with torch.device("meta"):
        vae = vae_factory(scale)()
        latents = torch.empty(scale.latent_shape(1))
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            vae.decode(latents)
    return batch * counter.get_total_flops()


def generate_flops(scale: Scale, steps: int, batch: int) -> int:
    """Consistency sampling's FLOPs: one UNet forward a step (guidance is an embedding, not a second
    pass), then the VAE decode."""
    return steps * unet_flops(scale, batch) + vae_decode_flops(scale, batch)


def unet_factory(scale: Scale) -> Callable[[], nn.Module]:
    return functools.partial(VC2UNet.preset, scale.unet_preset)


def vae_factory(scale: Scale) -> Callable[[], nn.Module]:
    return functools.partial(VideoVAE.preset, scale.vae_preset)


@functools.lru_cache(maxsize=None)
def decoder_parameter_count(scale: Scale) -> int:
    """Parameters a VAE decode reads (the decoder and post_quant_conv), counted on the meta device."""
    with torch.device("meta"):
        autoencoder = vae_factory(scale)().autoencoder
    return sum(p.numel() for module in (autoencoder.decoder, autoencoder.post_quant_conv) for p in module.parameters())


def random_context(batch: int, scale: Scale, device: torch.device, dtype: torch.dtype, seed: int) -> Tensor:
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(batch, TEXT_TOKENS, scale.context_dim, generator=generator, device=device, dtype=dtype)


class RandomTextEncoder:
    """Stand-in text encoder: encode(prompts) -> seeded random (len(prompts), 77, width) contexts.
    The real text tower runs once a prompt, before sampling, so it is left out of the timing."""

    def __init__(self, scale: Scale, device: torch.device, dtype: torch.dtype, seed: int):
        self.scale, self.device, self.dtype, self.seed = scale, device, dtype, seed

    def encode(self, prompts: Sequence[str]) -> Tensor:
        return random_context(len(prompts), self.scale, self.device, self.dtype, self.seed)


# ---- cases ----------------------------------------------------------------------------------------


def _unet_inputs(batch: int, scale: Scale, options: SuiteOptions) -> Callable[[], SimpleNamespace]:
    def make_inputs() -> SimpleNamespace:
        device, dtype = options.device, options.dtype
        unet = build(unet_factory(scale), device, dtype, options.seed).eval()
        generator = torch.Generator(device=device).manual_seed(options.seed)
        latents = torch.randn(scale.latent_shape(batch), generator=generator, device=device, dtype=dtype)
        return SimpleNamespace(
            unet=unet,
            args=(
                latents,
                torch.full((batch,), 999, device=device),
                random_context(batch, scale, device, dtype, options.seed),
                FPS,
                guidance_embedding(torch.full((batch,), GUIDANCE_SCALE)).to(device),
                motion_embedding(torch.full((batch,), MOTION_STRENGTH)).to(device),
            ),
            cache={},
        )

    return make_inputs


def _unet_call(variant: Variant) -> Callable[[SimpleNamespace], Tensor]:
    @torch.no_grad()
    def call(x: SimpleNamespace) -> Tensor:
        set_kernels(x.unet, variant.use_kernels)
        set_conv_memory_format(x.cache, [x.unet], variant.channels_last)
        model = compiled_module(x.cache, x.unet) if variant.compiled else x.unet
        graphed = graphed_unet(x.cache, variant, model, x.unet)
        return (model if graphed is None else graphed)(*x.args)

    return call


def _pipeline_inputs(scale: Scale, options: SuiteOptions) -> Callable[[], SimpleNamespace]:
    def make_inputs() -> SimpleNamespace:
        device, dtype = options.device, options.dtype
        unet = build(unet_factory(scale), device, dtype, options.seed)
        vae = build(vae_factory(scale), device, dtype, options.seed)
        text_encoder = RandomTextEncoder(scale, device, dtype, options.seed)
        pipeline = T2VTurboPipeline(unet, vae, text_encoder, fps=FPS)
        return SimpleNamespace(pipeline=pipeline, unet=unet, vae=vae, cache={})

    return make_inputs


def _generate_call(variant: Variant, steps: int, batch: int, scale: Scale) -> Callable[[SimpleNamespace], Tensor]:
    def call(x: SimpleNamespace) -> Tensor:
        pipeline = x.pipeline
        if pipeline.use_kernels != variant.use_kernels:
            pipeline.use_kernels = variant.use_kernels
        set_conv_memory_format(x.cache, [x.unet, x.vae], variant.channels_last)
        pipeline.noise_predictor.model = compiled_module(x.cache, x.unet) if variant.compiled else x.unet
        predictor = pipeline.noise_predictor
        predictor.graphs = graphed_unet(x.cache, variant, predictor.call_model, x.unet)
        output = pipeline.generate(
            ["a stand-in prompt"] * batch, num_steps=steps, guidance_scale=GUIDANCE_SCALE,
            motion_strength=MOTION_STRENGTH, num_frames=scale.frames, height=scale.height, width=scale.width,
            seed=0, progress=False,
        )
        return output.frames

    return call


def _vae_inputs(scale: Scale, options: SuiteOptions) -> Callable[[], SimpleNamespace]:
    def make_inputs() -> SimpleNamespace:
        device, dtype = options.device, options.dtype
        vae = build(vae_factory(scale), device, dtype, options.seed)
        generator = torch.Generator(device=device).manual_seed(options.seed)
        latents = torch.randn(scale.latent_shape(GENERATE_BATCH), generator=generator, device=device, dtype=dtype)
        return SimpleNamespace(vae=vae, latents=latents, cache={})

    return make_inputs


def _vae_call(variant: Variant) -> Callable[[SimpleNamespace], Tensor]:
    @torch.no_grad()
    def call(x: SimpleNamespace) -> Tensor:
        set_kernels(x.vae, variant.use_kernels)
        set_conv_memory_format(x.cache, [x.vae], variant.channels_last)
        return x.vae.decode(x.latents)

    return call


def cases(options: SuiteOptions) -> Iterator[Case]:
    """UNet forward at batch 1 and 4, 4- and 16-step generation with VAE decode, in four variants,
    and the VAE decode alone, eager."""
    scale = scale_of(options)
    element_size = torch.empty((), dtype=options.dtype).element_size()
    unet_bytes = parameter_count(unet_factory(scale)) * element_size
    vae_bytes = parameter_count(vae_factory(scale)) * element_size
    for batch in options.batch_sizes or ((1,) if options.quick else UNET_BATCH_SIZES):
        yield Case(
            op=UNET_OP,
            case=f"b{batch}-{scale.video}",
            pass_name="fwd",
            make_inputs=_unet_inputs(batch, scale, options),
            impls=variant_impls(options, _unet_call, VARIANTS + NHWC_VARIANTS + GRAPH_VARIANTS),
            bytes_moved=unet_bytes,
            dtype=options.dtype,
            shape=(batch, 4, scale.frames, scale.height, scale.width),
            flops=functools.partial(unet_flops, scale, batch),
            rotate_inputs=False,
        )
    for steps in QUICK_GENERATE_STEPS if options.quick else GENERATE_STEPS:
        yield Case(
            op=GENERATE_OP,
            case=f"steps{steps}-b{GENERATE_BATCH}-{scale.video}",
            pass_name="fwd",
            make_inputs=_pipeline_inputs(scale, options),
            impls=variant_impls(
                options, lambda v, steps=steps: _generate_call(v, steps, GENERATE_BATCH, scale),
                VARIANTS + NHWC_VARIANTS + GRAPH_VARIANTS,
            ),
            bytes_moved=steps * unet_bytes + vae_bytes,
            dtype=options.dtype,
            shape=(GENERATE_BATCH, 3, scale.frames, scale.height, scale.width),
            flops=functools.partial(generate_flops, scale, steps, GENERATE_BATCH),
            rotate_inputs=False,
        )
    frames_shape = (GENERATE_BATCH, 3, scale.frames, scale.height, scale.width)
    yield Case(
        op=VAE_OP,
        case=f"b{GENERATE_BATCH}-{scale.video}",
        pass_name="fwd",
        make_inputs=_vae_inputs(scale, options),
        impls=variant_impls(options, _vae_call, tuple(v for v in VARIANTS if not v.compiled) + NHWC_VARIANTS),
        # The decoder's weights, the latents read and the frames written.
        bytes_moved=element_size * (
            decoder_parameter_count(scale) + math.prod(scale.latent_shape(GENERATE_BATCH)) + math.prod(frames_shape)
        ),
        dtype=options.dtype,
        shape=frames_shape,
        flops=functools.partial(vae_decode_flops, scale, GENERATE_BATCH),
        rotate_inputs=False,
    )


# ---- targets and the summary ----------------------------------------------------------------------


def rows_by(result: dict, op: str, pass_name: Optional[str] = None) -> dict[tuple[str, str], dict]:
    """(case, impl) -> row of one op's measured rows (of one pass, when `pass_name` is given)."""
    return {
        (row["case"], row["impl"]): row
        for row in result["rows"]
        if row["op"] == op and pass_name in (None, row["pass"])
    }


def skip_reasons(result: dict, op: str) -> dict[tuple[str, str], str]:
    return {(s["case"], s["impl"]): s["reason"] for s in result["skipped"] if s["op"] == op}


def wall_or_median(row: dict) -> float:
    """A row's latency from an idle GPU (wall_ms), or its median where it has none (CPU rows)."""
    return row.get("wall_ms") or row["median_ms"]


def speedup_line(label: str, rows: dict, case: str, fast: str, slow: str, target: float) -> str:
    """'PASS'/'FAIL' with the measured speed-up of `fast` over `slow`, or why it cannot be judged."""
    if (case, fast) not in rows or (case, slow) not in rows:
        missing = [impl for impl in (fast, slow) if (case, impl) not in rows]
        return f"n/a   {label}: {', '.join(missing)} not measured"
    speedup = rows[(case, slow)]["median_ms"] / rows[(case, fast)]["median_ms"]
    verdict = "PASS" if speedup >= target else "FAIL"
    return f"{verdict}  {label}: {fast} {speedup:.2f}x {slow} (target >= {target:g}x)"


def memory_line(label: str, rows: dict, case: str, impl: str, baseline: str) -> str:
    """'PASS'/'FAIL' for `impl`'s peak memory no higher than `baseline`'s, from rows' peak_mem_mb."""
    peaks = [rows.get((case, name), {}).get("peak_mem_mb") for name in (impl, baseline)]
    if None in peaks:
        return f"n/a   {label}: peak memory not recorded for {impl} and {baseline} (needs GPU rows with peak_mem_mb)"
    verdict = "PASS" if peaks[0] <= peaks[1] else "FAIL"
    return f"{verdict}  {label}: {impl} {peaks[0]:.0f} MiB vs {baseline} {peaks[1]:.0f} MiB (target: no higher)"


def variant_targets(result: dict, op: str, case: str, label: str) -> list[str]:
    """The three targets issues 4 and 6 set for kernels + compile on one case."""
    rows = rows_by(result, op)
    return [
        speedup_line(f"{label} vs reference eager", rows, case, KERNELS_COMPILED, EAGER, 1.5),
        speedup_line(f"{label} vs reference compile", rows, case, KERNELS_COMPILED, COMPILED, 1.15),
        memory_line(f"{label} peak memory", rows, case, KERNELS_COMPILED, EAGER),
    ]


def summary(result: dict) -> list[str]:
    """Issue 4's targets for 4-step generation end to end, judged on a harness result, and what
    the experiments (channels-last, CUDA graphs) measured."""
    cases_4_step = [row["case"] for row in result["rows"] if row["op"] == GENERATE_OP and row["case"].startswith("steps4-")]
    case = cases_4_step[0] if cases_4_step else f"steps4-b{GENERATE_BATCH}-{FULL.video}"
    return variant_targets(result, GENERATE_OP, case, f"4-step generation ({case})") + vae_lines(result) + experiment_lines(result)


def vae_lines(result: dict) -> list[str]:
    """Informational: the fused GroupNorm + SiLU's speed-up on the VAE decode, contiguous and
    channels-last."""
    rows = rows_by(result, VAE_OP)
    return [
        f"info  {VAE_OP} {case}: {fast} {rows[(case, slow)]['median_ms'] / rows[(case, fast)]['median_ms']:.2f}x {slow}"
        for case in dict.fromkeys(case for case, _ in rows)
        for fast, slow in ((KERNELS, EAGER), (KERNELS_NHWC, EAGER_NHWC), (KERNELS_NHWC, EAGER))
        if (case, fast) in rows and (case, slow) in rows
    ]


def experiment_lines(result: dict) -> list[str]:
    """Informational: each experiment variant's speed-up over the variant it changes, per case."""
    lines = []
    for experiment, (metric, pairs) in EXPERIMENTS.items():
        for op in (UNET_OP, GENERATE_OP):
            rows = rows_by(result, op)

            def time_of(row: dict) -> float:
                return row.get(metric) or row["median_ms"]

            for case in dict.fromkeys(case for case, _ in rows):
                measured = [(new, old) for new, old in pairs if (case, new) in rows and (case, old) in rows]
                if measured:
                    ratios = ", ".join(
                        f"{new} {time_of(rows[(case, old)]) / time_of(rows[(case, new)]):.2f}x {old}"
                        for new, old in measured
                    )
                    lines.append(f"info  {experiment} {op} {case} ({metric}): {ratios}")
    return lines


# ---- running one suite on its own -------------------------------------------------------------------


def run_suite(suite: harness.Suite, summarize: Callable[[dict], list[str]], argv: Optional[Sequence[str]], prog: str) -> int:
    """The harness on one suite (its usual options), then the suite's target lines from the JSON it wrote."""
    parser = argparse.ArgumentParser(prog=prog, description=harness.DESCRIPTION)
    harness.add_arguments(parser)
    args = parser.parse_args(argv)
    before = set(Path(args.out).glob("*.json")) if Path(args.out).is_dir() else set()
    started = time.time()
    status = harness.run(args, [suite])
    written = [p for p in set(Path(args.out).glob("*.json")) - before if p.stat().st_mtime >= started - 1]
    if written:
        result = json.loads(max(written, key=lambda p: p.stat().st_mtime).read_text())
        print()
        print(harness.targets_heading(args.quick))
        for line in summarize(result):
            print(f"  {line}")
    return status


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_suite(cases, summary, argv, "python -m benchmarks.models")


if __name__ == "__main__":
    raise SystemExit(main())
