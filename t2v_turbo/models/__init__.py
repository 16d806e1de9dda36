"""Networks of the method layer."""

from t2v_turbo.models.text_encoder import (
    MiniLMTextEncoder,
    OpenCLIPTextEncoder,
    PromptCache,
    load_text_encoder,
    save_text_encoder,
)
from t2v_turbo.models.vae import PixelSpace, VideoVAE, load_vae
from t2v_turbo.models.vc2_unet import VC2UNet, guidance_embedding, motion_embedding

__all__ = [
    "MiniLMTextEncoder",
    "OpenCLIPTextEncoder",
    "PixelSpace",
    "PromptCache",
    "VC2UNet",
    "VideoVAE",
    "guidance_embedding",
    "load_text_encoder",
    "load_vae",
    "motion_embedding",
    "save_text_encoder",
]
