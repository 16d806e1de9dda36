"""Benchmark cases of the fused temporal transformer (SPEC 1; turbo_kernels.FusedTemporalTransformer)
at VideoCrafter2 shapes, against the release's code path (reference.temporal_block) eagerly and
under torch.compile, alone (triton; triton-strided and triton-cublas with proj_in and proj_out
forced onto either route) and itself under torch.compile (triton-compile); and of its
GEGLU activation alone (turbo_kernels.geglu, also every spatial transformer's), against the
release's `value * F.gelu(gate)` eagerly and compiled; of its LayerNorms alone
(turbo_kernels.layer_norm on the block's tokens), against F.layer_norm eagerly and compiled; and
of its proj_in and proj_out GEMMs alone (`strided_linear`), the Triton kernel at several tile
shapes against cuBLAS running the same GEMM on tokens that are already contiguous.

Every level of the UNet runs one temporal transformer on its (B*F, C, H, W) stream: C = 320, 640,
1280, 1280 channels on 40x64, 20x32, 10x16 and 5x8 latents, with 5, 10, 20, 20 heads of 64. The
input is the stream; forward+backward takes the gradients of the stream and of every parameter
from a fixed upstream gradient, as training does. The forward alone runs under no_grad, as sampling
does. A block's `flops` are the release path's (block_flops), so its rows' roofline share weighs its
GEMMs against the run's matrix rate.

    python -m benchmarks.temporal_block [--warmup N --iters N ...]
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

import turbo_kernels as tk
from benchmarks import models
from benchmarks.harness import COMPILED, EAGER, Case, Impl, SuiteOptions
from turbo_kernels import FusedTemporalTransformer
from turbo_kernels.temporal_block import fused_temporal_transformer

OP = "temporal_block"
GEGLU_OP = "geglu"
LAYER_NORM_OP = "layer_norm"
FRAMES = 16
HEAD_DIM = 64
# (channels, height, width, heads) of the UNet's levels: 40x64, 20x32, 10x16 latents and the middle block.
LEVELS = ((320, 40, 64, 5), (640, 20, 32, 10), (1280, 10, 16, 20), (1280, 5, 8, 20))
QUICK_FRAMES = 4
QUICK_HEAD_DIM = 16
QUICK_LEVELS = ((64, 4, 4, 2),)
GPU_BATCH_SIZES = (1, 4)
CPU_BATCH_SIZES = (1,)
# Ideal traffic in stream-sized tensors: the forward reads x and writes out; the backward reads x
# and dO and writes dx. Parameters: read once forward; read again and their gradients written backward.
STREAM_TRAFFIC = {"fwd": 2, "fwd+bwd": 5}
PARAMETER_TRAFFIC = {"fwd": 1, "fwd+bwd": 3}
# Issue 3's target: the fused block at least this much faster than the reference block.
TARGET_SPEEDUP = 1.5
# Issue 4's target for kernels + compile over the compiled reference, at the whole model.
COMPILED_TARGET_SPEEDUP = 1.15
TRITON = "triton"
TRITON_COMPILED = "triton-compile"
# The block with its proj_in and proj_out forced onto each route (turbo_kernels.temporal_block.
# projection_route); `triton` takes the "auto" one.
ROUTE_IMPLS = {"strided": "triton-strided", "cublas": "triton-cublas"}
# The block on a channels_last stream, as the UNet's channels-last convolutions hand it over
# (benchmarks.models' kernels-nhwc): its cuBLAS route, no layout copy.
TRITON_NHWC = "triton-nhwc"
STRIDED_LINEAR_OP = "strided_linear"
CUBLAS_CONTIGUOUS = "cublas-contiguous"
# (BLOCK_M, BLOCK_N, BLOCK_K, warps) of strided_linear's 16-bit tile sweep, and (BLOCK_M, BLOCK_J,
# BLOCK_K, warps) of its weight gradient's; the first of each is linear_params' / weight_grad_params'.
# All compile for sm_90a without spills (the kernel report's compiler: 58-235 registers, up to 96 KiB
# of shared memory).
LINEAR_TILES = ((64, 64, 32, 4), (128, 64, 32, 4), (128, 64, 64, 4), (64, 128, 64, 4), (128, 128, 32, 8), (128, 128, 64, 8))
WEIGHT_GRAD_TILES = ((32, 64, 64, 4), (64, 64, 64, 4), (64, 128, 64, 4), (32, 128, 128, 8), (64, 128, 128, 8))


def _inputs(shape, pass_name: str, make_module: Callable[[], FusedTemporalTransformer], options: SuiteOptions):
    generator = torch.Generator(device=options.device).manual_seed(options.seed)
    with_grad = pass_name == "fwd+bwd"

    def make_inputs() -> SimpleNamespace:
        module = make_module()
        x = torch.randn(shape, generator=generator, device=options.device, dtype=options.dtype)
        return SimpleNamespace(
            module=module,
            x=x.requires_grad_(with_grad),
            differentiable=(x, *module.parameters()) if with_grad else (),
            grad_out=torch.randn(shape, generator=generator, device=options.device, dtype=options.dtype)
            if with_grad else None,
        )

    return make_inputs


def _timed(forward: Callable[[SimpleNamespace], torch.Tensor], with_grad: bool) -> Callable:
    def call(inputs: SimpleNamespace):
        if not with_grad:
            with torch.no_grad():
                return forward(inputs)
        return torch.autograd.grad(forward(inputs), inputs.differentiable, inputs.grad_out)

    return call


def _impls(frames: int, with_grad: bool, device: torch.device) -> tuple[Impl, ...]:
    compiled = torch.compile(lambda module, x: module.reference_forward(x, frames), dynamic=False)
    # The fused block's ops are opaque to the compiler; it fuses the LayerNorms, GEGLU and
    # residual adds between them, which the eager fused block runs as separate kernels.
    fused_compiled = torch.compile(lambda module, x: module(x, frames), dynamic=False)

    def fused(inputs: SimpleNamespace) -> torch.Tensor:
        with tk.backend("triton"):
            return inputs.module(inputs.x, frames)

    def fused_then_compiled(inputs: SimpleNamespace) -> torch.Tensor:
        with tk.backend("triton"):
            return fused_compiled(inputs.module, inputs.x)

    def fused_on_route(route: str) -> Callable[[SimpleNamespace], torch.Tensor]:
        def call(inputs: SimpleNamespace) -> torch.Tensor:
            with tk.backend("triton"):
                return fused_temporal_transformer(inputs.module, inputs.x, frames, projections=route)

        return call

    # The input sets holding triton-nhwc's copies: the harness calls an impl on one set first and
    # resets its peak memory statistics while the other sets are still alive.
    holding_copies: list[SimpleNamespace] = []

    def on_channels_last(call: Callable[[SimpleNamespace], Any]) -> Callable[[SimpleNamespace], Any]:
        def run(inputs: SimpleNamespace) -> Any:
            # The same values channels_last, the output's gradient too (a channels-last
            # convolution's), made on this impl's first call of each input set and dropped from
            # every set by the first call of any other impl (without_channels_last), so no other
            # impl's memory holds them.
            if not hasattr(inputs, "channels_last"):
                holding_copies.append(inputs)
                x = inputs.x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(with_grad)
                inputs.channels_last = SimpleNamespace(
                    module=inputs.module, x=x,
                    differentiable=(x, *inputs.module.parameters()) if with_grad else (),
                    grad_out=None if inputs.grad_out is None
                    else inputs.grad_out.contiguous(memory_format=torch.channels_last),
                )
            return call(inputs.channels_last)

        return run

    def without_channels_last(call: Callable[[SimpleNamespace], Any]) -> Callable[[SimpleNamespace], Any]:
        def run(inputs: SimpleNamespace) -> Any:
            # The harness runs the compiled impls after triton-nhwc: its copies of every input
            # set's stream and gradient would count in their peak memory.
            for holder in holding_copies:
                vars(holder).pop("channels_last", None)
            holding_copies.clear()
            return call(inputs)

        return run

    kernels_unavailable = models.kernels_unavailable(device)
    return (
        Impl(EAGER, without_channels_last(
            _timed(lambda inputs: inputs.module.reference_forward(inputs.x, frames), with_grad))),
        Impl(COMPILED, without_channels_last(_timed(lambda inputs: compiled(inputs.module, inputs.x), with_grad)),
             compiles=True),
        Impl(TRITON, without_channels_last(_timed(fused, with_grad)), unavailable=kernels_unavailable),
        Impl(TRITON_COMPILED, without_channels_last(_timed(fused_then_compiled, with_grad)), compiles=True,
             unavailable=kernels_unavailable),
        *(
            Impl(name, without_channels_last(_timed(fused_on_route(route), with_grad)), unavailable=kernels_unavailable)
            for route, name in ROUTE_IMPLS.items()
        ),
        Impl(TRITON_NHWC, on_channels_last(_timed(fused, with_grad)), unavailable=kernels_unavailable),
    )


def _sizes(options: SuiteOptions) -> tuple[int, int, tuple, tuple[int, ...]]:
    """(frames, head dim, levels, batch sizes) of a run: the UNet's, or tiny ones with --quick."""
    frames, head_dim, levels = (
        (QUICK_FRAMES, QUICK_HEAD_DIM, QUICK_LEVELS) if options.quick else (FRAMES, HEAD_DIM, LEVELS)
    )
    on_gpu = options.device.type == "cuda"
    batch_sizes = options.batch_sizes or (GPU_BATCH_SIZES if on_gpu and not options.quick else CPU_BATCH_SIZES)
    return frames, head_dim, levels, batch_sizes


@functools.lru_cache(maxsize=None)
def block_flops(channels: int, heads: int, head_dim: int, shape: tuple[int, ...], frames: int, with_grad: bool) -> int:
    """FLOPs of the release's block on a `shape` stream (forward; with_grad: then the gradients of the
    stream and every parameter), counted by FlopCounterMode on the meta device."""
    with torch.device("meta"):
        module = FusedTemporalTransformer(channels, heads, head_dim)
        x = torch.empty(shape, requires_grad=with_grad)
        with torch.set_grad_enabled(with_grad), FlopCounterMode(display=False) as counter:
            out = module.reference_forward(x, frames)
            if with_grad:
                out.backward(torch.empty_like(out))
    return counter.get_total_flops()


def cases(options: SuiteOptions) -> Iterator[Case]:
    """The fused temporal transformer forward and forward+backward at every level of the UNet."""
    frames, head_dim, levels, batch_sizes = _sizes(options)
    element_size = torch.empty((), dtype=options.dtype).element_size()
    for pass_name in ("fwd", "fwd+bwd"):
        for batch in batch_sizes:
            for channels, height, width, heads in levels:
                # One module a case, shared by its input sets (built on first use).
                make_module = functools.cache(
                    lambda channels=channels, heads=heads: FusedTemporalTransformer(channels, heads, head_dim)
                    .to(options.device, options.dtype)
                )
                shape = (batch * frames, channels, height, width)
                parameters = models.parameter_count(functools.partial(FusedTemporalTransformer, channels, heads, head_dim))
                yield Case(
                    op=OP,
                    case=f"b{batch}-c{channels}-{height}x{width}-h{heads}",
                    pass_name=pass_name,
                    make_inputs=_inputs(shape, pass_name, make_module, options),
                    impls=_impls(frames, pass_name == "fwd+bwd", options.device),
                    bytes_moved=(STREAM_TRAFFIC[pass_name] * torch.Size(shape).numel()
                                 + PARAMETER_TRAFFIC[pass_name] * parameters) * element_size,
                    dtype=options.dtype,
                    shape=shape,
                    flops=functools.partial(
                        block_flops, channels, heads, head_dim, shape, frames, pass_name == "fwd+bwd"
                    ),
                )


# An input of a token op: its shape, and its dtype (None: the run's storage dtype).
InputSpec = tuple[tuple[int, ...], Optional[torch.dtype]]


def _random_inputs(specs: Sequence[InputSpec], grad_shape: tuple[int, ...], with_grad: bool, options: SuiteOptions):
    """make_inputs of a token op: its inputs (all differentiable in forward+backward) and the
    upstream gradient of its output."""
    generator = torch.Generator(device=options.device).manual_seed(options.seed)

    def make_inputs() -> SimpleNamespace:
        def randn(shape, dtype=None):
            return torch.randn(shape, generator=generator, device=options.device, dtype=dtype or options.dtype)

        inputs = tuple(randn(shape, dtype).requires_grad_(with_grad) for shape, dtype in specs)
        return SimpleNamespace(inputs=inputs, differentiable=inputs, grad_out=randn(grad_shape))

    return make_inputs


def _token_op_cases(
    options: SuiteOptions,
    op: str,
    eager: Callable[..., torch.Tensor],
    kernel: Callable[..., torch.Tensor],
    input_specs: Callable[[int, int], Sequence[InputSpec]],
    output_shape: Callable[[int, int], tuple[int, ...]],
    elements: Callable[[int, int, bool], int],
) -> Iterator[Case]:
    """One op of the block on its tokens at every level (tokens = batch x frames x positions, the
    level's C channels), eager, compiled and on its Triton kernel; `input_specs(tokens, C)`, the
    output's shape, and `elements(tokens, C, with_grad)` the values an ideal pass moves."""
    frames, _, levels, batch_sizes = _sizes(options)
    element_size = torch.empty((), dtype=options.dtype).element_size()
    compiled = torch.compile(eager, dynamic=False)

    def on_triton(*inputs: torch.Tensor) -> torch.Tensor:
        with tk.backend("triton"):
            return kernel(*inputs)

    def call(fn, with_grad: bool):
        return _timed(lambda inputs: fn(*inputs.inputs), with_grad)

    for pass_name in ("fwd", "fwd+bwd"):
        with_grad = pass_name == "fwd+bwd"
        for batch in batch_sizes:
            for channels, height, width, _ in levels:
                tokens = batch * frames * height * width
                specs = input_specs(tokens, channels)
                yield Case(
                    op=op,
                    case=f"b{batch}-c{channels}-{height}x{width}",
                    pass_name=pass_name,
                    make_inputs=_random_inputs(specs, output_shape(tokens, channels), with_grad, options),
                    impls=(
                        Impl(EAGER, call(eager, with_grad)),
                        Impl(COMPILED, call(compiled, with_grad), compiles=True),
                        Impl(TRITON, call(on_triton, with_grad), unavailable=models.kernels_unavailable(options.device)),
                    ),
                    bytes_moved=elements(tokens, channels, with_grad) * element_size,
                    dtype=options.dtype,
                    shape=specs[0][0],
                )


def tile_impl_name(tile: tuple[int, int, int, int]) -> str:
    return "triton-{}x{}x{}-w{}".format(*tile)


def _linear_inputs(videos: int, frames: int, channels: int, positions: int, options: SuiteOptions):
    generator = torch.Generator(device=options.device).manual_seed(options.seed)

    def make_inputs() -> SimpleNamespace:
        def randn(*shape, dtype=None):
            return torch.randn(shape, generator=generator, device=options.device, dtype=dtype or options.dtype)

        rows = videos * frames
        return SimpleNamespace(
            stream=randn(rows, channels, positions),
            tokens=randn(rows, positions, channels),
            weight=randn(channels, channels) / channels**0.5,
            bias=randn(channels),
            scale=randn(videos, channels, dtype=torch.float32),
            shift=randn(videos, channels, dtype=torch.float32),
        )

    return make_inputs


def _linear_calls(group_norm, frames: int) -> dict[str, tuple[Callable, Callable, int]]:
    """name -> (triton(x, tiles), cublas(x), activation-sized tensors an ideal call moves) of the
    six GEMMs proj_in and proj_out launch, each with the operand layouts it has in the block
    (inner width = C): x.stream stands for the stream or its gradient (channel-major), x.tokens
    for the block's tokens or their gradient (row-major). cuBLAS runs the same FLOPs on
    contiguous tokens."""

    def linear(x):
        return torch.nn.functional.linear(x.tokens, x.weight, x.bias)

    def input_grad(x):
        return torch.matmul(x.tokens, x.weight)

    def weight_grad(x):
        tokens = x.tokens.flatten(0, 1)
        return torch.mm(tokens.t(), tokens)

    def stream_tokens(x):
        return x.stream.transpose(1, 2)

    return {
        # Forward: GroupNorm applied on load from the stream; the stream added to a channel-major output.
        "proj_in": (lambda x, t: group_norm.strided_linear(
            stream_tokens(x), x.weight, x.bias, None, x.scale, x.shift, frames, False, tiles=t), linear, 2),
        "proj_out": (lambda x, t: group_norm.strided_linear(
            x.tokens, x.weight, x.bias, x.stream, None, None, frames, True, tiles=t), linear, 3),
        # Backward, input gradients: the transposed weight; proj_in's written back channel-major.
        "proj_in-dx": (lambda x, t: group_norm.strided_linear(
            x.tokens, x.weight.t(), None, None, None, None, frames, True, tiles=t), input_grad, 2),
        "proj_out-dx": (lambda x, t: group_norm.strided_linear(
            stream_tokens(x), x.weight.t(), None, None, None, None, frames, False, tiles=t), input_grad, 2),
        # Backward, weight gradients: proj_in's normalises the stream on load again.
        "proj_in-dw": (lambda x, t: group_norm.strided_linear_weight_grad(
            x.tokens, stream_tokens(x), x.scale, x.shift, frames, tiles=t), weight_grad, 2),
        "proj_out-dw": (lambda x, t: group_norm.strided_linear_weight_grad(
            stream_tokens(x), x.tokens, None, None, frames, tiles=t), weight_grad, 2),
    }


def _tile_params(name: str, tile: tuple[int, int, int, int]) -> tuple[dict, int]:
    axes = ("BLOCK_M", "BLOCK_J", "BLOCK_K") if name.endswith("-dw") else ("BLOCK_M", "BLOCK_N", "BLOCK_K")
    return dict(zip(axes, tile[:3])), tile[3]


def strided_linear_cases(options: SuiteOptions) -> Iterator[Case]:
    """The GEMMs of the fused block's proj_in and proj_out alone at every level: the two forward
    ones (proj_in reads the stream channel-major and applies GroupNorm's affine on load; proj_out
    writes channel-major and adds the stream) and the four of their backward (`-dx`: input
    gradients, `-dw`: weight gradients), one launch a row. Each 16-bit tile shape of LINEAR_TILES
    (WEIGHT_GRAD_TILES for `-dw`) runs the Triton kernel; `cublas-contiguous` runs the same FLOPs
    on tokens already contiguous, without the layout work: the bar the sweep is read against (its
    output differs)."""
    from turbo_kernels.triton_kernels import group_norm

    frames, _, levels, _ = _sizes(options)
    # One video unless asked: it keeps the sweep (160 rows a batch size) short in a lease.
    batch_sizes = options.batch_sizes or (1,)
    element_size = torch.empty((), dtype=options.dtype).element_size()
    unavailable = models.kernels_unavailable(options.device)
    if unavailable is None and options.dtype == torch.float32:
        unavailable = "the tile sweep is of the 16-bit tensor-core tiles"

    def tiled(call, name, tile):
        params = _tile_params(name, tile)
        return _timed(lambda x: call(x, params), False)

    for batch in batch_sizes:
        for channels, height, width, _ in levels:
            positions = height * width
            activation = batch * frames * positions * channels
            for name, (triton_call, cublas_call, activations_moved) in _linear_calls(group_norm, frames).items():
                tiles = WEIGHT_GRAD_TILES if name.endswith("-dw") else LINEAR_TILES
                yield Case(
                    op=STRIDED_LINEAR_OP,
                    case=f"{name}-b{batch}-c{channels}-{height}x{width}",
                    pass_name="fwd",
                    make_inputs=_linear_inputs(batch, frames, channels, positions, options),
                    impls=(
                        Impl(CUBLAS_CONTIGUOUS, _timed(cublas_call, False)),
                        *(
                            Impl(tile_impl_name(tile), tiled(triton_call, name, tile), unavailable=unavailable)
                            for tile in tiles
                        ),
                    ),
                    bytes_moved=(activations_moved * activation + channels * channels) * element_size,
                    flops=2 * activation * channels,
                    dtype=options.dtype,
                    shape=(batch * frames, channels, height, width),
                )


def _release_geglu(h: torch.Tensor) -> torch.Tensor:
    value, gate = h.chunk(2, dim=-1)
    return value * torch.nn.functional.gelu(gate)


def geglu_cases(options: SuiteOptions) -> Iterator[Case]:
    """The feed-forward's GEGLU at every level: h (tokens, 2 hidden), hidden = 4 C. Forward: h
    read, the output written; backward: h and the output's gradient read, h's gradient written."""
    return _token_op_cases(
        options, GEGLU_OP, _release_geglu, tk.geglu,
        input_specs=lambda tokens, channels: [((tokens, 8 * channels), None)],
        output_shape=lambda tokens, channels: (tokens, 4 * channels),
        elements=lambda tokens, channels, with_grad: tokens * 4 * channels * (3 + 5 * with_grad),
    )


def _torch_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.layer_norm(x, x.shape[-1:], weight, bias)


def layer_norm_cases(options: SuiteOptions) -> Iterator[Case]:
    """norm1/norm2/norm3 of the block at every level, with float32 weight and bias (autocast's
    master weights) and their gradients in the backward, as training takes them. Forward: x read,
    the output written; backward: x and the output's gradient read, x's gradient written (the
    parameters' traffic is negligible)."""
    return _token_op_cases(
        options, LAYER_NORM_OP, _torch_layer_norm, tk.layer_norm,
        input_specs=lambda tokens, channels: [
            ((tokens, channels), None), ((channels,), torch.float32), ((channels,), torch.float32)
        ],
        output_shape=lambda tokens, channels: (tokens, channels),
        elements=lambda tokens, channels, with_grad: tokens * channels * (2 + 3 * with_grad),
    )


GROUP_NORM_OP = "group_norm_silu"
# x as the UNet hands it over: a ResBlock's frames (N, C, H, W), the transposed view of the
# stream (B, C, F, H, W) that a temporal convolution normalises, a contiguous video; the first two
# also channels-last, as channels-last convolutions return them (`-nhwc`).
GROUP_NORM_LAYOUTS = ("frames", "stream", "video", "frames-nhwc", "stream-nhwc")
GROUP_NORM_OUTPUT_FORMATS = {"frames-nhwc": torch.channels_last, "stream-nhwc": torch.channels_last_3d}


def _group_norm_inputs(layout: str, videos: int, frames: int, channels: int, height: int, width: int,
                       with_grad: bool, autocast: bool, options: SuiteOptions) -> Callable[[], SimpleNamespace]:
    generator = torch.Generator(device=options.device).manual_seed(options.seed)

    def make_inputs() -> SimpleNamespace:
        def randn(*shape):
            return torch.randn(shape, generator=generator, device=options.device, dtype=options.dtype)

        stream = randn(videos * frames, channels, height, width)
        if layout.endswith("-nhwc"):
            stream = stream.contiguous(memory_format=torch.channels_last)
        video = stream.unflatten(0, (videos, frames)).transpose(1, 2)
        x = {"video": video.contiguous()}.get(layout, stream if layout.startswith("frames") else video)
        weight, bias = 1 + 0.1 * randn(channels), 0.1 * randn(channels)
        if autocast:  # float32 master weights, as mixed-precision training holds them
            weight, bias = weight.float(), bias.float()
        differentiable = tuple(t.requires_grad_(with_grad) for t in (x, weight, bias))
        return SimpleNamespace(
            x=x, weight=weight, bias=bias, differentiable=differentiable if with_grad else (),
            # In the layout of the kernels' output, as the next layer's gradient arrives: channels-last
            # for the -nhwc layouts (a channels-last convolution's), contiguous for the others.
            grad_out=randn(*x.shape).to(torch.float32 if autocast else options.dtype).contiguous(
                memory_format=GROUP_NORM_OUTPUT_FORMATS.get(layout, torch.contiguous_format)
            ) if with_grad else None,
        )

    return make_inputs


def _torch_group_norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(torch.nn.functional.group_norm(x, 32, weight, bias, 1e-5))


def group_norm_cases(options: SuiteOptions) -> Iterator[Case]:
    """GroupNorm + SiLU as the UNet's ResBlocks and temporal convolutions run it, at every level
    and in each of its input layouts, forward and forward+backward (x, weight and bias): torch's
    composition eager and compiled against turbo_kernels.group_norm_silu; in 16-bit also
    under CUDA autocast with float32 weight and bias (cases `...-autocast`: bf16 training, where
    the output and its gradient are float32). An ideal pass reads x once and writes the output
    once; the backward reads x and the output's gradient and writes x's."""
    frames, _, levels, batch_sizes = _sizes(options)
    element_size = torch.empty((), dtype=options.dtype).element_size()
    compiled = torch.compile(_torch_group_norm_silu, dynamic=False)

    def on_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        with tk.backend("triton"):
            return tk.group_norm_silu(x, weight, bias, 32, 1e-5)

    def call(fn: Callable, with_grad: bool, autocast: bool) -> Callable[[SimpleNamespace], Any]:
        def timed(inputs: SimpleNamespace):
            with contextlib.ExitStack() as stack:
                if autocast:
                    stack.enter_context(torch.autocast(options.device.type, dtype=options.dtype))
                if not with_grad:
                    stack.enter_context(torch.no_grad())
                    return fn(inputs.x, inputs.weight, inputs.bias)
                if fn is on_triton:
                    stack.enter_context(tk.backend("triton"))
                out = fn(inputs.x, inputs.weight, inputs.bias)
                return torch.autograd.grad(out, inputs.differentiable, inputs.grad_out)

        return timed

    autocast_modes = (False, True) if element_size == 2 else (False,)

    for pass_name in ("fwd", "fwd+bwd"):
        with_grad = pass_name == "fwd+bwd"
        for batch in batch_sizes:
            for channels, height, width, _ in levels:
                for layout, autocast in itertools.product(GROUP_NORM_LAYOUTS, autocast_modes):
                    shape = (batch * frames, channels, height, width)
                    # x (and its gradient) in the storage dtype; the output and its gradient float32 under autocast.
                    out_size = 4 if autocast else element_size
                    bytes_per_element = element_size + out_size + (2 * element_size + out_size if with_grad else 0)
                    yield Case(
                        op=GROUP_NORM_OP,
                        case=f"b{batch}-c{channels}-{height}x{width}-{layout}" + ("-autocast" if autocast else ""),
                        pass_name=pass_name,
                        make_inputs=_group_norm_inputs(
                            layout, batch, frames, channels, height, width, with_grad, autocast, options
                        ),
                        impls=(
                            Impl(EAGER, call(_torch_group_norm_silu, with_grad, autocast)),
                            Impl(COMPILED, call(compiled, with_grad, autocast), compiles=True),
                            Impl(
                                TRITON, call(on_triton, with_grad, autocast),
                                unavailable=models.kernels_unavailable(options.device),
                            ),
                        ),
                        bytes_moved=bytes_per_element * torch.Size(shape).numel(),
                        dtype=options.dtype,
                        shape=shape,
                    )


def summary(result: dict) -> list[str]:
    """Issue 3's target for the fused block (>= 1.5x the reference block), per measured case and pass;
    the block's share of issue 4's (fused + compile >= 1.15x the compiled reference); and the GEGLU
    and LayerNorm kernels never slower than the eager forms they replace."""
    lines = []
    for pass_name in ("fwd", "fwd+bwd"):
        rows = models.rows_by(result, OP, pass_name)
        for case in dict.fromkeys(case for case, _ in rows):
            label = f"temporal block {case} {pass_name}"
            lines.append(models.speedup_line(label, rows, case, TRITON, EAGER, TARGET_SPEEDUP))
            lines.append(models.speedup_line(label, rows, case, TRITON_COMPILED, COMPILED, COMPILED_TARGET_SPEEDUP))
            lines.extend(route_lines(rows, case, label))
            if (case, TRITON_NHWC) in rows and (case, TRITON) in rows:
                ratio = rows[(case, TRITON)]["median_ms"] / rows[(case, TRITON_NHWC)]["median_ms"]
                lines.append(f"info  {label}: {TRITON_NHWC} {ratio:.2f}x {TRITON} (a channels_last stream)")
        rows = models.rows_by(result, GEGLU_OP, pass_name)
        for case in dict.fromkeys(case for case, _ in rows):
            # The UNet's GEGLU modules take the kernel wherever use_kernels is on: it must never lose.
            lines.append(models.speedup_line(f"geglu {case} {pass_name}", rows, case, TRITON, EAGER, 1.0))
        rows = models.rows_by(result, LAYER_NORM_OP, pass_name)
        for case in dict.fromkeys(case for case, _ in rows):
            # The fused block takes the kernel: it must never lose to torch's LayerNorm.
            lines.append(models.speedup_line(f"layer_norm {case} {pass_name}", rows, case, TRITON, EAGER, 1.0))
        rows = models.rows_by(result, GROUP_NORM_OP, pass_name)
        for case in dict.fromkeys(case for case, _ in rows):
            # VC2UNet's ResBlocks and temporal convolutions take it by default (outside autocast and compile).
            lines.append(models.speedup_line(f"group_norm_silu {case} {pass_name}", rows, case, TRITON, EAGER, 1.0))
    lines.extend(tile_sweep_lines(result))
    return lines


def route_lines(rows: dict, case: str, label: str) -> list[str]:
    """Informational: which projection route was faster on a case, to set
    turbo_kernels.temporal_block.CUBLAS_PROJECTIONS_BELOW from."""
    strided, cublas = (rows.get((case, name)) for name in (ROUTE_IMPLS["strided"], ROUTE_IMPLS["cublas"]))
    if strided is None or cublas is None:
        return []
    faster = "cublas" if cublas["median_ms"] < strided["median_ms"] else "strided"
    return [
        f"info  {label} projections: strided {strided['median_ms']:.3f} ms, cublas {cublas['median_ms']:.3f} ms: "
        f"{faster} faster"
    ]


def tile_sweep_lines(result: dict) -> list[str]:
    """Per strided_linear case: the default tile's and the fastest tile's time as a multiple of
    cuBLAS's on contiguous tokens (informational: the sweep chooses tiles, it sets no target)."""
    rows = models.rows_by(result, STRIDED_LINEAR_OP, "fwd")
    lines = []
    for case in dict.fromkeys(case for case, _ in rows):
        default = tile_impl_name((WEIGHT_GRAD_TILES if "-dw-" in case else LINEAR_TILES)[0])
        tiles = {impl: row["median_ms"] for (c, impl), row in rows.items() if c == case and impl.startswith("triton-")}
        if (case, CUBLAS_CONTIGUOUS) not in rows or not tiles:
            continue
        cublas_ms = rows[(case, CUBLAS_CONTIGUOUS)]["median_ms"]
        best = min(tiles, key=tiles.get)
        shown = f"default {default} " + (f"{tiles[default] / cublas_ms:.2f}x" if default in tiles else "not measured")
        lines.append(
            f"info  strided_linear {case}: time / cuBLAS-contiguous's: {shown}, fastest {best} {tiles[best] / cublas_ms:.2f}x"
        )
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    return models.run_suite(
        lambda options: itertools.chain(
            cases(options), geglu_cases(options), layer_norm_cases(options), group_norm_cases(options),
            strided_linear_cases(options),
        ),
        summary, argv,
        "python -m benchmarks.temporal_block",
    )


if __name__ == "__main__":
    raise SystemExit(main())
