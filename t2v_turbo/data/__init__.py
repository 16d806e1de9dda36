"""Video-text data: the procedural toy world and real or synthetic video-text datasets."""

from t2v_turbo.data.videos import (
    SyntheticVideoText,
    VideoTextDataset,
    build_dataset,
    collate_skipping,
    read_manifest,
)
from t2v_turbo.data.world import (
    Attributes,
    Clip,
    WorldConfig,
    WorldDataset,
    make_clip,
    motion_fidelity,
    parse_caption,
    prompts,
)

__all__ = [
    "Attributes",
    "Clip",
    "SyntheticVideoText",
    "VideoTextDataset",
    "WorldConfig",
    "WorldDataset",
    "build_dataset",
    "collate_skipping",
    "make_clip",
    "motion_fidelity",
    "parse_caption",
    "prompts",
    "read_manifest",
]
