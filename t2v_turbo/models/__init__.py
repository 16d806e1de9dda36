"""Networks of the method layer. Names load their module on first use (PEP 562), so importing one
model module, or this package for its checkpoint helpers, does not import diffusers and open_clip."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MiniLMTextEncoder": "text_encoder",
    "OpenCLIPTextEncoder": "text_encoder",
    "PromptCache": "text_encoder",
    "load_text_encoder": "text_encoder",
    "save_text_encoder": "text_encoder",
    "PixelSpace": "vae",
    "VideoVAE": "vae",
    "load_vae": "vae",
    "VC2UNet": "vc2_unet",
    "guidance_embedding": "vc2_unet",
    "motion_embedding": "vc2_unet",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
