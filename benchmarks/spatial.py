"""Benchmark cases of spatial attention (SPEC 1) at VideoCrafter2 shapes.

Every attention level of the UNet runs, on each of the B*F frames (16 a video), self-attention
over its h*w = 2560 / 640 / 160 tokens with 5 / 10 / 20 heads of dim 64, then cross-attention from
those tokens to the 77 text tokens. Inputs come as the projections hand them in: self-attention's
q, k, v are channel slices of one fused (B*F, N, 3*heads*d) qkv projection; cross-attention's q is
(B*F, N, heads*d) and its k, v slices of one (B, 77, 2*heads*d) projection of each video's context.
Every implementation returns (B*F, N, heads*d), the layout the out projection reads:

- reference-eager / reference-compile: the reference (per-head matmul, softmax, matmul in fp32,
  the context broadcast over frames), eagerly and under torch.compile;
- sdpa-flash / sdpa-efficient / sdpa-cudnn: torch's scaled_dot_product_attention forced to one
  backend (torch.nn.attention.sdpa_kernel) on heads-first views. SDPA cannot broadcast one context
  over F frames, so its cross-attention k, v are the per-frame copies VideoCrafter2 makes (made
  outside the timed call: SDPA's best case); a backend that cannot take a case is skipped, with
  its reason;
- xformers (when installed): xformers.ops.memory_efficient_attention on the same per-frame
  inputs, as (batch, tokens, heads, d) views;
- triton: the public op, which reads the projections' layout in place and shares each video's
  k, v across its frames (kv_repeat = F).

FLOPs: 4*B*F*heads*N*M*d forward (two matmuls), and 2.5 times that more for the backward (five);
the JSON rows carry TFLOP/s.
"""

from __future__ import annotations

import functools
import warnings
from types import SimpleNamespace
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import turbo_kernels as tk
from benchmarks import models
from benchmarks.harness import COMPILED, EAGER, MAX_REASON_CHARS, Case, Impl, SuiteOptions
from turbo_kernels import dispatch
from turbo_kernels.ops.spatial import spatial_attention
from turbo_kernels.reference import attention as ref

SELF_OP = "spatial_self_attention"
CROSS_OP = "spatial_cross_attention"
OPS = (SELF_OP, CROSS_OP)
SDPA_BACKENDS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
}
XFORMERS = "xformers"
FRAMES = 16
HEAD_DIM = 64
TEXT_TOKENS = 77
# (tokens h*w, heads) of the attention levels: 40x64, 20x32 and 10x16 latents.
LEVELS = ((2560, 5), (640, 10), (160, 20))
# The CPU times only the smallest level: the reference's fp32 scores of 2560 tokens alone take
# 2 GiB a video.
CPU_LEVELS = ((160, 20),)
QUICK_FRAMES = 2
QUICK_HEAD_DIM = 16
QUICK_LEVELS = ((24, 2),)
QUICK_TEXT_TOKENS = 5
# Videos a batch: 16 and 128 frames.
GPU_BATCH_SIZES = (1, 8)
CPU_BATCH_SIZES = (1,)
QUICK_BATCH_SIZES = (1,)
# The backward's five matmuls against the forward's two.
BWD_FLOPS_FACTOR = 2.5


def _forward_flops(rows: int, heads: int, queries: int, keys: int, head_dim: int) -> int:
    return 4 * rows * heads * queries * keys * head_dim


def _bytes_moved(rows: int, kv_rows: int, queries: int, keys: int, channels: int, element_size: int, with_grad: bool):
    """What an ideal kernel moves: q read and out written (B*F rows), k and v read (one row a video
    for cross-attention); the backward then reads q, k, v, out, dO and writes dq, dk, dv (the fp32
    logsumexp, 1/32 of a bf16 tensor at d = 64, is left out). Per query or key row alike, 2 tensors
    forward and 6 with the backward."""
    tensors = 6 if with_grad else 2
    return tensors * element_size * channels * (rows * queries + kv_rows * keys)


def _input_maker(
    kind: str, batch: int, frames: int, queries: int, keys: int, heads: int, head_dim: int, options: SuiteOptions,
    with_grad: bool,
) -> Callable:
    generator = torch.Generator(device=options.device).manual_seed(options.seed)
    rows, channels = batch * frames, heads * head_dim

    def tensor(shape, requires_grad: bool = False) -> torch.Tensor:
        x = torch.randn(shape, generator=generator, device=options.device, dtype=options.dtype)
        return x.requires_grad_(requires_grad)

    def make_inputs() -> SimpleNamespace:
        if kind == "self":
            q, k, v = tensor((rows, queries, 3 * channels), with_grad).split(channels, dim=-1)
            kv_repeat, sdpa_kv = 1, (k, v)
        else:
            q = tensor((rows, queries, channels), with_grad)
            kv = tensor((batch, keys, 2 * channels))
            k, v = kv.requires_grad_(with_grad).split(channels, dim=-1)
            kv_repeat = frames
            per_frame = kv.detach().repeat_interleave(frames, dim=0).requires_grad_(with_grad)
            sdpa_kv = per_frame.split(channels, dim=-1)
        return SimpleNamespace(
            q=q, k=k, v=v, sdpa_kv=sdpa_kv, heads=heads, kv_repeat=kv_repeat,
            grad_out=tensor((rows, queries, channels)) if with_grad else None,
        )

    return make_inputs


def _timed(forward: Callable, with_grad: bool) -> Callable:
    """One call: `forward(x)` returns the output and the tensors it is differentiable in; with
    gradients, the backward from a fixed upstream gradient follows (torch.autograd.grad, so
    nothing accumulates into .grad between calls)."""

    def call(x: SimpleNamespace):
        out, inputs = forward(x)
        return torch.autograd.grad(out, inputs, x.grad_out) if with_grad else out

    return call


def _sdpa(backend: SDPBackend) -> Callable:
    def forward(x: SimpleNamespace):
        k, v = x.sdpa_kv
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(*(ref.split_heads(t, x.heads) for t in (x.q, k, v)))
        return ref.merge_heads(out), (x.q, k, v)

    return forward


def xformers_unavailable(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return "no GPU"
    try:
        import xformers.ops  # noqa: F401
    except ImportError as error:
        return f"xformers not installed: {error}"
    return None


def _xformers(x: SimpleNamespace):
    import xformers.ops

    k, v = x.sdpa_kv
    out = xformers.ops.memory_efficient_attention(*(t.unflatten(-1, (x.heads, -1)) for t in (x.q, k, v)))
    return out.flatten(2), (x.q, k, v)


@functools.lru_cache(maxsize=None)
def sdpa_unavailable(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    """Why this SDPA backend cannot run here at this dtype and head dim (a small probe call), or None."""
    probe = torch.zeros(1, 1, 16, head_dim, device=device, dtype=dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel(SDPA_BACKENDS[name]):
                F.scaled_dot_product_attention(probe, probe, probe)
        except RuntimeError as exc:
            why = "; ".join(str(w.message) for w in caught) or str(exc)
            reason = " ".join(f"{name} cannot run {str(dtype).removeprefix('torch.')} on {device.type}: {why}".split())
            return reason[:MAX_REASON_CHARS]
    return None


def _impls(with_grad: bool, device: torch.device, dtype: torch.dtype, head_dim: int) -> tuple[Impl, ...]:
    compiled = torch.compile(ref.spatial_attention, dynamic=False)

    def shared_context(fn: Callable) -> Callable:
        """`fn` with the signature of ref.spatial_attention, on each video's own k, v."""
        return lambda x: (fn(x.q, x.k, x.v, x.heads, None, x.kv_repeat), (x.q, x.k, x.v))

    def triton_call(x: SimpleNamespace):
        # The backward dispatches too, so the whole call runs inside the backend's block.
        with tk.backend("triton"):
            return _timed(shared_context(spatial_attention), with_grad)(x)

    # The Triton interpreter (TRITON_INTERPRET=1) is a testing tool, never worth timing.
    triton_unavailable = "no GPU" if device.type != "cuda" else dispatch.machine_unavailable_reason("triton", device)
    sdpa = tuple(
        Impl(name, _timed(_sdpa(backend), with_grad), unavailable=sdpa_unavailable(name, device, dtype, head_dim))
        for name, backend in SDPA_BACKENDS.items()
    )
    return (
        Impl(EAGER, _timed(shared_context(ref.spatial_attention), with_grad)),
        *sdpa,
        Impl(XFORMERS, _timed(_xformers, with_grad), unavailable=xformers_unavailable(device)),
        Impl(COMPILED, _timed(shared_context(compiled), with_grad), compiles=True),
        Impl("triton", triton_call, unavailable=triton_unavailable),
    )


def cases(options: SuiteOptions) -> Iterator[Case]:
    """Spatial self- and cross-attention, forward and forward+backward, at the UNet's attention levels."""
    on_gpu = options.device.type == "cuda"
    if options.quick:
        frames, head_dim, levels, text_tokens = QUICK_FRAMES, QUICK_HEAD_DIM, QUICK_LEVELS, QUICK_TEXT_TOKENS
    else:
        frames, head_dim, levels, text_tokens = FRAMES, HEAD_DIM, LEVELS if on_gpu else CPU_LEVELS, TEXT_TOKENS
    batch_sizes = options.batch_sizes or (
        QUICK_BATCH_SIZES if options.quick else GPU_BATCH_SIZES if on_gpu else CPU_BATCH_SIZES
    )
    element_size = torch.empty((), dtype=options.dtype).element_size()
    for op, kind in ((SELF_OP, "self"), (CROSS_OP, "cross")):
        for pass_name in ("fwd", "fwd+bwd"):
            with_grad = pass_name == "fwd+bwd"
            for batch in batch_sizes:
                for queries, heads in levels:
                    rows, channels = batch * frames, heads * head_dim
                    keys, kv_rows = (queries, rows) if kind == "self" else (text_tokens, batch)
                    flops = _forward_flops(rows, heads, queries, keys, head_dim)
                    make_inputs = _input_maker(kind, batch, frames, queries, keys, heads, head_dim, options, with_grad)
                    yield Case(
                        op=op,
                        case=f"b{batch}-n{queries}-h{heads}" + ("" if kind == "self" else f"-m{keys}"),
                        pass_name=pass_name,
                        make_inputs=make_inputs,
                        impls=_impls(with_grad, options.device, options.dtype, head_dim),
                        bytes_moved=_bytes_moved(rows, kv_rows, queries, keys, channels, element_size, with_grad),
                        dtype=options.dtype,
                        shape=(rows, queries, channels),
                        flops=int(flops * (1 + BWD_FLOPS_FACTOR)) if with_grad else flops,
                    )


def triton_against_fastest_sdpa(label: str, rows: dict, case: str, target: float) -> str:
    """The target line of the Triton op's speed-up on `case` over the SDPA backend with the least
    median time among `rows` ((case, impl) -> row), or n/a when no SDPA row was measured (runs from
    before 2026-11-26's second lease have one row of torch's own backend choice, `sdpa`, instead of
    a row a backend)."""
    measured = [name for name in (*SDPA_BACKENDS, "sdpa") if (case, name) in rows]
    if not measured:
        return f"n/a   {label}: no SDPA backend measured"
    fastest = min(measured, key=lambda name: rows[(case, name)]["median_ms"])
    return models.speedup_line(label, rows, case, "triton", fastest, target)


# Where the Triton kernels lose, models do not run them: said under the lines, which judge the kernels.
MODELS_RUN_SDPA = (
    "info  spatial attention: the patch layer's processors and VC2UNet call SDPA (torch's backend choice), "
    "not these Triton kernels; the lines above judge the kernels alone"
)


def summary(result: dict) -> list[str]:
    """Issue 3's target for spatial self- and cross-attention, per measured case and pass: the
    Triton op never slower than the fastest SDPA backend."""
    lines = []
    for op in OPS:
        for pass_name in ("fwd", "fwd+bwd"):
            rows = models.rows_by(result, op, pass_name)
            for case in dict.fromkeys(case for case, _ in rows):
                lines.append(triton_against_fastest_sdpa(f"{op} {case} {pass_name}", rows, case, 1.0))
    return [*lines, MODELS_RUN_SDPA] if lines else lines
