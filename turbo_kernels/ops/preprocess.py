"""Public fused reward preprocessing (SPEC 5), registered as torch.library custom ops.

`turbo_kernels.reward_preprocess(frames, specs)` turns decoded frames into every reward model's
input in one differentiable pass: per spec a resize (bicubic or bilinear, antialiased as
torchvision does by default), a centred pad, a squash or a crop, and a per-channel normalisation,
exactly as the release's torchvision transforms (turbo_kernels/reference/preprocess.py).

Each spec is linear in the frames: out = (A X B^T - mean) / std per channel, with the pad or crop
folded into A and B. Those matrices, their bands (the spans of nonzero weights the kernels walk)
and the statistics form a Plan, built once per (specs, H, W, device, dtype) and cached. The
custom op `turbo_kernels::reward_preprocess` takes the specs' fields as plain lists, looks the
plan up from the frames' concrete shape, and returns all specs' outputs concatenated flat, which
the public function splits into one contiguous (B, F, 3, size, size) view a spec (one output
tensor keeps the op free of aliasing outputs). Its autograd formula calls
`turbo_kernels::reward_preprocess_backward`, the exact adjoint summed over specs. Inside each op,
`dispatch.run` picks cuda | triton | reference (the matrix form) for the actual tensors. The
CUDA kernels (csrc/preprocess.cu) filter separably on FMA units, the Triton ones multiply dense
windows on tensor cores; `auto` tries Triton first, as for every op, until the harness's rows
say which wins (benchmarks.preprocess times both).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from turbo_kernels import _cuda_ext, checks, dispatch
from turbo_kernels.reference import preprocess as ref
from turbo_kernels.reference.preprocess import PreprocessSpec

# Grid axis 1 of the Triton kernels walks the (frame, channel) images.
MAX_KERNEL_IMAGES = 65535


def _triton():
    from turbo_kernels.triton_kernels import preprocess

    return preprocess


class Plan(NamedTuple):
    """The tensors that define a list of specs on (H, W) frames, stacked spec by spec.

    rows (sum(sizes), H) and cols (sum(sizes), W): the specs' A and B. mean, std: (S, 3).
    row_spans, col_spans (sum(sizes), 2) int32: [first, end) of the nonzero weights of each row
    of A and B. row_spans_t (S * H, 2), col_spans_t (S * W, 2) int32: for each input row or
    column, [first, end) of the output indices that weigh it. Empty spans are [n, 0).
    """

    rows: Tensor
    cols: Tensor
    mean: Tensor
    std: Tensor
    row_spans: Tensor
    col_spans: Tensor
    row_spans_t: Tensor
    col_spans_t: Tensor


def _spans(matrix: Tensor) -> Tensor:
    """(rows, 2) int32: [first, end) of each row's nonzero columns; [columns, 0) for a zero row."""
    nonzero = matrix != 0
    index = torch.arange(matrix.shape[1])
    first = torch.where(nonzero, index, matrix.shape[1]).amin(dim=1)
    end = torch.where(nonzero, index + 1, 0).amax(dim=1)
    return torch.stack([first, end], dim=1).to(torch.int32)


# A few plans: a training run's specs and its evaluation's. A random crop (RewardEntry.random_crop)
# is a new plan each step, which must not keep dozens of 2 MB plans on the device.
@functools.lru_cache(maxsize=8)
def _plan(specs: tuple[PreprocessSpec, ...], height: int, width: int, device: torch.device, dtype: torch.dtype) -> Plan:
    """The plan of `specs` on (height, width) frames, on `device` in `dtype`, built once."""
    matrices = [ref.spec_matrices(spec, height, width) for spec in specs]
    rows = torch.cat([a for a, _ in matrices])
    cols = torch.cat([b for _, b in matrices])
    plan = Plan(
        rows=rows,
        cols=cols,
        mean=torch.tensor([spec.mean for spec in specs], dtype=torch.float64),
        std=torch.tensor([spec.std for spec in specs], dtype=torch.float64),
        row_spans=_spans(rows),
        col_spans=_spans(cols),
        row_spans_t=torch.cat([_spans(a.t()) for a, _ in matrices]),
        col_spans_t=torch.cat([_spans(b.t()) for _, b in matrices]),
    )
    return Plan(*(t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for t in plan))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- the specs as custom-op arguments ----------------------------------------------------------
# A custom op's schema takes neither dataclasses nor lists of strings, so each spec field travels
# as one list: modes and interpolations as indices into MODES and INTERPOLATIONS, crop offsets as
# two ints a spec (-1 for a centred crop), statistics as mean then std (six floats a spec).


def _spec_args(specs: Sequence[PreprocessSpec]) -> tuple[list, ...]:
    offsets = [v for spec in specs for v in (spec.crop_offset or (-1, -1))]
    statistics = [v for spec in specs for v in spec.mean + spec.std]
    return (
        [spec.size for spec in specs],
        [ref.MODES.index(spec.mode) for spec in specs],
        [ref.INTERPOLATIONS.index(spec.interpolation) for spec in specs],
        [spec.antialias for spec in specs], statistics, offsets,
    )


def _specs_from_args(sizes, modes, interpolations, antialias, statistics, crop_offsets) -> tuple[PreprocessSpec, ...]:
    specs = []
    for index, size in enumerate(sizes):
        top, left = crop_offsets[2 * index : 2 * index + 2]
        stats = statistics[6 * index : 6 * index + 6]
        specs.append(
            PreprocessSpec(
                size, ref.MODES[modes[index]], ref.INTERPOLATIONS[interpolations[index]], antialias[index],
                tuple(stats[:3]), tuple(stats[3:]),
                None if top < 0 else (top, left),
            )
        )
    return tuple(specs)


# ---- implementations: reference (matrix form) and Triton ----------------------------------------


def _reference_forward(frames: Tensor, plan: Plan, sizes, in_scale, in_shift, out_dtype):
    return ref.matrix_preprocess(frames, sizes, plan.rows, plan.cols, plan.mean, plan.std, in_scale, in_shift, out_dtype)


def _reference_backward(grad: Tensor, plan: Plan, sizes, frames_shape, frames_dtype, in_scale):
    return ref.matrix_preprocess_backward(
        grad, frames_shape, frames_dtype, sizes, plan.rows, plan.cols, plan.std, in_scale
    )


def _triton_forward(frames: Tensor, plan: Plan, sizes, in_scale, in_shift, out_dtype):
    return _triton().reward_preprocess(
        frames, sizes, plan.rows, plan.cols, plan.mean, plan.std, plan.row_spans, plan.col_spans,
        in_scale, in_shift, out_dtype,
    )


def _triton_backward(grad: Tensor, plan: Plan, sizes, frames_shape, frames_dtype, in_scale):
    return _triton().reward_preprocess_backward(
        grad, frames_shape, frames_dtype, sizes, plan.rows, plan.cols, plan.std, plan.row_spans_t,
        plan.col_spans_t, in_scale,
    )


def _kernel_problem(storage: Tensor, other_dtype: torch.dtype, other_name: str, num_images: int) -> Optional[str]:
    """Why the Triton kernels cannot stream `storage` and write `other_dtype`, or None."""
    problem = checks.storage_problem(storage)
    if problem:
        return problem
    if other_dtype not in checks.KERNEL_DTYPES:
        return f"{other_name} {other_dtype} (kernels take float32, float16, bfloat16)"
    if num_images > MAX_KERNEL_IMAGES:
        return f"{num_images} (frame, channel) images exceed {MAX_KERNEL_IMAGES}"
    return None


def _forward_problem(frames, plan, sizes, in_scale, in_shift, out_dtype):
    return _kernel_problem(frames, out_dtype, "output dtype", frames.shape[0] * frames.shape[1] * frames.shape[2])


def _backward_problem(grad, plan, sizes, frames_shape, frames_dtype, in_scale):
    return _kernel_problem(grad, frames_dtype, "frames dtype", frames_shape[0] * frames_shape[1] * frames_shape[2])


# ---- CUDA backend (csrc/preprocess.cu): separable filtering on FMA units -------------------------

CUDA_MAX_SPECS = 8


def _cuda_problem(storage: Tensor, other_dtype: torch.dtype, other_name: str, num_images: int, sizes) -> Optional[str]:
    if not storage.is_cuda:
        return "CUDA kernels need CUDA tensors"
    if len(sizes) > CUDA_MAX_SPECS:
        return f"{len(sizes)} specs (the CUDA kernels take up to {CUDA_MAX_SPECS})"
    return _kernel_problem(storage, other_dtype, other_name, num_images)


def _cuda_forward_problem(frames, plan, sizes, in_scale, in_shift, out_dtype):
    num_images = frames.shape[0] * frames.shape[1] * frames.shape[2]
    return _cuda_problem(frames, out_dtype, "output dtype", num_images, sizes)


def _cuda_backward_problem(grad, plan, sizes, frames_shape, frames_dtype, in_scale):
    num_images = frames_shape[0] * frames_shape[1] * frames_shape[2]
    return _cuda_problem(grad, frames_dtype, "frames dtype", num_images, sizes)


def _cuda_forward(frames: Tensor, plan: Plan, sizes, in_scale, in_shift, out_dtype):
    return _cuda_ext.ops().reward_preprocess_fwd(
        frames, plan.rows, plan.cols, plan.mean, plan.std, plan.row_spans, plan.col_spans, list(sizes),
        in_scale, in_shift, out_dtype,
    )


def _cuda_backward(grad: Tensor, plan: Plan, sizes, frames_shape, frames_dtype, in_scale):
    return _cuda_ext.ops().reward_preprocess_bwd(
        grad.contiguous(), plan.rows, plan.cols, plan.std, plan.row_spans_t, plan.col_spans_t, list(sizes), list(frames_shape),
        frames_dtype, in_scale,
    )


dispatch.register("reward_preprocess", "reference")(_reference_forward)
dispatch.register("reward_preprocess", "triton", _forward_problem)(_triton_forward)
dispatch.register("reward_preprocess", "cuda", _cuda_forward_problem)(_cuda_forward)
dispatch.register("reward_preprocess_backward", "reference")(_reference_backward)
dispatch.register("reward_preprocess_backward", "triton", _backward_problem)(_triton_backward)
dispatch.register("reward_preprocess_backward", "cuda", _cuda_backward_problem)(_cuda_backward)


# ---- the custom ops ------------------------------------------------------------------------------
# The plan is looked up inside the ops, from concrete shapes: torch.compile sees one opaque node
# whatever the frame size, and never traces the plan's construction.


def _flat_numel(frames_shape, sizes) -> int:
    batch, num_frames, channels = frames_shape[:3]
    return batch * num_frames * channels * sum(n * n for n in sizes)


@dispatch.custom_op("turbo_kernels::reward_preprocess")
def _reward_preprocess(
    frames: Tensor, sizes: list[int], modes: list[int], interpolations: list[int], antialias: list[bool],
    statistics: list[float], crop_offsets: list[int], in_scale: float, in_shift: float, out_dtype: torch.dtype,
) -> Tensor:
    specs = _specs_from_args(sizes, modes, interpolations, antialias, statistics, crop_offsets)
    plan = _plan(specs, frames.shape[3], frames.shape[4], frames.device, _compute_dtype(frames.dtype))
    return dispatch.run("reward_preprocess", frames.device, frames, plan, sizes, in_scale, in_shift, out_dtype)


@_reward_preprocess.register_fake
def _(frames, sizes, modes, interpolations, antialias, statistics, crop_offsets, in_scale, in_shift, out_dtype):
    return frames.new_empty((_flat_numel(frames.shape, sizes),), dtype=out_dtype)


@dispatch.custom_op("turbo_kernels::reward_preprocess_backward")
def _reward_preprocess_backward(
    grad: Tensor, sizes: list[int], modes: list[int], interpolations: list[int], antialias: list[bool],
    statistics: list[float], crop_offsets: list[int], frames_shape: list[int], frames_dtype: torch.dtype,
    in_scale: float, backend: str,
) -> Tensor:
    specs = _specs_from_args(sizes, modes, interpolations, antialias, statistics, crop_offsets)
    plan = _plan(specs, frames_shape[3], frames_shape[4], grad.device, _compute_dtype(frames_dtype))
    return dispatch.run(
        "reward_preprocess_backward", grad.device, grad, plan, sizes, frames_shape, frames_dtype, in_scale,
        requested=backend,
    )


@_reward_preprocess_backward.register_fake
def _(
    grad, sizes, modes, interpolations, antialias, statistics, crop_offsets, frames_shape, frames_dtype, in_scale,
    backend,
):
    return grad.new_empty(frames_shape, dtype=frames_dtype)


def _setup(ctx, inputs, output):
    frames, *spec_args, in_scale, _, _ = inputs
    ctx.spec_args = spec_args
    ctx.frames_shape = list(frames.shape)
    ctx.frames_dtype = frames.dtype
    ctx.in_scale = in_scale
    ctx.backend = dispatch.requested_backend()


def _backward(ctx, grad):
    grad_frames = _reward_preprocess_backward(
        grad.contiguous(), *ctx.spec_args, ctx.frames_shape, ctx.frames_dtype, ctx.in_scale, ctx.backend
    )
    return (grad_frames,) + (None,) * (len(ctx.spec_args) + 3)


_reward_preprocess.register_autograd(_backward, setup_context=_setup)


# ---- public function -----------------------------------------------------------------------------


def _check_frames(frames) -> None:
    checks.floating_tensor(frames, "frames", min_dim=0)
    if frames.dim() != 5:
        raise ValueError(f"frames must have 5 dimensions (B, F, 3, H, W), got shape {tuple(frames.shape)}")
    if frames.shape[2] != 3:
        raise ValueError(f"frames must have 3 (RGB) channels in dimension 2, got shape {tuple(frames.shape)}")
    if frames.shape[3] == 0 or frames.shape[4] == 0:
        raise ValueError(f"frames must have a positive height and width, got shape {tuple(frames.shape)}")


def _check_specs(specs, height: int, width: int) -> tuple[PreprocessSpec, ...]:
    if isinstance(specs, PreprocessSpec) or not isinstance(specs, Sequence) or isinstance(specs, str):
        raise TypeError(f"specs must be a list of PreprocessSpec, got {type(specs).__name__}")
    if not specs:
        raise ValueError("specs must hold at least one PreprocessSpec, got an empty list")
    for index, spec in enumerate(specs):
        if not isinstance(spec, PreprocessSpec):
            raise TypeError(f"specs[{index}] must be a PreprocessSpec, got {type(spec).__name__}")
        try:
            ref.geometry(spec, height, width)
        except ValueError as exc:
            raise ValueError(f"specs[{index}]: {exc}") from None
    return tuple(specs)


def _check_out_dtype(out_dtype, frames: Tensor) -> torch.dtype:
    if out_dtype is None:
        return frames.dtype
    if not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point:
        raise TypeError(f"out_dtype must be a floating-point torch.dtype or None, got {out_dtype!r}")
    return out_dtype


def reward_preprocess(
    frames: Tensor,
    specs: Sequence[PreprocessSpec],
    input_range: str = "unit",
    out_dtype: Optional[torch.dtype] = None,
) -> list[Tensor]:
    """Every spec's preprocessing of `frames` in one pass: a list of (B, F, 3, size, size) tensors,
    one a spec, in `out_dtype` (default: the frames' dtype).

    frames: (B, F, 3, H, W) RGB in [0, 1] (input_range="unit") or in [-1, 1] (input_range="signed",
    mapped by x / 2 + 1/2 without clamping), in any strides. specs: PreprocessSpec each (mode
    "squash", "pad" or "crop"; see its docstring). Maths runs in float32 (float64 for float64
    frames). Differentiable in frames: the backward is the exact adjoint, summed over the specs.
    """
    _check_frames(frames)
    batch, num_frames, _, height, width = frames.shape
    specs = _check_specs(specs, height, width)
    in_scale, in_shift = ref.input_affine(input_range)
    out_dtype = _check_out_dtype(out_dtype, frames)
    sizes = [spec.size for spec in specs]
    flat = _reward_preprocess(frames, *_spec_args(specs), in_scale, in_shift, out_dtype)
    blocks = flat.split([batch * num_frames * 3 * n * n for n in sizes])
    return [block.view(batch, num_frames, 3, n, n) for block, n in zip(blocks, sizes)]
