"""Benchmark cases of the fused reward preprocessing (SPEC 5) at the release's sizes.

A training step's decoded clips, (clips, 16, 3, 320, 512), go through the three reward
preprocessings at once: HPSv2.1 (letterbox pad to 224), CLIP (squash to 224) and the video
rewards (shorter side to 224, one crop). Implementations:

- reference-eager / reference-compile: the release's ops spec by spec (F.interpolate with
  antialias, F.pad or a crop, normalise; maths in fp32), eagerly and under torch.compile;
- matrix: the public op forced to its reference backend (each spec as two dense matmuls, A X B^T);
- triton: the public op, one launch for every spec forward and one for the backward;
- cuda: the same on the CUDA kernels (separable filtering, csrc/preprocess.cu).

Frames and the op's outputs are in the run's dtype (the reference functions compute and return
fp32). Traffic is what an ideal fused kernel moves: the frames read once and every output
written; the backward reads the outputs' gradients and writes the frames' gradient. No FLOP count
is given: the resampling is banded, so its arithmetic depends on the algorithm.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, Iterator, Optional

import torch

import turbo_kernels as tk
from benchmarks.harness import COMPILED, EAGER, Case, Impl, SuiteOptions
from turbo_kernels import dispatch
from turbo_kernels.ops.preprocess import PreprocessSpec, reward_preprocess
from turbo_kernels.reference import preprocess as ref

OP = "reward_preprocess"
FRAMES, HEIGHT, WIDTH, SIZE = 16, 320, 512, 224
CPU_FRAMES = 4
QUICK_FRAMES, QUICK_HEIGHT, QUICK_WIDTH, QUICK_SIZE = 2, 40, 64, 24
GPU_BATCH_SIZES = (2, 8, 16)
CPU_BATCH_SIZES = (1,)
QUICK_BATCH_SIZES = (1,)


def release_specs(size: int) -> tuple[PreprocessSpec, ...]:
    """HPSv2.1, CLIP and the video rewards' preprocessing (the crop at the release's golden offset
    when it fits, else centred)."""
    video_offset = (0, 111) if size == SIZE else None
    return (
        PreprocessSpec(size, "pad"),
        PreprocessSpec(size, "squash"),
        PreprocessSpec(size, "crop", mean=ref.IMAGENET_MEAN, std=ref.IMAGENET_STD, crop_offset=video_offset),
    )


def _input_maker(shape: tuple[int, ...], specs, options: SuiteOptions, with_grad: bool) -> Callable:
    generator = torch.Generator(device=options.device).manual_seed(options.seed)
    clips, frames = shape[:2]

    def make_inputs() -> SimpleNamespace:
        x = torch.rand(shape, generator=generator, device=options.device, dtype=options.dtype)
        grads = tuple(
            torch.randn((clips, frames, 3, s.size, s.size), generator=generator, device=options.device, dtype=options.dtype)
            for s in specs
        )
        return SimpleNamespace(frames=x.requires_grad_(with_grad), grad_outputs=grads if with_grad else ())

    return make_inputs


def _timed(forward: Callable, with_grad: bool) -> Callable:
    """One call: every spec's output, then (with gradients) the backward from fixed upstream
    gradients (torch.autograd.grad, so nothing accumulates into .grad between calls)."""

    def call(x: SimpleNamespace):
        outputs = tuple(forward(x.frames))
        if not with_grad:
            return outputs
        grads = tuple(g.to(o.dtype) for g, o in zip(x.grad_outputs, outputs))
        return torch.autograd.grad(outputs, x.frames, grads)

    return call


def _under_backend(name: str, call: Callable) -> Callable:
    # The backward dispatches too, so the whole call runs inside the backend's block.
    def run(x: SimpleNamespace):
        with tk.backend(name):
            return call(x)

    return run


def _impls(specs, with_grad: bool, device: torch.device) -> tuple[Impl, ...]:
    def release_path(frames: torch.Tensor):
        return [ref.release_pipeline(frames, spec) for spec in specs]

    compiled = torch.compile(release_path, dynamic=False)

    def fused(frames: torch.Tensor):
        return reward_preprocess(frames, list(specs))

    # The Triton interpreter (TRITON_INTERPRET=1) is a testing tool, never worth timing.
    def unavailable(backend_name: str) -> Optional[str]:
        return "no GPU" if device.type != "cuda" else dispatch.machine_unavailable_reason(backend_name, device)

    return (
        Impl(EAGER, _timed(release_path, with_grad)),
        Impl(COMPILED, _timed(compiled, with_grad), compiles=True),
        Impl("matrix", _under_backend("reference", _timed(fused, with_grad))),
        *(
            Impl(name, _under_backend(name, _timed(fused, with_grad)), unavailable=unavailable(name))
            for name in ("triton", "cuda")
        ),
    )


def cases(options: SuiteOptions) -> Iterator[Case]:
    """The three release preprocessings of 320x512 clips (HPS pad, CLIP squash, video crop, all to
    224) in one call, forward and forward+backward, for 2..16 clips of 16 frames on a GPU."""
    on_gpu = options.device.type == "cuda"
    if options.quick:
        frames, height, width, size = QUICK_FRAMES, QUICK_HEIGHT, QUICK_WIDTH, QUICK_SIZE
    else:
        frames, height, width, size = FRAMES if on_gpu else CPU_FRAMES, HEIGHT, WIDTH, SIZE
    batch_sizes = options.batch_sizes or (
        QUICK_BATCH_SIZES if options.quick else GPU_BATCH_SIZES if on_gpu else CPU_BATCH_SIZES
    )
    specs = release_specs(size)
    element_size = torch.empty((), dtype=options.dtype).element_size()
    for pass_name in ("fwd", "fwd+bwd"):
        with_grad = pass_name == "fwd+bwd"
        for clips in batch_sizes:
            shape = (clips, frames, 3, height, width)
            frame_bytes = clips * frames * 3 * height * width * element_size
            output_bytes = clips * frames * 3 * sum(s.size * s.size for s in specs) * element_size
            moved = frame_bytes + output_bytes
            yield Case(
                op=OP,
                case=f"c{clips}-f{frames}-{height}x{width}-to-{size}x3",
                pass_name=pass_name,
                make_inputs=_input_maker(shape, specs, options, with_grad),
                impls=_impls(specs, with_grad, options.device),
                bytes_moved=2 * moved if with_grad else moved,
                dtype=options.dtype,
                shape=shape,
            )
