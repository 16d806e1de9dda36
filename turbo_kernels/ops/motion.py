"""Temporal attention probabilities and the top-1 motion energy (SPEC 4), registered as
torch.library custom ops.

`turbo_kernels::temporal_attention_probs` returns P = softmax(scale q k^T) per sequence and head;
`turbo_kernels::motion_energy` returns the mean of (P - ref)^2 over each query row's top-1 key of
ref_probs without writing P anywhere. Each has a backward custom op that recomputes P from q and
k, so torch.compile sees single opaque nodes. Inside each op, `dispatch.run` picks triton |
reference for the actual tensors.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from turbo_kernels import checks, dispatch
from turbo_kernels.reference import attention as ref



def _triton():
    from turbo_kernels.triton_kernels import motion_energy

    return motion_energy


def _num_sequences(q: Tensor, num_frames: int, layout: str):
    return (q.shape[0] // num_frames) * q.shape[1] if layout == "frames" else q.shape[0]


def _probs_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


# ---- reference backend -------------------------------------------------------------------------


def _reference_scores_backward(grad_scores, q, k, num_frames, heads, layout, scale):
    """dq = scale dS k and dk = scale dS^T q for dS = dL/dS of (B*N, heads, F, F), in q's layout."""
    cdt = grad_scores.dtype
    q_s, k_s = (ref.to_sequences(x, num_frames, heads, layout).to(cdt) for x in (q, k))
    grads = (torch.matmul(grad_scores, k_s) * scale, torch.matmul(grad_scores.transpose(-1, -2), q_s) * scale)
    return tuple(ref.from_sequences(g, x.shape, layout).to(x.dtype).contiguous() for g, x in zip(grads, (q, k)))


def _reference_probs_backward(grad, q, k, num_frames, heads, layout, scale):
    probs = ref.temporal_attention_probs(q, k, num_frames, heads, layout, scale)
    grad = grad.to(probs.dtype)
    grad_scores = probs * (grad - (grad * probs).sum(dim=-1, keepdim=True))
    return _reference_scores_backward(grad_scores, q, k, num_frames, heads, layout, scale)


def _reference_energy_backward(grad, q, k, ref_probs, num_frames, heads, layout, scale, num_videos):
    """dE/dP is g 2 (P - ref) / count at each row's top-1 key of ref_probs and 0 elsewhere."""
    probs = ref.temporal_attention_probs(q, k, num_frames, heads, layout, scale)
    ref_probs = ref_probs.to(probs.dtype)
    top1 = ref_probs.argmax(dim=-1, keepdim=True)
    groups = num_videos or 1
    seq_per_group = probs.shape[0] // groups
    per_sequence = grad.to(probs.dtype).reshape(groups).repeat_interleave(seq_per_group).reshape(-1, 1, 1, 1)
    kept = probs.gather(-1, top1) - ref_probs.gather(-1, top1)
    grad_kept = per_sequence * 2 * kept / (seq_per_group * heads * num_frames)
    return _reference_probs_backward(
        torch.zeros_like(probs).scatter_(-1, top1, grad_kept), q, k, num_frames, heads, layout, scale
    )


# ---- Triton backend: what its kernels cannot take ---------------------------------------------


def _kernel_problem(q: Tensor, k: Tensor, num_frames: int) -> Optional[str]:
    """Why the Triton kernels cannot take q and k, or None."""
    problem = checks.storage_problem(q, k)
    if problem:
        return problem
    if num_frames > _triton().MAX_FRAMES:
        return f"num_frames={num_frames} exceeds {_triton().MAX_FRAMES}"
    return checks.channel_stride_problem(q, "q") or checks.channel_stride_problem(k, "k")


def _register(op: str, reference_fn, problem) -> None:
    dispatch.register(op, "reference")(reference_fn)
    dispatch.register(op, "triton", problem)(lambda *args: getattr(_triton(), op)(*args))


_register(
    "temporal_attention_probs", ref.temporal_attention_probs,
    lambda q, k, num_frames, *_: _kernel_problem(q, k, num_frames),
)
_register(
    "temporal_attention_probs_backward", _reference_probs_backward,
    lambda grad, q, k, num_frames, *_: _kernel_problem(q, k, num_frames),
)
_register(
    "motion_energy", ref.motion_energy,
    lambda q, k, ref_probs, num_frames, *_: _kernel_problem(q, k, num_frames),
)
_register(
    "motion_energy_backward", _reference_energy_backward,
    lambda grad, q, k, ref_probs, num_frames, *_: _kernel_problem(q, k, num_frames),
)


# ---- temporal_attention_probs ------------------------------------------------------------------


@dispatch.custom_op("turbo_kernels::temporal_attention_probs")
def _temporal_attention_probs(q: Tensor, k: Tensor, num_frames: int, heads: int, layout: str, scale: float) -> Tensor:
    return dispatch.run("temporal_attention_probs", q.device, q, k, num_frames, heads, layout, scale)


@_temporal_attention_probs.register_fake
def _(q, k, num_frames, heads, layout, scale):
    shape = (_num_sequences(q, num_frames, layout), heads, num_frames, num_frames)
    return q.new_empty(shape, dtype=_probs_dtype(q))


@dispatch.custom_op("turbo_kernels::temporal_attention_probs_backward")
def _temporal_attention_probs_backward(
    grad: Tensor, q: Tensor, k: Tensor, num_frames: int, heads: int, layout: str, scale: float, backend: str
) -> tuple[Tensor, Tensor]:
    return dispatch.run(
        "temporal_attention_probs_backward", q.device, grad, q, k, num_frames, heads, layout, scale,
        requested=backend,
    )


@_temporal_attention_probs_backward.register_fake
def _(grad, q, k, num_frames, heads, layout, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _probs_setup(ctx, inputs, output):
    q, k, num_frames, heads, layout, scale = inputs
    ctx.save_for_backward(q, k)
    ctx.attention = (num_frames, heads, layout, scale)
    ctx.backend = dispatch.requested_backend()


def _probs_backward(ctx, grad):
    q, k = ctx.saved_tensors
    grad_q, grad_k = _temporal_attention_probs_backward(grad, q, k, *ctx.attention, ctx.backend)
    return grad_q, grad_k, None, None, None, None


_temporal_attention_probs.register_autograd(_probs_backward, setup_context=_probs_setup)


def _checked_scale(q, k, num_frames, heads, layout, scale) -> float:
    # The probabilities have no values: k stands in for v in the shared q/k/v checks.
    head_dim = checks.attention_inputs(q, k, k, num_frames, heads, layout, ref.LAYOUTS)
    return ref.default_scale(head_dim, None if scale is None else checks.positive_float(scale, "scale"))


def temporal_attention_probs(
    q: Tensor, k: Tensor, num_frames: int, heads: int, layout: str = "frames", scale: Optional[float] = None
) -> Tensor:
    """P = softmax_j(scale q_i . k_j) over the F frames of every sequence and head: a
    (B*N, heads, F, F) tensor whose rows are queries, float32 (float64 for float64 inputs).

    layout "frames": q and k are (B*F, N, heads*d), the main stream's tokens (row b*F + f,
    position n); "sequences": (B*N, F, heads*d). Sequence s = b*N + n in both. Any strides are
    taken without copies as long as the channel dimension is unit-stride (e.g. slices of one fused
    qkv projection). scale defaults to 1/sqrt(d). Differentiable in q and k.
    """
    scale = _checked_scale(q, k, num_frames, heads, layout, scale)
    return _temporal_attention_probs(q, k, num_frames, heads, layout, scale)


# ---- motion_energy -----------------------------------------------------------------------------


@dispatch.custom_op("turbo_kernels::motion_energy")
def _motion_energy(
    q: Tensor, k: Tensor, ref_probs: Tensor, num_frames: int, heads: int, layout: str, scale: float,
    num_videos: Optional[int],
) -> Tensor:
    return dispatch.run(
        "motion_energy", q.device, q, k, ref_probs, num_frames, heads, layout, scale, num_videos
    )


@_motion_energy.register_fake
def _(q, k, ref_probs, num_frames, heads, layout, scale, num_videos):
    return q.new_empty(() if num_videos is None else (num_videos,), dtype=_probs_dtype(q))


@dispatch.custom_op("turbo_kernels::motion_energy_backward")
def _motion_energy_backward(
    grad: Tensor, q: Tensor, k: Tensor, ref_probs: Tensor, num_frames: int, heads: int, layout: str, scale: float,
    num_videos: Optional[int], backend: str,
) -> tuple[Tensor, Tensor]:
    return dispatch.run(
        "motion_energy_backward", q.device, grad, q, k, ref_probs, num_frames, heads, layout, scale, num_videos,
        requested=backend,
    )


@_motion_energy_backward.register_fake
def _(grad, q, k, ref_probs, num_frames, heads, layout, scale, num_videos, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _energy_setup(ctx, inputs, output):
    q, k, ref_probs, num_frames, heads, layout, scale, num_videos = inputs
    ctx.save_for_backward(q, k, ref_probs)
    ctx.energy = (num_frames, heads, layout, scale, num_videos)
    ctx.backend = dispatch.requested_backend()


def _energy_backward(ctx, grad):
    q, k, ref_probs = ctx.saved_tensors
    grad_q, grad_k = _motion_energy_backward(grad, q, k, ref_probs, *ctx.energy, ctx.backend)
    # ref_probs is held constant (SPEC 4: the reference pass has no gradient).
    return grad_q, grad_k, None, None, None, None, None, None


_motion_energy.register_autograd(_energy_backward, setup_context=_energy_setup)


def motion_energy(
    q: Tensor,
    k: Tensor,
    ref_probs: Tensor,
    num_frames: int,
    heads: int,
    layout: str = "frames",
    scale: Optional[float] = None,
    num_videos: Optional[int] = None,
) -> Tensor:
    """The top-1-masked attention MSE of SPEC 4 for one layer (without its 1e4 factor and the mean
    over layers): for every (sequence, head, query row) keep only the key where `ref_probs` is
    largest (the first on ties) and average (P - ref_probs)^2 over the kept entries, where
    P = temporal_attention_probs(q, k, ...). P is never written to memory, forward or backward.

    q, k: as for temporal_attention_probs. ref_probs: (B*N, heads, F, F), any floating dtype and
    strides, held constant (e.g. temporal_attention_probs of the reference pass, under no_grad).
    Returns a float32 scalar (float64 for float64 inputs), or with `num_videos` a (num_videos,)
    tensor of per-video means, the sequences split into num_videos equal consecutive groups (as
    s = b*N + n does), so each clip's energy is its solo energy. Differentiable in q and k.
    """
    scale = _checked_scale(q, k, num_frames, heads, layout, scale)
    num_sequences = _num_sequences(q, num_frames, layout)
    checks.attention_probs(ref_probs, "ref_probs", (num_sequences, heads, num_frames, num_frames), q, "q")
    if num_videos is not None:
        checks.group_count(num_videos, "num_videos", num_sequences, "sequences (B*N)")
    return _motion_energy(q, k, ref_probs, num_frames, heads, layout, scale, num_videos)
