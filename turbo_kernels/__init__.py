"""turbo-kernels: Triton and CUDA kernels for post-training text-to-video diffusion models.

Public ops (each a torch.library custom op with a plain PyTorch reference, a Triton kernel and,
where it pays, a CUDA kernel, chosen per call by `turbo_kernels.dispatch`):
guided_solver_step, consistency_output, consistency_sampler_step, pseudo_huber_loss,
temporal_attention, temporal_attention_probs, motion_energy, spatial_attention, geglu, layer_norm,
group_norm_silu, reward_preprocess.
"""

from turbo_kernels.dispatch import (
    BackendUnavailableError,
    TurboKernelsFallbackWarning,
    backend,
    backends,
    checkpoint,
    report as backend_report,
)
from turbo_kernels.capture import capture_attention_inputs
from turbo_kernels.ops.attention import temporal_attention
from turbo_kernels.ops.geglu import geglu
from turbo_kernels.ops.group_norm import group_norm_silu
from turbo_kernels.ops.layer_norm import layer_norm
from turbo_kernels.ops.motion import motion_energy, temporal_attention_probs
from turbo_kernels.ops.preprocess import PreprocessSpec, reward_preprocess
from turbo_kernels.reference.preprocess import IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from turbo_kernels.ops.spatial import spatial_attention
from turbo_kernels.patching import patch, unpatch
from turbo_kernels.temporal_block import FusedTemporalTransformer
from turbo_kernels.checks import value_checks_enabled
from turbo_kernels.ops.solver import (
    MOTION_FORMS,
    consistency_output,
    consistency_sampler_step,
    guided_solver_step,
    pseudo_huber_loss,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "FusedTemporalTransformer",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MOTION_FORMS",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "PreprocessSpec",
    "TurboKernelsFallbackWarning",
    "backend",
    "backend_report",
    "backends",
    "capture_attention_inputs",
    "checkpoint",
    "consistency_output",
    "consistency_sampler_step",
    "geglu",
    "group_norm_silu",
    "guided_solver_step",
    "layer_norm",
    "motion_energy",
    "patch",
    "pseudo_huber_loss",
    "reward_preprocess",
    "spatial_attention",
    "temporal_attention",
    "temporal_attention_probs",
    "unpatch",
    "value_checks_enabled",
]
