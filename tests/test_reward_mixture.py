"""OpenCLIPReward and RewardMixture on tiny random open_clip models and a tiny video stand-in:
the batched, stacked mixture against each model run separately clip by clip (values and frame
gradients), the text cache, a reward-ascent step, frame selection, input errors, checkpoint loading
(.pt, nested 'state_dict', .safetensors), the release specs, timm vision towers and tokenizers."""

import dataclasses
import gc
import json
import math
import re
import weakref

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.timm_model import TimmModel
from safetensors.torch import save_file
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from t2v_turbo.rewards.base import RewardModel, l2_normalize
from t2v_turbo.rewards.image_text import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    OpenCLIPReward,
    clip_spec,
    hpsv2_spec,
    video_spec,
)
from t2v_turbo.rewards.internvideo2 import InternVideo2Config, InternVideo2Reward
from t2v_turbo.rewards.mixture import (
    RELEASE_IMAGE_WEIGHT,
    RELEASE_VIDEO_WEIGHT,
    RewardEntry,
    RewardMixture,
    _random_crop,
    default_mixture,
)
from t2v_turbo.rewards.toy import ToyImageReward
from t2v_turbo.rewards.viclip import ViCLIPConfig, ViCLIPReward
from turbo_kernels.ops.preprocess import reward_preprocess

from .helpers import SHARED

TINY_SIZE = 32
TINY_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": TINY_SIZE, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
# A timm vision tower set up as open_clip's convnext configs set theirs (convnext_base.json).
TIMM_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"timm_model_name": "convnext_atto", "timm_model_pretrained": False, "timm_pool": "",
                   "timm_proj": "linear", "image_size": TINY_SIZE},
    "text_cfg": TINY_CONFIG["text_cfg"],
}
# float32 end to end; the stacked (vmapped) and the per-clip paths sum in different orders.
SCORE_TOL = 2e-6
GRAD_TOL = 1e-6
CLIP_FRAMES, HEIGHT, WIDTH = 6, 24, 40
CAPTIONS = ["a red fox runs through snow", "two boats on a calm lake"]
SHORT_CAPTIONS = ["fox in snow", "boats"]


def tiny_clip(seed: int, config=TINY_CONFIG) -> OpenCLIPReward:
    torch.manual_seed(seed)
    model = OpenCLIPReward(config)
    # open_clip initialises some tensors to constants (class/positional scales, zero biases):
    # randomise everything so two instances differ everywhere.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


class TinyVideoReward(RewardModel):
    """A video-text stand-in: a linear map of the flattened clip; captions embedded from their bytes."""

    kind = "video"

    def __init__(self, num_frames: int = 2, size: int = TINY_SIZE, dim: int = 8, seed: int = 3) -> None:
        super().__init__()
        self.num_frames = num_frames
        generator = torch.Generator().manual_seed(seed)
        self.visual = nn.Linear(num_frames * 3 * size * size, dim)
        self.text = nn.Linear(32, dim)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
        self.text_calls = 0

    def embed_visual(self, pixels):
        return l2_normalize(self.visual(pixels.flatten(1).to(self.visual.weight.dtype)))

    def embed_text(self, captions):
        self.text_calls += 1
        codes = torch.zeros(len(captions), 32)
        for row, caption in enumerate(captions):
            data = caption.encode()[:32]
            codes[row, : len(data)] = torch.tensor(list(data), dtype=torch.float32) / 128
        with torch.no_grad():
            return l2_normalize(self.text(codes.to(self.text.weight.device, self.text.weight.dtype)))


pytestmark = pytest.mark.usefixtures("one_thread")


def fresh_models() -> tuple[OpenCLIPReward, OpenCLIPReward, TinyVideoReward]:
    """Two image models of one architecture (they stack) and the video stand-in."""
    return tiny_clip(1), tiny_clip(2), TinyVideoReward()


@pytest.fixture(scope="module")
def models():
    return fresh_models()


def make_mixture(models, **options) -> RewardMixture:
    hps, clip, video = models
    return RewardMixture(
        [
            RewardEntry("hpsv2", hps, hpsv2_spec(TINY_SIZE), "random", 2, 0.2, "short"),
            RewardEntry("clip", clip, clip_spec(TINY_SIZE), "random", 2, 0.3, "short"),
            RewardEntry("video", video, video_spec(TINY_SIZE), "strided", None, 0.5, "dense"),
        ],
        **options,
    )


def decoded_frames(seed: int, frame_count: int, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frame_count, HEIGHT, WIDTH, generator=generator)


def separate_reference(mixture, frames_by_index, captions, short_captions):
    """The release's path: every model, clip and frame on its own, preprocessed spec by spec."""
    total = 0.0
    scores = {}
    for entry in mixture.entries:
        texts = short_captions if entry.caption == "short" else captions
        per_clip = []
        for b, caption in enumerate(texts):
            text = entry.model.embed_text([caption])
            chosen = torch.stack([frames_by_index[f][b] for f in mixture.entry_frames[entry.name]])  # (n, 3, H, W)
            pixels = reward_preprocess(chosen[None], [entry.spec])[0]  # (1, n, 3, S, S)
            if entry.model.kind == "image":
                frame_scores = torch.cat([entry.model.score(pixels[:, j], text) for j in range(pixels.shape[1])])
                per_clip.append(frame_scores.mean())
            else:
                per_clip.append(entry.model.score(pixels, text)[0])
        scores[entry.name] = torch.stack(per_clip)
        total = total + entry.weight * scores[entry.name].mean()
    return total, scores


@pytest.mark.parametrize("checkpointing", [False, True])
def test_stacked_mixture_matches_each_model_run_separately(models, checkpointing):
    mixture = make_mixture(models, gradient_checkpointing=checkpointing, stack_same_architecture=True)
    assert (0, 1) in mixture.groups, "HPS and CLIP (same tiny architecture) should form one stacked group"
    indices = mixture.select_frames(CLIP_FRAMES, torch.Generator().manual_seed(5))
    frames = decoded_frames(0, len(indices)).requires_grad_()
    total, scores = mixture(frames, indices, CAPTIONS, SHORT_CAPTIONS)
    (grad,) = torch.autograd.grad(total, frames)
    assert (0, 1) in mixture.groups, "the stacked forward fell back to running the models one by one"

    leaf = frames.detach().clone().requires_grad_()
    by_index = {f: leaf[:, :, i] for i, f in enumerate(indices)}
    expected_total, expected = separate_reference(mixture, by_index, CAPTIONS, SHORT_CAPTIONS)
    (expected_grad,) = torch.autograd.grad(expected_total, leaf)

    assert set(scores) == {"hpsv2", "clip", "video"}
    for name, value in scores.items():
        assert value.shape == (2,) and value.dtype == torch.float32
        assert torch.allclose(value, expected[name], atol=SCORE_TOL, rtol=0), name
    assert abs(total.item() - expected_total.item()) < SCORE_TOL
    assert grad.abs().max() > 1e-4, "the reward should depend on the frames"
    assert torch.allclose(grad, expected_grad, atol=GRAD_TOL, rtol=1e-4)
    # The stacked and sequential mixtures agree too, and no model picked up a parameter gradient.
    sequential = make_mixture(models, stack_same_architecture=False)
    assert all(len(group) == 1 for group in sequential.groups)
    sequential._selection = mixture._selection
    seq_total, _ = sequential(frames.detach(), indices, CAPTIONS, SHORT_CAPTIONS)
    assert abs(seq_total.item() - total.item()) < SCORE_TOL
    assert all(p.grad is None and not p.requires_grad for m in models for p in m.parameters())


def test_stacked_forward_keeps_sdpa_to_backends_whose_backward_works_under_vmap(models, monkeypatch):
    """Under vmap q, k and v never report requires_grad, so SDPA's memory-efficient and cuDNN
    backends skip the logsumexp their backward needs: on the H200 the stacked float32 towers'
    backward failed with "LSE is not correctly aligned (strideH)". Every attention call of the
    stacked forward, and of its recomputation under checkpointing, may use flash or math only."""
    flags = (
        torch.backends.cuda.mem_efficient_sdp_enabled, torch.backends.cuda.cudnn_sdp_enabled,
        torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.math_sdp_enabled,
    )
    before = tuple(enabled() for enabled in flags)
    allowed = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(query, *args, **kwargs):
        # The text towers run outside vmap (once a caption, then cached).
        if torch._C._functorch.is_batchedtensor(query):
            allowed.append(tuple(enabled() for enabled in flags))
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    for checkpointing in (False, True):
        allowed.clear()
        mixture = make_mixture(models, gradient_checkpointing=checkpointing, stack_same_architecture=True)
        indices = mixture.select_frames(CLIP_FRAMES, torch.Generator().manual_seed(5))
        frames = decoded_frames(0, len(indices)).requires_grad_()
        total, _ = mixture(frames, indices, CAPTIONS, SHORT_CAPTIONS)
        total.backward()
        # Two image towers of two layers; the recomputation calls them again.
        assert len(allowed) == (4 if checkpointing else 2) and set(allowed) == {(False, False, True, True)}, allowed
    assert tuple(enabled() for enabled in flags) == before, "the backends must be restored after the call"
    # A backend the caller turned off stays off.
    allowed.clear()
    with sdpa_kernel([SDPBackend.MATH]):
        total, _ = mixture(frames.detach().requires_grad_(), indices, CAPTIONS, SHORT_CAPTIONS)
        total.backward()
    assert allowed and set(allowed) == {(False, False, False, True)}, allowed


def test_a_mixture_infers_shapes_on_the_meta_device():
    """Meta frames have no values for the finite-frames check to read (it raised there); the rest
    of the mixture runs on meta, stacked group included, forward and backward (captions embedded
    each call: the text cache keeps embeddings on the host, which meta ones cannot reach)."""
    mixture = make_mixture(fresh_models(), text_cache=False).to("meta")
    frame_indices = mixture.select_frames(8, torch.Generator().manual_seed(0))
    frames = torch.empty(2, 3, len(frame_indices), HEIGHT, WIDTH, device="meta", requires_grad=True)
    total, scores = mixture(frames, frame_indices, ["a", "b"], ["c", "d"])
    total.backward()
    assert total.is_meta and frames.grad.is_meta and set(scores) == {"hpsv2", "clip", "video"}


def test_models_whose_settings_differ_do_not_stack():
    """One architecture with and without the logit scale: the stack would score both through the
    first one's code, so each runs alone, and scores as it does in a mixture of its own."""
    plain, scaled = tiny_clip(1), tiny_clip(2)
    scaled.use_logit_scale = True
    entries = [
        RewardEntry(name, model, clip_spec(TINY_SIZE), "random", 1) for name, model in (("plain", plain), ("scaled", scaled))
    ]
    mixture = RewardMixture(entries, stack_same_architecture=True)
    assert mixture.groups == [(0,), (1,)]
    indices = mixture.select_frames(CLIP_FRAMES, torch.Generator().manual_seed(5))
    frames = decoded_frames(0, len(indices)).requires_grad_()
    _, scores = mixture(frames, indices, CAPTIONS)
    alone = RewardMixture([RewardEntry("scaled", scaled, clip_spec(TINY_SIZE), "random", 1)])
    alone._selection = mixture._selection
    _, alone_scores = alone(frames, indices, CAPTIONS)
    torch.testing.assert_close(scores["scaled"], alone_scores["scaled"], rtol=0, atol=SCORE_TOL)
    scaled.use_logit_scale = False  # what the first member's code would have scored
    _, cosines = alone(frames, indices, CAPTIONS)
    logit_scale = scaled.clip.logit_scale.exp().item()
    assert logit_scale > 2
    torch.testing.assert_close(scores["scaled"], cosines["scaled"] * logit_scale, rtol=1e-5, atol=SCORE_TOL)


def test_a_stacked_group_runs_unstacked_without_autograd(models, monkeypatch):
    """Under no_grad the members of a stacked group run one after the other (no vmap), with the
    same scores as the stacked pass."""
    from t2v_turbo.rewards import mixture as mixture_module

    vmapped = []
    original_vmap = mixture_module.vmap

    def counting_vmap(fn, *args, **kwargs):
        vmapped.append(fn)
        return original_vmap(fn, *args, **kwargs)

    monkeypatch.setattr(mixture_module, "vmap", counting_vmap)
    mixture = make_mixture(models, stack_same_architecture=True)
    indices = mixture.select_frames(CLIP_FRAMES, torch.Generator().manual_seed(6))
    frames = decoded_frames(5, len(indices))
    stacked_total, stacked = mixture(frames, indices, CAPTIONS, SHORT_CAPTIONS)
    assert len(vmapped) == 1
    with torch.no_grad():
        total, scores = mixture(frames, indices, CAPTIONS, SHORT_CAPTIONS)
    assert len(vmapped) == 1, "the no_grad pass went through vmap"
    assert (0, 1) in mixture.groups
    assert abs(total.item() - stacked_total.item()) < SCORE_TOL
    for name, value in scores.items():
        assert torch.allclose(value, stacked[name], atol=SCORE_TOL, rtol=0), name


def test_an_entry_scoring_consecutive_frames_reads_the_preprocessed_frames_in_place(models, monkeypatch):
    """Frames (0, 1, 2) of the decoded (0, 1, 2) reach the CLIP model as a view of the preprocessed
    output, frames (0, 2) as a copy; both scored as the models score them alone."""
    from t2v_turbo.rewards import mixture as mixture_module

    hps, clip, _ = models
    mixture = RewardMixture([
        RewardEntry("clip", clip, clip_spec(TINY_SIZE), (0, 1, 2), None, 0.5, "short"),
        RewardEntry("hpsv2", hps, hpsv2_spec(TINY_SIZE), (0, 2), None, 0.5, "short"),
    ])
    outputs, scored = [], {}
    preprocess = mixture_module.reward_preprocess

    def recorded_preprocess(*args, **kwargs):
        outputs.extend(preprocess(*args, **kwargs))
        return outputs

    def recorded_score(name, score):
        def score_and_record(pixels, text):
            scored[name] = pixels
            return score(pixels, text)

        return score_and_record

    monkeypatch.setattr(mixture_module, "reward_preprocess", recorded_preprocess)
    for name, model in (("clip", clip), ("hpsv2", hps)):
        monkeypatch.setattr(model, "score", recorded_score(name, model.score))
    indices = mixture.select_frames(CLIP_FRAMES)
    assert indices == [0, 1, 2]
    frames = decoded_frames(8, len(indices))
    with torch.no_grad():
        _, scores = mixture(frames, indices, CAPTIONS, SHORT_CAPTIONS)
    storages = {out.untyped_storage().data_ptr() for out in outputs}
    assert scored["clip"].untyped_storage().data_ptr() in storages
    assert scored["hpsv2"].untyped_storage().data_ptr() not in storages
    monkeypatch.undo()
    with torch.no_grad():
        _, reference = separate_reference(mixture, dict(zip(indices, frames.unbind(2))), CAPTIONS, SHORT_CAPTIONS)
    for name, value in scores.items():
        torch.testing.assert_close(value, reference[name], atol=SCORE_TOL, rtol=0)


def test_scoring_through_cuda_graphs_equals_eager_scoring(monkeypatch):
    """On the CPU with captures recorded (helpers.record_graph_captures): under no_grad each model's
    call warms up, is captured and replayed, with the eager scores; with gradients nothing is
    captured. On a GPU, the same with real graphs (on models of its own: moving them to the GPU
    would move the module fixture's too)."""
    from tests.helpers import record_graph_captures

    models = fresh_models()

    captures = [] if torch.cuda.is_available() else record_graph_captures(monkeypatch)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mixture = make_mixture(models).to(device)
    indices = mixture.select_frames(CLIP_FRAMES, torch.Generator().manual_seed(7))
    frames = [decoded_frames(seed, len(indices)).to(device) for seed in (8, 9, 10)]
    with torch.no_grad():
        eager = [mixture(f, indices, CAPTIONS, SHORT_CAPTIONS) for f in frames]
        mixture.enable_cuda_graphs()
        graphed = [mixture(f, indices, CAPTIONS, SHORT_CAPTIONS) for f in frames]
    assert mixture.cuda_graphs and len(mixture._graphs) == len(models)
    # As a list, so that a failed capture's error shows in the assertion.
    assert [(g.num_graphs, g.failure) for g in mixture._graphs.values()] == [(1, None)] * len(models)
    if captures:
        assert len(captures) == len(models) and all(c.replays == 2 for c in captures)
    for (want_total, want), (got_total, got) in zip(eager, graphed):
        assert abs(got_total.item() - want_total.item()) < SCORE_TOL
        for name in want:
            assert torch.allclose(got[name], want[name], atol=SCORE_TOL, rtol=0), name
    grad_frames = frames[0].clone().requires_grad_()
    total, _ = mixture(grad_frames, indices, CAPTIONS, SHORT_CAPTIONS)
    assert torch.autograd.grad(total, grad_frames)[0].abs().max() > 0
    assert all(g.num_graphs == 1 for g in mixture._graphs.values())
    mixture.disable_cuda_graphs()
    assert not mixture.cuda_graphs


def test_stacked_checkpointed_group_recomputes_without_its_models_block_checkpoints():
    """A stacked group checkpoints as a whole; its recomputation in the backward pass, after the
    forward has restored the models' own switches, must not take block checkpoints inside vmap."""
    models = fresh_models()
    indices = None
    grads = []
    for checkpointing in (False, True):
        for model in models[:2]:
            model.gradient_checkpointing = True  # the user's own setting, outside the mixture
        mixture = make_mixture(models, gradient_checkpointing=checkpointing, stack_same_architecture=True)
        if indices is None:
            indices = mixture.select_frames(CLIP_FRAMES, torch.Generator().manual_seed(3))
        else:
            mixture.select_frames(CLIP_FRAMES, torch.Generator().manual_seed(3))
        frames = decoded_frames(1, len(indices)).requires_grad_()
        total, _ = mixture(frames, indices, CAPTIONS, SHORT_CAPTIONS)
        grads.append(torch.autograd.grad(total, frames)[0])
        assert all(model.gradient_checkpointing for model in models[:2])
    torch.testing.assert_close(grads[1], grads[0], atol=GRAD_TOL, rtol=1e-4)


def test_stacking_shares_weights_and_survives_a_cast(models):
    hps, clip, _ = models
    mixture = make_mixture(models)
    indices = mixture.select_frames(CLIP_FRAMES, torch.Generator().manual_seed(1))
    frames = decoded_frames(2, len(indices))
    reference, _ = mixture(frames, indices, CAPTIONS, SHORT_CAPTIONS)
    hps_weight = hps.clip.visual.conv1.weight
    clip_weight = clip.clip.visual.conv1.weight
    assert hps_weight.untyped_storage().data_ptr() == clip_weight.untyped_storage().data_ptr(), "one stacked copy"
    mixture.to(torch.float64)
    total, _ = mixture(frames.double(), indices, CAPTIONS, SHORT_CAPTIONS)
    mixture.to(torch.float32)
    assert abs(total.item() - reference.item()) < 1e-5


def test_a_cast_restacks_the_weights_it_scores_with(models):
    """Casting the mixture drops its stacked weights: the next stacked pass stacks the cast weights
    and rebinds the members to views of that stack, so the weights are held once, in the new
    dtype, and are what the stacked forward reads (a stale float32 stack was a second copy of the
    weights, scored in place of the float64 ones)."""
    hps, clip, _ = models
    mixture = make_mixture(models)
    indices = mixture.select_frames(CLIP_FRAMES, torch.Generator().manual_seed(1))
    frames = decoded_frames(2, len(indices))
    mixture(frames, indices, CAPTIONS, SHORT_CAPTIONS)  # stacks the float32 weights
    try:
        mixture.to(torch.float64)
        mixture(frames.double(), indices, CAPTIONS, SHORT_CAPTIONS)
        ((params, _),) = mixture._stacked.values()
        stack = params["model.clip.visual.conv1.weight"]
        assert stack.dtype == torch.float64
        for model in (hps, clip):
            weight = model.clip.visual.conv1.weight
            assert weight.dtype == torch.float64
            assert weight.untyped_storage().data_ptr() == stack.untyped_storage().data_ptr(), "held twice"
    finally:
        mixture.to(torch.float32)


def test_a_mixture_frees_its_stack_of_shared_models():
    """Two mixtures of the same models each stack them (with gradients); the models' parameters
    are views of the latest stack, so the first one's stack is held by it alone until it frees
    it, and is rebuilt, with the same scores, on its next use."""
    models = fresh_models()
    first, second = make_mixture(models), make_mixture(models)
    indices = first.select_frames(CLIP_FRAMES, torch.Generator().manual_seed(1))
    assert second.select_frames(CLIP_FRAMES, torch.Generator().manual_seed(1)) == indices
    frames = decoded_frames(2, len(indices))
    before, _ = first(frames, indices, CAPTIONS, SHORT_CAPTIONS)
    (group,) = first._stacked
    first_stack = weakref.ref(first._stacked[group][0]["model.clip.visual.conv1.weight"])
    second(frames, indices, CAPTIONS, SHORT_CAPTIONS)
    assert first_stack() is not None, "the first mixture's stack outlives the second's restacking"
    first.free_stacked_weights()
    gc.collect()
    assert first_stack() is None
    after, _ = first(frames, indices, CAPTIONS, SHORT_CAPTIONS)
    assert abs(after.item() - before.item()) < SCORE_TOL


def test_stacked_forward_never_copies_a_weight_per_token(models):
    """Under vmap, F.linear on (L, N, E) tokens with stacked weights broadcast the weight over L and
    materialised one copy a token (nn.MultiheadAttention's in-projection): the stacked path's
    largest tensor must stay far below that size."""
    hps, _, _ = models
    mixture = make_mixture(models)
    indices = mixture.select_frames(CLIP_FRAMES, torch.Generator().manual_seed(2))
    frames = decoded_frames(4, len(indices)).requires_grad_()
    torch.autograd.grad(mixture(frames, indices, CAPTIONS, SHORT_CAPTIONS)[0], frames)  # stacks the weights

    largest = 0

    class LargestOutput(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal largest
            out = func(*args, **(kwargs or {}))
            for tensor in pytree.tree_leaves(out):
                if isinstance(tensor, torch.Tensor):
                    largest = max(largest, tensor.numel())
            return out

    with LargestOutput():
        torch.autograd.grad(mixture(frames, indices, CAPTIONS, SHORT_CAPTIONS)[0], frames)
    tokens = (TINY_SIZE // TINY_CONFIG["vision_cfg"]["patch_size"]) ** 2 + 1
    in_projection = hps.clip.visual.transformer.resblocks[0].attn.in_proj_weight
    assert largest < tokens * in_projection.numel()


def test_bf16_models_score_close_to_float32():
    # Own models: casting to bf16 and back would round the shared fixture's weights.
    mixture = make_mixture(fresh_models())
    indices = mixture.select_frames(CLIP_FRAMES, torch.Generator().manual_seed(4))
    frames = decoded_frames(3, len(indices))
    _, ref_scores = mixture(frames, indices, CAPTIONS, SHORT_CAPTIONS)
    mixture.clear_text_cache()
    mixture.to(torch.bfloat16)
    leaf = frames.clone().requires_grad_()
    total, scores = mixture(leaf, indices, CAPTIONS, SHORT_CAPTIONS)
    total.backward()
    assert leaf.grad.dtype == torch.float32 and torch.isfinite(leaf.grad).all()
    for name in scores:
        assert torch.allclose(scores[name], ref_scores[name], atol=3e-2), name


def test_text_cache_reuses_embeddings_without_recomputing(models):
    hps, _, video = models
    mixture = make_mixture(models)
    indices = mixture.select_frames(CLIP_FRAMES, torch.Generator().manual_seed(0))
    frames = decoded_frames(1, len(indices))
    video.text_calls = 0
    first_total, _ = mixture(frames, indices, CAPTIONS, SHORT_CAPTIONS)
    assert video.text_calls == 1
    info = mixture.cache_info()
    assert info == {"hits": 0, "misses": 6, "size": 6}
    second_total, _ = mixture(frames, indices, CAPTIONS, SHORT_CAPTIONS)
    assert video.text_calls == 1, "cached captions must not be embedded again"
    assert mixture.cache_info() == {"hits": 6, "misses": 6, "size": 6}
    assert second_total.item() == first_total.item()
    cached = mixture._text_embeddings(mixture._model_index[0], SHORT_CAPTIONS, torch.device("cpu"))
    assert torch.equal(cached, hps.embed_text(SHORT_CAPTIONS))

    uncached = make_mixture(models, text_cache=False)
    uncached._selection = mixture._selection
    uncached(frames, indices, CAPTIONS, SHORT_CAPTIONS)
    uncached(frames, indices, CAPTIONS, SHORT_CAPTIONS)
    assert video.text_calls == 3 and uncached.cache_info()["size"] == 0


def test_clearing_the_text_cache_embeds_the_captions_anew():
    """clear_text_cache drops every cached row: after a model's text tower changes (new weights),
    the next pass embeds the captions with it (the cleared cache scored the old rows)."""
    video = TinyVideoReward()
    mixture = RewardMixture([RewardEntry("video", video, video_spec(TINY_SIZE), "strided", None, 1.0, "dense")])
    indices = mixture.select_frames(CLIP_FRAMES, torch.Generator().manual_seed(0))
    frames = decoded_frames(1, len(indices))
    _, before = mixture(frames, indices, CAPTIONS)
    with torch.no_grad():  # text rows -> their negation, so every score flips sign
        video.text.weight.neg_()
        video.text.bias.neg_()
    mixture.clear_text_cache()
    assert mixture.cache_info()["size"] == 0
    _, after = mixture(frames, indices, CAPTIONS)
    assert before["video"].abs().min() > 1e-3
    torch.testing.assert_close(after["video"], -before["video"], rtol=0, atol=SCORE_TOL)


def test_gradient_ascent_step_increases_the_reward(models):
    _, clip, _ = models
    mixture = RewardMixture([RewardEntry("clip", clip, clip_spec(TINY_SIZE), [0], weight=1.0)])
    indices = mixture.select_frames(1)
    image = decoded_frames(7, 1, batch=1).requires_grad_()
    before, _ = mixture(image, indices, ["a photo of a cat"])
    (grad,) = torch.autograd.grad(before, image)
    step = 1e-2
    with torch.no_grad():
        after, _ = mixture(image + step * grad / grad.norm(), indices, ["a photo of a cat"])
    predicted = step * grad.norm().item()
    assert after.item() - before.item() > 0.5 * predicted > 0


def test_select_frames_covers_entries_and_is_reproducible(models):
    mixture = make_mixture(models)
    first = mixture.select_frames(16, torch.Generator().manual_seed(11))
    first_entries = mixture.entry_frames
    again = mixture.select_frames(16, torch.Generator().manual_seed(11))
    assert first == again and mixture.entry_frames == first_entries
    assert first == sorted(set().union(*first_entries.values()))
    hps, clip, video = first_entries["hpsv2"], first_entries["clip"], first_entries["video"]
    assert hps == clip, "entries with the same frame rule share one draw"
    assert len(set(hps)) == 2 and all(0 <= f < 16 for f in hps)
    assert len(video) == 2 and video[1] - video[0] == 8 and 0 <= video[0] < 8
    draws = {tuple(mixture.select_frames(16, torch.Generator().manual_seed(seed))) for seed in range(8)}
    assert len(draws) > 1, "different seeds should draw different frames"
    with pytest.raises(ValueError, match="num_frames"):
        mixture.select_frames(1)


def test_frame_draws_reach_every_frame_and_every_strided_start(models):
    """Over seeds, the image entries' random frames take every frame of the clip (not the same
    frames every step) and the video entry's strided start takes every value in [0, stride), as
    the release's randint(0, stride) does."""
    mixture = make_mixture(models)
    starts, image_frames, image_draws = set(), set(), set()
    for seed in range(64):
        mixture.select_frames(16, torch.Generator().manual_seed(seed))
        drawn = mixture.entry_frames
        assert drawn["video"] == (drawn["video"][0], drawn["video"][0] + 8)
        starts.add(drawn["video"][0])
        image_frames.update(drawn["hpsv2"])
        image_draws.add(drawn["hpsv2"])
    assert starts == set(range(8))
    assert image_frames == set(range(16)) and len(image_draws) > 16


GOLDEN = SHARED / "reward_reference"


@pytest.mark.parametrize("case, height, width", [("small", 40, 64), ("big", 320, 512)])
def test_the_video_crop_is_drawn_as_the_releases_random_crop(case, height, width):
    """From the generator state the release's goldens seeded its global RNG with, the drawn crop
    is the one they record (top first, then left, on the 224x358 resized frames)."""
    if not (GOLDEN / "preprocess_golden.json").is_file():
        pytest.skip(f"reward reference data not found at {GOLDEN} (shared/reward_reference is absent)")
    meta = json.loads((GOLDEN / "preprocess_golden.json").read_text())[case]["video"]
    generator = torch.Generator().manual_seed(meta["crop_seed"])
    spec = _random_crop(video_spec(), height, width, generator)
    assert spec.crop_offset == tuple(meta["random_crop_params_i_j_h_w"][0][:2])
    # No draw where the release makes none: the shorter side already 224, or a square resized frame.
    for frame in ((224, 300), (160, 160)):
        state = generator.get_state()
        assert _random_crop(video_spec(), *frame, generator) == video_spec()
        assert torch.equal(generator.get_state(), state)


def test_a_random_crop_entry_scores_the_crop_its_step_draws(models):
    """Each forward crops the video entry where the step's generator says, the same for every
    frame and clip: its scores equal the entry run with that crop_offset; the image entries keep
    their specs; steps draw different crops."""
    entries = make_mixture(models).entries
    entries[2] = dataclasses.replace(entries[2], spec=video_spec(TINY_SIZE), random_crop=True)
    mixture = RewardMixture(entries)
    frames = decoded_frames(4, CLIP_FRAMES)
    offsets = set()
    for seed in range(4):
        generator = torch.Generator().manual_seed(seed)
        indices = mixture.select_frames(CLIP_FRAMES, generator)
        after_selection = generator.get_state()
        _, scores = mixture(frames[:, :, indices], indices, CAPTIONS, SHORT_CAPTIONS)
        replay = torch.Generator()
        replay.set_state(after_selection)
        drawn = _random_crop(video_spec(TINY_SIZE), HEIGHT, WIDTH, replay)
        offsets.add(drawn.crop_offset)
        video_frames = mixture.entry_frames["video"]
        fixed = RewardMixture([dataclasses.replace(entries[2], spec=drawn, random_crop=False, frames=video_frames)])
        fixed.select_frames(CLIP_FRAMES)
        _, want = fixed(frames[:, :, indices], indices, CAPTIONS, SHORT_CAPTIONS)
        torch.testing.assert_close(scores["video"], want["video"], rtol=0, atol=0)
    assert len(offsets) > 1, "steps should draw different crops"
    # 24x40 frames resize to 32x53: the left offset ranges over [0, 21], the top is 0.
    assert all(top == 0 and 0 <= left <= 21 for top, left in offsets)


def test_random_crop_entries_need_an_uncentred_crop_spec(models):
    _, clip, video = models
    with pytest.raises(ValueError, match="random_crop needs a spec of mode 'crop'"):
        RewardEntry("clip", clip, clip_spec(TINY_SIZE), random_crop=True)
    with pytest.raises(ValueError, match="without crop_offset"):
        RewardEntry("video", video, video_spec(TINY_SIZE, crop_offset=(0, 1)), random_crop=True)
    with pytest.raises(TypeError, match="random_crop must be a bool"):
        RewardEntry("video", video, video_spec(TINY_SIZE), random_crop=1)


def test_subset_keeps_the_entries_of_the_asked_kinds_and_the_options(models):
    mixture = make_mixture(models, gradient_checkpointing=True, text_cache=False)
    images = mixture.subset(["image"])
    assert [entry.name for entry in images.entries] == ["hpsv2", "clip"]
    assert (images.gradient_checkpointing, images.text_cache, images.stack_same_architecture) == (True, False, False)
    assert [entry.name for entry in mixture.subset(["video"]).entries] == ["video"]
    assert mixture.subset(["image", "video"]) is mixture
    assert RewardMixture(mixture.entries[:1]).subset(["video"]) is None
    with pytest.raises(ValueError, match="kinds must be among"):
        mixture.subset(["audio"])


def test_errors_name_the_argument(models):
    mixture = make_mixture(models)
    frames = decoded_frames(0, CLIP_FRAMES)
    with pytest.raises(RuntimeError, match="select_frames"):
        mixture(frames, list(range(CLIP_FRAMES)), CAPTIONS, SHORT_CAPTIONS)
    indices = mixture.select_frames(CLIP_FRAMES, torch.Generator().manual_seed(0))
    everything = list(range(CLIP_FRAMES))
    with pytest.raises(ValueError, match="captions holds 1 prompts for 2 clips"):
        mixture(frames, everything, CAPTIONS[:1], SHORT_CAPTIONS)
    with pytest.raises(ValueError, match="short_captions holds 3"):
        mixture(frames, everything, CAPTIONS, SHORT_CAPTIONS + ["x"])
    with pytest.raises(ValueError, match="out of range"):
        mixture(frames, [f + 1 for f in everything], CAPTIONS, SHORT_CAPTIONS)
    with pytest.raises(ValueError, match="sorted"):
        mixture(frames, everything[::-1], CAPTIONS, SHORT_CAPTIONS)
    with pytest.raises(ValueError, match="frame_indices lists"):
        mixture(frames, indices[:-1], CAPTIONS, SHORT_CAPTIONS)
    with pytest.raises(ValueError, match="lacks the selected frames"):
        mixture(frames[:, :, :1], [f for f in everything if f not in indices][:1], CAPTIONS, SHORT_CAPTIONS)
    bad = frames.clone()
    bad[1, 0, 2, 3, 4] = math.nan
    with pytest.raises(ValueError, match="frames holds NaN"):
        mixture(bad, everything, CAPTIONS, SHORT_CAPTIONS)
    bad[1, 0, 2, 3, 4] = math.inf
    with pytest.raises(ValueError, match="frames holds NaN or infinite"):
        mixture(bad, everything, CAPTIONS, SHORT_CAPTIONS)
    with pytest.raises(ValueError, match=r"frames must lie in \[0, 1\] .*got values in \[-1, 0\.9999\]"):
        mixture(frames * 2 - 1, everything, CAPTIONS, SHORT_CAPTIONS)
    mixture(frames * (1 + 1e-4), everything, CAPTIONS, SHORT_CAPTIONS)  # rounding past 1 is let through
    with pytest.raises(ValueError, match="video model scores clips of 2 frames"):
        RewardEntry("video", models[2], video_spec(TINY_SIZE), "strided", 4)
    with pytest.raises(ValueError, match="distinct names"):
        RewardMixture([RewardEntry("a", models[0], clip_spec(TINY_SIZE)), RewardEntry("a", models[1], clip_spec(TINY_SIZE))])


def test_frames_of_a_range_above_one_are_refused(models):
    """The range check bounds frames from above too: [0, 255] frames (not divided by 255) or
    [0, 2] ones would be normalised as if in [0, 1] and scored silently."""
    mixture = make_mixture(models)
    mixture.select_frames(CLIP_FRAMES, torch.Generator().manual_seed(0))
    frames = decoded_frames(0, CLIP_FRAMES)
    everything = list(range(CLIP_FRAMES))
    for scale in (255, 2):
        with pytest.raises(ValueError, match=r"frames must lie in \[0, 1\] .*got values in \[[\d.e-]+, [\d.]+\]"):
            mixture(frames * scale, everything, CAPTIONS, SHORT_CAPTIONS)


@pytest.mark.parametrize("layout", ["pt", "nested_pt", "safetensors"])
def test_loads_weights_from_a_file(tmp_path, models, layout):
    source = models[0]
    state = {key: value.clone() for key, value in source.clip.state_dict().items()}
    path = tmp_path / ("weights.safetensors" if layout == "safetensors" else "weights.pt")
    if layout == "safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "epoch": 3} if layout == "nested_pt" else state, path)
    loaded = OpenCLIPReward.from_weights(TINY_CONFIG, path)
    pixels = torch.rand(3, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded.embed_visual(pixels), source.embed_visual(pixels))
    # Text features also check the causal mask, which the file does not hold and loading rebuilds.
    assert torch.equal(loaded.embed_text(CAPTIONS), source.embed_text(CAPTIONS))
    assert not any(p.requires_grad for p in loaded.parameters())


def test_loading_errors_and_logit_scale(tmp_path, models):
    state = dict(models[0].clip.state_dict())
    state.pop("logit_scale")
    path = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(KeyError, match="logit_scale"):
        OpenCLIPReward.from_weights(TINY_CONFIG, path)
    with pytest.raises(ValueError, match="not a built-in open_clip config"):
        OpenCLIPReward("no-such-model")
    plain = models[0]
    scaled = OpenCLIPReward(TINY_CONFIG, use_logit_scale=True)
    scaled.load_state_dict(plain.state_dict())
    pixels = torch.rand(2, 3, TINY_SIZE, TINY_SIZE)
    text = plain.embed_text(SHORT_CAPTIONS)
    cosine = plain.score(pixels, text)
    assert torch.allclose(scaled.score(pixels, text), cosine * scaled.clip.logit_scale.exp())
    assert cosine.abs().max() <= 1 + 1e-6


def test_a_tower_without_block_checkpoints_is_checkpointed_whole_in_a_mixture():
    """open_clip's ModifiedResNet (RN50 and kin) takes the checkpointing switch and ignores it: set
    directly it says so; a checkpointing mixture recomputes its whole call instead (the same
    gradients) and leaves the other models' switches as they were."""
    resnet = {**TINY_CONFIG, "vision_cfg": {"image_size": TINY_SIZE, "layers": [1, 1, 1, 1], "width": 8}}
    rn, vit = tiny_clip(5, resnet), tiny_clip(6)
    assert not rn.supports_block_checkpointing and vit.supports_block_checkpointing
    rn.gradient_checkpointing = False
    with pytest.raises(ValueError, match="custom: its ModifiedResNet vision tower has no gradient checkpointing"):
        rn.gradient_checkpointing = True
    grads = []
    for checkpointing in (False, True):
        mixture = RewardMixture(
            [RewardEntry("vit", vit, clip_spec(TINY_SIZE), "random", 2), RewardEntry("rn", rn, clip_spec(TINY_SIZE), "random", 2)],
            gradient_checkpointing=checkpointing,
        )
        indices = mixture.select_frames(CLIP_FRAMES, torch.Generator().manual_seed(3))
        frames = decoded_frames(1, len(indices)).requires_grad_()
        total, _ = mixture(frames, indices, CAPTIONS, SHORT_CAPTIONS)
        grads.append(torch.autograd.grad(total, frames)[0])
        assert not vit.gradient_checkpointing
    torch.testing.assert_close(grads[1], grads[0], atol=GRAD_TOL, rtol=1e-4)


def test_a_timm_vision_tower_builds_offline_scores_checkpoints_and_loads(tmp_path):
    model = tiny_clip(1, TIMM_CONFIG)
    assert isinstance(model.clip.visual, TimmModel) and model.image_size == TINY_SIZE
    pixels = torch.rand(2, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(0)).requires_grad_()
    text = model.embed_text(CAPTIONS)
    visual = model.embed_visual(pixels)
    assert visual.shape == (2, TIMM_CONFIG["embed_dim"])
    torch.testing.assert_close(visual.norm(dim=-1), torch.ones(2))
    (grad,) = torch.autograd.grad(model.score(pixels, text).sum(), pixels)
    assert grad.abs().max() > 1e-4, "the score should depend on the pixels"
    assert not model.gradient_checkpointing
    model.gradient_checkpointing = True
    assert model.gradient_checkpointing
    (checkpointed,) = torch.autograd.grad(model.score(pixels, text).sum(), pixels)
    model.gradient_checkpointing = False
    assert not model.gradient_checkpointing
    torch.testing.assert_close(checkpointed, grad, rtol=1e-5, atol=1e-7)
    # Built on the meta device by from_weights, then loaded strictly. The file's tensors are read in
    # place, at addresses aligned to 4 bytes only, where the CPU convolutions round differently (1 ulp).
    path = tmp_path / "timm.safetensors"
    save_file({key: value.contiguous() for key, value in model.clip.state_dict().items()}, str(path))
    loaded = OpenCLIPReward.from_weights(TIMM_CONFIG, path)
    torch.testing.assert_close(loaded.embed_visual(pixels.detach()), visual.detach(), rtol=0, atol=1e-6)


def test_stacked_timm_towers_match_each_model_run_separately():
    timm_models = [tiny_clip(seed, TIMM_CONFIG) for seed in (1, 2)]
    entries = [
        RewardEntry(f"timm{i}", model, clip_spec(TINY_SIZE), "random", 2, 0.5, "short")
        for i, model in enumerate(timm_models)
    ]
    mixture = RewardMixture(entries, stack_same_architecture=True)
    assert mixture.groups == [(0, 1)]
    indices = mixture.select_frames(CLIP_FRAMES, torch.Generator().manual_seed(5))
    frames = decoded_frames(0, len(indices)).requires_grad_()
    total, scores = mixture(frames, indices, CAPTIONS)
    (grad,) = torch.autograd.grad(total, frames)
    assert mixture.groups == [(0, 1)], "the stacked forward fell back to running the models one by one"

    leaf = frames.detach().clone().requires_grad_()
    by_index = {f: leaf[:, :, i] for i, f in enumerate(indices)}
    expected_total, expected = separate_reference(mixture, by_index, CAPTIONS, CAPTIONS)
    (expected_grad,) = torch.autograd.grad(expected_total, leaf)
    for name, value in scores.items():
        assert torch.allclose(value, expected[name], atol=SCORE_TOL, rtol=0), name
    assert abs(total.item() - expected_total.item()) < SCORE_TOL
    assert grad.abs().max() > 1e-4, "the reward should depend on the frames"
    assert torch.allclose(grad, expected_grad, atol=GRAD_TOL, rtol=1e-4)


def test_unsupported_open_clip_architectures_fail_naming_why():
    with pytest.raises(ValueError, match="'coca_ViT-B-32' is a CoCa model.*not supported"):
        OpenCLIPReward("coca_ViT-B-32")
    hf_text = {**TINY_CONFIG, "text_cfg": {**TINY_CONFIG["text_cfg"], "hf_model_name": "roberta-base"}}
    with pytest.raises(ValueError, match="hf_model_name='roberta-base'.*fetches its model config from the Hugging Face hub"):
        OpenCLIPReward(hf_text)
    pretrained = {**TIMM_CONFIG, "vision_cfg": {**TIMM_CONFIG["vision_cfg"], "timm_model_pretrained": True}}
    with pytest.raises(ValueError, match="timm_model_pretrained, which would download timm's pretrained weights"):
        OpenCLIPReward(pretrained)


@pytest.mark.parametrize(
    "architecture, hf_tokenizer", [("ViT-H-14-worldwide", "facebook/xlm-v-base"), ("ViT-L-14-CLIPA", "bert-base-uncased")]
)
def test_an_architecture_with_a_hugging_face_tokenizer_needs_one_passed_in(architecture, hf_tokenizer):
    expected = f"{architecture!r} tokenises with the Hugging Face tokenizer {hf_tokenizer!r}"
    with pytest.raises(ValueError, match=re.escape(expected) + ".*pass tokenizer="):
        OpenCLIPReward(architecture)


def test_a_passed_tokenizer_tokenises_the_captions(tmp_path):
    """A tiny stand-in for ViT-H-14-worldwide's text tower: a Hugging Face tokenizer's ids, pooled at
    its eos id (2)."""
    context_length = 8
    text_cfg = {**TINY_CONFIG["text_cfg"], "context_length": context_length, "hf_tokenizer_name": "facebook/xlm-v-base",
                "pool_type": "eos", "eos_id": 2}
    config = {**TINY_CONFIG, "text_cfg": text_cfg}
    calls = []

    def tokenizer(captions):
        calls.append(captions)
        ids = torch.zeros(len(captions), context_length, dtype=torch.long)
        for row, caption in enumerate(captions):
            ids[row, :3] = torch.tensor([0, 5 + len(caption), 2])
        return ids

    with pytest.raises(ValueError, match="'custom' tokenises with the Hugging Face tokenizer 'facebook/xlm-v-base'"):
        OpenCLIPReward(config)
    model = OpenCLIPReward(config, tokenizer=tokenizer)
    embedded = model.embed_text(CAPTIONS)
    assert calls == [CAPTIONS]
    assert torch.equal(embedded, l2_normalize(model.clip.encode_text(tokenizer(CAPTIONS))))
    path = tmp_path / "weights.safetensors"
    save_file({key: value.contiguous() for key, value in model.clip.state_dict().items()}, str(path))
    loaded = OpenCLIPReward.from_weights(config, path, tokenizer=tokenizer)
    assert loaded.tokenizer is tokenizer and torch.equal(loaded.embed_text(CAPTIONS), embedded)

    def too_long(captions):
        return torch.zeros(len(captions), 77, dtype=torch.long)

    with pytest.raises(ValueError, match=re.escape("tokenizer must return a (2, 8) tensor of token ids")):
        OpenCLIPReward(config, tokenizer=too_long).embed_text(CAPTIONS)
    with pytest.raises(TypeError, match="tokenizer must be a callable"):
        OpenCLIPReward(config, tokenizer="facebook/xlm-v-base")


def test_the_bpe_tokenizer_takes_the_architectures_tokenizer_kwargs():
    config = {**TINY_CONFIG, "text_cfg": {**TINY_CONFIG["text_cfg"], "tokenizer_kwargs": {"clean": "canonicalize"}}}
    caption = ["A fox, running!"]
    canonical = OpenCLIPReward(config).tokenizer(caption)
    assert torch.equal(canonical, open_clip.SimpleTokenizer(context_length=77, clean="canonicalize")(caption))
    assert not torch.equal(canonical, OpenCLIPReward(TINY_CONFIG).tokenizer(caption))


def test_an_entry_spec_must_preprocess_to_the_models_input_size(models):
    hps, _, _ = models
    with pytest.raises(ValueError, match="RewardEntry 'hpsv2': spec size 224 differs from the model's input size 32"):
        RewardEntry("hpsv2", hps, hpsv2_spec(), "random", 2)
    with torch.device("meta"):
        video_models = [InternVideo2Reward(InternVideo2Config.preset("tiny")), ViCLIPReward(ViCLIPConfig.preset("tiny"))]
    for video_model in video_models:
        assert video_model.image_size == video_model.config.image_size == 56
        RewardEntry("video", video_model, video_spec(56), "strided")
        with pytest.raises(ValueError, match="RewardEntry 'video': spec size 224 differs from the model's input size 56"):
            RewardEntry("video", video_model, video_spec(), "strided")
    # The toy image model pools whatever size it is given.
    toy = ToyImageReward()
    assert toy.image_size is None
    RewardEntry("toy", toy, clip_spec(), "random", 2)


def test_release_specs_and_vit_h_on_meta():
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073) and CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
    hps, clip, video = hpsv2_spec(), clip_spec(), video_spec(crop_offset=(0, 111))
    assert (hps.size, hps.mode, hps.interpolation, hps.antialias, hps.mean) == (224, "pad", "bicubic", True, CLIP_MEAN)
    assert (clip.size, clip.mode, clip.std) == (224, "squash", CLIP_STD)
    assert (video.size, video.mode, video.mean, video.crop_offset) == (224, "crop", IMAGENET_MEAN, (0, 111))
    # HPS pads before normalising: a letterboxed frame's padding rows become -mean/std.
    frame = torch.rand(1, 1, 3, 20, 40)
    out = reward_preprocess(frame, [hpsv2_spec(16)])[0]
    padded = -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)
    assert torch.allclose(out[0, 0, :, 0, 0], padded, atol=1e-6)
    squashed = reward_preprocess(frame, [clip_spec(16)])[0]
    expected = F.interpolate(frame[0], size=(16, 16), mode="bicubic", align_corners=False, antialias=True)
    expected = (expected - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    assert torch.allclose(squashed[0], expected, atol=1e-5)
    with torch.device("meta"):
        vit_h = OpenCLIPReward("ViT-H-14")
    assert sum(p.numel() for p in vit_h.parameters()) == 986_109_441
    assert vit_h.image_size == 224 and vit_h.context_length == 77


def test_default_mixture_uses_the_release_weights(models):
    hps, clip, video = models
    mixture = default_mixture(hps, clip, video, hps_spec=hpsv2_spec(TINY_SIZE), clip_spec=clip_spec(TINY_SIZE),
                              video_spec=video_spec(TINY_SIZE))
    weights = {entry.name: entry.weight for entry in mixture.entries}
    assert weights == {"hpsv2": 0.2, "clip": 0.2, "video": pytest.approx(0.5 * 2 / 6)}
    assert RELEASE_IMAGE_WEIGHT == 0.2 and RELEASE_VIDEO_WEIGHT == pytest.approx(1 / 6)
    captions = {entry.name: entry.caption for entry in mixture.entries}
    assert captions == {"hpsv2": "short", "clip": "short", "video": "dense"}
    assert [entry.num_frames for entry in mixture.entries] == [2, 2, video.num_frames]
    assert [entry.random_crop for entry in mixture.entries] == [False, False, True], "the release's RandomCrop"
    unrandom = default_mixture(None, None, video, video_spec=video_spec(TINY_SIZE), video_random_crop=False)
    assert not unrandom.entries[0].random_crop
    assert default_mixture(None, clip, None, clip_spec=clip_spec(TINY_SIZE), image_weight=1.0).entries[0].weight == 1.0


def test_default_mixture_weighs_each_image_model_by_its_own_weight(models):
    """Image entries weigh image_weight * hps_weight and image_weight * clip_weight (both 1 in the
    release, where leaving either factor out goes unseen)."""
    hps, clip, _ = models
    mixture = default_mixture(hps, clip, None, hps_spec=hpsv2_spec(TINY_SIZE), clip_spec=clip_spec(TINY_SIZE),
                              image_weight=0.2, hps_weight=2.0, clip_weight=0.5)
    assert {entry.name: entry.weight for entry in mixture.entries} == {
        "hpsv2": pytest.approx(0.4, rel=1e-12), "clip": pytest.approx(0.1, rel=1e-12)
    }


def _image_mixture(image_models, **options) -> RewardMixture:
    entries = [
        RewardEntry(f"image{i}", model, hpsv2_spec(TINY_SIZE), "random", 2, 0.2, "short")
        for i, model in enumerate(image_models)
    ]
    return RewardMixture(entries, **options)


def _working_memory_of_reward_gradient(mixture: RewardMixture) -> int:
    from benchmarks.harness import TensorMemoryMeter

    indices = mixture.select_frames(CLIP_FRAMES, torch.Generator().manual_seed(2))
    frames = decoded_frames(0, len(indices)).requires_grad_()
    mixture(frames, indices, CAPTIONS, SHORT_CAPTIONS)  # caches the captions and stacks weights first
    with TensorMemoryMeter(frames.device) as meter:
        total, _ = mixture(frames, indices, CAPTIONS, SHORT_CAPTIONS)
        torch.autograd.grad(total, frames)
    return meter.peak


def test_checkpointed_mixture_memory_does_not_grow_with_the_models_activations():
    # Patches of 4 pixels: 65 tokens, so each tower's activations outweigh its share of the inputs.
    config = {**TINY_CONFIG, "vision_cfg": {**TINY_CONFIG["vision_cfg"], "patch_size": 4}}
    image_models = [OpenCLIPReward(config) for _ in range(4)]
    # All built before any runs: mixtures that share models must not overwrite each other's settings.
    mixtures = {
        (checkpointing, count): _image_mixture(image_models[:count], gradient_checkpointing=checkpointing)
        for checkpointing in (False, True) for count in (1, 4)
    }
    peaks = {key: _working_memory_of_reward_gradient(mixture) for key, mixture in mixtures.items()}
    growth = {checkpointing: (peaks[checkpointing, 4] - peaks[checkpointing, 1]) / 3 for checkpointing in (False, True)}
    # Measured: 1.12 MB a model without checkpointing, 0.19 MB with it (the model's share of the
    # inputs and its blocks' inputs); stacking under checkpointing would add about 1 MB a model.
    # The bound is the one benchmarks.rewards applies at real sizes.
    from benchmarks.rewards import BOUNDED_SHARE

    assert growth[False] > 0
    assert growth[True] < BOUNDED_SHARE * growth[False], growth
    assert not any(model.gradient_checkpointing for model in image_models), "a pass left its switch behind"
