"""A diffusers UNet3DConditionModel (ModelScope layout, guidance through time_cond_proj_dim) through
the same preprocessing, motion prior and training code as a VC2UNet, all via NoisePredictor:
the captured temporal q/k layout, batched motion priors equal to solo ones, preprocess with motion
priors, then 2 training steps and a diffusers save_pretrained student."""

import math

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset

from t2v_turbo.cache import TeacherCache
from t2v_turbo.models import OpenCLIPTextEncoder, VideoVAE
from t2v_turbo.models import adapter
from t2v_turbo.motion import compute_motion_prior, decoder_temporal_attention_names
from t2v_turbo.preprocess import PreprocessConfig, preprocess
from t2v_turbo.train import TrainConfig, train

diffusers = pytest.importorskip("diffusers")

NUM_FRAMES, SIZE = 4, (16, 16)  # latents (4, 4, 8, 8) through the tiny VAE
CONTEXT_DIM = 32  # the tiny OpenCLIP text tower's width
# A short inversion (n + 1 <= 3 teacher passes) keeps the motion path cheap.
MOTION_RANGE = (0, 3)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet3DConditionModel(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=CONTEXT_DIM,
        attention_head_dim=8,
        layers_per_block=1,
        norm_num_groups=8,
        time_cond_proj_dim=256,
    ).eval()


class Clips(Dataset):
    def __init__(self, count: int, motion=()):
        self.count, self.motion = count, set(motion)

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(2000 + index)
        return {
            "frames": torch.rand(3, NUM_FRAMES, *SIZE, generator=generator) * 2 - 1,
            "caption": f"a caption of clip {index}",
            "use_motion": index in self.motion,
        }


@pytest.fixture
def predictor_calls(monkeypatch):
    """Every NoisePredictor call as (kind, fps, guidance given, motion given)."""
    calls = []
    original = adapter.NoisePredictor.__call__

    def recording(self, x, t, context, fps=8, guidance=None, motion=None):
        calls.append((self.kind, fps, guidance is not None, motion is not None))
        return original(self, x, t, context, fps, guidance=guidance, motion=motion)

    monkeypatch.setattr(adapter.NoisePredictor, "__call__", recording)
    return calls


def test_any_latent_size_is_accepted_for_a_diffusers_unet():
    """UNet3DConditionModel upsamples to each skip connection's size, so unlike VC2UNet it takes
    latents of any height and width: generate and preprocess must not refuse them."""
    from t2v_turbo.models.adapter import NoisePredictor

    unet = tiny_unet()
    predictor = NoisePredictor(unet)
    assert predictor.latent_multiple == 1
    x = torch.randn(1, 4, 2, 5, 7)
    with torch.no_grad():
        eps = predictor(x, 10, torch.randn(1, 3, predictor.context_dim), guidance=torch.tensor([4.0]))
    assert eps.shape == x.shape


def test_guidance_reaches_a_diffusers_unet_as_its_timestep_cond():
    """NoisePredictor passes the guidance scale w to a UNet3DConditionModel as timestep_cond, the
    LCM sinusoid at its time_cond_proj_dim: eps is the model's own call with that embedding and
    differs from the teacher call (guidance=None), which a dropped embedding would equal."""
    from t2v_turbo.models.adapter import NoisePredictor
    from t2v_turbo.models.vc2_unet import sinusoid_b

    unet = tiny_unet()
    predictor = NoisePredictor(unet)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 2, 8, 8, generator=generator)
    context = torch.randn(2, 3, CONTEXT_DIM, generator=generator)
    w = torch.tensor([4.0, 7.5])
    with torch.no_grad():
        guided = predictor(x, 10, context, guidance=w)
        teacher = predictor(x, 10, context)
        want = unet(x, torch.tensor([10, 10]), encoder_hidden_states=context, timestep_cond=sinusoid_b(w, 256)).sample
    torch.testing.assert_close(guided, want, rtol=0, atol=0)
    assert (guided - teacher).abs().max() > 1e-4


def test_temporal_attention_capture_is_in_the_sequences_layout():
    # diffusers' TransformerTemporalModel turns (B·F, C, H, W) into (B·H·W, F, C) before its
    # blocks, so attn1's to_q / to_k outputs are (B·H·W, F, heads·d), batch-major.
    import turbo_kernels

    unet = tiny_unet()
    names = decoder_temporal_attention_names(unet)
    modules = {name: unet.get_submodule(name) for name in names}
    x = torch.randn(2, 4, NUM_FRAMES, 8, 8)
    context = torch.randn(2, 5, CONTEXT_DIM)
    perturbed = x.clone()
    perturbed[1] += 1.0
    with torch.no_grad():
        with turbo_kernels.capture_attention_inputs(modules) as first:
            adapter.NoisePredictor(unet)(x, 9, context)
        with turbo_kernels.capture_attention_inputs(modules) as second:
            adapter.NoisePredictor(unet)(perturbed, 9, context)
    for name in names:
        q, k = first[name]
        assert q.shape == k.shape == (2 * 8 * 8, NUM_FRAMES, 32), name
        # Only clip 1's sequences (rows 64..127) see clip 1's change.
        assert torch.equal(second[name][0][:64], q[:64])
        assert not torch.allclose(second[name][0][64:], q[64:])


def test_batched_motion_prior_equals_solo_priors(predictor_calls):
    unet = tiny_unet()
    generator = torch.Generator().manual_seed(1)
    z0 = torch.randn(2, 4, NUM_FRAMES, 8, 8, generator=generator)
    noise = torch.randn(z0.shape, generator=generator)
    context = torch.randn(2, 5, CONTEXT_DIM, generator=generator)
    grid_index = torch.tensor([2, 1])
    batched = compute_motion_prior(unet, z0, grid_index, noise, context)
    assert predictor_calls and all(kind == "diffusers" and not g and not m for kind, _, g, m in predictor_calls)
    for b in range(2):
        solo = compute_motion_prior(unet, z0[b:b + 1], grid_index[b:b + 1], noise[b:b + 1], context[b:b + 1])
        # Batching changes the rounding of the UNet's matmuls only (float32).
        assert float(solo["energy"][0]) > 0
        assert torch.allclose(batched["energy"][b], solo["energy"][0], rtol=1e-4)
        scale = solo["score"].abs().max()
        assert float((batched["score"][b] - solo["score"][0]).abs().max()) < 1e-4 * float(scale)


def test_preprocess_with_motion_then_train_two_steps_in_full_and_with_lora(tmp_path, predictor_calls):
    unet = tiny_unet()
    teacher_dir = tmp_path / "teacher"
    unet.save_pretrained(teacher_dir)
    cache = tmp_path / "cache"
    preprocess(
        PreprocessConfig(
            cache=str(cache), preset="tiny", num_frames=NUM_FRAMES, size=SIZE, batch_size=2, shard_size=4,
            dtype="float32", seed=3, motion_grid_range=MOTION_RANGE, fps=6, progress=False, cpu=True,
        ),
        Clips(4, motion={1}),
        (unet, VideoVAE.preset("tiny"), OpenCLIPTextEncoder("tiny")),
    )
    stored = TeacherCache(cache)
    assert len(stored) == 4 and int(sum(stored[i]["use_motion"] for i in range(4))) == 1
    motion_sample = next(stored[i] for i in range(4) if stored[i]["use_motion"])
    assert float(motion_sample["score"].abs().max()) > 0
    assert {(kind, fps) for kind, fps, _, _ in predictor_calls} == {("diffusers", 6)}

    predictor_calls.clear()
    common = dict(
        teacher=str(teacher_dir), cache=str(cache), output_dir=str(tmp_path / "run"), max_steps=2, batch_size=2,
        checkpoint_every=0, kernels="off", progress=False, use_8bit_adam=False,
    )
    with pytest.raises(ValueError, match="no motion conditioning: set motion_strength=0"):
        train(TrainConfig(**common))
    result = train(TrainConfig(**common, motion_strength=0.0))
    assert result.steps == 2 and all(math.isfinite(loss) and loss > 0 for loss in result.losses)
    # Student and target calls, with guidance, at the cache's fps.
    assert len(predictor_calls) == 4
    assert all(call == ("diffusers", 6, True, True) for call in predictor_calls)
    student = diffusers.UNet3DConditionModel.from_pretrained(result.student_dir)
    teacher = diffusers.UNet3DConditionModel.from_pretrained(teacher_dir)
    moved = [k for k, v in student.state_dict().items() if not torch.equal(v, teacher.state_dict()[k])]
    assert len(moved) > len(teacher.state_dict()) // 2

    # LoRA: adapters on the attention projections, and the guidance projection (absent from a real
    # teacher) trained in full, saved with the adapter and moved in the merged student.
    lora = train(TrainConfig(**{**common, "output_dir": str(tmp_path / "lora"), "checkpoint_every": 2},
                             motion_strength=0.0, lora_rank=4, lr=1e-3, ema_decay=None))
    adapter = load_file(str(tmp_path / "lora" / "checkpoint-000002" / "adapter.safetensors"))
    assert any("lora_A" in key for key in adapter) and any("time_embedding.cond_proj" in key for key in adapter)
    student = diffusers.UNet3DConditionModel.from_pretrained(lora.student_dir)
    moved = {k for k, v in student.state_dict().items() if not torch.equal(v, teacher.state_dict()[k])}
    assert "time_embedding.cond_proj.weight" in moved and any("to_q" in k for k in moved)
