"""Kernel-backed attention for diffusers video UNets: `patch(model)` installs it, `unpatch(model)`
takes it out again. The only module in the package that knows diffusers' module names.

Supported models and what `patch` replaces (only attention modules that run diffusers' plain
`AttnProcessor` / `AttnProcessor2_0`; any other processor, e.g. LoRA or IP-Adapter, is kept):

- `UNet3DConditionModel` (VideoCrafter2 / ModelScope): the self- and cross-attention of its spatial
  transformers get `SpatialAttnProcessor`; both self-attentions of every `TransformerTemporalModel`
  (the blocks' `temp_attentions` and `transformer_in`) get `TemporalAttnProcessor`.
- `UNetMotionModel` (AnimateDiff): likewise, its `AnimateDiffTransformer3D` motion modules being the
  temporal transformers.
- `AutoencoderKL` (the VAE of VideoCrafter2, ModelScope, AnimateDiff and Stable Diffusion): every
  GroupNorm whose output only a SiLU reads (both norms of each ResNet block without a time
  embedding, and the encoder's and decoder's output norm) becomes a `GroupNormSiLU` running
  `turbo_kernels.group_norm_silu`, and that SiLU an `nn.Identity`. The fused module holds the
  GroupNorm's own parameters, so state dicts keep their keys and values. Its attention (one
  SDPA call at the coarsest level) is left as it is. The two UNets get the same fusion where it
  applies (`norms`): their output norm, and UNet3DConditionModel's temporal convolutions (four
  GroupNorm-SiLU-Conv3d stages each); their ResNet blocks' SiLU also acts on the time
  embedding, so those norms stay.
- The project's own VideoCrafter2 UNet (`t2v_turbo.models.VC2UNet`, or any model with a settable
  `use_kernels` property): it runs its fused temporal transformer blocks and kernel temporal
  attention itself while `use_kernels` is set, and its spatial attention is always SDPA, so `patch`
  sets `use_kernels = temporal` and `unpatch` restores the value it had.

Both temporal transformers hand their attention processors hidden states of shape (B*H*W, F, C):
they permute the (B*F, C, H, W) feature map to (B, H, W, F, C) and flatten, so every row is the
F frames of one position of one video, and attention runs over frames. That is the "sequences"
layout of `turbo_kernels.temporal_attention`.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from turbo_kernels.ops.attention import temporal_attention
from turbo_kernels.ops.group_norm import group_norm_silu

_ORIGINAL_PROCESSORS = "_turbo_kernels_original_processors"
_INSTALLED_PROCESSORS = "_turbo_kernels_installed_processors"
_ORIGINAL_USE_KERNELS = "_turbo_kernels_original_use_kernels"
_FUSED_NORMS = "_turbo_kernels_fused_norms"

# cuDNN, the default SDPA backend on H100/H200, has returned NaN grad_q for calls with an explicit
# mask, a key length of 64 mod 128 and a query row whose logsumexp is below about -88.7
# (pytorch/pytorch#196678, reported against torch 2.11 and later). Masked calls therefore run one
# of the other backends.
_MASKED_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@functools.lru_cache(maxsize=None)
def _supported_models() -> dict[type, tuple[type, ...]]:
    """Each supported model class, with the classes of its temporal transformers. Imported on first
    use so that `import turbo_kernels` does not import diffusers."""
    from diffusers import UNet3DConditionModel, UNetMotionModel
    from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    return {UNet3DConditionModel: (TransformerTemporalModel,), UNetMotionModel: (AnimateDiffTransformer3D,)}


@functools.lru_cache(maxsize=None)
def _replaceable_processors() -> tuple[type, ...]:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    return (AttnProcessor, AttnProcessor2_0)


# ---- processors --------------------------------------------------------------------------------


def _per_head(norm: Optional[torch.nn.Module], x: Tensor, heads: int) -> Tensor:
    """Apply a head-dim norm (attn.norm_q / norm_k) to (batch, tokens, heads*d)."""
    if norm is None:
        return x
    return norm(x.unflatten(-1, (heads, -1))).flatten(-2)


def _project(attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v as (batch, tokens, heads*d), with the module's group, cross and q/k norms applied as
    diffusers' AttnProcessor2_0 applies them."""
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    query = _per_head(attn.norm_q, attn.to_q(hidden_states), attn.heads)
    key = _per_head(attn.norm_k, attn.to_k(encoder_hidden_states), attn.heads)
    return query, key, attn.to_v(encoder_hidden_states)


def _output(attn, hidden_states: Tensor, residual: Tensor, image_shape: Optional[torch.Size] = None) -> Tensor:
    """Output projection, dropout, residual and rescaling, as AttnProcessor2_0 finishes."""
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    if image_shape is not None:
        hidden_states = hidden_states.transpose(1, 2).reshape(image_shape)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


class TemporalAttnProcessor:
    """Self-attention over the frames of every position (diffusers' temporal transformers), run by
    `turbo_kernels.temporal_attention` on the (B*H*W, F, C) "sequences" layout. Calls the module
    would need more for (a mask, encoder states, a spatial norm, other shapes) go to `fallback`,
    the processor the module had before `patch`."""

    def __init__(self, fallback):
        self.fallback = fallback

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ):
        if (
            hidden_states.ndim != 3
            or encoder_hidden_states is not None
            or attention_mask is not None
            or attn.spatial_norm is not None
        ):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        query, key, value = _project(attn, hidden_states, None)
        attended = temporal_attention(
            query, key, value, num_frames=hidden_states.shape[1], heads=attn.heads, layout="sequences", scale=attn.scale
        )
        return _output(attn, attended, hidden_states)


def _sdpa(query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor], scale: float) -> Tensor:
    """SDPA on (batch, heads, tokens, d). A query row whose keys are all masked out returns zeros
    with zero gradients: its mask row is lifted before the softmax, so no backend sees an all -inf
    row (such rows have given NaN outputs, hence NaN gradients, in SDPA kernels:
    pytorch/pytorch#103749, #110213), and its output is zeroed after."""
    if mask is None:
        return F.scaled_dot_product_attention(query, key, value, scale=scale)
    if mask.dtype == torch.bool:
        live_rows = mask.any(dim=-1, keepdim=True)
        mask = mask | ~live_rows
    else:
        live_rows = ~torch.isneginf(mask).all(dim=-1, keepdim=True)
        # The memory-efficient backend takes float masks only in the query's dtype.
        mask = mask.masked_fill(~live_rows, 0.0).to(query.dtype)
    with sdpa_kernel(_MASKED_SDPA_BACKENDS):
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
    return attended * live_rows.to(attended.dtype)


class SpatialAttnProcessor:
    """Spatial self- and cross-attention with AttnProcessor2_0's semantics (and the module's
    `attn.scale`), through `attend`: PyTorch's SDPA, guarded against fully masked rows. The
    harness measured SDPA's cuDNN backend (which torch picks on an H100) ahead of the Triton
    spatial kernels at every UNet shape but the 160-token level, where they tie, forward and
    backward (README, benchmark results), so
    those kernels are not chosen here; `turbo_kernels.spatial_attention` calls them directly."""

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = None
        if hidden_states.ndim == 4:
            image_shape = hidden_states.shape
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if attention_mask is not None:
            context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            batch, context_length, _ = context.shape
            attention_mask = attn.prepare_attention_mask(attention_mask, context_length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        query, key, value = _project(attn, hidden_states, encoder_hidden_states)
        attended = self.attend(query, key, value, attn.heads, attn.scale, attention_mask)
        return _output(attn, attended, residual, image_shape)

    def attend(
        self, query: Tensor, key: Tensor, value: Tensor, heads: int, scale: float, mask: Optional[Tensor]
    ) -> Tensor:
        """softmax(scale q k^T + mask) v per head; q, k, v and the result are (batch, tokens, heads*d),
        the mask (batch, heads, queries or 1, keys)."""
        query, key, value = (x.unflatten(-1, (heads, -1)).transpose(1, 2) for x in (query, key, value))
        return _sdpa(query, key, value, mask, scale).transpose(1, 2).flatten(2)


# ---- GroupNorm + SiLU ----------------------------------------------------------------------------


class GroupNormSiLU(nn.GroupNorm):
    """silu(group_norm(x)) in one `turbo_kernels.group_norm_silu` call: what `patch` puts in place
    of a GroupNorm whose output goes only to a SiLU. Built around that GroupNorm's own parameter
    objects (`fused_from`), so loading, casting or moving either module changes both."""

    @classmethod
    def fused_from(cls, norm: nn.GroupNorm) -> "GroupNormSiLU":
        with torch.device("meta"):
            fused = cls(norm.num_groups, norm.num_channels, norm.eps, affine=True)
        fused.weight, fused.bias = norm.weight, norm.bias
        return fused.train(norm.training)

    def forward(self, x: Tensor) -> Tensor:
        return group_norm_silu(x, self.weight, self.bias, self.num_groups, self.eps)


def has_hooks(module: nn.Module) -> bool:
    """Whether calls to `module` must go through it: torch's module hooks, or a forward replaced on
    the instance (how accelerate's offloading hooks and diffusers' hook registry wrap a module).
    A fusion that would skip such a module's call leaves it alone."""
    return bool(
        module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks or module._backward_hooks
        or "forward" in vars(module)
    )


def _fusable(norm: nn.Module, silu: nn.Module) -> bool:
    """An affine nn.GroupNorm and an nn.SiLU (exactly those classes: a subclass may compute
    something else), neither with hooks that fusing would stop calling."""
    return (
        type(norm) is nn.GroupNorm and norm.affine and type(silu) is nn.SiLU
        and not has_hooks(norm) and not has_hooks(silu)
    )


def _norm_silu_pairs(model: nn.Module) -> list[tuple[nn.Module, tuple[str, ...], str]]:
    """(parent, GroupNorm attribute names, SiLU attribute name) of every place in a diffusers model
    where the SiLU reads nothing but those norms' outputs: a ResnetBlock2D without a time
    embedding (its `nonlinearity` follows norm1 and norm2 and, with a time embedding, would also
    act on that) whose norm2 goes straight to it (every time_embedding_norm but "scale_shift",
    which scales and shifts in between: the VAE decoder's blocks use "group"); the output layers'
    conv_norm_out / conv_act of the VAE's Encoder and Decoder and of the video UNets; and a
    GroupNorm followed by a SiLU in an nn.Sequential (UNet3DConditionModel's temporal
    convolutions)."""
    from diffusers import UNet3DConditionModel, UNetMotionModel
    from diffusers.models.autoencoders.vae import Decoder, Encoder
    from diffusers.models.resnet import ResnetBlock2D

    pairs = []
    for module in model.modules():
        if (
            isinstance(module, ResnetBlock2D) and module.time_emb_proj is None
            and module.time_embedding_norm != "scale_shift"
        ):
            names = ("norm1", "norm2")
            if all(_fusable(getattr(module, name), module.nonlinearity) for name in names):
                pairs.append((module, names, "nonlinearity"))
        elif isinstance(module, (Encoder, Decoder, UNet3DConditionModel, UNetMotionModel)):
            if module.conv_norm_out is not None and _fusable(module.conv_norm_out, module.conv_act):
                pairs.append((module, ("conv_norm_out",), "conv_act"))
        elif isinstance(module, nn.Sequential):
            children = list(module.named_children())
            pairs += [
                (module, (norm_name,), silu_name)
                for (norm_name, norm), (silu_name, silu) in zip(children, children[1:])
                if _fusable(norm, silu)
            ]
    return pairs


def _fuse_norms(model: nn.Module) -> None:
    """Install GroupNormSiLU modules (module docstring), remembering the modules they replace."""
    fused = []
    for parent, norm_names, silu_name in _norm_silu_pairs(model):
        originals = {name: getattr(parent, name) for name in (*norm_names, silu_name)}
        installed = {name: GroupNormSiLU.fused_from(originals[name]) for name in norm_names}
        installed[silu_name] = nn.Identity().train(originals[silu_name].training)
        for name, module in installed.items():
            setattr(parent, name, module)
        fused.append((parent, originals, installed))
    setattr(model, _FUSED_NORMS, fused)


def _unfuse_norms(model: nn.Module) -> None:
    """Put back the GroupNorm and SiLU modules _fuse_norms replaced, each where its replacement
    still is, with the replacement's parameter objects and training flag (a load with
    assign=True, or a conversion that swaps parameters, reached only the modules in the tree)."""
    for parent, originals, installed in getattr(model, _FUSED_NORMS):
        for name, module in installed.items():
            if getattr(parent, name) is not module:
                continue
            original = originals[name]
            if isinstance(module, GroupNormSiLU):
                original.weight, original.bias = module.weight, module.bias
            setattr(parent, name, original.train(module.training))
    delattr(model, _FUSED_NORMS)


@functools.lru_cache(maxsize=None)
def _autoencoder_classes() -> tuple[type, ...]:
    from diffusers import AutoencoderKL

    return (AutoencoderKL,)


# ---- patch / unpatch ---------------------------------------------------------------------------


def _temporal_transformer_classes(model: torch.nn.Module) -> tuple[type, ...]:
    for model_class, temporal_classes in _supported_models().items():
        if isinstance(model, model_class):
            return temporal_classes
    supported = ", ".join(f"diffusers.{cls.__name__}" for cls in _supported_models())
    supported += ", diffusers.AutoencoderKL, models with a settable use_kernels property (t2v_turbo's VC2UNet)"
    model_class = f"{type(model).__module__}.{type(model).__qualname__}"
    raise TypeError(f"turbo_kernels.patch does not support {model_class}; supported models: {supported}")


def _temporal_processor_names(model: torch.nn.Module) -> set[str]:
    """Keys of `model.attn_processors` that belong to attention inside a temporal transformer."""
    temporal_classes = _temporal_transformer_classes(model)
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, temporal_classes):
            names.update(
                f"{prefix}.{name}.processor"
                for name, child in module.named_modules()
                if hasattr(child, "get_processor")
            )
    return names


def _has_kernel_switch(model: torch.nn.Module) -> bool:
    """Whether the model switches its kernels itself (VC2UNet's `use_kernels` property)."""
    switch = getattr(type(model), "use_kernels", None)
    return isinstance(switch, property) and switch.fset is not None


def patch(model: torch.nn.Module, spatial: bool = True, temporal: bool = True, norms: bool = True) -> torch.nn.Module:
    """Install kernel-backed attention processors on a diffusers `UNet3DConditionModel` or
    `UNetMotionModel` (in place; returns the model): `TemporalAttnProcessor` on the temporal
    self-attentions when `temporal`, `SpatialAttnProcessor` on the spatial self- and
    cross-attentions when `spatial`. Only modules running diffusers' plain attention processors are
    replaced. Patching a patched model starts again from the processors it had before the first
    patch (keeping any set since, as `unpatch` does). On a model with a settable `use_kernels` property (VC2UNet) it
    sets `use_kernels = temporal` instead (its spatial attention is SDPA either way). With `norms`,
    each GroupNorm + SiLU pair of a diffusers model whose SiLU reads only that norm becomes a
    `GroupNormSiLU` (module docstring); on a diffusers `AutoencoderKL` that is all it does
    (`spatial` and `temporal` do not apply). Raises TypeError for other models."""
    if isinstance(model, _autoencoder_classes()):
        unpatch(model)
        if norms:
            _fuse_norms(model)
        return model
    if _has_kernel_switch(model):
        unpatch(model)
        setattr(model, _ORIGINAL_USE_KERNELS, model.use_kernels)
        model.use_kernels = temporal
        return model
    temporal_names = _temporal_processor_names(model)
    unpatch(model)
    originals = model.attn_processors
    replaceable = _replaceable_processors()
    processors = {}
    for name, original in originals.items():
        if type(original) not in replaceable:
            processors[name] = original
        elif name in temporal_names:
            processors[name] = TemporalAttnProcessor(original) if temporal else original
        else:
            processors[name] = SpatialAttnProcessor() if spatial else original
    # set_attn_processor consumes the dict it is given.
    model.set_attn_processor(dict(processors))
    setattr(model, _ORIGINAL_PROCESSORS, originals)
    setattr(model, _INSTALLED_PROCESSORS, processors)
    if norms:
        _fuse_norms(model)
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Restore the attention processors `model` had before `patch` (the same objects) where the
    patch's processors still are, or its `use_kernels` value, and the GroupNorm and SiLU modules
    it fused (the same objects) where the fused ones still are; processors and modules set since
    the patch (an IP-Adapter's, say) stay. A model that is not patched is left as it is. Returns the model."""
    if hasattr(model, _FUSED_NORMS):
        _unfuse_norms(model)
    if hasattr(model, _ORIGINAL_USE_KERNELS):
        model.use_kernels = getattr(model, _ORIGINAL_USE_KERNELS)
        delattr(model, _ORIGINAL_USE_KERNELS)
        return model
    originals = getattr(model, _ORIGINAL_PROCESSORS, None)
    if originals is not None:
        installed = getattr(model, _INSTALLED_PROCESSORS)
        restored = {
            name: originals[name] if name in installed and current is installed[name] else current
            for name, current in model.attn_processors.items()
        }
        model.set_attn_processor(restored)
        delattr(model, _ORIGINAL_PROCESSORS)
        delattr(model, _INSTALLED_PROCESSORS)
    return model
