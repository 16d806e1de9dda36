"""turbo_kernels.patching on tiny random diffusers video UNets: patched and unpatched models agree,
forward and parameter gradients, with the temporal op forced to the reference and to Triton
(the interpreter on the CPU); the processors reproduce AttnProcessor2_0 on the module features the
UNets do not exercise; masks, fallbacks, unpatch, idempotence, refusals and torch.compile.

Tolerances (fp32), each error measured against the largest magnitude of the unpatched tensor:
1e-5 for outputs, 5e-5 for parameter gradients. The patched model computes the same maths in
float32 with its sums in another order, so every value moves by a few float32 roundings. Measured
on these configs: outputs 8e-7, gradients up to 5e-6 (bias and norm gradients sum over every
position and frame with cancellation, which magnifies the relative error), and two unpatched runs
are bitwise equal. Both tolerances leave about 10x headroom, while attention run over the wrong
axis moves the output by 0.3.
"""

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is not installed (the GPU machines lack it unless carried as a wheel)")

from diffusers import AutoencoderKL, UNet2DConditionModel, UNet3DConditionModel, UNetMotionModel  # noqa: E402
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0  # noqa: E402

import turbo_kernels as tk
from turbo_kernels import dispatch, patching
from turbo_kernels.patching import SpatialAttnProcessor, TemporalAttnProcessor, patch, unpatch

from .helpers import DEVICE

TRITON_USABLE = dispatch.machine_unavailable_reason("triton", DEVICE) is None
OUTPUT_TOLERANCE = 1e-5
GRAD_TOLERANCE = 5e-5
CROSS_DIM = 16
TEXT_TOKENS = 5


# Processors on the tiny models below: UNet3D has 8 spatial (4 self, 4 cross: down 0, mid, 2 in
# up 1) and 10 temporal (attn1 and attn2, both self-attention, of transformer_in, the down 0 and mid
# temp_attentions and the 2 up 1 temp_attentions); UNetMotion has the same 8 spatial and 14
# temporal (2 each in 7 motion modules: down 0, down 1, mid, 2 in up 0, 2 in up 1).
EXPECTED_COUNTS = {"unet3d": (8, 10), "motion": (8, 14)}
# GroupNorm + SiLU pairs patch fuses: both UNets' output norm, and the four stages of each of the
# 8 temporal convolutions of UNet3D (down 0 and 1, 2 in mid, 2 in each up block).
EXPECTED_FUSED_NORMS = {"unet3d": 1 + 4 * 8, "motion": 1}
NORM_OPS = {"group_norm_stats", "channel_affine_silu", "channel_affine_silu_backward"}


def tiny_unet3d() -> UNet3DConditionModel:
    """Temporal heads: 2 of dim 8 at 16 channels, 4 at 32, and transformer_in's fixed 8."""
    return UNet3DConditionModel(
        sample_size=8,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=8,
    )


def tiny_motion_unet() -> UNetMotionModel:
    """Two heads everywhere: dims 8 and 16 at 16 and 32 channels."""
    return UNetMotionModel(
        sample_size=8,
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=CROSS_DIM,
        num_attention_heads=2,
        motion_num_attention_heads=2,
        motion_max_seq_length=8,
    )


BUILDERS = {"unet3d": tiny_unet3d, "motion": tiny_motion_unet}


def build(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return BUILDERS[kind]().to(DEVICE)


def model_inputs(kind: str, batch: int, frames: int, size: int) -> dict:
    g = torch.Generator().manual_seed(1)
    text = torch.randn(batch, TEXT_TOKENS, CROSS_DIM, generator=g)
    if kind == "motion":
        # UNetMotionModel takes one text embedding per frame, as AnimateDiff's pipeline repeats it.
        text = text.repeat_interleave(frames, dim=0)
    inputs = dict(
        sample=torch.randn(batch, 4, frames, size, size, generator=g),
        timestep=torch.tensor([999, 421][:batch]),
        encoder_hidden_states=text,
    )
    return {name: x.to(DEVICE) for name, x in inputs.items()}


def processor_kinds(model) -> dict[str, list[str]]:
    kinds = {}
    for name, processor in model.attn_processors.items():
        kinds.setdefault(type(processor).__name__, []).append(name)
    return kinds


def forward_and_grads(model, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training step's output and parameter gradients, under a fixed dropout seed."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)
    out = model(**inputs).sample
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.device)
    (out * cotangent).sum().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_close_to(got: torch.Tensor, want: torch.Tensor, name: str, tolerance: float, scale: float | None = None):
    err = (got - want).abs().max().item()
    scale = want.abs().max().item() if scale is None else scale
    assert err <= tolerance * scale, f"{name}: max error {err:.3e} > {tolerance:g} x {scale:.3e}"


@pytest.fixture
def temporal_calls(monkeypatch):
    """Records the arguments of every temporal_attention call the processors make."""
    record = []
    original = patching.temporal_attention

    def spy(q, k, v, num_frames, heads, layout, scale):
        record.append(dict(shape=tuple(q.shape), num_frames=num_frames, heads=heads, layout=layout))
        return original(q, k, v, num_frames, heads, layout=layout, scale=scale)

    monkeypatch.setattr(patching, "temporal_attention", spy)
    return record


# Triton runs in the interpreter on the CPU at roughly 10 ms per program, so its cases are the
# smallest videos that still have several positions, heads and an odd, padded frame count.
CASES = [
    pytest.param("reference", "unet3d", 2, 5, 8, id="reference-unet3d"),
    pytest.param("reference", "motion", 2, 5, 8, id="reference-motion"),
    pytest.param("triton", "unet3d", 1, 3, 4, id="triton-unet3d"),
    pytest.param("triton", "motion", 1, 3, 4, id="triton-motion"),
]


@pytest.mark.parametrize("backend,kind,batch,frames,size", CASES)
def test_patched_model_matches_original(backend, kind, batch, frames, size, temporal_calls, chosen):
    if backend == "triton" and not TRITON_USABLE:
        pytest.skip("Triton is not usable here")
    model = build(kind)
    inputs = model_inputs(kind, batch, frames, size)
    want_out, want_grads = forward_and_grads(model, inputs)

    # The fused norms' Triton kernels take 25 s of the interpreter on UNet3D; test_group_norm and
    # the AutoencoderKL case run them, so the Triton cases patch the processors alone.
    norms = backend == "reference"
    patch(model, norms=norms)
    kinds = processor_kinds(model)
    spatial_count, temporal_count = EXPECTED_COUNTS[kind]
    assert (len(kinds["SpatialAttnProcessor"]), len(kinds["TemporalAttnProcessor"])) == (spatial_count, temporal_count)
    fused_count = sum(isinstance(m, patching.GroupNormSiLU) for m in model.modules())
    assert fused_count == (EXPECTED_FUSED_NORMS[kind] if norms else 0)
    with tk.backend(backend):
        out, grads = forward_and_grads(model, inputs)

    assert len(temporal_calls) == temporal_count
    # (B*H*W, F, C): every row one position's frames.
    assert all(call["layout"] == "sequences" for call in temporal_calls)
    assert all(call["shape"][1] == call["num_frames"] == frames for call in temporal_calls)
    assert max(call["shape"][0] for call in temporal_calls) == batch * size * size
    assert {op for op, _ in chosen} == {"temporal_attention", "temporal_attention_backward"} | (NORM_OPS if norms else set())
    assert {name for _, name in chosen} == {backend}
    assert_close_to(out, want_out, "output", OUTPUT_TOLERANCE)
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        assert_close_to(grad, want_grads[name], f"grad {name}", GRAD_TOLERANCE)
    for name in kinds["TemporalAttnProcessor"]:
        query_grad = want_grads[name.replace("processor", "to_q.weight")]
        assert query_grad.abs().max() > 0, f"{name}: the gradient comparison must reach temporal attention"


def _attention_module(**features) -> Attention:
    torch.manual_seed(4)
    return Attention(**{"query_dim": 16, "heads": 2, "dim_head": 8, **features}).to(DEVICE)


def _run(processor, attn, hidden_states, **kwargs):
    hidden_states = hidden_states.clone().requires_grad_(True)
    attn.zero_grad(set_to_none=True)
    torch.manual_seed(8)
    out = processor(attn, hidden_states, **kwargs)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.device))
    grads = [hidden_states.grad] + [p.grad for p in attn.parameters()]
    return out.detach(), grads


# Module features the tiny UNets do not use but AttnProcessor2_0 handles.
FEATURES = {
    "qk-layer-norm": dict(qk_norm="layer_norm"),
    "group-norm-residual-rescale": dict(norm_num_groups=4, residual_connection=True, rescale_output_factor=2.0),
    # Training mode: both processors draw the output dropout's mask from the same seed.
    "output-dropout": dict(dropout=0.5),
}


@pytest.mark.parametrize("features", FEATURES.values(), ids=FEATURES.keys())
@pytest.mark.parametrize("processor_kind", ["temporal", "spatial"])
def test_processors_match_attn_processor_2_0(processor_kind, features, temporal_calls):
    attn = _attention_module(**features)
    _assert_processor_matches(processor_kind, AttnProcessor2_0, attn, temporal_calls)


def _assert_processor_matches(processor_kind, diffusers_processor, attn, temporal_calls):
    """Our processor of `processor_kind` (the temporal one wrapping `diffusers_processor` as its
    fallback) gives diffusers_processor's output and gradients on `attn`, with the reference ops."""
    hidden_states = torch.randn(6, 5, 16, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    want_out, want_grads = _run(diffusers_processor(), attn, hidden_states)
    processor = (
        TemporalAttnProcessor(diffusers_processor()) if processor_kind == "temporal" else SpatialAttnProcessor()
    )
    with tk.backend("reference"):
        out, grads = _run(processor, attn, hidden_states)
    assert len(temporal_calls) == (1 if processor_kind == "temporal" else 0)
    assert_close_to(out, want_out, "output", OUTPUT_TOLERANCE)
    # One scale for all gradients of the module: the key norm's bias has an analytically zero
    # gradient (softmax ignores a shift shared by all keys), so its own values are rounding noise.
    grad_scale = max(want.abs().max().item() for want in want_grads)
    for index, (grad, want) in enumerate(zip(grads, want_grads)):
        assert_close_to(grad, want, f"grad {index}", GRAD_TOLERANCE, grad_scale)


@pytest.mark.parametrize("processor_kind", ["temporal", "spatial"])
def test_processors_scale_by_the_modules_scale(processor_kind, temporal_calls):
    """A module built with scale_qk=False scales its logits by 1, not 1/sqrt(d); diffusers gives
    it the classic AttnProcessor, which reads attn.scale (AttnProcessor2_0 would not). The
    processors read it too."""
    attn = _attention_module(scale_qk=False)
    assert attn.scale == 1.0 and type(attn.processor) is AttnProcessor
    _assert_processor_matches(processor_kind, AttnProcessor, attn, temporal_calls)


# Calls of the spatial processor the tiny UNets do not make: (module features, hidden states'
# shape, with a 4-D temb for SpatialNorm, with a text context).
SPATIAL_CALLS = {
    "cross-attention-norm": (dict(cross_attention_dim=16, cross_attention_norm="layer_norm"), (2, 5, 16), False, True),
    "image-shaped": ({}, (2, 16, 2, 3), False, False),
    # SpatialNorm (the VAE's attention) group-norms 32 groups: 32 channels.
    "image-shaped-spatial-norm": (dict(query_dim=32, spatial_norm_dim=4), (2, 32, 2, 3), True, False),
}


@pytest.mark.parametrize("features,shape,with_temb,with_context", SPATIAL_CALLS.values(), ids=SPATIAL_CALLS.keys())
def test_spatial_processor_matches_attn_processor_2_0_on_other_calls(features, shape, with_temb, with_context):
    """A context through the module's cross norm; (B, C, H, W) maps, flattened to tokens and back,
    after the module's spatial norm of temb."""
    attn = _attention_module(**features)
    g = torch.Generator().manual_seed(9)
    hidden_states = torch.randn(shape, generator=g).to(DEVICE)
    kwargs = {}
    if with_temb:
        kwargs["temb"] = torch.randn(shape[0], 4, 1, 2, generator=g).to(DEVICE)
    if with_context:
        kwargs["encoder_hidden_states"] = torch.randn(shape[0], 3, 16, generator=g).to(DEVICE)
    want_out, want_grads = _run(AttnProcessor2_0(), attn, hidden_states, **kwargs)
    out, grads = _run(SpatialAttnProcessor(), attn, hidden_states, **kwargs)
    assert_close_to(out, want_out, "output", OUTPUT_TOLERANCE)
    grad_scale = max(want.abs().max().item() for want in want_grads)
    for index, (grad, want) in enumerate(zip(grads, want_grads)):
        assert_close_to(grad, want, f"grad {index}", GRAD_TOLERANCE, grad_scale)


class RecordingProcessor(AttnProcessor2_0):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return super().__call__(*args, **kwargs)


class AddedEmbedding(torch.nn.Module):
    """A spatial norm that takes token-shaped states (diffusers' SpatialNorm takes maps only)."""

    def forward(self, hidden_states, temb):
        return hidden_states + temb


@pytest.mark.parametrize("call", ["attention_mask", "encoder_hidden_states", "image_shaped", "spatial_norm"])
def test_temporal_processor_falls_back_for_what_it_does_not_take(call, temporal_calls):
    attn = _attention_module()
    hidden_states = torch.randn(2, 4, 16, device=DEVICE)
    kwargs = {
        "attention_mask": dict(attention_mask=torch.zeros(2, 1, 4, device=DEVICE)),
        "encoder_hidden_states": dict(encoder_hidden_states=torch.randn(2, 3, 16, device=DEVICE)),
        "image_shaped": {},
        "spatial_norm": dict(temb=torch.randn(2, 4, 16, device=DEVICE)),
    }[call]
    if call == "image_shaped":
        hidden_states = torch.randn(2, 16, 2, 2, device=DEVICE)
    if call == "spatial_norm":
        attn.spatial_norm = AddedEmbedding()
    fallback = RecordingProcessor()
    out = TemporalAttnProcessor(fallback)(attn, hidden_states, **kwargs)
    assert fallback.calls == 1 and temporal_calls == []
    torch.testing.assert_close(out, AttnProcessor2_0()(attn, hidden_states, **kwargs), rtol=0, atol=0)


@pytest.mark.parametrize("mask_kind", ["bool", "float-inf"])
def test_spatial_processor_fully_masked_rows(mask_kind):
    """A query row with every key masked out returns zeros and every gradient stays finite; all
    other rows match AttnProcessor2_0. PyTorch's CPU SDPA gives the same zeros by itself (since
    torch 2.5), so on the CPU this checks that the guard keeps the semantics; the guard exists for
    the CUDA kernels, which have returned NaN there."""
    attn = _attention_module(cross_attention_dim=16)
    g = torch.Generator().manual_seed(7)
    hidden_states = torch.randn(2, 5, 16, generator=g).to(DEVICE)
    context = torch.randn(2, 6, 16, generator=g).to(DEVICE)
    keep = torch.rand(2, 5, 6, generator=g) > 0.3
    keep[:, :, 0] = True
    keep[1, 2, :] = False
    keep = keep.to(DEVICE)
    mask = keep if mask_kind == "bool" else torch.zeros(keep.shape, device=DEVICE).masked_fill(~keep, float("-inf"))
    kwargs = dict(encoder_hidden_states=context, attention_mask=mask)

    out, grads = _run(SpatialAttnProcessor(), attn, hidden_states, **kwargs)
    assert all(torch.isfinite(grad).all() for grad in grads)
    # The dead row's attention output is zero, so the module returns the output projection's bias.
    torch.testing.assert_close(out[1, 2], attn.to_out[0].bias.detach(), rtol=0, atol=0)
    live = torch.ones(2, 5, dtype=torch.bool, device=DEVICE)
    live[1, 2] = False
    want = AttnProcessor2_0()(attn, hidden_states, **kwargs).detach()
    assert_close_to(out[live], want[live], "live rows", OUTPUT_TOLERANCE)


def test_unpatch_restores_the_original_processors():
    model = build("unet3d")
    originals = model.attn_processors
    patch(model)
    assert all(type(p) in (SpatialAttnProcessor, TemporalAttnProcessor) for p in model.attn_processors.values())
    unpatch(model)
    assert all(model.attn_processors[name] is original for name, original in originals.items())
    unpatch(model)
    assert all(model.attn_processors[name] is original for name, original in originals.items())


def test_patch_twice_is_idempotent_and_flags_choose_the_kinds():
    model = build("motion")
    originals = model.attn_processors
    patch(model)
    once = {name: type(p) for name, p in model.attn_processors.items()}
    patch(model)
    assert {name: type(p) for name, p in model.attn_processors.items()} == once
    for name, processor in model.attn_processors.items():
        if isinstance(processor, TemporalAttnProcessor):
            assert processor.fallback is originals[name]

    patch(model, spatial=False)
    spatial_count, temporal_count = EXPECTED_COUNTS["motion"]
    assert {k: len(v) for k, v in processor_kinds(model).items()} == {
        "AttnProcessor2_0": spatial_count, "TemporalAttnProcessor": temporal_count
    }
    patch(model, temporal=False)
    assert {k: len(v) for k, v in processor_kinds(model).items()} == {
        "SpatialAttnProcessor": spatial_count, "AttnProcessor2_0": temporal_count
    }
    unpatch(model)
    assert all(model.attn_processors[name] is original for name, original in originals.items())


def test_processors_other_than_diffusers_plain_ones_are_kept():
    model = build("unet3d")
    custom = RecordingProcessor()
    name = "mid_block.temp_attentions.0.transformer_blocks.0.attn1.processor"
    processors = model.attn_processors
    processors[name] = custom
    model.set_attn_processor(processors)
    patch(model)
    assert model.attn_processors[name] is custom
    unpatch(model)
    assert model.attn_processors[name] is custom


@pytest.mark.parametrize("then", ["unpatch", "patch again", "install a kernel processor"])
def test_a_processor_set_after_patch_is_kept(then):
    """As one an IP-Adapter loads into a patched model: unpatching or patching again restores the
    patch's processors and keeps it."""
    model = build("motion")
    originals = model.attn_processors
    patch(model)
    custom = RecordingProcessor()
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"
    processors = model.attn_processors
    processors[name] = custom
    model.set_attn_processor(processors)
    if then == "unpatch":
        unpatch(model)
        assert all(model.attn_processors[n] is p for n, p in originals.items() if n != name)
    elif then == "install a kernel processor":
        own = TemporalAttnProcessor(custom)
        processors = model.attn_processors
        processors[name] = own
        model.set_attn_processor(processors)
        unpatch(model)
        assert model.attn_processors[name] is own
        return
    else:
        patch(model, temporal=False)
        assert processor_kinds(model)["SpatialAttnProcessor"]
    assert model.attn_processors[name] is custom


class ReadOnlyKernelSwitch(torch.nn.Module):
    @property
    def use_kernels(self) -> bool:
        return True


UNSUPPORTED = {
    "Linear": lambda: torch.nn.Linear(2, 2),
    "read-only-use_kernels": ReadOnlyKernelSwitch,
    "UNet2DConditionModel": lambda: UNet2DConditionModel(
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=4,
        cross_attention_dim=8, attention_head_dim=4,
    ),
}


@pytest.mark.parametrize("builder", UNSUPPORTED.values(), ids=UNSUPPORTED.keys())
def test_unsupported_models_raise(builder):
    model = builder()
    before = model.attn_processors if hasattr(model, "attn_processors") else None
    with pytest.raises(TypeError, match=f"{type(model).__name__}.*UNet3DConditionModel.*UNetMotionModel.*VC2UNet"):
        patch(model)
    if before is not None:
        assert all(model.attn_processors[name] is p for name, p in before.items())


def test_patch_switches_vc2_unet_kernels_and_unpatch_restores_them():
    from t2v_turbo.models.vc2_unet import TemporalTransformer, VC2UNet

    model = VC2UNet.preset("tiny", use_kernels=False)
    temporal_layers = [m for m in model.modules() if isinstance(m, TemporalTransformer)]
    assert temporal_layers and not any(layer.use_kernels for layer in temporal_layers)
    assert patch(model) is model and model.use_kernels
    assert all(layer.use_kernels for layer in temporal_layers)
    patch(model, temporal=False)  # a second patch starts again from the unpatched value
    assert not model.use_kernels
    patch(model)
    assert unpatch(model) is model and not model.use_kernels
    assert not any(layer.use_kernels for layer in temporal_layers)
    model.use_kernels = True
    patch(model, temporal=False)
    assert not model.use_kernels
    unpatch(model)
    unpatch(model)  # unpatching an unpatched model leaves it as it is
    assert model.use_kernels


def test_unpatch_after_two_patches_of_a_vc2_unet_restores_the_value_before_the_first():
    """The second patch starts again from the unpatched value, so the first patch's value is not
    taken for the model's own."""
    from t2v_turbo.models.vc2_unet import VC2UNet

    model = VC2UNet.preset("tiny", use_kernels=False)
    patch(model)
    patch(model, temporal=False)
    unpatch(model)
    assert not model.use_kernels


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["unet3d", "motion"])
def test_torch_compile_traces_one_graph_with_the_temporal_op(kind):
    """The check for graph breaks: dynamo hands the backend one FX graph per region between breaks,
    so a patched forward that reaches the backend as exactly one graph has none (the unpatched
    model of diffusers 0.42 compiles to one graph as well, by torch._dynamo.explain). The graph
    must hold the temporal op itself, once per temporal attention, as one opaque node."""
    model = build(kind)
    inputs = model_inputs(kind, 1, 3, 4)
    patch(model).eval()
    with tk.backend("reference"):
        want = model(**inputs).sample

    graphs = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def recording_aot_eager(graph_module, example_inputs):
        graphs.append(graph_module)
        return aot_eager(graph_module, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=False, backend=recording_aot_eager)
    with tk.backend("reference"):
        out = compiled(**inputs).sample
        out.square().sum().backward()
    torch._dynamo.reset()

    assert len(graphs) == 1, f"{len(graphs)} graphs: graph breaks (inspect with torch._dynamo.explain)"
    temporal_nodes = [
        node for node in graphs[0].graph.nodes if node.target is torch.ops.turbo_kernels.temporal_attention.default
    ]
    assert len(temporal_nodes) == EXPECTED_COUNTS[kind][1]
    assert_close_to(out.detach(), want, "compiled output", OUTPUT_TOLERANCE)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ---- AutoencoderKL: GroupNorm + SiLU fused -------------------------------------------------------


def tiny_autoencoder() -> AutoencoderKL:
    """Two levels of one ResNet block each (plus the decoder's extra one a level) and a mid block
    of two: 10 ResNet blocks, 2 norms each, and the encoder's and decoder's output norms."""
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    ).to(DEVICE)


AUTOENCODER_FUSED_NORMS = 2 * (2 + 2 + 3 + 3) + 2


def autoencoder_step(model, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Encode to the posterior mean, decode it; the output, the frames' gradient and every
    parameter's gradient of a fixed random projection of the output."""
    model.zero_grad(set_to_none=True)
    frames = frames.clone().requires_grad_(True)
    out = model.decode(model.encode(frames).latent_dist.mean).sample
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.device)
    (out * cotangent).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return out.detach(), frames.grad, grads


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the group_norm_silu calls the fused modules make."""
    record = []
    original = patching.group_norm_silu

    def spy(x, weight, bias, groups, eps):
        record.append(tuple(x.shape))
        return original(x, weight, bias, groups, eps)

    monkeypatch.setattr(patching, "group_norm_silu", spy)
    return record


@pytest.mark.parametrize("backend,size", [("reference", 16), ("triton", 8)])
def test_patched_autoencoder_matches_original(backend, size, fused_calls, chosen):
    if backend == "triton" and not TRITON_USABLE:
        pytest.skip("Triton is not usable here")
    model = tiny_autoencoder()
    frames = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1)).to(DEVICE) * 2 - 1
    want_out, want_frame_grad, want_grads = autoencoder_step(model, frames)

    assert patch(model) is model
    fused = [m for m in model.modules() if isinstance(m, patching.GroupNormSiLU)]
    assert len(fused) == AUTOENCODER_FUSED_NORMS
    assert not any(type(m) is torch.nn.SiLU for m in model.modules())
    with tk.backend(backend):
        out, frame_grad, grads = autoencoder_step(model, frames)

    assert len(fused_calls) == AUTOENCODER_FUSED_NORMS
    assert {op for op, name in chosen if name == backend} >= {"channel_affine_silu", "channel_affine_silu_backward"}
    assert_close_to(out, want_out, "output", OUTPUT_TOLERANCE)
    assert_close_to(frame_grad, want_frame_grad, "frames' gradient", GRAD_TOLERANCE)
    assert grads.keys() == want_grads.keys()
    # The attention's key bias has a gradient that is zero in exact arithmetic (softmax ignores a
    # constant added to all of a row's scores): rounding alone, so each gradient's error is
    # measured against at least a thousandth of the largest gradient.
    floor = 1e-3 * max(grad.abs().max().item() for grad in want_grads.values())
    for name, grad in grads.items():
        want = want_grads[name]
        assert_close_to(grad, want, f"grad {name}", GRAD_TOLERANCE, scale=max(want.abs().max().item(), floor))


def test_autoencoder_patch_shares_parameters_and_unpatch_restores_the_modules():
    model = tiny_autoencoder()
    block = model.decoder.up_blocks[0].resnets[0]
    norm1, norm2, silu, norm_out = block.norm1, block.norm2, block.nonlinearity, model.decoder.conv_norm_out
    state = model.state_dict()

    patch(model.eval())  # the fused modules and Identities take the modules' mode
    assert not any(m.training for m in model.modules())
    unpatch(model.train())

    patch(model)
    patch(model)  # a second patch starts again from the unpatched modules
    assert type(block.norm1) is patching.GroupNormSiLU and type(block.nonlinearity) is torch.nn.Identity
    assert block.norm1.weight is norm1.weight and block.norm2.bias is norm2.bias
    assert (block.norm1.num_groups, block.norm1.eps) == (norm1.num_groups, norm1.eps)
    patched_state = model.state_dict()
    assert patched_state.keys() == state.keys()
    assert all(patched_state[key].data_ptr() == value.data_ptr() for key, value in state.items())
    assert len([m for m in model.modules() if isinstance(m, patching.GroupNormSiLU)]) == AUTOENCODER_FUSED_NORMS

    # Loading into the patched model, in place or by assignment, reaches the modules unpatch puts
    # back, and so does eval().
    model.load_state_dict({key: torch.full_like(value, 0.5) for key, value in state.items()})
    model.load_state_dict({key: torch.full_like(value, 0.25) for key, value in state.items() if "norm2" in key}, strict=False, assign=True)
    model.eval()
    assert unpatch(model) is model
    assert (block.norm1, block.norm2, block.nonlinearity, model.decoder.conv_norm_out) == (norm1, norm2, silu, norm_out)
    assert bool((norm1.weight == 0.5).all()) and bool((norm2.weight == 0.25).all())
    assert not any(m.training for m in model.modules())
    assert not any(isinstance(m, patching.GroupNormSiLU) for m in model.modules())
    unpatch(model)  # unpatching an unpatched model leaves it as it is


def test_autoencoder_patch_leaves_norms_whose_silu_or_hooks_must_stay():
    from diffusers.models.resnet import ResnetBlock2D

    model = tiny_autoencoder()
    hooked = model.decoder.up_blocks[1].resnets[0]
    calls = []
    hooked.norm2.register_forward_hook(lambda module, args, output: calls.append(output.shape))
    replaced_by_user = model.encoder.down_blocks[0].resnets[0]
    patch(model)
    assert type(hooked.norm1) is torch.nn.GroupNorm and type(hooked.nonlinearity) is torch.nn.SiLU
    model.decode(torch.randn(1, 4, 4, 4, device=DEVICE))
    assert len(calls) == 1
    # A module set after patch stays through unpatch, and the ones around it come back.
    mine = torch.nn.GroupNorm(4, 8).to(DEVICE)
    replaced_by_user.norm1 = mine
    unpatch(model)
    assert replaced_by_user.norm1 is mine and type(replaced_by_user.nonlinearity) is torch.nn.SiLU
    assert type(replaced_by_user.norm2) is torch.nn.GroupNorm
    # A forward replaced on the instance (accelerate's offloading hooks) is a hook too.
    wrapped = model.decoder.conv_norm_out
    wrapped.forward = lambda x, forward=wrapped.forward: forward(x)
    patch(model)
    assert model.decoder.conv_norm_out is wrapped and type(model.decoder.conv_act) is torch.nn.SiLU

    # With a time embedding the block's SiLU acts on it too; "scale_shift" puts work between norm2 and it.
    for block in (
        ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=4, groups=4),
        ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=4, groups=4, time_embedding_norm="scale_shift"),
    ):
        assert patching._norm_silu_pairs(block) == []
    plain = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=None, groups=4)
    assert patching._norm_silu_pairs(plain) == [(plain, ("norm1", "norm2"), "nonlinearity")]


def test_unet_norms_fuse_with_the_processors_and_unpatch_restores_both():
    model = build("unet3d")
    stage = model.down_blocks[0].temp_convs[0].conv2
    norm, silu, dropout = stage[0], stage[1], stage[2]
    originals = model.attn_processors
    patch(model, norms=False)
    assert not any(isinstance(m, patching.GroupNormSiLU) for m in model.modules())
    patch(model)
    assert type(stage[0]) is patching.GroupNormSiLU and type(stage[1]) is torch.nn.Identity and stage[2] is dropout
    assert type(model.conv_norm_out) is patching.GroupNormSiLU
    # The ResNet blocks' SiLU also acts on the time embedding: their norms stay.
    assert type(model.down_blocks[0].resnets[0].norm1) is torch.nn.GroupNorm
    unpatch(model)
    assert (stage[0], stage[1]) == (norm, silu)
    assert all(model.attn_processors[name] is p for name, p in originals.items())
