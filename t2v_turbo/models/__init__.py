"""Networks of the method layer."""

from t2v_turbo.models.vc2_unet import VC2UNet, guidance_embedding, motion_embedding

__all__ = ["VC2UNet", "guidance_embedding", "motion_embedding"]
