"""Argument checks shared by the public ops: every error names the argument at fault.

Shape, dtype and device checks always run. Checks on values (finite scalars, timesteps inside the
schedule) read device memory, which costs a host sync on GPU tensors, so they are skipped while
torch.compile traces, while a CUDA graph is captured, and when TURBO_KERNELS_VALIDATE=0.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Union

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

Scalar = Union[float, int, Tensor]

DENSE_FORMATS = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def reads_values(t: Tensor) -> bool:
    """Whether a value check reads `t`: checks are on, and it has values (meta tensors, for shape
    inference, have none)."""
    return value_checks_enabled() and not t.is_meta and t.numel() > 0


@torch.compiler.assume_constant_result
def autocast_available(device_type: str) -> bool:
    """torch.amp.is_autocast_available (False for meta tensors, which torch.autocast refuses), in a
    form torch.compile traces: torch 2.11's dynamo skips the C function it calls, which breaks the
    graph (an error under fullgraph=True). The answer is fixed per device type, so the graph takes
    it as a constant."""
    return torch.amp.is_autocast_available(device_type)


def value_checks_enabled() -> bool:
    if os.environ.get("TURBO_KERNELS_VALIDATE", "1") == "0":
        return False
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def floating_tensor(x, name: str, min_dim: int = 1) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s) (batch first), got shape {tuple(x.shape)}")
    return x


def same_as(x, name: str, like: Tensor, like_name: str) -> Tensor:
    floating_tensor(x, name, min_dim=0)
    if x.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected the shape of {like_name} {tuple(like.shape)}")
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device}, expected the device of {like_name} ({like.device})")
    return x


def schedule_table(alphas_cumprod, device: torch.device) -> Tensor:
    """The alphas_cumprod table as a 1-D float tensor on `device` (float64 kept, else float32)."""
    if not isinstance(alphas_cumprod, Tensor):
        raise TypeError(f"alphas_cumprod must be a torch.Tensor, got {type(alphas_cumprod).__name__}")
    if alphas_cumprod.dim() != 1 or alphas_cumprod.numel() == 0 or not alphas_cumprod.is_floating_point():
        raise ValueError(
            f"alphas_cumprod must be a non-empty 1-D floating-point tensor, got shape "
            f"{tuple(alphas_cumprod.shape)} and dtype {alphas_cumprod.dtype}"
        )
    check_table_values(alphas_cumprod)
    dtype = torch.float64 if alphas_cumprod.dtype == torch.float64 else torch.float32
    if alphas_cumprod.device == device and alphas_cumprod.dtype == dtype and alphas_cumprod.is_contiguous():
        return alphas_cumprod
    if torch.compiler.is_compiling() or alphas_cumprod.is_inference():
        # Tensors made under inference_mode keep no version counter to tell a change by.
        return alphas_cumprod.to(device=device, dtype=dtype).contiguous()
    # A table kept on the CPU would otherwise be copied to the GPU on every call, and a host copy
    # inside CUDA-graph capture fails; the cached copy is refreshed when the table is modified.
    per_table = _device_tables.setdefault(alphas_cumprod, {})
    cached = per_table.get((device, dtype))
    if cached is None or cached[0] != alphas_cumprod._version:
        cached = (alphas_cumprod._version, alphas_cumprod.to(device=device, dtype=dtype).contiguous())
        per_table[(device, dtype)] = cached
    return cached[1]


_device_tables: WeakIdKeyDictionary = WeakIdKeyDictionary()


def check_table_values(alphas_cumprod: Tensor, allow_zero: bool = False) -> None:
    """ᾱ_t is a signal fraction: every value in (0, 1] (a NaN or a value out of range gives NaN
    coefficients); `allow_zero` for callers that never divide by sqrt(ᾱ_t) at the table's end (a
    zero-terminal-SNR table). Read once a table version (a GPU table costs one synchronisation
    then; a table made under inference_mode, which keeps no version counter, on every call), as
    the other value checks are (value_checks_enabled), and not on the meta device."""
    if not reads_values(alphas_cumprod):
        return
    versioned = not alphas_cumprod.is_inference()
    if versioned and _checked_versions.get(alphas_cumprod, {}).get(allow_zero) == alphas_cumprod._version:
        return
    above = alphas_cumprod >= 0 if allow_zero else alphas_cumprod > 0
    inside = above & (alphas_cumprod <= 1)
    if not bool(inside.all()):
        outside = alphas_cumprod[~inside]
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(
            f"alphas_cumprod must hold values in {interval}; {outside.numel()} do not (first: {outside[0].item()!r})"
        )
    if versioned:
        _checked_versions.setdefault(alphas_cumprod, {})[allow_zero] = alphas_cumprod._version


_checked_versions: WeakIdKeyDictionary = WeakIdKeyDictionary()


def timesteps(t, name: str, batch: int, device: torch.device, num_train_timesteps: int) -> Tensor:
    """An int or integer tensor of shape () or (B,) -> an int64 (B,) tensor on `device`."""
    if isinstance(t, bool) or not isinstance(t, (int, Tensor)):
        raise TypeError(f"{name} must be an int or an integer tensor, got {type(t).__name__}")
    if isinstance(t, int):
        if not 0 <= t < num_train_timesteps:
            raise ValueError(f"{name}={t} is outside the schedule [0, {num_train_timesteps})")
        return torch.full((batch,), t, dtype=torch.int64, device=device)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer timesteps, got dtype {t.dtype}")
    t = _per_sample_shape(t, name, batch).to(device=device, dtype=torch.int64).contiguous()
    if reads_values(t) and bool(((t < 0) | (t >= num_train_timesteps)).any()):
        bad = t[(t < 0) | (t >= num_train_timesteps)]
        raise ValueError(f"{name} has timesteps outside the schedule [0, {num_train_timesteps}): {bad.tolist()[:8]}")
    return t


def per_sample_scalar(
    x: Optional[Scalar], name: str, batch: int, device: torch.device, default: Optional[float] = None
) -> Tensor:
    """A float or tensor of shape () or (B,) -> a finite float32 (B,) tensor on `device`; None is
    `default` where one is given, else an error."""
    if x is None:
        if default is None:
            raise TypeError(f"{name} must be a float or a tensor, got None")
        x = default
    if isinstance(x, bool) or not isinstance(x, (int, float, Tensor)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(x).__name__}")
    if not isinstance(x, Tensor):
        if not math.isfinite(float(x)):
            raise ValueError(f"{name} must be finite, got {x}")
        return torch.full((batch,), float(x), dtype=torch.float32, device=device)
    if x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must be a real tensor, got dtype {x.dtype}")
    x = _per_sample_shape(x, name, batch).to(device=device, dtype=torch.float32).contiguous()
    if reads_values(x) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must be finite, got {x.tolist()[:8]}")
    return x


def _per_sample_shape(x: Tensor, name: str, batch: int) -> Tensor:
    if x.dim() == 0:
        return x.expand(batch)
    if x.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or have shape ({batch},) (one value a sample), got {tuple(x.shape)}")
    return x


def storage_problem(*tensors: Tensor) -> Optional[str]:
    """Why kernels cannot take these tensors' storage: they need one kernel dtype on one device."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        return f"mixed storage dtypes {sorted(str(d) for d in dtypes)}"
    if tensors[0].dtype not in KERNEL_DTYPES:
        return f"storage dtype {tensors[0].dtype} (kernels take float32, float16, bfloat16)"
    if len({t.device for t in tensors}) > 1:
        return "tensors on several devices"
    return None


def channel_stride_problem(t: Tensor, name: str) -> Optional[str]:
    """Why kernels that address the last (channel) dimension as contiguous cannot read t, or None;
    every other dimension may have any stride. A single channel's stride, and an empty tensor's
    (an expanded gradient of nothing), are never used."""
    if t.numel() and t.shape[-1] > 1 and t.stride(-1) != 1:
        return f"{name} has channel stride {t.stride(-1)} (kernels need 1)"
    return None


def rows_problem(t: Tensor, name: str) -> Optional[str]:
    """Why row kernels cannot walk t as (rows, last dimension) with one row stride and unit
    stride along the last dimension (a view of it, no copy), or None."""
    if t.numel() == 0:
        return None
    problem = channel_stride_problem(t, name)
    if problem:
        return problem
    try:
        t.view(-1, t.shape[-1])
    except RuntimeError:
        return f"{name}'s leading dimensions do not flatten to rows of one stride"
    return None


def kernel_layout_problem(*tensors: Tensor, batched: bool = True) -> Optional[str]:
    """Why the elementwise kernels cannot stream these tensors, or None.

    The kernels walk raw memory sample by sample, so every tensor needs the same dense layout with
    the batch outermost: contiguous, channels_last or channels_last_3d (all share their strides).
    `batched=False` is for kernels that stream all elements as one run (the loss reduction).
    """
    first = tensors[0]
    problem = storage_problem(*tensors)
    if problem:
        return problem
    if any(_effective_strides(t) != _effective_strides(first) for t in tensors):
        return "the tensors do not share one memory layout"
    if not any(first.is_contiguous(memory_format=f) for f in DENSE_FORMATS if _format_fits(f, first)):
        return f"non-dense layout (strides {first.stride()})"
    if batched and first.shape[0] > 65535:
        return f"batch size {first.shape[0]} exceeds 65535"
    return None


def exact_layout_problem(*tensors: Tensor) -> Optional[str]:
    """The CUDA kernels' stricter rule: identical strides, batch outermost in memory."""
    first = tensors[0]
    if any(t.stride() != first.stride() for t in tensors):
        return "the CUDA kernels need identical strides (size-1 dimensions included)"
    if first.dim() == 0 or first.stride(0) * first.shape[0] != first.numel():
        return "the CUDA kernels need the batch outermost in memory"
    return None


def _effective_strides(x: Tensor) -> tuple[int, ...]:
    # Strides of size-1 dimensions never matter for addressing.
    return tuple(s for s, n in zip(x.stride(), x.shape) if n > 1)


def _format_fits(memory_format: torch.memory_format, x: Tensor) -> bool:
    if memory_format == torch.channels_last:
        return x.dim() == 4
    if memory_format == torch.channels_last_3d:
        return x.dim() == 5
    return True


def positive_int(x, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x <= 0:
        raise ValueError(f"{name} must be a positive int, got {x!r}")
    return x


def positive_float(x, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {x!r}")
    return float(x)


def attention_inputs(q, k, v, num_frames, heads, layout: str, layouts: tuple[str, ...]) -> int:
    """Checks the q, k, v of temporal attention in `layout` ("frames": (B*F, N, heads*d),
    "sequences": (B*N, F, heads*d)) and returns the head dim d."""
    if layout not in layouts:
        raise ValueError(f"layout must be one of {layouts}, got {layout!r}")
    floating_tensor(q, "q", min_dim=0)
    if q.dim() != 3:
        raise ValueError(f"q must have 3 dimensions ((B*F, N, heads*d) or (B*N, F, heads*d)), got shape {tuple(q.shape)}")
    same_as(k, "k", q, "q")
    same_as(v, "v", q, "q")
    positive_int(num_frames, "num_frames")
    positive_int(heads, "heads")
    rows, second, channels = q.shape
    if channels == 0:
        raise ValueError("q's last dimension (heads*d) must be positive, got 0")
    if channels % heads:
        raise ValueError(f"q's last dimension {channels} is not divisible by heads={heads}")
    if layout == "frames" and rows % num_frames:
        raise ValueError(
            f"q's first dimension {rows} (B*F in the 'frames' layout) is not divisible by num_frames={num_frames}"
        )
    if layout == "sequences" and second != num_frames:
        raise ValueError(f"q's second dimension {second} (F in the 'sequences' layout) is not num_frames={num_frames}")
    return channels // heads


def attention_probs(x, name: str, shape: tuple, like: Tensor, like_name: str) -> Tensor:
    """A floating tensor of attention probabilities, (B*N, heads, F, F) = `shape`, on the device of `like`."""
    floating_tensor(x, name, min_dim=0)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected (B*N, heads, F, F) = {tuple(shape)}")
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device}, expected the device of {like_name} ({like.device})")
    return x


def group_count(x, name: str, total: int, what: str) -> int:
    """A positive int that splits `total` `what` into equal groups."""
    positive_int(x, name)
    if total % x:
        raise ValueError(f"{name}={x} does not divide the {total} {what} into equal groups")
    return x
