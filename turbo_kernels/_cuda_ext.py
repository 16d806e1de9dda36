"""Loads the compiled extension `turbo_kernels._C` (csrc/), whose ops live in torch.ops.turbo_kernels_cuda."""

from __future__ import annotations

import functools
from typing import Optional


@functools.lru_cache(maxsize=None)
def load_error() -> Optional[str]:
    """None when the extension is imported and its ops are registered, else why not."""
    try:
        from turbo_kernels import _C  # noqa: F401
    except ImportError as exc:
        return f"the CUDA extension turbo_kernels._C is not built ({exc})"
    return None


def ops():
    """The extension's op namespace; call only after load_error() returned None."""
    import torch

    return torch.ops.turbo_kernels_cuda
